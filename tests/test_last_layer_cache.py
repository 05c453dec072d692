"""last_layer_cache: the last-layer passes on similarities computed once per push give what the
uncached passes give (both with the backbone's BatchNorm frozen), and resume exactly."""
import csv
import os

import pytest
import torch

import main as lvw_main
import run_state
from model import build_model
from tests.conftest import tiny_overrides
from tests.test_resume import Boom, SCHEDULE, assert_same_run, fail_at, run_path

MODES = {'LVW, joint flip': [], 'ProtoPNet mode, double flip': ['class_specific=True', 'attention_flip="double"']}


def args(run, *extra):
    return ['-dataset', 'toy', '-set', *tiny_overrides('./data/toy', experiment_run=run), *SCHEDULE, *extra]


def rows(run):
    with open(os.path.join(run_path(run), 'metrics.csv')) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize('mode', list(MODES))
def test_cached_passes_equal_the_uncached_ones(tiny_workspace, monkeypatch, mode):
    monkeypatch.chdir(tiny_workspace)
    name = mode.split(',')[0].replace(' ', '_')
    uncached = lvw_main.main(args('unc_' + name, *MODES[mode], 'frozen_bn_eval=True'))
    cached = lvw_main.main(args('cac_' + name, *MODES[mode], 'last_layer_cache=True'))
    assert cached['final_checkpoint'] == uncached['final_checkpoint']
    names = sorted(f for f in os.listdir(run_path('unc_' + name)) if f.endswith('.pth'))
    assert names == sorted(f for f in os.listdir(run_path('cac_' + name)) if f.endswith('.pth'))
    for f in names:  # the same W (and every other weight) after each last-layer pass
        a = torch.load(os.path.join(run_path('unc_' + name), f), weights_only=True)['state_dict']
        b = torch.load(os.path.join(run_path('cac_' + name), f), weights_only=True)['state_dict']
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=lambda m: '%s %s: %s' % (f, key, m))
    for r, q in zip(rows('unc_' + name), rows('cac_' + name), strict=True):
        assert (r['epoch'], r['phase'], r['split'], r['iteration']) == (q['epoch'], q['phase'], q['split'], q['iteration'])
        assert r['accuracy'] == q['accuracy']
        for key in ('cross_entropy', 'cluster', 'separation', 'attention', 'l1', 'p_dist_pair'):
            if r[key]:
                assert float(q[key]) == pytest.approx(float(r[key]), rel=1e-5, abs=1e-6), (r, key)


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


def test_resume_without_the_cache_file_builds_it_again(tiny_workspace, monkeypatch):
    """Killed after the push (the cache file written), the file lost: the resumed run builds the
    cache from scratch and ends as the uninterrupted run, to 1e-5."""
    monkeypatch.chdir(tiny_workspace)
    lvw_main.main(args('rebuild_ref', 'last_layer_cache=True'))
    with monkeypatch.context() as patch:
        fail_at(patch, run_state, 'save_state', 3, after=True)  # passes: warm 0, joint 1, push 1 <- here
        with pytest.raises(Boom):
            lvw_main.main(args('rebuild_cut', 'last_layer_cache=True'))
    os.remove(os.path.join(run_path('rebuild_cut'), run_state.CACHE_FILE))
    lvw_main.main(args('rebuild_cut', 'last_layer_cache=True', '-resume'))
    for r, q in zip(rows('rebuild_ref'), rows('rebuild_cut'), strict=True):
        assert r['accuracy'] == q['accuracy']
        assert float(q['cross_entropy']) == pytest.approx(float(r['cross_entropy']), rel=1e-5)
    ref = sorted(f for f in os.listdir(run_path('rebuild_ref')) if f.endswith('.pth'))
    assert ref == sorted(f for f in os.listdir(run_path('rebuild_cut')) if f.endswith('.pth'))
    for f in ref:
        a = torch.load(os.path.join(run_path('rebuild_ref'), f), weights_only=True)['state_dict']
        b = torch.load(os.path.join(run_path('rebuild_cut'), f), weights_only=True)['state_dict']
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)
