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

A run folder is open in one process at a time: `lock_run_folder` takes <run>/.lock (RunLock)
before anything is decided, and a lock whose process died on this host is taken over.
"""
import json
import os
import random
import secrets
import signal
import socket
import sys
import threading
import time

import numpy as np
import torch

from run import config, distributed
from run.checkpoint import safe_load, unreadable_reason


def append(path, text, mode='a'):
    """Write `text` to `path` (appended by default); a full disk is one UserError naming it."""
    try:
        with open(path, mode) as f:
            f.write(text)
    except OSError as err:
        failure = config.write_failure(err, path)
        if failure is None:
            raise
        raise failure from None


class RunLog:
    """Prints and appends to <run>/train.log; one CSV row per pass in <run>/metrics.csv.
    resume=True keeps both files (cut back later by `truncate`)."""

    def __init__(self, folder, fields, resume=False):
        self.log_path = os.path.join(folder, 'train.log')
        self.csv_path = os.path.join(folder, 'metrics.csv')
        self.fields = tuple(fields)
        if not resume or not os.path.isfile(self.csv_path):
            append(self.csv_path, ','.join(self.fields) + '\n', mode='w')
            if not resume:
                append(self.log_path, '', mode='w')

    def __call__(self, message):
        print(message, flush=True)
        append(self.log_path, message + '\n')

    def row(self, **values):
        append(self.csv_path, ','.join('' if values.get(k) is None else str(values.get(k)) for k in self.fields) + '\n')

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


RESTART = 'pass -overwrite to move the run aside (its checkpoints kept there) and start it again'


def load_state(path, remedy=RESTART):
    """last.pth as a dict; a file that cannot be read is a one-line error naming it, saying what
    it is (truncated, not a PyTorch file, ...) and `remedy`, what to do."""
    try:
        state = safe_load(path)
    except Exception as err:  # noqa: BLE001 - truncated, damaged, or not a state file at all
        # 'copy or save it again' is advice for a file a user copied, not for a state a run wrote
        reason = unreadable_reason(path, err).replace('; copy or save it again', '')
        raise config.UserError('cannot resume from %s: %s; %s' % (path, reason, remedy)) from None
    if not isinstance(state, dict) or 'done' not in state or 'modules' not in state:
        raise config.UserError('cannot resume from %s: it is not a resume state of this project; %s' % (path, remedy))
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
    if action in ('resume', 'restart'):  # -resume: only with the command that started the run
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


def open_run(folder, action, record, fields, early, lock=None):
    """Once every input is checked: prepare the folder (moving an old run aside for 'replace', with
    its `lock`), write settings.json for a new run, open the logs (cut back to the last boundary on
    resume) and copy the early lines into train.log. Returns (log, resume state or None)."""
    config.prepare_run_dir(folder, action, log=early, lock=lock)
    state = None
    if action == 'resume':
        state = load_state(state_path(folder))
    else:
        if action == 'restart':
            early('-resume: %s holds no %s (the state of its first pass was never written); starting the run '
                  'again from its beginning in that folder' % (folder, config.LAST_STATE))
        config.save_json(dict(record, **{config.RESUMABLE: config.LAST_STATE}), os.path.join(folder, 'settings.json'))
    log = RunLog(folder, fields, resume=state is not None)
    if state is not None and state.get('log_sizes'):
        log.truncate(state['log_sizes'])
    append(log.log_path, ''.join(line + '\n' for line in early.lines))
    return log, state


class ResumeStartLog:
    """The log to build a resumed run's model with: the model is built from random weights, then
    given last.pth's, so the line saying that it starts from random weights becomes one saying
    where its weights come from."""

    def __init__(self, log, state_file):
        self.log, self.state_file = log, state_file

    def __call__(self, message):
        if message.endswith('starting from random weights'):  # model.load_start_weights, pretrained=False
            message = '%s: weights from %s (-resume)' % (message.split(':')[0], self.state_file)
        self.log(message)


# ---- one process per run folder ------------------------------------------------------------------

_HELD = set()  # the lock files this process holds (a lock naming this pid but not here is stale)
STALE_EMPTY_SECONDS = 30  # a lock file still empty after this long lost its writer


def read_holder(path):
    """The lock file's record {'pid', 'host', 'since', 'command', 'token'}, {} when it cannot be
    read (being written, or damaged), None when there is no lock file."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def process_alive(pid):
    """True unless no process `pid` runs on this machine (os.kill with signal 0 only asks)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


class RunLock:
    """A lock file, `path`, that says which process has `guarded` (a run folder, a fine-tuning
    output) open: created with O_CREAT | O_EXCL, so of two processes only one makes it; removed at
    release. A lock left by a process that no longer runs on this host is taken over."""

    def __init__(self, path, guarded):
        self.path, self.guarded = path, guarded
        self.token, self.made_folder, self.previous_term = None, None, None

    def acquire(self, log=print):
        """Take the lock (making its folder if missing) or raise a UserError naming the holder."""
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            if not os.path.isdir(folder):
                os.makedirs(folder)
                self.made_folder = folder  # removed again at release if the run left nothing in it
        except FileExistsError:
            pass
        except OSError as err:
            raise config.UserError('cannot write to the output folder %s (%s)'
                                   % (folder, err.strerror or err)) from None
        try:
            for _ in range(3):  # a lock removed or taken over between two looks: look again
                if self._create():
                    self._on_terminate_release()
                    return self
                holder = read_holder(self.path)
                if holder is None:
                    continue
                if not self._stale(holder):
                    raise config.UserError(self._refusal(holder))
                if self._remove_stale(holder):
                    log('took over the lock %s of process %s on %s, which no longer runs (a crashed or killed run)'
                        % (self.path, holder.get('pid', '?'), holder.get('host', '?')))
            raise config.UserError(self._refusal(read_holder(self.path) or {}))
        except BaseException:
            self._remove_made_folder()
            raise

    def _create(self):
        """Make the lock file with this process's record; False when it exists."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as err:
            raise config.UserError('cannot write the lock %s (%s)' % (self.path, err.strerror or err)) from None
        self.token = secrets.token_hex(8)
        record = {'pid': os.getpid(), 'host': socket.gethostname(), 'since': time.strftime('%Y-%m-%d %H:%M:%S'),
                  'command': ' '.join(sys.argv)[:300], 'token': self.token}
        try:
            with os.fdopen(fd, 'w') as f:
                json.dump(record, f)
        except OSError as err:  # a full disk: no half-made lock left behind
            os.remove(self.path)
            failure = config.write_failure(err, self.path)
            raise (failure or err) from None
        _HELD.add(os.path.abspath(self.path))
        return True

    def _stale(self, holder):
        """True when the holder can no longer be running: its pid is gone on this host (or is
        this process's own, which does not hold it: a restarted container reuses pids)."""
        pid = holder.get('pid')
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:  # empty or damaged
            try:
                return time.time() - os.path.getmtime(self.path) > STALE_EMPTY_SECONDS
            except OSError:
                return False
        if holder.get('host') != socket.gethostname():
            return False  # another machine's process: it cannot be asked
        if pid == os.getpid():
            return os.path.abspath(self.path) not in _HELD
        return not process_alive(pid)

    def _remove_stale(self, holder):
        """Remove the stale lock `holder` read, unless another process replaced it meanwhile:
        it is renamed first, so that of two processes taking it over only one removes it."""
        aside = '%s.stale-%d' % (self.path, os.getpid())
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return False
        if read_holder(aside) != holder:  # a live lock taken in between: put it back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            os.remove(aside)
            return False
        os.remove(aside)
        return True

    def _refusal(self, holder):
        """The one line for a second process: the folder, and who holds it."""
        if 'pid' not in holder:
            return ('%s is being opened by another process (its lock %s is empty); try again in a minute, or delete '
                    'the lock if no run of this project uses it' % (self.guarded, self.path))
        return ('%s is in use by another run: process %s on %s (since %s) holds its lock %s; wait for that run to '
                'end, or delete the lock if that process is no run of this project'
                % (self.guarded, holder['pid'], holder.get('host', '?'), holder.get('since', '?'), self.path))

    def moved_to(self, moved):
        """The locked folder was renamed to `moved` (config.move_aside, its lock file with it):
        lock the folder under its own name again, new and empty, and drop the moved lock."""
        old, token = os.path.join(moved, os.path.basename(self.path)), self.token
        if (read_holder(old) or {}).get('token') == token:
            os.remove(old)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.made_folder = os.path.dirname(os.path.abspath(self.path))
        if not self._create():
            self.token = None  # the lock there is the other process's
            raise config.UserError('%s was moved aside to %s, but another process has opened a new %s meanwhile'
                                   % (self.guarded, moved, self.guarded))

    def _on_terminate_release(self):
        """SIGTERM (a scheduler's pre-emption, `kill`) ends the process by SystemExit, so that the
        lock is released and no temporary file is left, instead of at once. Not under torchrun,
        which stops its processes itself (a lock it leaves names a dead pid and is taken over)."""
        if threading.current_thread() is threading.main_thread() and distributed.world_size() == 1 \
                and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self.previous_term = signal.signal(signal.SIGTERM, _exit_on_terminate)

    def release(self):
        """Remove the lock file if it is still this process's, and the folder `acquire` made if
        the run left nothing in it."""
        if self.token is None:
            return
        if (read_holder(self.path) or {}).get('token') == self.token:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        _HELD.discard(os.path.abspath(self.path))
        self.token = None
        if self.previous_term is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.previous_term)
            self.previous_term = None
        self._remove_made_folder()

    def _remove_made_folder(self):
        """The folder `acquire` made, removed if nothing was written in it (a start refused or
        failed in its checks leaves no empty run folder behind)."""
        if self.made_folder and os.path.isdir(self.made_folder) and not os.listdir(self.made_folder):
            try:
                os.rmdir(self.made_folder)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _exit_on_terminate(signum, frame):
    raise SystemExit(128 + signum)


def lock_run_folder(folder, name_setting, log=print):
    """Take the run folder's lock (<run>/.lock) before anything is decided or moved; under
    torchrun rank 0 takes it (the other ranks write nothing) and a refusal stops every rank.
    Returns the RunLock (None on the other ranks)."""
    config.check_run_name(os.path.basename(folder.rstrip(os.sep)), name_setting)
    lock, refusal = None, None
    if distributed.is_main():
        try:
            lock = RunLock(os.path.join(folder, config.LOCK_NAME), folder).acquire(log)
        except config.UserError as err:
            refusal = str(err)
    refusal = distributed.broadcast_object(refusal)
    if refusal:
        raise config.UserError(refusal)
    return lock
