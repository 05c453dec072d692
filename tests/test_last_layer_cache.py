"""last_layer_cache: the last-layer passes on similarities computed once per push give what the
uncached passes give (both with the backbone's BatchNorm frozen), and resume exactly."""
import csv
import os

import pytest
import torch

import main as lvw_main
from model import build_model
from run import run_state
from tests import decisions
from tests.conftest import tiny_overrides
from tests.test_resume import Boom, SCHEDULE, assert_same_run, fail_at, run_path

MODES = {'LVW, joint flip': [], 'ProtoPNet mode, double flip': ['class_specific=True', 'attention_flip="double"']}


def args(run, *extra):
    return ['-dataset', 'toy', '-set', *tiny_overrides('./data/toy', experiment_run=run), *SCHEDULE, *extra]


def rows(run):
    with open(os.path.join(run_path(run), 'metrics.csv')) as f:
        return list(csv.DictReader(f))


def assert_same_checkpoints(run_a, run_b):
    """The same checkpoints (names up to their test accuracy), every weight as close as two runs
    whose sums are split differently can be (decisions.assert_close_weights)."""
    names = {decisions.without_accuracy(f): f for f in os.listdir(run_path(run_a)) if f.endswith('.pth')}
    others = {decisions.without_accuracy(f): f for f in os.listdir(run_path(run_b)) if f.endswith('.pth')}
    assert sorted(names) == sorted(others) and names
    for stem in names:  # the same W (and every other weight) after each saved pass
        a = torch.load(os.path.join(run_path(run_a), names[stem]), weights_only=True)['state_dict']
        b = torch.load(os.path.join(run_path(run_b), others[stem]), weights_only=True)['state_dict']
        decisions.assert_close_weights(a, b, stem)


@pytest.mark.parametrize('mode', list(MODES))
def test_cached_passes_equal_the_uncached_ones(tiny_workspace, monkeypatch, tmp_path, mode):
    """The cache computes the distances in other batches than the uncached passes (the push's,
    the test's), so the two agree as runs whose sums are split differently do (decisions.py):
    bit for bit up to the first push, then decisions equal where they are not near-ties."""
    monkeypatch.chdir(tiny_workspace)
    name = mode.split(',')[0].replace(' ', '_')
    record = decisions.run_main_recorded
    uncached = record(args('unc_' + name, *MODES[mode], 'frozen_bn_eval=True'), str(tmp_path / 'unc'))
    cached = record(args('cac_' + name, *MODES[mode], 'last_layer_cache=True'), str(tmp_path / 'cac'))
    assert decisions.without_accuracy(cached['final_checkpoint']) == \
        decisions.without_accuracy(uncached['final_checkpoint'])
    assert_same_checkpoints('unc_' + name, 'cac_' + name)
    one, two = rows('unc_' + name), rows('cac_' + name)
    decisions.assert_same_training(one, two, decisions.load(str(tmp_path / 'unc')),
                                   decisions.load(str(tmp_path / 'cac')), 'cached against uncached, ' + mode)
    first_push = next(i for i, r in enumerate(one) if r['phase'] == 'push')
    assert one[:first_push + 1] == [dict(r, time=q['time']) for r, q in zip(two[:first_push + 1], one)]


def test_cached_run_resumes_between_last_layer_passes(tiny_workspace, monkeypatch):
    monkeypatch.chdir(tiny_workspace)
    lvw_main.main(args('cache_ref', 'last_layer_cache=True'))
    with monkeypatch.context() as patch:
        fail_at(patch, run_state, 'save_state', 4, after=True)  # after last 1/0: the cache is gone with the process
        with pytest.raises(Boom):
            lvw_main.main(args('cache_cut', 'last_layer_cache=True'))
    lvw_main.main(args('cache_cut', 'last_layer_cache=True', '-resume'))
    assert_same_run('cache_ref', 'cache_cut')


def test_frozen_bn_eval_keeps_the_backbone_statistics_in_the_warm_epoch(tiny_workspace, monkeypatch):
    monkeypatch.chdir(tiny_workspace)
    s = lvw_main.config.resolve_settings('toy', tiny_overrides('./data/toy') + SCHEDULE)
    run_state.seed_everything(s['seed'])
    start = build_model(s, log=lambda *_: None).state_dict()
    stats = [k for k in start if k.startswith('features.') and k.endswith('running_mean')]
    assert stats
    for flag, moved in (('False', True), ('True', False)):
        run = 'bn_' + flag
        with monkeypatch.context() as patch:  # the warm epoch is enough
            fail_at(patch, run_state, 'save_state', 1, after=True)
            with pytest.raises(Boom):
                lvw_main.main(args(run, 'frozen_bn_eval=%s' % flag))
        after = next(torch.load(os.path.join(run_path(run), f), weights_only=True)['state_dict']
                     for f in os.listdir(run_path(run)) if f.startswith('0nopush'))
        assert any(not torch.equal(after[k], start[k]) for k in stats) == moved


def test_cache_reuses_the_push_pass_and_the_test_after_it(tiny_workspace, monkeypatch):
    """The push keeps the unflipped training features and the test after it its outputs, so the
    cache costs one pass over the flipped training images only."""
    monkeypatch.chdir(tiny_workspace)
    calls = []
    build = lvw_main.tnt.build_last_layer_cache

    def spy(net, train_set, test_set, device, s, train_features=None, test_outputs=None):
        calls.append((train_features is not None and len(train_features['feature_indices']) == len(train_set),
                      test_outputs is not None and sum(len(m) for m in test_outputs['min_distances']) == len(test_set)))
        return build(net, train_set, test_set, device, s, train_features, test_outputs)

    monkeypatch.setattr(lvw_main.tnt, 'build_last_layer_cache', spy)
    lvw_main.main(args('cache_spy', 'last_layer_cache=True'))
    assert calls == [(True, True), (True, True)]  # one per push, both parts reused
    assert not os.path.exists(os.path.join(run_path('cache_spy'), run_state.CACHE_FILE))  # removed at the end


def test_resume_without_the_cache_file_builds_it_again(tiny_workspace, monkeypatch, tmp_path):
    """Killed after the push (the cache file written), the file lost: the resumed run builds the
    cache from scratch (in other batches than the push's) and ends as the uninterrupted run, as
    far as runs whose sums are split differently can (decisions.py)."""
    monkeypatch.chdir(tiny_workspace)
    decisions.run_main_recorded(args('rebuild_ref', 'last_layer_cache=True'), str(tmp_path / 'ref'))
    with monkeypatch.context() as patch:
        fail_at(patch, run_state, 'save_state', 3, after=True)  # passes: warm 0, joint 1, push 1 <- here
        with pytest.raises(Boom):
            decisions.run_main_recorded(args('rebuild_cut', 'last_layer_cache=True'), str(tmp_path / 'cut'))
    os.remove(os.path.join(run_path('rebuild_cut'), run_state.CACHE_FILE))
    decisions.run_main_recorded(args('rebuild_cut', 'last_layer_cache=True', '-resume'), str(tmp_path / 'resumed'))
    # the interrupted start recorded the passes up to the push, the resumed one the rest
    passes = decisions.load(str(tmp_path / 'cut')) + decisions.load(str(tmp_path / 'resumed'))
    decisions.assert_same_training(rows('rebuild_ref'), rows('rebuild_cut'), decisions.load(str(tmp_path / 'ref')),
                                   passes, 'cache rebuilt on resume')
    assert_same_checkpoints('rebuild_ref', 'rebuild_cut')
