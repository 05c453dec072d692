"""One run per folder (the lock), full disks and damaged state files: each is one 'error: ...' line,
nothing lost or half-written, and the run resumable afterwards."""
import csv
import errno
import io
import json
import os
import re
import pickle
import signal
import socket
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

import finetune_backbone
import main as lvw_main
import train_and_test as tnt
import train_peer
from model import build_model
from run import checkpoint, config, run_state
from tests.conftest import ROOT, tiny_overrides

# 4 passes: warm 0 | joint 1, push 1, last 1/0
SHORT = ['num_train_epochs=2', 'push_epochs=[1]', 'last_layer_iterations=1']
ROWS = [('0', 'warm', 'train'), ('0', 'warm', 'test'), ('1', 'joint', 'train'), ('1', 'joint', 'test'),
        ('1', 'push', 'test'), ('1', 'last', 'train'), ('1', 'last', 'test')]


class Boom(RuntimeError):
    pass


@pytest.fixture(scope='module')
def work(tiny_workspace):
    """The tiny workspace (conftest) with an uninterrupted 4-pass run 'guard_ref'."""
    cwd = os.getcwd()
    os.chdir(tiny_workspace)
    try:
        lvw_main.main(args('guard_ref'))
    finally:
        os.chdir(cwd)
    return tiny_workspace


def args(run, *extra):
    return ['-dataset', 'toy', '-set', *tiny_overrides('./data/toy', experiment_run=run), *SHORT, *extra]


def run_path(run):
    return os.path.join('saved_models', 'resnet18', run)


def stop_at(monkeypatch, k):
    """The k-th call of train_and_test.train_or_test raises Boom (3: epoch 1's training, after
    pass 0's checkpoint and state)."""
    original, calls = tnt.train_or_test, [0]

    def wrapper(*a, **kw):
        calls[0] += 1
        if calls[0] == k:
            raise Boom('injected fault')
        return original(*a, **kw)

    monkeypatch.setattr(tnt, 'train_or_test', wrapper)


def error_line(capsys, main_fn, argv):
    """Run `main_fn(argv)` as the scripts do: exit status 2 and one stderr line, returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        config.run_cli(main_fn, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err and err.endswith('\n') and len(err.splitlines()) == 1, err
    return err.rstrip('\n')


def snapshot(folder):
    """Every file under `folder` with its size and modification time."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            st = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), folder)] = (st.st_size, st.st_mtime_ns)
    return out


def csv_rows(path):
    with open(path) as f:
        return [{k: v for k, v in row.items() if k != 'time'} for row in csv.DictReader(f)]


def assert_same_as_ref(run):
    """The same checkpoints (bit for bit) and metrics rows as the uninterrupted 'guard_ref'."""
    ref, other = run_path('guard_ref'), run_path(run)
    names = sorted(f for f in os.listdir(ref) if f.endswith('.pth'))
    assert len(names) >= 2 and names == sorted(f for f in os.listdir(other) if f.endswith('.pth'))
    for name in names:
        a, b = (torch.load(os.path.join(d, name), weights_only=True)['state_dict'] for d in (ref, other))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    rows = csv_rows(os.path.join(other, 'metrics.csv'))
    assert [(r['epoch'], r['phase'], r['split']) for r in rows] == ROWS
    assert rows == csv_rows(os.path.join(ref, 'metrics.csv'))
    left = [f for f in os.listdir(other) if f.endswith('.tmp') or f == config.LOCK_NAME]
    assert left == [] and os.path.isfile(os.path.join(other, 'run_summary.json'))


def wait_for(path, process, seconds=300):
    """Wait until `path` exists (the child got where the test wants it), failing if it exits."""
    end = time.time() + seconds
    while not os.path.exists(path):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < end, 'the child did not get there in time'
        time.sleep(0.2)


# ---- one process per run folder ----------------------------------------------------------------

# main.py in a child that stops inside its second pass (after pass 0's checkpoint and last.pth)
# and waits there, holding the run folder, until it is killed
BLOCKED = '''
import os, sys, time
sys.path.insert(0, sys.argv[1])
import train_and_test
from run import config
import main
original, calls = train_and_test.train_or_test, [0]
def blocked(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:
        open(os.environ['BLOCKED_FILE'], 'w').close()
        time.sleep(600)
    return original(*args, **kwargs)
train_and_test.train_or_test = blocked
config.run_cli(main.main, sys.argv[2:])
'''


def test_a_running_run_keeps_its_folder_and_a_crashed_one_is_taken_over(work, monkeypatch, capsys):
    """A second start (plain, -resume or -overwrite) while main.py runs in the folder is one line
    naming the folder and the runner's pid, and changes nothing; once that process is dead (killed
    here), -resume takes its lock over and ends the run as the uninterrupted one, its log saying
    that the weights come from last.pth."""
    monkeypatch.chdir(work)
    folder = run_path('guard_live')
    child = subprocess.Popen([sys.executable, '-c', BLOCKED, ROOT, *args('guard_live')], cwd=work,
                             env=dict(os.environ, BLOCKED_FILE='blocked_guard_live'),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for('blocked_guard_live', child)
        before = snapshot(folder)
        assert config.LAST_STATE in before and config.LOCK_NAME in before
        for extra in ([], ['-resume'], ['-overwrite']):
            line = error_line(capsys, lvw_main.main, args('guard_live', *extra))
            assert line.startswith('error: %s is in use by another run: process %d on %s (since '
                                   % (folder, child.pid, socket.gethostname())), line
            assert 'holds its lock %s' % os.path.join(folder, config.LOCK_NAME) in line
            assert snapshot(folder) == before
        assert not [d for d in os.listdir(os.path.dirname(folder)) if d.startswith('guard_live.replaced-')]
    finally:
        child.kill()
        child.wait()
    assert os.path.exists(os.path.join(folder, config.LOCK_NAME))  # a crashed run's lock stays behind
    capsys.readouterr()
    lvw_main.main(args('guard_live', '-resume'))
    out = capsys.readouterr().out
    assert 'took over the lock %s of process %d on %s, which no longer runs' % (
        os.path.join(folder, config.LOCK_NAME), child.pid, socket.gethostname()) in out
    assert 'backbone: weights from %s (-resume)' % os.path.join(folder, config.LAST_STATE) in out
    assert 'random weights' not in out
    assert_same_as_ref('guard_live')
    with open(os.path.join(folder, 'train.log')) as f:
        assert 'took over the lock' in f.read()


def test_run_lock_pieces(tmp_path):
    """Exclusive within a process too; released; a dead pid's, an old empty lock and this pid's
    own unheld lock (a restarted container) are taken over; another host's is not."""
    path, lines = str(tmp_path / 'run' / '.lock'), []
    first = run_state.RunLock(path, 'the run').acquire(lines.append)
    with pytest.raises(config.UserError, match=r'^the run is in use by another run: process %d on ' % os.getpid()):
        run_state.RunLock(path, 'the run').acquire()
    first.release()
    assert not os.path.exists(tmp_path / 'run')  # made by the lock, left empty: removed
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    for holder in ({'pid': dead.pid, 'host': socket.gethostname()}, {'pid': os.getpid(), 'host': socket.gethostname()},
                   None):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'w') as f:
            f.write(json.dumps(holder) if holder else '')
        if holder is None:  # an empty lock: its writer is still writing it, unless it is old
            with pytest.raises(config.UserError, match='is being opened by another process'):
                run_state.RunLock(path, 'the run').acquire()
            os.utime(path, (time.time() - 120, time.time() - 120))
        with run_state.RunLock(path, 'the run').acquire(lines.append):
            assert run_state.read_holder(path)['pid'] == os.getpid()
        assert lines.pop().startswith('took over the lock %s of process %s' % (path, holder and holder['pid'] or '?'))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump({'pid': dead.pid, 'host': 'another-machine', 'since': 'then'}, f)
    with pytest.raises(config.UserError, match=r'process %d on another-machine \(since then\)' % dead.pid):
        run_state.RunLock(path, 'the run').acquire()
    assert lines == []


def test_a_locked_folder_is_not_moved_aside(tmp_path):
    folder = tmp_path / 'run'
    folder.mkdir()
    (folder / config.LOCK_NAME).write_text('{}')
    with pytest.raises(config.UserError, match='is in use by a run'):
        config.move_aside(str(folder), log=lambda *_: None)
    assert sorted(os.listdir(tmp_path)) == ['run']


def test_overwrite_moves_the_run_aside_and_the_lock_follows(work, monkeypatch):
    monkeypatch.chdir(work)
    with monkeypatch.context() as patch:
        stop_at(patch, 3)
        with pytest.raises(Boom):
            lvw_main.main(args('guard_over'))
    seen = []
    original = run_state.RunLog.__init__

    def spy(self, folder, *a, **kw):  # when the new run opens its logs, the new folder is locked
        seen.append(run_state.read_holder(os.path.join(folder, config.LOCK_NAME)))
        original(self, folder, *a, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(run_state.RunLog, '__init__', spy)
        stop_at(patch, 3)
        with pytest.raises(Boom):
            lvw_main.main(args('guard_over', '-overwrite'))
    assert seen[0]['pid'] == os.getpid()
    moved = [d for d in os.listdir(os.path.dirname(run_path('guard_over'))) if d.startswith('guard_over.replaced-')]
    assert len(moved) == 1
    kept = os.path.join(os.path.dirname(run_path('guard_over')), moved[0])
    assert config.LAST_STATE in os.listdir(kept) and config.LOCK_NAME not in os.listdir(kept)
    assert config.LOCK_NAME not in os.listdir(run_path('guard_over'))


def test_finetune_output_is_locked(work, monkeypatch, capsys):
    monkeypatch.chdir(work)
    os.makedirs('ft_guard', exist_ok=True)
    with run_state.RunLock(os.path.join('ft_guard', 'base.lock'), 'ft_guard/base.pth').acquire():
        line = error_line(capsys, finetune_backbone.main, ['-dataset', 'toy', '-set', *tiny_overrides('./data/toy'),
                                                           '-out', 'ft_guard/base.pth'])
    assert line.startswith('error: ft_guard/base.pth is in use by another run: process %d' % os.getpid())
    assert os.listdir('ft_guard') == []


# ---- full disks --------------------------------------------------------------------------------

class FullAfter:
    """A file whose writes fail with ENOSPC once `room` bytes are written (torch.save then raises
    its own RuntimeError from the OSError, as on a full disk)."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def test_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / 'last.pth')
    torch.save({'done': 1}, path)
    payload = {'w': torch.zeros(10000)}
    with pytest.raises(config.UserError) as err:
        config.atomic_write(path, lambda f: torch.save(payload, FullAfter(f, 1000)), mode='wb')
    assert str(err.value).startswith('cannot write %s: no space left on device; free some space' % path)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert torch.load(path, weights_only=True) == {'done': 1} and os.listdir(tmp_path) == ['last.pth']
    log = run_state.RunLog(str(tmp_path), ('a',))
    log.log_path = '/dev/full'  # every write there fails with ENOSPC
    with pytest.raises(config.UserError, match='^cannot write /dev/full: no space left on device;'):
        log('a line')
    with pytest.raises(ValueError):  # any other error is left alone
        config.atomic_write(path, lambda f: (_ for _ in ()).throw(ValueError('x')))


# main.py in a child whose files may not grow past a limit: a write beyond fails with EFBIG
LIMITED = '''
import resource, signal, sys
limit = int(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.path.insert(0, sys.argv[2])
from run import config
import main
config.run_cli(main.main, sys.argv[3:])
'''


def test_file_size_limit_while_writing_last_pth_then_resume(work, monkeypatch):
    """last.pth after the warm pass is about one model, after the joint pass about three (Adam's
    moments of the backbone): a limit of two models lets the first through and stops the second.
    One line names the file; the previous last.pth stays whole; -resume then ends the run."""
    monkeypatch.chdir(work)
    s = config.resolve_settings('toy', tiny_overrides('./data/toy'))
    buffer = io.BytesIO()
    torch.save(build_model(s, log=lambda *_: None).state_dict(), buffer)
    limit = 2 * buffer.tell()
    done = subprocess.run([sys.executable, '-c', LIMITED, str(limit), ROOT, *args('guard_full')], cwd=work,
                          capture_output=True, text=True, timeout=600)
    state = os.path.join(run_path('guard_full'), config.LAST_STATE)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines() == ['error: cannot write %s: file too large; free some space (or raise the limit) '
                                        'and run the command again (a training run continues with -resume)' % state]
    assert torch.load(state, weights_only=True)['done'] == 1 and os.path.getsize(state) < limit
    left = os.listdir(run_path('guard_full'))
    assert not [f for f in left if f.endswith('.tmp')] and config.LOCK_NAME not in left
    lvw_main.main(args('guard_full', '-resume'))
    assert_same_as_ref('guard_full')


def test_first_state_write_failing_then_resume_starts_again_in_place(work, monkeypatch, capsys):
    """The very first last.pth cannot be written: the folder holds a checkpoint but no last.pth.
    -resume starts the run again from its beginning there (its settings.json says it is of a
    version that writes last.pth); a run of an older version is refused as before."""
    monkeypatch.chdir(work)
    original = config.atomic_write

    def full_for_last_pth(path, write_fn, mode='w'):
        if os.path.basename(path) != config.LAST_STATE:
            return original(path, write_fn, mode)
        return original(path, lambda f: torch.save({'x': torch.zeros(1000)}, FullAfter(f, 100)), mode)

    with monkeypatch.context() as patch:
        patch.setattr(config, 'atomic_write', full_for_last_pth)
        line = error_line(capsys, lvw_main.main, args('guard_first'))
    folder = run_path('guard_first')
    assert line.startswith('error: cannot write %s: no space left on device;' % os.path.join(folder, 'last.pth'))
    left = sorted(os.listdir(folder))
    assert config.LAST_STATE not in left and any(f.endswith('.pth') for f in left)
    assert not [f for f in left if f.endswith('.tmp')] and config.LOCK_NAME not in left
    record_path = os.path.join(folder, 'settings.json')
    record = json.load(open(record_path))
    assert record[config.RESUMABLE] == config.LAST_STATE
    old = {k: v for k, v in record.items() if k != config.RESUMABLE}  # as a run from before -resume wrote it
    config.save_json(old, record_path)
    with pytest.raises(config.UserError, match='holds checkpoints but no last.pth to resume from'):
        lvw_main.main(args('guard_first', '-resume'))
    config.save_json(record, record_path)
    capsys.readouterr()
    lvw_main.main(args('guard_first', '-resume'))
    assert ('-resume: %s holds no last.pth (the state of its first pass was never written); starting the run again '
            'from its beginning in that folder' % folder) in capsys.readouterr().out
    assert_same_as_ref('guard_first')
    with open(os.path.join(folder, 'train.log')) as f:
        assert sum(line.startswith('epoch 0 | warm | train') for line in f) == 1


def test_finetune_full_disk_puts_the_earlier_base_model_back(work, monkeypatch, capsys):
    monkeypatch.chdir(work)
    sets = ['-dataset', 'toy', '-set', *tiny_overrides('./data/toy'), 'finetune_epochs=0', '-out', 'ft_full/base.pth']
    finetune_backbone.main(sets)
    before = open('ft_full/base.pth', 'rb').read()
    original = checkpoint.atomic_write

    def full(path, write_fn, mode='w'):
        return original(path, lambda f: write_fn(FullAfter(f, 100)), mode)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, 'atomic_write', full)
        line = error_line(capsys, finetune_backbone.main, sets + ['-overwrite'])
    assert line.startswith('error: cannot write ft_full/base.pth: no space left on device;')
    assert open('ft_full/base.pth', 'rb').read() == before
    assert sorted(os.listdir('ft_full')) == ['base.pth']


# ---- damaged files -----------------------------------------------------------------------------

def damaged_files(real):
    """name -> (bytes, the reason a read gives) for files made from the real checkpoint `real`."""
    data = open(real, 'rb').read()
    noise = b'\0' + np.random.RandomState(0).bytes(4095)  # neither 'PK' (zip) nor 0x80 (pickle)
    with zipfile.ZipFile(real) as z:
        info = next(i for i in z.infolist() if i.filename.endswith('/data.pkl'))
    header = data[info.header_offset:info.header_offset + 30]  # the local header: its name and extra lengths
    start = info.header_offset + 30 + int.from_bytes(header[26:28], 'little') + int.from_bytes(header[28:30], 'little')
    flipped = data[:start + 2] + b'\xff' * 8 + data[start + 10:]  # damaged inside the zip: data.pkl
    whole = io.BytesIO()
    torch.save({'model': torch.nn.Linear(2, 2)}, whole)
    damaged = 'it is truncated or damaged (a write interrupted?)'
    return {
        'random bytes': (noise, 'it is not a PyTorch checkpoint (neither a zip archive nor a pickle: 4096 bytes'),
        'truncated': (data[:len(data) // 2], 'it is truncated or corrupt (an incomplete zip archive of %d bytes'
                      % (len(data) // 2)),
        'damaged inside': (flipped, damaged),
        'a pickle': (pickle.dumps({'x': {1, 2}}), 'it is not a PyTorch checkpoint (a Python pickle'),
        'a whole model': (whole.getvalue(), 'it holds pickled Python objects (torch.nn.modules.linear.Linear), '
                                            'not plain tensors (a whole model saved by other code?)'),
    }


@pytest.fixture(scope='module')
def stopped_run(work):
    """A run stopped after its first pass: a checkpoint and a last.pth."""
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with pytest.MonkeyPatch.context() as patch:
            stop_at(patch, 3)
            with pytest.raises(Boom):
                lvw_main.main(args('guard_damaged'))
    finally:
        os.chdir(cwd)
    return run_path('guard_damaged')


@pytest.mark.parametrize('kind', ['random bytes', 'truncated', 'damaged inside', 'a pickle', 'a whole model'])
def test_damaged_checkpoint_says_what_it_is(work, stopped_run, tmp_path, kind):
    folder = os.path.join(work, stopped_run)
    real = os.path.join(folder, sorted(f for f in os.listdir(folder) if f.endswith('.pth') and f != config.LAST_STATE)[0])
    content, reason = damaged_files(real)[kind]
    path = tmp_path / 'model.pth'
    path.write_bytes(content)
    with pytest.raises(config.UserError) as err:
        checkpoint.load_checkpoint(str(path))
    assert str(err.value).startswith('cannot read checkpoint %s: %s' % (path, reason)), str(err.value)
    assert 'weights_only' not in str(err.value)


@pytest.mark.parametrize('kind', ['random bytes', 'truncated', 'damaged inside', 'a pickle', 'a whole model'])
def test_damaged_last_pth_on_resume(work, stopped_run, monkeypatch, capsys, kind):
    monkeypatch.chdir(work)
    state = os.path.join(stopped_run, config.LAST_STATE)
    intact = open(state, 'rb').read()
    content, reason = damaged_files(state)[kind]
    open(state, 'wb').write(content)
    try:
        before = snapshot(stopped_run)
        line = error_line(capsys, lvw_main.main, args('guard_damaged', '-resume'))
        assert line.startswith('error: cannot resume from %s: %s' % (state, reason)), line
        assert line.endswith('; pass -overwrite to move the run aside (its checkpoints kept there) and start it again')
        assert 'weights_only' not in line and 'copy or save it again' not in line
        assert snapshot(stopped_run) == before
    finally:
        open(state, 'wb').write(intact)


# ---- run folder names --------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['a\nb', 'tab\there', 'bell\x07', 'rtl\u202eexe'])
def test_run_names_with_control_characters_are_refused(work, monkeypatch, capsys, name):
    monkeypatch.chdir(work)
    before = sorted(os.listdir(os.path.join('saved_models', 'resnet18')))
    line = error_line(capsys, lvw_main.main, ['-dataset', 'toy', '-set', *tiny_overrides('./data/toy'),
                                              'experiment_run=%r' % name])
    assert line.startswith('error: setting experiment_run must be a plain folder name') and repr(name) in line, line
    line = error_line(capsys, train_peer.main, ['-method', 'gc', '-dataset', 'toy', '-set',
                                                *tiny_overrides('./data/toy'), 'peer_run=%r' % name])
    assert re.match(r'error: setting peer_run must be (None or )?a plain folder name', line) and repr(name) in line
    assert sorted(os.listdir(os.path.join('saved_models', 'resnet18'))) == before


def test_run_dir_action_refuses_dot_names(tmp_path):
    for name in ('..', '.'):
        with pytest.raises(config.UserError, match="setting experiment_run must be a plain folder name"):
            config.run_dir_action(os.path.join(str(tmp_path), name), False, False, 'experiment_run')


def test_resume_start_log_names_last_pth():
    lines = []
    log = run_state.ResumeStartLog(lines.append, 'runs/x/last.pth')
    log('trunk: pretrained is False, starting from random weights')
    log('something else')
    assert lines == ['trunk: weights from runs/x/last.pth (-resume)', 'something else']


def test_a_full_disk_met_outside_atomic_write_is_one_line(capsys):
    """A figure or np.save that meets a full disk: run_cli reports the file and the reason; an
    OSError of another kind is not a user's mistake and keeps its traceback."""
    import errno as errno_module
    from run.errors import run_cli

    def full(argv):
        raise OSError(errno_module.ENOSPC, 'No space left on device', 'run/figure.png')

    with pytest.raises(SystemExit) as stop:
        run_cli(full)
    assert stop.value.code == 2
    assert capsys.readouterr().err == 'error: cannot write run/figure.png: no space left on device\n'

    def other(argv):
        raise OSError(errno_module.EIO, 'Input/output error', 'x')

    with pytest.raises(OSError):
        run_cli(other)
