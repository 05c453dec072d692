"""What makes a training run resumable (-resume): the run's logs, its random state and last.pth.

A run is a fixed list of passes (main.py: each warm/joint epoch, each push, each last-layer pass;
train_peer.py and finetune_backbone.py: each epoch). After every pass, `save_state` writes
<run>/last.pth atomically:
    done         the number of passes finished
    modules      state_dicts of the model, every optimizer and scheduler (by name)
    rng          python, numpy, torch CPU and CUDA generator states
    keeper       the CheckpointKeeper's files and best accuracy, and the latest checkpoint
    log_sizes    bytes of train.log and metrics.csv at that moment
    elapsed      training seconds so far
A resumed run rebuilds everything from the same settings (which consumes the generators), then
`restore_state` puts the state back, so the passes that follow draw the same random numbers, see
the same batches and end in the same weights as an uninterrupted run (exactly, on CPU). The logs
are cut back to their sizes at the boundary: a pass lost to the interruption leaves no row.
"""
import os
import random

import numpy as np
import torch

from run import config


class RunLog:
    """Prints and appends to <run>/train.log; one CSV row per pass in <run>/metrics.csv.
    resume=True keeps both files (cut back later by `truncate`)."""

    def __init__(self, folder, fields, resume=False):
        self.log_path = os.path.join(folder, 'train.log')
        self.csv_path = os.path.join(folder, 'metrics.csv')
        self.fields = tuple(fields)
        if not resume or not os.path.isfile(self.csv_path):
            with open(self.csv_path, 'w') as f:
                f.write(','.join(self.fields) + '\n')
            if not resume:
                open(self.log_path, 'w').close()

    def __call__(self, message):
        print(message, flush=True)
        with open(self.log_path, 'a') as f:
            f.write(message + '\n')

    def row(self, **values):
        with open(self.csv_path, 'a') as f:
            f.write(','.join('' if values.get(k) is None else str(values.get(k)) for k in self.fields) + '\n')

    def sizes(self):
        return {os.path.basename(path): os.path.getsize(path) if os.path.isfile(path) else 0
                for path in (self.log_path, self.csv_path)}

    def truncate(self, sizes):
        """Cut train.log and metrics.csv back to the byte sizes recorded at the last boundary."""
        folder = os.path.dirname(self.log_path)
        for name, size in sizes.items():
            path = os.path.join(folder, name)
            if os.path.isfile(path) and os.path.getsize(path) > size:
                with open(path, 'r+b') as f:
                    f.truncate(size)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """Every generator a run draws from, in types torch.load(weights_only=True) reads back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'python': random.getstate(), 'torch': torch.get_rng_state(),
             'numpy': {'kind': kind, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                       'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(_tuples(state['python']))
    n = state['numpy']
    np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


def _tuples(value):
    """random.setstate wants the nested tuples that a save may have turned into lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def state_path(folder):
    return os.path.join(folder, config.LAST_STATE)


def save_state(path, done, modules, keeper=None, log=None, elapsed=0.0, **extra):
    """Write last.pth atomically: `done` passes finished, the state_dicts of `modules` (a dict of
    name -> model / optimizer / scheduler), the generators, the keeper and the logs' sizes."""
    payload = {'done': int(done), 'elapsed': float(elapsed), 'rng': rng_state(),
               'modules': {name: _cpu(m.state_dict()) for name, m in modules.items()},
               'keeper': keeper.state() if keeper is not None else None,
               'log_sizes': log.sizes() if log is not None and hasattr(log, 'sizes') else None, **extra}
    config.atomic_write(path, lambda f: torch.save(payload, f), mode='wb')


def _cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


def load_state(path):
    """last.pth as a dict; a file that cannot be read is a one-line error naming it."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # truncated by a full disk, or not a state file at all
        raise config.UserError('cannot read the resume state %s: %s; pass -overwrite to start the run again '
                               '(the old run is moved aside)' % (path, str(err).splitlines()[0])) from None
    if not isinstance(state, dict) or 'done' not in state or 'modules' not in state:
        raise config.UserError('%s is not a resume state of this project' % path)
    return state


def restore_state(state, modules, keeper=None):
    """Put back what `save_state` wrote (call it after everything is built); returns `done`."""
    for name, module in modules.items():
        if name not in state['modules']:
            raise config.UserError('the resume state has no %r; it was written by another kind of run' % name)
        module.load_state_dict(state['modules'][name])
    if keeper is not None and state.get('keeper') is not None:
        keeper.load_state(state['keeper'])
    set_rng_state(state['rng'])
    return state['done']


def check_same_run(saved, current, folder, ignore=('num_workers', 'image_check')):
    """-resume continues a run only with the settings it started with (except `ignore`): one line
    naming the first few that differ. Names added to settings.py since the run started count as
    their defaults there."""
    defaults = {n: v for n, v in config.default_settings().items() if n not in saved}
    saved, current = config.to_jsonable({**defaults, **saved}), config.to_jsonable(current)
    names = sorted(n for n in set(saved) | set(current) if n not in ignore and saved.get(n) != current.get(n))
    if names:
        shown = ', '.join('%s: %r -> %r' % (n, saved.get(n), current.get(n)) for n in names[:4])
        raise config.UserError('-resume: the settings differ from %s/settings.json (%s%s); resume with the '
                               'command that started the run' % (folder, shown, ', ...' if len(names) > 4 else ''))


# ---- starting, resuming or replacing a run: the same steps for main.py and train_peer.py ----------

def start_action(folder, overwrite, resume, name_setting, record):
    """Decide what to do with the run folder before reading any input (see
    config.run_dir_action); for 'resume', the command must match the run's settings.json."""
    action = config.run_dir_action(folder, overwrite, resume, name_setting)
    if action == 'resume':
        saved = config.read_json(os.path.join(folder, 'settings.json'))
        check_same_run(saved.get('settings', {}), record['settings'], folder)
        for key, value in record.items():
            if key != 'settings' and config.to_jsonable(saved.get(key)) != config.to_jsonable(value):
                raise config.UserError('-resume: %s was %r when the run started, now %r; resume with the command '
                                       'that started the run' % (key, saved.get(key), value))
    config.check_writable(os.path.dirname(os.path.abspath(folder)))
    return action


CACHE_FILE = 'last_layer_cache.pth'


def save_cache(folder, epoch, cache):
    """The last-layer cache built after the push of `epoch`, for a resume inside its passes."""
    payload = {'epoch': int(epoch), 'cache': _cpu(cache)}
    config.atomic_write(os.path.join(folder, CACHE_FILE), lambda f: torch.save(payload, f), mode='wb')


def load_cache(folder, epoch, device):
    """The cache `save_cache` wrote for `epoch`, on `device`; None if there is none for that epoch
    or it cannot be read (it is then built again)."""
    try:
        payload = torch.load(os.path.join(folder, CACHE_FILE), map_location=device, weights_only=True)
    except Exception:
        return None
    return payload['cache'] if isinstance(payload, dict) and payload.get('epoch') == epoch else None


def finish_run(folder, summary):
    """Write run_summary.json, which marks the run finished, then drop last.pth (and the
    last-layer cache), no longer needed."""
    config.save_json(summary, os.path.join(folder, 'run_summary.json'))
    for path in (state_path(folder), os.path.join(folder, CACHE_FILE)):
        if os.path.isfile(path):
            os.remove(path)


def finished_summary(folder, log=print):
    summary = config.read_json(os.path.join(folder, 'run_summary.json'))
    log('-resume: the run in %s has finished (run_summary.json); nothing to do' % folder)
    return summary


class EarlyLog:
    """The log before the run folder may be written: printed now, copied into train.log later."""

    def __init__(self, quiet=False):
        self.lines, self.quiet = [], quiet

    def __call__(self, message):
        if not self.quiet:  # quiet: a torchrun rank other than 0
            print(message, flush=True)
            self.lines.append(message)


def open_run(folder, action, record, fields, early):
    """Once every input is checked: prepare the folder (moving an old run aside for 'replace'),
    write settings.json for a new run, open the logs (cut back to the last boundary on resume) and
    copy the early lines into train.log. Returns (log, resume state or None)."""
    config.prepare_run_dir(folder, action, log=early)
    state = None
    if action == 'resume':
        state = load_state(state_path(folder))
    else:
        config.save_json(record, os.path.join(folder, 'settings.json'))
    log = RunLog(folder, fields, resume=state is not None)
    if state is not None and state.get('log_sizes'):
        log.truncate(state['log_sizes'])
    with open(log.log_path, 'a') as f:
        f.writelines(line + '\n' for line in early.lines)
    return log, state
