"""The import layers of docs/ARCHITECTURE.md: a module imports only modules of its own layer or
below, and no chain of imports comes back to where it started. Read from the source (ast), so
imports inside functions count as well; nothing is imported."""
import ast
import fnmatch
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lowest first. A module's layer is the first whose patterns match its dotted name.
LAYERS = (
    ('settings', ('settings',)),
    ('run machinery', ('run', 'run.*')),
    ('data', ('data', 'data.*')),
    ('the card\'s library modules', ('model', 'receptive_field', 'train_and_test', 'push', 'finetune_backbone',
                                     'gradcam_extract')),
    ('metrics', ('metrics', 'metrics.*')),
    ('figures and peers', ('figures', 'figures.*', 'peers', 'peers.*')),
    ('command lines', ('main', 'eval_iou', 'train_peer', 'eval_metrics', 'local_analysis', 'visualize', 'explore')),
    ('pipelines', ('demo', 'benchmark', 'bench')),
    ('probes and tests', ('results.probes.*', 'tests', 'tests.*')),
)
PACKAGES = ('run', 'data', 'metrics', 'figures', 'peers', 'tests', 'results/probes')


def first_party_files(root=ROOT):
    """{dotted module name: path} of the top-level .py files and of every .py file of PACKAGES."""
    found = {}
    for name in os.listdir(root):
        if name.endswith('.py'):
            found[name[:-3]] = os.path.join(root, name)
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(root, package)):
            for name in files:
                if name.endswith('.py'):
                    rel = os.path.relpath(os.path.join(folder, name), root)[:-3].replace(os.sep, '.')
                    found[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = os.path.join(folder, name)
    return found


def imported_modules(path, module, known):
    """The first-party modules that the source of `module` imports, anywhere in the file.
    `from P import N` counts as an import of P.N when that is a module, else of P."""
    tree = ast.parse(open(path, encoding='utf-8').read(), path)
    package = module if os.path.basename(path) == '__init__.py' else module.rpartition('.')[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parent = package.split('.')[:len(package.split('.')) - node.level + 1] if package else []
                base = '.'.join(parent + ([base] if base else []))
            names = ['%s.%s' % (base, alias.name) if '%s.%s' % (base, alias.name) in known else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # import a.b.c of a module a.b
                name = name.rpartition('.')[0]
            if name and name != module:
                out.add(name)
    return out


def import_graph(root=ROOT):
    known = first_party_files(root)
    return {m: imported_modules(p, m, known) for m, p in known.items()}


def layer_of(module, layers=LAYERS):
    for i, (_, patterns) in enumerate(layers):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    return None


def upward_imports(graph, layers=LAYERS):
    """'a (layer) imports b (higher layer)' for every import that goes up."""
    return sorted('%s (%s) imports %s (%s)' % (m, layers[layer_of(m, layers)][0], d, layers[layer_of(d, layers)][0])
                  for m, deps in graph.items() for d in deps if layer_of(d, layers) > layer_of(m, layers))


def import_cycles(graph):
    """One cycle [a, b, ..., a] for each back edge found by a depth-first search (empty: none)."""
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = 'open'
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 'open':
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 'done'

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


@pytest.fixture(scope='module')
def graph():
    return import_graph()


def test_every_module_has_a_layer(graph):
    assert [m for m in graph if layer_of(m) is None] == []


def test_no_module_imports_one_above_it(graph):
    assert upward_imports(graph) == []


def test_no_import_cycles(graph):
    assert import_cycles(graph) == []


def test_the_graph_sees_the_imports_it_should(graph):
    # known edges, one per import form: `from run.checkpoint import`, `from run import config`,
    # `import main as lvw_main`, an import inside a function (metrics.scoring.word_grid)
    assert {'run.checkpoint', 'run.config'} <= graph['model']
    assert 'main' in graph['bench']
    assert {'model', 'receptive_field'} <= graph['metrics.scoring']
    assert 'run.errors' in graph['run.settings_rules'] and 'run.config' not in graph['run.settings_rules']
    assert 'model' not in graph['run.checkpoint']


def test_the_checks_report_what_is_wrong():
    layers = (('low', ('a',)), ('high', ('b', 'c')))
    assert upward_imports({'a': {'b'}, 'b': set(), 'c': {'a'}}, layers) == ['a (low) imports b (high)']
    assert import_cycles({'a': set(), 'b': {'c'}, 'c': {'b'}}) == [['b', 'c', 'b']]
    assert import_cycles({'a': {'b'}, 'b': {'c'}, 'c': set()}) == []


def test_the_top_level_is_the_card_and_the_command_lines():
    top = sorted(name[:-3] for name in os.listdir(ROOT) if name.endswith('.py'))
    card = ['eval_iou', 'finetune_backbone', 'gradcam_extract', 'main', 'model', 'push', 'receptive_field',
            'settings', 'train_and_test']
    clis = ['bench', 'benchmark', 'demo', 'eval_metrics', 'explore', 'local_analysis', 'train_peer', 'visualize']
    assert top == sorted(card + clis)
