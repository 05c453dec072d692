"""Fault injection: runs interrupted anywhere (an exception at pass k, a real kill -9) and resumed
end exactly where an uninterrupted run ends; what a user made is never lost to a mistake."""
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import finetune_backbone
import main as lvw_main
import push
import train_and_test as tnt
import train_peer
from data.image_data import check_images
from run import config, run_state
from run.checkpoint import CheckpointKeeper
from tests.conftest import ROOT, tiny_overrides

# 9 passes: warm 0 | joint 1, push 1, last 1/0, last 1/1 | joint 2, push 2, last 2/0, last 2/1
SCHEDULE = ['num_train_epochs=3', 'push_epochs=[1, 2]', 'last_layer_iterations=2', 'keep_checkpoints=2']


class Boom(RuntimeError):
    pass


@pytest.fixture(scope='module')
def work(tiny_workspace):
    """The tiny workspace (conftest) with an uninterrupted LVW run 'ref'."""
    cwd = os.getcwd()
    os.chdir(tiny_workspace)
    try:
        lvw_main.main(lvw_args('ref'))
    finally:
        os.chdir(cwd)
    return tiny_workspace


def lvw_args(run, *extra, data='./data/toy'):
    return ['-dataset', 'toy', '-set', *tiny_overrides(data, experiment_run=run), *SCHEDULE, *extra]


def run_path(run):
    return os.path.join('saved_models', 'resnet18', run)


def fail_at(monkeypatch, module, name, k, after=False, action=None):
    """Make the k-th call of module.name raise Boom (or run `action`), before or after it runs."""
    original = getattr(module, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        hit = calls[0] == k
        if hit and not after:
            (action or _raise)()
        result = original(*args, **kwargs)
        if hit and after:
            (action or _raise)()
        return result

    monkeypatch.setattr(module, name, wrapper)


def _raise():
    raise Boom('injected fault')


def pass_lines(path):
    """The per-pass lines of train.log with the timings taken out."""
    with open(path) as f:
        lines = [line.rstrip('\n') for line in f if line.startswith(('epoch ', 'push:'))]
    return [re.sub(r'time [\d.]+s|\([\d.]+s\)', '', line) for line in lines]


def csv_rows(path):
    with open(path) as f:
        return [{k: v for k, v in row.items() if k != 'time'} for row in csv.DictReader(f)]


def assert_same_run(ref, other):
    """Same checkpoints (bit for bit), same metrics rows and log lines, same summary."""
    ref, other = run_path(ref), run_path(other)
    names = sorted(f for f in os.listdir(ref) if f.endswith('.pth'))
    assert names == sorted(f for f in os.listdir(other) if f.endswith('.pth'))
    assert config.LAST_STATE not in names and len(names) >= 2
    for name in names:
        a = torch.load(os.path.join(ref, name), weights_only=True)
        b = torch.load(os.path.join(other, name), weights_only=True)
        assert a['state_dict'].keys() == b['state_dict'].keys()
        for key in a['state_dict']:
            assert torch.equal(a['state_dict'][key], b['state_dict'][key]), (name, key)
        assert a['accuracy'] == b['accuracy']
    assert csv_rows(os.path.join(ref, 'metrics.csv')) == csv_rows(os.path.join(other, 'metrics.csv'))
    assert pass_lines(os.path.join(ref, 'train.log')) == pass_lines(os.path.join(other, 'train.log'))
    summaries = [json.load(open(os.path.join(d, 'run_summary.json'))) for d in (ref, other)]
    for s in summaries:
        s.pop('train_seconds')
        s.pop('phase_seconds', None)
    assert summaries[0] == summaries[1]
    assert not [f for _, _, files in os.walk(other) for f in files if f.endswith('.tmp')]


def copy_of_toy_data(work, tmp_path, split, class_index):
    """A copy of the workspace's toy data to damage, and the first image of one class of `split`."""
    data = str(tmp_path / 'toy')
    shutil.copytree(os.path.join(work, 'data', 'toy'), data)
    folder = os.path.join(data, split, sorted(os.listdir(os.path.join(data, split)))[class_index])
    return data, os.path.join(folder, sorted(f for f in os.listdir(folder) if f.endswith('.png'))[0])


def state_done(run):
    return torch.load(os.path.join(run_path(run), config.LAST_STATE), weights_only=True)['done']


def test_reference_run_has_the_expected_passes(work, monkeypatch):
    monkeypatch.chdir(work)
    rows = csv_rows(os.path.join(run_path('ref'), 'metrics.csv'))
    assert [(r['epoch'], r['phase'], r['split'], r['iteration']) for r in rows] == [
        ('0', 'warm', 'train', ''), ('0', 'warm', 'test', ''),
        ('1', 'joint', 'train', ''), ('1', 'joint', 'test', ''), ('1', 'push', 'test', ''),
        ('1', 'last', 'train', '0'), ('1', 'last', 'test', '0'), ('1', 'last', 'train', '1'), ('1', 'last', 'test', '1'),
        ('2', 'joint', 'train', ''), ('2', 'joint', 'test', ''), ('2', 'push', 'test', ''),
        ('2', 'last', 'train', '0'), ('2', 'last', 'test', '0'), ('2', 'last', 'train', '1'), ('2', 'last', 'test', '1')]
    assert not os.path.exists(os.path.join(run_path('ref'), config.LAST_STATE))  # removed once finished
    assert [p[0] for p in lvw_main.passes(config.resolve_settings('toy', tiny_overrides('x') + SCHEDULE))] == [
        'warm', 'joint', 'push', 'last', 'last', 'joint', 'push', 'last', 'last']


# (where, k, after, passes done when it fails): each is one interruption, then -resume
FAULTS = {
    # the 3rd train/test pass call is epoch 1's joint training (warm train, warm test, joint train)
    'inside a joint epoch': (tnt, 'train_or_test', 3, False, 1),
    # 3 push batches per push (18 images, batch 7): the 5th call is the 2nd batch of the 2nd push
    'inside a push': (push, 'normalize', 5, False, 6),
    # after the state of pass 4 (last 1/0) is written: between the two last-layer passes
    'between last-layer passes': (run_state, 'save_state', 4, True, 4),
    # right after push 1's checkpoint, before its state: the push is done again
    'between a checkpoint and its state': (run_state, 'save_state', 3, False, 2),
}


@pytest.mark.parametrize('where', list(FAULTS))
def test_exception_then_resume_matches_the_uninterrupted_run(work, monkeypatch, where):
    monkeypatch.chdir(work)
    module, name, k, after, done = FAULTS[where]
    run = 'fault_%s' % where.replace(' ', '_')
    with monkeypatch.context() as patch:
        fail_at(patch, module, name, k, after)
        with pytest.raises(Boom):
            lvw_main.main(lvw_args(run))
    assert state_done(run) == done  # only the pass in progress is lost
    rows = csv_rows(os.path.join(run_path(run), 'metrics.csv'))
    summary = lvw_main.main(lvw_args(run, '-resume'))
    assert len(csv_rows(os.path.join(run_path(run), 'metrics.csv'))) == 16 >= len(rows)
    assert summary['final_checkpoint'] == json.load(open(os.path.join(run_path('ref'), 'run_summary.json')))[
        'final_checkpoint']
    assert_same_run('ref', run)
    with open(os.path.join(run_path(run), 'train.log')) as f:
        assert 'resumed from %s: %d of 9 passes done' % (os.path.join(run_path(run), 'last.pth'), done) in f.read()


def test_resume_with_data_loader_workers_matches(work, monkeypatch):
    """Workers draw the flips; they are started per pass from the restored generator, so a run
    with workers resumes exactly too (its reference is a run with the same worker count)."""
    monkeypatch.chdir(work)
    lvw_main.main(lvw_args('workers_ref', 'num_workers=1'))
    with monkeypatch.context() as patch:
        fail_at(patch, push, 'normalize', 2)  # inside the first push: a joint epoch follows the resume
        with pytest.raises(Boom):
            lvw_main.main(lvw_args('workers_cut', 'num_workers=1'))
    assert state_done('workers_cut') == 2
    lvw_main.main(lvw_args('workers_cut', 'num_workers=1', '-resume'))
    assert_same_run('workers_ref', 'workers_cut')


def run_killed(args, target, k, mode='kill'):
    """tests/fault_runner.py: main.py in a subprocess that SIGKILLs itself at the k-th call of target."""
    return subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'fault_runner.py'), target, str(k), mode,
                           'main.py', *args], capture_output=True, text=True, timeout=300)


def test_kill_9_twice_then_resume_matches(work, monkeypatch):
    """A real kill -9 in the middle of a training epoch, then another inside the write of last.pth
    (which leaves a temporary file); the third start finishes the run exactly as the reference."""
    monkeypatch.chdir(work)
    # normalize is called per batch: 3 + 1 in epoch 0 (train, test), the 6th is in epoch 1's training
    first = run_killed(lvw_args('killed'), 'train_and_test.normalize', 6)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert state_done('killed') == 1
    # torch.save calls of the resumed start: checkpoint of pass 2, state of pass 2 <- killed inside
    second = run_killed(lvw_args('killed', '-resume'), 'torch.save', 2)
    assert second.returncode == -signal.SIGKILL, second.stderr[-2000:]
    leftovers = [f for f in os.listdir(run_path('killed')) if f.endswith('.tmp')]
    assert leftovers and leftovers[0].startswith('.last.pth.')
    assert state_done('killed') == 1  # the old state is intact: the write was atomic
    lvw_main.main(lvw_args('killed', '-resume'))
    assert_same_run('ref', 'killed')
    with open(os.path.join(run_path('killed'), 'train.log')) as f:
        assert 'removed 1 temporary file(s) left by an interrupted write' in f.read()


def test_unreadable_image_mid_run_names_it_and_leaves_a_resumable_run(work, monkeypatch, tmp_path):
    monkeypatch.chdir(work)
    data, victim = copy_of_toy_data(work, tmp_path, 'train', 1)
    intact = open(victim, 'rb').read()

    def truncate():  # after pass 2's state: the header still reads, the pixels do not
        with open(victim, 'wb') as f:
            f.write(intact[:len(intact) // 2])

    with monkeypatch.context() as patch:
        fail_at(patch, run_state, 'save_state', 2, after=True, action=truncate)
        with pytest.raises(config.UserError, match=r'^cannot decode image %s: ' % re.escape(victim)):
            lvw_main.main(lvw_args('decode', data=data))
    assert state_done('decode') == 2
    with pytest.raises(config.UserError, match='1 unreadable image'):  # -set image_check=full finds it up front
        lvw_main.main(lvw_args('decode', 'image_check="full"', '-resume', data=data))
    with open(victim, 'wb') as f:
        f.write(intact)
    lvw_main.main(lvw_args('decode', '-resume', data=data))
    assert_same_run('ref', 'decode')


def test_resume_refuses_other_settings_and_finished_runs_are_left_alone(work, monkeypatch, capsys):
    monkeypatch.chdir(work)
    with monkeypatch.context() as patch:
        fail_at(patch, tnt, 'train_or_test', 3)
        with pytest.raises(Boom):
            lvw_main.main(lvw_args('changed'))
    with pytest.raises(config.UserError, match=r"-resume: the settings differ from .*\(topk: 5 -> 4\)"):
        lvw_main.main(lvw_args('changed', 'topk=4', '-resume'))
    sidecar = os.path.join(work, 'data', 'grad_test_toy.txt')
    intact = open(sidecar).read()
    with open(sidecar, 'w') as f:  # as if the maps had been extracted again since the run started
        f.write(re.sub(r'crc32 [0-9a-f]{8}', 'crc32 00000000', intact, count=1))
    try:
        with pytest.raises(config.UserError, match=r'-resume: maps_checksums was .* when the run started, now'):
            lvw_main.main(lvw_args('changed', '-resume'))
    finally:
        with open(sidecar, 'w') as f:
            f.write(intact)
    with pytest.raises(config.UserError, match='exclude each other'):
        lvw_main.main(lvw_args('changed', '-resume', '-overwrite'))
    before = sorted(os.listdir(run_path('ref')))
    summary = lvw_main.main(lvw_args('ref', '-resume'))
    assert 'has finished (run_summary.json); nothing to do' in capsys.readouterr().out
    assert summary == json.load(open(os.path.join(run_path('ref'), 'run_summary.json')))
    assert sorted(os.listdir(run_path('ref'))) == before


def test_existing_run_is_kept_and_overwrite_moves_it_aside_only_after_the_checks(work, monkeypatch, capsys):
    monkeypatch.chdir(work)
    shutil.copytree(run_path('ref'), run_path('old'))
    before = {f: os.path.getsize(os.path.join(run_path('old'), f)) for f in os.listdir(run_path('old'))}
    with pytest.raises(config.UserError, match='already holds a run; pass -resume to continue it, -overwrite'):
        lvw_main.main(lvw_args('old'))
    np.save('bad_maps.npy', np.zeros((18, 32, 32), np.float32))  # maps of the wrong size
    for bad in (['-train_atts', 'bad_maps.npy'], ['-weights', 'missing.pth']):
        with pytest.raises(config.UserError):
            lvw_main.main(lvw_args('old', '-overwrite', *bad))
        assert {f: os.path.getsize(os.path.join(run_path('old'), f)) for f in os.listdir(run_path('old'))} == before
    assert not [d for d in os.listdir(os.path.dirname(run_path('old'))) if d.startswith('old.replaced-')]
    capsys.readouterr()
    with monkeypatch.context() as patch:  # a good start: stop it after the first pass, that is enough
        fail_at(patch, tnt, 'train_or_test', 3)
        with pytest.raises(Boom):
            lvw_main.main(lvw_args('old', '-overwrite'))
    moved = [d for d in os.listdir(os.path.dirname(run_path('old'))) if d.startswith('old.replaced-')]
    assert len(moved) == 1 and re.fullmatch(r'old\.replaced-\d{8}-\d{6}', moved[0])
    assert '-overwrite: moved the earlier %s to ' % run_path('old') in capsys.readouterr().out
    kept = os.path.join(os.path.dirname(run_path('old')), moved[0])
    assert {f: os.path.getsize(os.path.join(kept, f)) for f in os.listdir(kept)} == before


def test_failed_start_leaves_nothing_that_blocks_a_retry(work, monkeypatch, tmp_path):
    monkeypatch.chdir(work)
    data, broken = copy_of_toy_data(work, tmp_path, 'test', 0)
    intact = open(broken, 'rb').read()
    open(broken, 'wb').close()  # a zero-byte image
    with pytest.raises(config.UserError) as err:
        lvw_main.main(lvw_args('retry', data=data))
    assert str(err.value).startswith('1 unreadable image(s) among the train, test and push images '
                                     '(image_check=header): %s (' % broken)
    assert not os.path.exists(run_path('retry'))
    open(broken, 'wb').write(intact)
    with monkeypatch.context() as patch:  # a start that dies in its first pass: nothing to keep either
        fail_at(patch, tnt, 'train_or_test', 1)
        with pytest.raises(Boom):
            lvw_main.main(lvw_args('retry', data=data))
    assert not config.holds_run(run_path('retry'))
    with monkeypatch.context() as patch:
        fail_at(patch, tnt, 'train_or_test', 3)
        with pytest.raises(Boom):
            lvw_main.main(lvw_args('retry', data=data))  # no flag needed
    assert state_done('retry') == 1


def test_peer_run_resumes_exactly(work, monkeypatch):
    monkeypatch.chdir(work)
    args = ['-method', 'gc', '-weights', 'saved_models/base/toy_resnet18.pth', '-dataset', 'toy', '-set',
            *tiny_overrides('./data/toy'), 'gc_epochs=3', 'gc_batch_size=8', 'gc_milestones=[2]']
    ref = train_peer.main(args + ['peer_run="gc_ref"'])
    with monkeypatch.context() as patch:
        fail_at(patch, train_peer, 'train_one_epoch', 2)
        with pytest.raises(Boom):
            train_peer.main(args + ['peer_run="gc_cut"'])
    assert state_done('gc_cut') == 1
    resumed = train_peer.main(args + ['peer_run="gc_cut"', '-resume'])
    assert resumed['final_checkpoint'] == ref['final_checkpoint']
    a = torch.load(os.path.join(run_path('gc_ref'), ref['final_checkpoint']), weights_only=True)['state_dict']
    b = torch.load(os.path.join(run_path('gc_cut'), ref['final_checkpoint']), weights_only=True)['state_dict']
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert csv_rows(os.path.join(run_path('gc_ref'), 'metrics.csv')) == csv_rows(
        os.path.join(run_path('gc_cut'), 'metrics.csv'))


def test_finetune_resumes_exactly_and_keeps_an_existing_base_model(work, monkeypatch):
    monkeypatch.chdir(work)
    args = ['-dataset', 'toy', '-set', *tiny_overrides('./data/toy'), 'finetune_epochs=2']
    ref = finetune_backbone.main(args + ['-out', 'ft/ref.pth'])
    with monkeypatch.context() as patch:
        fail_at(patch, finetune_backbone, 'evaluate', 2)  # the test pass of the second epoch
        with pytest.raises(Boom):
            finetune_backbone.main(args + ['-out', 'ft/cut.pth'])
    assert torch.load('ft/cut.last.pth', weights_only=True)['done'] == 1 and not os.path.exists('ft/cut.pth')
    resumed = finetune_backbone.main(args + ['-out', 'ft/cut.pth', '-resume'])
    assert resumed['test_accuracy'] == ref['test_accuracy'] and not os.path.exists('ft/cut.last.pth')
    a, b = (torch.load(p, weights_only=True)['state_dict'] for p in ('ft/ref.pth', 'ft/cut.pth'))
    assert all(torch.equal(a[k], b[k]) for k in a)
    size = os.path.getsize('ft/ref.pth')
    with pytest.raises(config.UserError, match=r'ft/ref.pth exists; pass -overwrite'):
        finetune_backbone.main(args + ['-out', 'ft/ref.pth'])
    finetune_backbone.main(args + ['finetune_epochs=0', '-out', 'ft/ref.pth', '-overwrite'])
    moved = [f for f in os.listdir('ft') if f.startswith('ref.replaced-')]
    assert len(moved) == 1 and moved[0].endswith('.pth') and os.path.getsize(os.path.join('ft', moved[0])) == size


# ---- the pieces --------------------------------------------------------------------------------

def test_generator_states_round_trip_through_a_weights_only_file(tmp_path):
    import random
    run_state.seed_everything(3)
    net = torch.nn.Linear(2, 2)
    run_state.save_state(str(tmp_path / 'last.pth'), 5, {'net': net})
    expected = (random.random(), np.random.rand(), torch.rand(3))
    run_state.seed_everything(99)
    state = run_state.load_state(str(tmp_path / 'last.pth'))
    assert run_state.restore_state(state, {'net': torch.nn.Linear(2, 2)}) == 5
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])


def test_keeper_state_round_trip(tmp_path, tiny_settings):
    net = torch.nn.Linear(2, 2)
    keep = CheckpointKeeper(str(tmp_path), 0.0, keep=1, log=lambda *_: None)
    for name, acc in (('a.pth', 0.9), ('b.pth', 0.5), ('c.pth', 0.6)):
        keep(net, name, acc, tiny_settings, [])
    again = CheckpointKeeper(str(tmp_path), 0.0, keep=1, log=lambda *_: None)
    again.load_state(keep.state())
    assert again.saved == keep.saved and again.best == (str(tmp_path / 'a.pth'), 0.9)
    assert keep.state() == {'saved': [['a.pth', 0.9], ['c.pth', 0.6]], 'best': ['a.pth', 0.9]}


def test_run_log_cut_back_to_the_boundary(tmp_path):
    log = run_state.RunLog(str(tmp_path), ('a', 'b'))
    log('first')
    log.row(a=1, b=2)
    sizes = log.sizes()
    log('lost')
    log.row(a=3)
    again = run_state.RunLog(str(tmp_path), ('a', 'b'), resume=True)
    again.truncate(sizes)
    again('after')
    assert open(tmp_path / 'train.log').read() == 'first\nafter\n'
    assert open(tmp_path / 'metrics.csv').read() == 'a,b\n1,2\n'


def test_stale_temporary_files_are_removed_on_the_next_start(tmp_path):
    folder = tmp_path / 'run'
    folder.mkdir()
    (folder / '.last.pth.abc123.tmp').write_bytes(b'half')
    (folder / 'keep.tmp').write_bytes(b'not ours')  # not hidden: not from atomic_write
    config.prepare_run_dir(str(folder), config.run_dir_action(str(folder), False, True, 'experiment_run'),
                           log=lambda *_: None)
    assert sorted(os.listdir(folder)) == ['keep.tmp']


def test_image_check_header_and_full(tmp_path):
    from PIL import Image
    good, cut, empty = (str(tmp_path / n) for n in ('good.png', 'cut.png', 'empty.png'))
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), np.uint8)).save(good)
    data = open(good, 'rb').read()
    open(cut, 'wb').write(data[:len(data) // 2])
    open(empty, 'wb').close()
    check_images([good, cut], 'header')  # the header of a truncated file still reads
    with pytest.raises(config.UserError, match=r"^1 unreadable image\(s\) among the images \(image_check=header\): "
                                               r"%s \(cannot identify image file" % re.escape(empty)):
        check_images([good, cut, empty], 'header')
    with pytest.raises(config.UserError, match=r'^2 unreadable image\(s\) .*image_check=full\): %s .*; %s' %
                       (re.escape(cut), re.escape(empty))):
        check_images([good, cut, empty], 'full')
    check_images([empty], 'off')


def test_worker_wrapped_user_error_is_one_line():
    wrapped = ('Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n'
               '  File "x.py", line 1, in f\nconfig.UserError: cannot decode image a/b.png: broken data stream')
    assert config.one_line(wrapped) == 'cannot decode image a/b.png: broken data stream'
    assert config.one_line('plain message') == 'plain message'
