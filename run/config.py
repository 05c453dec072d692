"""Resolving settings.py, command-line plumbing shared by the scripts, devices, safe file writes.

Resolution order: the module-level names of settings.py, then `settings.presets[dataset]`, then
`-set NAME=VALUE` overrides. Derived names (train_dir, test_dir, train_push_dir, push_epochs) are
filled in last, so an override of data_path or num_train_epochs carries through. Every value is
checked first against its rule in settings_rules.py (also for the settings stored in checkpoints).
"""
import argparse
import ast
import importlib.util
import json
import os
import sys
import tempfile
import traceback
import types

from run.errors import FULL_DISK, UserError, one_line, run_cli  # noqa: F401  (config.UserError: the name most callers use)
from run.settings_rules import FOLDER_TEXT, RULES, _int, _number, plain_folder_name


# ---- settings ----------------------------------------------------------------------------------

TABLES = ('presets', 'variants')  # settings.py's tables of values, not settings themselves


def settings_error(err, path):
    """The one line of a settings file that fails to run: its file, line and column, and why."""
    if isinstance(err, SyntaxError):
        where = '%s, line %s' % (err.filename or path, err.lineno)
        where += ', column %s' % err.offset if err.offset else ''
        return '%s: %s: %s' % (where, type(err).__name__, err.msg)
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if os.path.abspath(f.filename) == os.path.abspath(path)]
    where = path
    if frames:
        where = '%s, line %s' % (frames[-1].filename, frames[-1].lineno)
        colno = getattr(frames[-1], 'colno', None)  # Python 3.11+
        where += ', column %d' % (colno + 1) if colno is not None else ''
    return '%s: %s: %s' % (where, type(err).__name__, one_line(str(err)) or 'failed')


def load_settings(path=None):
    """settings.py as a module: the one on the import path (imported once, as before; tests
    monkeypatch it), or the file `path`, run afresh. A file that fails to run (a syntax error, an
    unknown name, any exception) is one UserError line naming its file, line and column."""
    if path is None:
        try:
            import settings
        except Exception as err:  # noqa: BLE001  (whatever the edited file raises)
            spec = importlib.util.find_spec('settings')  # the file that failed (a failed import is not kept)
            raise UserError(settings_error(err, spec.origin if spec and spec.origin else 'settings.py')) from None
        return settings
    spec = importlib.util.spec_from_file_location('settings_from_file', path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001
        raise UserError(settings_error(err, path)) from None
    return module


def default_settings(module=None):
    """The plain-data names of settings.py (everything public that is not a module, a function or
    one of the TABLES); `module`: another settings module (load_settings(path))."""
    return {name: value for name, value in vars(module or load_settings()).items()
            if not name.startswith('_') and name not in TABLES
            and not isinstance(value, (types.ModuleType, types.FunctionType))}


def parse_override(item, known):
    """'name=value' -> (name, value). The value is a Python literal; for names whose current value
    is a string (or None where a string is usual, such as paths), a bare word is taken as a string."""
    if '=' not in item:
        raise UserError("-set expects NAME=VALUE, got %r" % item)
    name, text = item.split('=', 1)
    name = name.strip()
    if name not in known:
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
    settings_module = load_settings()
    base = default_settings(settings_module)
    presets, variants = settings_module.presets, settings_module.variants
    dataset = dataset or base['dataset']
    if dataset not in presets:
        raise UserError('unknown dataset %r (presets: %s)' % (dataset, ', '.join(sorted(presets))))
    resolved = dict(base)
    resolved['dataset'] = dataset
    for name, value in presets[dataset].items():
        if name not in base:
            raise UserError('settings.presets[%r] sets unknown name %r' % (dataset, name))
        resolved[name] = value
    given = parse_overrides(overrides, resolved)
    # the method variant's values go between the dataset's and the command line's
    variant = given.get('lvw_variant', resolved['lvw_variant'])
    if variant not in variants:
        raise UserError('setting lvw_variant must be one of %s, got %r' % (', '.join(map(repr, variants)), variant))
    for name, value in variants[variant].items():
        if name not in base:
            raise UserError('settings.variants[%r] sets unknown name %r' % (variant, name))
        resolved[name] = value
    resolved.update(given)
    return finish_settings(resolved)


def finish_settings(s):
    """Check every value (settings_rules.RULES, then the checks across names) and fill the derived
    names; also applied to the settings stored in checkpoints."""
    for name, rule in RULES.items():
        if name in s:
            rule(name, s[name], s)
    s = dict(s)
    join = lambda root, sub: os.path.join(root, sub, '')
    s['train_dir'] = s['train_dir'] or join(s['data_path'], 'train')
    s['test_dir'] = s['test_dir'] or join(s['data_path'], 'test')
    s['train_push_dir'] = s['train_push_dir'] or s['train_dir']
    if s['push_epochs'] is None:
        s['push_epochs'] = [e for e in range(s['num_train_epochs']) if e % s['push_interval'] == 0]
    s['push_epochs'] = sorted(int(e) for e in s['push_epochs'])
    s['prototype_shape'] = tuple(int(v) for v in s['prototype_shape'])
    if s['prototype_shape'][0] < s['num_classes']:
        raise UserError('setting prototype_shape must have at least one word per class (num_classes is %d), got %r'
                        % (s['num_classes'], s['prototype_shape']))
    if s['topk'] > s['prototype_shape'][0]:
        raise UserError('setting topk must be between 1 and the number of words (%d), got %r'
                        % (s['prototype_shape'][0], s['topk']))
    return s


# ---- command-line flags: the settings' ranges as argparse types --------------------------------

def flag_type(rule, parse=int):
    """An argparse `type=` that reads the flag's text with `parse` (int or float) and refuses, as
    argparse's one usage error (exit status 2), a value the settings rule `rule` refuses."""
    def convert(text):
        try:
            value = parse(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not rule.ok(value):
            raise argparse.ArgumentTypeError('must be %s, got %r' % (rule.expected, text))
        return value
    convert.__name__ = rule.expected  # what argparse shows should it name the type
    return convert


positive_int = flag_type(_int(1))                  # sizes, counts, batch sizes
nonnegative_int = flag_type(_int(0))               # seeds of the data generators, counts where 0 means none
nonnegative_number = flag_type(_number(0), float)  # tolerances in pixels


def int_in(lo, hi):
    """An argparse type: a whole number in [lo, hi]."""
    return flag_type(_int(lo, hi))


def add_settings_args(parser):
    parser.add_argument('-dataset', default=None,
                        help="settings preset (default: settings.dataset); e.g. pets, toy")
    parser.add_argument('-set', nargs='+', default=[], metavar='NAME=VALUE',
                        help='override settings for this run, Python literal values')


def add_device_args(parser):
    parser.add_argument('-device', default='auto', choices=('auto', 'cpu', 'cuda'),
                        help='auto: cuda when available, else cpu')
    parser.add_argument('-gpuid', default='0',
                        help='CUDA device index (several GPUs: torchrun --nproc_per_node N main.py ...)')


def installed_package_file(package, relative):
    """The path of `relative` inside the installed `package` (not imported), or None."""
    import importlib.util
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    folders = list(spec.submodule_search_locations or []) if spec else []
    return os.path.join(folders[0], relative) if folders else None


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


# ---- files --------------------------------------------------------------------------------------

TMP_SUFFIX = '.tmp'




def write_failure(err, path):
    """A UserError naming `path` when `err`, or an error it was raised from, is a full disk, a
    file-size limit or a quota (torch.save re-raises the OSError of its write as a RuntimeError
    of its own); None for any other error."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in FULL_DISK:
            return UserError('cannot write %s: %s; free some space (or raise the limit) and run the command again '
                             '(a training run continues with -resume)' % (path, os.strerror(err.errno).lower()))
        err = err.__cause__ or err.__context__
    return None


def atomic_write(path, write_fn, mode='w'):
    """Write via `write_fn(file)` to a temporary file beside `path`, then rename over it: an
    earlier `path` stays whole until the new one is. A full disk (or a file-size limit) is one
    UserError naming `path`, the temporary file removed."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix=TMP_SUFFIX, dir=folder)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, mode) as f:
            write_fn(f)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        failure = write_failure(err, path)
        if failure is not None:
            raise failure from None
        raise


def to_jsonable(value):
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def save_json(obj, path):
    atomic_write(path, lambda f: json.dump(to_jsonable(obj), f, indent=1, sort_keys=True))


NUMBER = (int, float)
MAYBE_NUMBER, MAYBE_TEXT = (int, float, type(None)), (str, type(None))


def json_shape(expected, fields=None, values=None):
    """What a JSON file must hold: an object (`expected` says what, in words) whose keys in
    `fields` have values of those types, and, with `values`, every value of those types."""
    return {'expected': expected, 'fields': fields or {}, 'values': values}


# the files the scripts read back, by name: read_json checks each against its shape
JSON_SHAPES = {
    'steps.json': json_shape("benchmark.py's object of finished steps and their seconds", values=NUMBER),
    'run_summary.json': json_shape("a finished run's summary object", {
        'final_checkpoint': MAYBE_TEXT, 'best_checkpoint': MAYBE_TEXT, 'final_accuracy': MAYBE_NUMBER,
        'best_accuracy': MAYBE_NUMBER, 'train_seconds': MAYBE_NUMBER, 'phase_seconds': (dict,)}),
    'settings.json': json_shape("a run's settings record (an object with its 'settings' object)",
                                {'settings': (dict,)}),
    'metrics.json': json_shape("eval_metrics.py's result (an object with its 'sources' object)",
                               {'sources': (dict,)}),
}
OBJECT = json_shape('a JSON object')


def _json_kind(value):
    """What a JSON value is, in words."""
    for kinds, word in ((bool, 'true or false'), (dict, 'an object'), (list, 'a list'), (str, 'a string'),
                        (NUMBER, 'a number'), (type(None), 'null')):
        if isinstance(value, kinds):
            return word
    return type(value).__name__


def of_types(value, kinds):
    """isinstance, except that true and false are not numbers."""
    return isinstance(value, kinds) and (not isinstance(value, bool) or bool in kinds)


def shape_problem(data, shape):
    """What in `data` does not fit `shape` (json_shape), in words; None when it fits."""
    if not isinstance(data, dict):
        return 'it holds %s' % _json_kind(data)
    for key, value in data.items():
        kinds = shape['fields'].get(key, shape['values'])
        if kinds is not None and not of_types(value, kinds):
            return '%r is %s' % (key, _json_kind(value))
    return None


def read_json(path, required=True, shape=None):
    """The JSON object in `path`; a missing file is None unless `required`, an unreadable one
    (empty, truncated, not JSON) or one of the wrong shape one UserError line naming it. `shape`
    (json_shape) defaults to the file name's in JSON_SHAPES, else any JSON object."""
    if not required and not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError('cannot read %s: %s' % (path, str(err).splitlines()[0] if str(err) else 'empty')) from None
    shape = shape or JSON_SHAPES.get(os.path.basename(path), OBJECT)
    problem = shape_problem(data, shape)
    if problem:
        raise UserError('cannot use %s: expected %s, but %s' % (path, shape['expected'], problem))
    return data


def remove_stale_tmp(folder, log=None):
    """Delete the hidden temporary files (.<name>.<random>.tmp) that a write killed midway left
    in `folder`; returns their names."""
    if not os.path.isdir(folder):
        return []
    stale = sorted(f for f in os.listdir(folder) if f.startswith('.') and f.endswith(TMP_SUFFIX))
    for name in stale:
        try:
            os.remove(os.path.join(folder, name))
        except OSError:
            pass
    if stale and log:
        log('removed %d temporary file(s) left by an interrupted write in %s' % (len(stale), folder))
    return stale


def check_output_file(path, flag='-out'):
    """Refuse, before any work, an output file path that names a folder (an existing one, or a
    path ending in '/') or lies under a file; its folder is then made if missing and must be
    writable (check_output_folder)."""
    if path.endswith(('/', os.sep)) or os.path.isdir(path):
        raise UserError('%s %s is a folder, not a file' % (flag, path))
    check_output_folder(os.path.dirname(path) or '.', flag, path)


def _existing_ancestor(path):
    """`path` itself, or the nearest folder above it that exists."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def check_output_folder(folder, flag='-out', given=None):
    """Refuse, before any work, an output folder that is a file or lies under one (the message
    names `flag` and `given`, the path as the user gave it); then check_writable (which makes it)."""
    above = _existing_ancestor(folder)
    if not os.path.isdir(above):
        raise UserError('%s %s: %s is a file, not a folder' % (flag, given or folder, above))
    check_writable(folder)


def check_writable(folder):
    """Refuse, before any work, an output folder that cannot be made or written to. The folder is
    created if missing; nothing else is left behind."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix='.write-check.', suffix=TMP_SUFFIX, dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise UserError('cannot write to the output folder %s (%s)' % (folder, err.strerror or err)) from None


def move_aside(path, log=print, lock=None):
    """Rename `path` (a run folder or a file) to <path>.replaced-<YYYYmmdd-HHMMSS>[-n] beside it,
    never deleting anything; returns the new path. A run folder holding a lock file is moved only
    by the holder of that lock (`lock`, a run_state.RunLock), which then locks the new, empty
    folder in its place."""
    import time
    if os.path.isdir(path) and os.path.exists(os.path.join(path, LOCK_NAME)) and lock is None:
        raise UserError('%s is in use by a run (it holds %s); it is not moved aside' % (path, LOCK_NAME))
    stem, ext = (path.rstrip(os.sep), '') if os.path.isdir(path) else os.path.splitext(path)
    stamp = time.strftime('%Y%m%d-%H%M%S')
    target, n = '%s.replaced-%s%s' % (stem, stamp, ext), 1
    while os.path.exists(target):
        n += 1
        target = '%s.replaced-%s-%d%s' % (stem, stamp, n, ext)
    os.replace(path, target)
    log('-overwrite: moved the earlier %s to %s' % (path, target))
    if lock is not None:
        lock.moved_to(target)
    return target


LAST_STATE = 'last.pth'
LOCK_NAME = '.lock'  # a run folder's lock (run_state.RunLock): the process that has the folder open
# the key of settings.json that says its run writes last.pth after every pass (so that a run holding
# checkpoints but no last.pth never wrote its first state, rather than predating -resume)
RESUMABLE = 'resume_state'


def holds_run(folder):
    """True when `folder` holds something of a run worth keeping: a checkpoint (any .pth, last.pth
    included) or a finished run's summary. Logs alone, from a start that failed before its first
    pass, do not count."""
    return os.path.isdir(folder) and any(f.endswith('.pth') or f == 'run_summary.json' for f in os.listdir(folder))


def check_run_name(name, setting):
    """Refuse a run folder name that settings_rules.plain_folder_name refuses, as its rule would."""
    if not plain_folder_name(name):
        raise UserError('setting %s must be %s, got %r' % (setting, FOLDER_TEXT, name))
    return name


def run_dir_action(folder, overwrite, resume, name_setting):
    """What to do with the run folder, decided before any input is read (nothing is written):
    'new' (empty or missing), 'replace' (-overwrite: move the old run aside), 'resume' (-resume
    and a last.pth), 'finished' (-resume of a run that has finished), 'restart' (-resume of a run
    of this version whose first last.pth was never written, e.g. for a full disk: it starts again
    from its beginning in its folder).

    -resume with no last.pth and no checkpoints starts the run, so the same command serves the
    first try and every retry; a folder holding a run is never touched without -overwrite/-resume.
    """
    check_run_name(os.path.basename(folder.rstrip(os.sep)), name_setting)
    if overwrite and resume:
        raise UserError('-overwrite and -resume exclude each other')
    has_state = os.path.isfile(os.path.join(folder, LAST_STATE))
    if resume and has_state:
        return 'resume'
    if not holds_run(folder):
        return 'new'
    if resume:
        if os.path.isfile(os.path.join(folder, 'run_summary.json')):
            return 'finished'
        record = read_json(os.path.join(folder, 'settings.json'), required=False)
        if record is not None and record.get(RESUMABLE) == LAST_STATE:
            return 'restart'
        raise UserError('%s holds checkpoints but no %s to resume from (a run from before -resume existed); '
                        'pass -overwrite to move it aside and start again' % (folder, LAST_STATE))
    if not overwrite:
        raise UserError('%s already holds a run; pass -resume to continue it, -overwrite to move it aside, '
                        'or choose another %s (-set %s=NAME)' % (folder, name_setting, name_setting))
    return 'replace'


def prepare_run_dir(folder, action, log=print, lock=None):
    """Act on `run_dir_action`'s decision once every input has been checked: move an old run aside
    ('replace'; `lock`, the folder's run_state.RunLock, then follows to the new folder), make sure
    the folder is writable, and remove what a killed write left behind."""
    if action == 'replace':
        move_aside(folder, log, lock=lock)
    check_writable(folder)
    remove_stale_tmp(folder, log)


def run_dir(s):
    """saved_models/<base_architecture>/<experiment_run>, the name checked to be one plain folder."""
    return os.path.join('saved_models', s['base_architecture'], check_run_name(s['experiment_run'], 'experiment_run'))


def versions():
    """Library versions recorded in checkpoints and settings.json."""
    import numpy
    import torch
    import torchvision
    return {'python': sys.version.split()[0], 'torch': str(torch.__version__),
            'torchvision': str(torchvision.__version__), 'numpy': str(numpy.__version__)}
