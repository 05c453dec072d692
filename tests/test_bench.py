"""bench.py -schedule: the pass counts of a schedule, the projection from per-image costs, and a
tiny run of the benchmark itself (its figures are for bench.py to print, not for tests to time)."""
import math

import bench
from run import config
from tests.conftest import tiny_overrides


def test_pets_schedule_counts_match_the_spec():
    """LVW_SPEC section 4: 10 warm + 191 joint + 400 last-layer passes, 20 pushes, 621 tests."""
    assert bench.schedule_counts(config.resolve_settings('pets')) == \
        {'warm': 10, 'joint': 191, 'push': 20, 'last': 400, 'test': 621}


def test_projection_by_hand():
    per_image = {'warm': 1, 'joint': 2, 'push': 3, 'cache': 4, 'last': 5, 'test': 6}
    counts = {'warm': 1, 'joint': 2, 'push': 1, 'last': 3, 'test': 7}
    # faithful: 10 * (1 + 2*2 + 3 + 3*5) + 5 * 7 * 6;  cached: 10 * (1 + 2*2 + 3 + 4) + 5 * (7 - 3) * 6
    assert bench.projected_seconds(per_image, counts, 10, 5, cached=False) == 440
    assert bench.projected_seconds(per_image, counts, 10, 5, cached=True) == 240


def test_tiny_schedule_benchmark_runs(tiny_workspace, monkeypatch, capsys):
    monkeypatch.chdir(tiny_workspace)
    out = bench.main(['-schedule', '-epochs', '2', '-push_epochs', '1', '-last', '2', '-device', 'cpu',
                      '-set', *tiny_overrides('./data/toy')])
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == 'schedule ratio cached/faithful: %.3f' % out['ratio']
    assert 0 < out['ratio'] < 2 and 0 < out['pets_ratio'] < 1
    assert set(out['phase_seconds']['cached']) == {'warm', 'joint', 'push', 'cache', 'last'}
    assert 'cache' not in out['phase_seconds']['faithful']
    assert all(0 <= a <= 1 for a in out['final_accuracy'].values())
    assert all(math.isfinite(v) and v >= 0 for v in out['per_image'].values())
