"""torchrun: two gloo processes on CPU train the same run as one process with the same global
batch, write one run folder, and resume after both are killed."""
import csv
import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest
import torch

from data.image_data import FlipDraws, ImageDataset, draw_flips
from run import distributed
from tests import decisions
from tests.conftest import ROOT, tiny_overrides
from tests.test_resume import assert_same_run, run_path, state_done

# all epochs warm and the backbone's BatchNorm frozen: without SyncBatchNorm (GPU only), BatchNorm
# in training mode normalises each rank's slice alone, and one process's numbers cannot be expected
EQUAL = ['num_train_epochs=3', 'num_warm_epochs=3', 'push_epochs=[1, 2]', 'last_layer_iterations=2',
         'frozen_bn_eval=True', 'save_threshold=-1']


def lvw_args(run, *extra):
    return ['-dataset', 'toy', '-set', *tiny_overrides('./data/toy', experiment_run=run), *EQUAL, *extra,
            '-weights', 'saved_models/base/toy_resnet18.pth']


def torchrun_command(args, processes=2, script=(), node=None):
    """The command line of main.py under torchrun with `processes` CPU processes (gloo).
    `script`: a runner and its arguments put before main.py (tests/fault_runner.py, which
    applies a fault in every process, or tests/decisions.py, which records the decisions).
    `node`: (node_rank, port) for one of two launchers as two nodes (--nnodes 2), with the
    rendezvous on 127.0.0.1:port; else one launcher (--standalone)."""
    where = ['--standalone'] if node is None else [
        '--nnodes', '2', '--node_rank', str(node[0]), '--master_addr', '127.0.0.1', '--master_port', str(node[1])]
    main_py = [*script, 'main.py'] if script else [os.path.join(ROOT, 'main.py')]
    return [sys.executable, '-m', 'torch.distributed.run', *where, '--nproc_per_node', str(processes), *main_py, *args]


def launcher_env():
    # gloo on the loopback device: the nodes of the two-node test are this machine
    return dict(os.environ, OMP_NUM_THREADS='1', GLOO_SOCKET_IFNAME='lo')


def torchrun(args, processes=2, fault=(), record=None, timeout=600):
    """main.py under torchrun; `fault`: (function, k, mode) of tests/fault_runner.py, applied in
    every process; `record`: where tests/decisions.py saves each rank's decisions."""
    return subprocess.run(torchrun_command(args, processes, runner(fault, record)), capture_output=True, text=True,
                          timeout=timeout, env=launcher_env())


def runner(fault=(), record=None):
    if fault:
        return [os.path.join(ROOT, 'tests', 'fault_runner.py'), *fault]
    return [os.path.join(ROOT, 'tests', 'decisions.py'), record] if record else []


def free_port():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def torchrun_two_nodes(args, fault=(), record=None, timeout=600):
    """Two torchrun launchers started at once as nodes 0 and 1 of one job (one process each);
    returns their (exit status, stderr)."""
    port, launched = free_port(), []
    with tempfile.TemporaryDirectory() as logs:
        for node in (0, 1):
            err = open(os.path.join(logs, 'node%d.err' % node), 'w+')
            launched.append((subprocess.Popen(torchrun_command(args, 1, runner(fault, record), (node, port)),
                                              stdout=subprocess.DEVNULL, stderr=err, env=launcher_env()), err))
        results = []
        for process, err in launched:
            try:
                process.wait(timeout=timeout)
            finally:
                if process.poll() is None:
                    process.kill()
            err.seek(0)
            results.append((process.returncode, err.read()))
            err.close()
    return results


def rows(run):
    with open(os.path.join(run_path(run), 'metrics.csv')) as f:
        return list(csv.DictReader(f))


def final_state(run):
    """A finished run's summary and its final checkpoint."""
    with open(os.path.join(run_path(run), 'run_summary.json')) as f:
        summary = json.load(f)
    return summary, torch.load(os.path.join(run_path(run), summary['final_checkpoint']), weights_only=True)


# ---- the pieces ---------------------------------------------------------------------------------

@pytest.mark.parametrize('n, parts', [(10, 3), (2, 2), (1, 2), (0, 2), (7, 1)])
def test_slice_bounds_split_every_row_once(n, parts):
    bounds = [distributed.slice_bounds(n, part, parts) for part in range(parts)]
    assert [i for start, stop in bounds for i in range(start, stop)] == list(range(n))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_global_batch_slices_draw_what_one_process_draws(tiny_toy):
    """The ranks' slices put together are the single-process loader's batches and flips, drawn
    from the same generator state; the weights add up to the world size per batch."""
    dataset = ImageDataset(tiny_toy + '/train', 64, flip='joint')
    torch.manual_seed(3)
    single = [(i.tolist(), a.tolist(), b.tolist())
              for i, a, b, _ in torch.utils.data.DataLoader(FlipDraws(dataset), batch_size=8, shuffle=True)]
    parts = 3
    per_rank = []
    for part in range(parts):
        torch.manual_seed(3)
        slices = distributed.GlobalBatchSlices(dataset, 8, True, lambda: draw_flips('joint', False), part, parts)
        torch.empty((), dtype=torch.int64).random_()  # the DataLoader iterator's base seed, drawn first
        per_rank.append(list(slices))
    assert len(per_rank[0]) == len(single) == 3
    for number, (indices, image_flips, _) in enumerate(single):  # batches of 8, 8 and 2 over 3 ranks
        weights = [distributed.GlobalBatchSlices(dataset, 8, True, None, part, parts).weight(number)
                   for part in range(parts)]
        assert sum(weights) == pytest.approx(parts)
        assert (weights[2] == 0) == (number == 2)  # the last batch leaves rank 2 a stand-in of weight 0
        keys = [key for part in range(parts) if weights[part] > 0 for key in per_rank[part][number]]
        assert [k[0] for k in keys] == indices
        assert [k[1] for k in keys] == image_flips


def test_an_empty_slice_gets_a_stand_in_of_weight_zero(tiny_toy):
    dataset = ImageDataset(tiny_toy + '/train', 64)  # 18 images: batches of 8, 8 and 2
    last = distributed.GlobalBatchSlices(dataset, 8, False, lambda: (False, False), 2, 3)
    batches = list(last)
    assert batches[2] == [(16, False, False)] and last.weight(2) == 0 and last.global_indices(2) == []
    assert last.global_indices(0) == [6, 7]


def test_gather_rows_in_one_process_puts_rows_in_place():
    values = torch.arange(6.).view(3, 2)
    out = distributed.gather_rows(values, [4, 0, 2], 5)
    assert out.tolist() == [[2, 3], [0, 0], [4, 5], [0, 0], [0, 1]]


def test_several_gpus_without_torchrun_is_refused(tiny_workspace, monkeypatch, capsys):
    import main as lvw_main
    monkeypatch.chdir(tiny_workspace)
    with pytest.raises(SystemExit) as exit_info:
        lvw_main.config.run_cli(lvw_main.main, lvw_args('dp', '-gpuid', '0,1'))
    assert exit_info.value.code == 2
    assert 'torchrun --nproc_per_node' in capsys.readouterr().err


@pytest.mark.parametrize('script', ['gradcam_extract', 'eval_iou', 'eval_metrics', 'finetune_backbone', 'train_peer'])
def test_single_process_scripts_refuse_torchrun(monkeypatch, script):
    import importlib
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(distributed.UserError, match='%s.py runs in one process; start it with python, not torchrun'
                       % script):
        importlib.import_module(script).main([])


# ---- two processes against one ------------------------------------------------------------------

CASES = {'plain': [], 'cached': ['last_layer_cache=True'],
         # 18 training and 9 test images: last batches of 1, so rank 1 gets a stand-in of weight 0
         'cached_empty_slices': ['last_layer_cache=True', 'train_batch_size=17', 'train_push_batch_size=17',
                                  'test_batch_size=8'],
         # W trained in the warm epochs, every word on its own patch, chosen over both ranks' candidates
         'shared': ['last_layer_init="zero"', 'last_layer_joint_lr=1e-2', 'push_unique=True']}


def assert_trains_as_one(single, name, recorded_single, recorded, processes):
    """Run `name` (under torchrun, `processes` in all, its decisions recorded at `recorded`)
    trained what the single-process run `single` trained, as far as two runs whose sums are split
    differently can (decisions.assert_same_training: the same rows and images, decisions equal
    where they are not near-ties, the losses), the final words and W as close
    (decisions.assert_close_weights), one run folder written once."""
    decisions.assert_same_training(rows(single), rows(name), decisions.load(recorded_single),
                                   decisions.load(recorded, processes), '%s against %s' % (name, single))
    summary_one, ckpt_one = final_state(single)
    summary_two, ckpt_two = final_state(name)
    assert decisions.without_accuracy(summary_two['final_checkpoint']) == \
        decisions.without_accuracy(summary_one['final_checkpoint'])
    assert summary_two['processes'] == processes
    words_and_w = ('prototype_vectors', 'last_layer.weight')
    decisions.assert_close_weights({k: ckpt_one['state_dict'][k] for k in words_and_w},
                                   {k: ckpt_two['state_dict'][k] for k in words_and_w}, name)
    with open(os.path.join(run_path(name), 'train.log')) as f:
        log = f.read()
    assert log.count('run folder ') == 1 and '(%d processes)' % processes in log
    assert sorted(map(decisions.without_accuracy, os.listdir(run_path(name)))) == \
        sorted(map(decisions.without_accuracy, os.listdir(run_path(single))))


@pytest.mark.parametrize('case', list(CASES))
def test_two_processes_train_what_one_process_trains(tiny_workspace, monkeypatch, tmp_path, case):
    """Same global batches and flips, gradients of the global batch mean, the push's nearest patch
    over both ranks, accuracies summed over ranks: two processes train what one trains
    (assert_trains_as_one)."""
    monkeypatch.chdir(tiny_workspace)
    single, name, extra = 'one_' + case, 'two_' + case, CASES[case]
    decisions.run_main_recorded(lvw_args(single, *extra), str(tmp_path / 'one'))
    done = torchrun(lvw_args(name, *extra), record=str(tmp_path / 'two'))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_trains_as_one(single, name, str(tmp_path / 'one'), str(tmp_path / 'two'), 2)


def test_two_nodes_train_what_one_process_trains_and_resume(tiny_workspace, monkeypatch, tmp_path):
    """Two torchrun launchers on this machine as two nodes (--nnodes 2, --node_rank 0 and 1, one
    process each, rendezvous on 127.0.0.1) train what one process trains into one run folder;
    both killed inside epoch 1, then started again with -resume, they end bit for bit as the
    uninterrupted two-node run."""
    monkeypatch.chdir(tiny_workspace)
    decisions.run_main_recorded(lvw_args('one_node'), str(tmp_path / 'one'))
    for status, err in torchrun_two_nodes(lvw_args('two_nodes'), record=str(tmp_path / 'two')):
        assert status == 0, err[-3000:]
    assert_trains_as_one('one_node', 'two_nodes', str(tmp_path / 'one'), str(tmp_path / 'two'), 2)
    # per rank, train_and_test.normalize runs once per batch: 3 + 1 in epoch 0, the 6th is in epoch 1
    for status, err in torchrun_two_nodes(lvw_args('two_nodes_cut'), fault=('train_and_test.normalize', '6', 'kill')):
        assert status != 0, err[-3000:]
    assert state_done('two_nodes_cut') == 1
    for status, err in torchrun_two_nodes(lvw_args('two_nodes_cut', '-resume')):
        assert status == 0, err[-3000:]
    assert_same_run('two_nodes', 'two_nodes_cut')


def test_torchrun_run_killed_then_resumed_matches(tiny_workspace, monkeypatch):
    """Both ranks SIGKILLed inside epoch 1's training, then resumed under torchrun: the run ends
    exactly as an uninterrupted two-process run."""
    monkeypatch.chdir(tiny_workspace)
    reference = torchrun(lvw_args('ddp_ref'))
    assert reference.returncode == 0, reference.stderr[-3000:]
    # per rank, train_and_test.normalize runs once per batch: 3 + 1 in epoch 0, the 6th is in epoch 1
    killed = torchrun(lvw_args('ddp_cut'), fault=('train_and_test.normalize', '6', 'kill'))
    assert killed.returncode != 0 and 'SIGKILL' in killed.stderr, killed.stderr[-3000:]
    assert state_done('ddp_cut') == 1
    resumed = torchrun(lvw_args('ddp_cut', '-resume'))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run('ddp_ref', 'ddp_cut')


def test_torchrun_trains_joint_epochs(tiny_workspace, monkeypatch):
    """The usual schedule (warm, then joint epochs with BatchNorm training on each rank's slice):
    three DDP wrappers take turns (warm, joint, last layer) and the run finishes once."""
    monkeypatch.chdir(tiny_workspace)
    args = ['-dataset', 'toy', '-set', *tiny_overrides('./data/toy', experiment_run='ddp_joint'),
            'last_layer_iterations=1', 'save_threshold=-1', '-weights', 'saved_models/base/toy_resnet18.pth']
    done = torchrun(args)
    assert done.returncode == 0, done.stderr[-3000:]
    phases = [(r['epoch'], r['phase'], r['split']) for r in rows('ddp_joint')]
    assert ('1', 'joint', 'train') in phases and ('2', 'joint', 'train') in phases
    assert len(phases) == len(set((r['epoch'], r['phase'], r['split'], r['iteration']) for r in rows('ddp_joint')))
    summary, _ = final_state('ddp_joint')
    assert summary['processes'] == 2 and 0 <= summary['final_accuracy'] <= 1
