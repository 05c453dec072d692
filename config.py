"""Resolving settings.py, command-line plumbing shared by the scripts, devices, safe file writes.

Resolution order: the module-level names of settings.py, then `settings.presets[dataset]`, then
`-set NAME=VALUE` overrides. Derived names (train_dir, test_dir, train_push_dir, push_epochs) are
filled in last, so an override of data_path or num_train_epochs carries through.
"""
import ast
import json
import os
import sys
import tempfile
import types

import settings as settings_module


class UserError(Exception):
    """A mistake in the user's input: reported as one line, without a traceback."""


def run_cli(main_fn, argv=None):
    """Call `main_fn(argv)`; a UserError becomes 'error: <message>' on stderr and exit status 2."""
    try:
        return main_fn(argv)
    except UserError as err:
        print('error: %s' % err, file=sys.stderr)
        sys.exit(2)


# ---- settings ----------------------------------------------------------------------------------

def default_settings():
    """The plain-data names of settings.py (everything public that is not a module or function)."""
    return {name: value for name, value in vars(settings_module).items()
            if not name.startswith('_') and not isinstance(value, (types.ModuleType, types.FunctionType))}


def parse_override(item, known):
    """'name=value' -> (name, value). The value is a Python literal; for names whose current value
    is a string (or None where a string is usual, such as paths), a bare word is taken as a string."""
    if '=' not in item:
        raise UserError("-set expects NAME=VALUE, got %r" % item)
    name, text = item.split('=', 1)
    name = name.strip()
    if name not in known or name == 'presets':
        raise UserError('-set: unknown settings name %r (see settings.py)' % name)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if isinstance(known[name], str) or (known[name] is None and name.endswith(('_dir', '_path', '_run'))):
            value = text
        else:
            raise UserError('-set %s: %r is not a Python literal' % (name, text)) from None
    return name, value


def _check_type(name, value, reference):
    if reference is None or value is None:
        return
    number = (int, float)
    if isinstance(reference, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) == isinstance(reference, bool)
    elif isinstance(reference, number):
        ok = isinstance(value, number)
    elif isinstance(reference, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    else:
        ok = isinstance(value, type(reference))
    if not ok:
        raise UserError('-set %s: expected a value like %r, got %r' % (name, reference, value))


def parse_overrides(items, current):
    """-set items -> {name: value}, each checked against settings.py's names and the type of its
    `current` value (or the default where that is None)."""
    base = default_settings()
    out = {}
    for item in items:
        name, value = parse_override(item, base)
        if name == 'dataset':
            raise UserError('use -dataset NAME to choose the dataset, not -set dataset=...')
        reference = current.get(name) if current.get(name) is not None else base[name]
        _check_type(name, value, reference)
        out[name] = value
    return out


def resolve_settings(dataset=None, overrides=()):
    """Resolved settings as a plain dict (JSON-friendly: tuples become lists only when saved)."""
    base = default_settings()
    presets = base.pop('presets')
    dataset = dataset or base['dataset']
    if dataset not in presets:
        raise UserError('unknown dataset %r (presets: %s)' % (dataset, ', '.join(sorted(presets))))
    resolved = dict(base)
    resolved['dataset'] = dataset
    for name, value in presets[dataset].items():
        if name not in base:
            raise UserError('settings.presets[%r] sets unknown name %r' % (dataset, name))
        resolved[name] = value
    resolved.update(parse_overrides(overrides, resolved))
    return finish_settings(resolved)


def finish_settings(s):
    """Fill the derived names and check the values that would otherwise fail deep inside a run."""
    s = dict(s)
    join = lambda root, sub: os.path.join(root, sub, '')
    s['train_dir'] = s['train_dir'] or join(s['data_path'], 'train')
    s['test_dir'] = s['test_dir'] or join(s['data_path'], 'test')
    s['train_push_dir'] = s['train_push_dir'] or s['train_dir']
    if s['push_epochs'] is None:
        s['push_epochs'] = [e for e in range(s['num_train_epochs']) if e % s['push_interval'] == 0]
    s['push_epochs'] = sorted(int(e) for e in s['push_epochs'])
    s['prototype_shape'] = tuple(int(v) for v in s['prototype_shape'])
    if len(s['prototype_shape']) != 4 or s['prototype_shape'][2:] != (1, 1):
        raise UserError('prototype_shape must be (P, D, 1, 1), got %r' % (s['prototype_shape'],))
    if s['prototype_shape'][0] < s['num_classes']:
        raise UserError('prototype_shape has %d words for %d classes; need at least one per class'
                        % (s['prototype_shape'][0], s['num_classes']))
    if not 1 <= s['topk'] <= s['prototype_shape'][0]:
        raise UserError('topk must be between 1 and the number of words (%d), got %r'
                        % (s['prototype_shape'][0], s['topk']))
    choices = {
        'prototype_activation_function': ('log', 'linear'),
        'add_on_layers_type': ('regular', 'bottleneck'),
        'attention_flip': ('joint', 'double'),
        'train_map_interpolation': ('bilinear', 'bicubic'),
        'eval_map_interpolation': ('bilinear', 'bicubic'),
        'train_map_normalisation': ('max', 'minmax'),
        'eval_map_normalisation': ('max', 'minmax'),
        'gradcam_target': ('pred', 'label'),
    }
    for name, allowed in choices.items():
        if s[name] not in allowed:
            raise UserError('%s must be one of %s, got %r' % (name, ', '.join(allowed), s[name]))
    if s['img_size'] < 32:
        raise UserError('img_size must be at least 32 pixels, got %r' % s['img_size'])
    return s


def add_settings_args(parser):
    parser.add_argument('-dataset', default=None,
                        help="settings preset (default: settings.dataset); e.g. pets, toy")
    parser.add_argument('-set', nargs='+', default=[], metavar='NAME=VALUE',
                        help='override settings for this run, Python literal values')


def add_device_args(parser):
    parser.add_argument('-device', default='auto', choices=('auto', 'cpu', 'cuda'),
                        help='auto: cuda when available, else cpu')
    parser.add_argument('-gpuid', default='0',
                        help='CUDA device index (or a comma list, which trains with DataParallel)')


def pick_device(name='auto', gpuid='0'):
    """torch.device for 'auto' | 'cpu' | 'cuda'; `gpuid` picks the CUDA device."""
    import torch
    if name == 'cpu' or (name == 'auto' and not torch.cuda.is_available()):
        return torch.device('cpu')
    if not torch.cuda.is_available():
        raise UserError('-device cuda was asked for, but CUDA is not available here')
    first = str(gpuid).split(',')[0].strip() or '0'
    if not first.isdigit() or int(first) >= torch.cuda.device_count():
        raise UserError('-gpuid %r: this machine has %d CUDA device(s)' % (gpuid, torch.cuda.device_count()))
    return torch.device('cuda', int(first))


def gpu_ids(device, gpuid):
    """The CUDA device indices to train on (more than one: DataParallel)."""
    if device.type != 'cuda':
        return []
    return [int(g) for g in str(gpuid).split(',') if g.strip()]


# ---- files --------------------------------------------------------------------------------------

def atomic_write(path, write_fn, mode='w'):
    """Write via `write_fn(file)` to a temporary file beside `path`, then rename over it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def to_jsonable(value):
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def save_json(obj, path):
    atomic_write(path, lambda f: json.dump(to_jsonable(obj), f, indent=1, sort_keys=True))


def prepare_run_dir(folder, overwrite, name_setting):
    """Make the run folder; one that already holds a run is replaced only with `overwrite`."""
    import shutil
    if os.path.isdir(folder) and any(f.endswith('.pth') or f == 'settings.json' for f in os.listdir(folder)):
        if not overwrite:
            raise UserError('%s already holds a run; choose another %s (-set %s=NAME) or pass -overwrite'
                            % (folder, name_setting, name_setting))
        shutil.rmtree(folder)
    os.makedirs(folder, exist_ok=True)


def run_dir(s):
    return os.path.join('saved_models', s['base_architecture'], s['experiment_run'])


def versions():
    """Library versions recorded in checkpoints and settings.json."""
    import numpy
    import torch
    import torchvision
    return {'python': sys.version.split()[0], 'torch': str(torch.__version__),
            'torchvision': str(torchvision.__version__), 'numpy': str(numpy.__version__)}
