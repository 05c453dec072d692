"""benchmark.py: the verdict rule by hand, the pairing of seeds, and `-quick` end to end (every
method trained and scored, finished steps reused, the report of what is missing)."""
import json

import pytest
from PIL import Image

import benchmark
from run import config


def test_t_quantile_by_table():
    # Student's t, one-sided 95 %: 6.314 (1 dof), 2.920 (2), 2.353 (3) from the usual tables
    assert [round(benchmark.t_quantile_95(d), 3) for d in (1, 2, 3)] == [6.314, 2.920, 2.353]


def test_verdicts_by_hand():
    # [0.1, 0.2, 0.3]: mean 0.2, sd 0.1, half width 2.920 * 0.1 / sqrt(3) = 0.1686 -> L = 0.031 > 0
    assert benchmark.verdict([0.1, 0.2, 0.3]) == 'supported'
    # the same the other way: U = -0.2 + 0.1686 = -0.031 <= 0
    assert benchmark.verdict([-0.1, -0.2, -0.3]) == 'not supported'
    # mean 0.067, sd 0.252: the interval (-0.358, 0.491) holds 0
    assert benchmark.verdict([0.1, -0.2, 0.3]) == 'not decided by 3 seeds'
    # two of three seeds favour it but the spread is too large: sd 0.0577, half 0.0973, m 0.0667
    assert benchmark.verdict([0.1, 0.1, 0.0]) == 'not decided by 3 seeds'
    # no difference at all is no support for a > b
    assert benchmark.verdict([0.0, 0.0, 0.0]) == 'not supported'
    assert benchmark.verdict([0.05]) == 'not decided by 1 seed'


def test_noninferiority_verdicts_by_hand():
    # a > b - 0.02: one point below in every seed is within the margin, three points below is not
    assert benchmark.verdict([-0.01, -0.01, -0.01], 'noninferior', 0.02) == 'supported'
    assert benchmark.verdict([-0.03, -0.03, -0.03], 'noninferior', 0.02) == 'not supported'
    # mean -0.01, sd 0.02: L = -0.01 - 2.920 * 0.02 / sqrt(3) = -0.0437 < -0.02 < U = 0.0237
    assert benchmark.verdict([-0.03, -0.01, 0.01], 'noninferior', 0.02) == 'not decided by 3 seeds'
    with pytest.raises(ValueError):
        benchmark.verdict([0.1, 0.2], 'less')


def test_mean_sd():
    assert benchmark.mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert benchmark.mean_sd([0.5]) == (0.5, None)
    assert benchmark.mean_sd([]) == (None, None)


def test_compare_pairs_only_the_seeds_both_have():
    per_method = {'lvw_double': {0: {'iou_gradcam': 0.5}, 1: {'iou_gradcam': 0.6}, 2: {'iou_gradcam': 0.7}},
                  'protopnet': {0: {'iou_gradcam': 0.2}, 2: {'iou_gradcam': 0.3}}}
    c = benchmark.compare(per_method, 'iou_gradcam', 'lvw_double', 'protopnet', 'greater')
    assert c['seeds'] == [0, 2]
    assert c['diffs'] == pytest.approx([0.3, 0.4])
    assert c['mean'] == pytest.approx(0.35)
    # 2 seeds: half width 6.314 * 0.0707 / sqrt(2) = 0.316 -> L = 0.034 > 0
    assert c['verdict'] == 'supported'
    assert benchmark.compare(per_method, 'accuracy', 'lvw_double', 'base', 'noninferior')['verdict'] == 'not run yet'


def test_bad_arguments_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(config.UserError, match='-methods: unknown lvw'):
        benchmark.main(['-quick', '-methods', 'lvw'])
    with pytest.raises(config.UserError, match='distinct seeds'):
        benchmark.main(['-quick', '-seeds', '0', '0'])


def _steps_run(output):
    return [line.split('] ', 1)[1][:-len(' ...')] for line in output.splitlines()
            if line.startswith('[benchmark') and line.endswith(' ...')]


def test_quick_benchmark_end_to_end(tmp_path, monkeypatch, capsys):
    """Part of the methods first, then all: only the new steps run; a third call trains nothing."""
    monkeypatch.chdir(tmp_path)
    benchmark.main(['-quick', '-methods', 'base', 'lvw_double'])
    assert _steps_run(capsys.readouterr().out) == [
        'seed 0: base model and its Grad-CAM', 'seed 0: metrics of base', 'seed 0: train lvw_double',
        'seed 0: metrics of lvw_double']
    report = benchmark.main(['-quick'])
    ran = _steps_run(capsys.readouterr().out)
    assert len(ran) == 2 * (len(benchmark.METHODS) - 2)  # train + metrics of each method not yet run
    assert 'seed 0: train lvw_double' not in ran and ran[-1] == 'seed 0: metrics of lfi_cam'
    out = tmp_path / 'saved_models' / 'benchmark_quick'
    steps = json.loads((out / 'steps.json').read_text())
    assert len(steps) == 1 + 2 * (len(benchmark.METHODS) - 1) + 1
    assert report['wall_seconds'] == pytest.approx(sum(steps.values()), abs=0.2)

    assert report['methods'] == list(benchmark.METHODS) and report['missing'] == []
    values = {m: report['per_seed'][m][0] for m in benchmark.METHODS}
    assert values['base']['iou_gradcam'] == 1.0  # the Grad-CAM against itself
    for m, v in values.items():
        assert 0 <= v['accuracy'] <= 1 and 0 <= v['iou_gradcam'] <= 1
        assert 0 <= v['pointing_game'] <= 1 and 0 <= v['content_heatmap'] <= 100
        assert 0 <= v['insertion_auc'] <= 1 and 0 <= v['deletion_auc'] <= 1
        words = [v[k] for k in ('classes_per_word', 'image_classes_per_word', 'top_locations_on_object',
                                'part_purity')]
        if m in benchmark.WORD_METHODS:
            assert 0 <= words[0] <= 3 and 1 <= words[1] <= 3 and 0 <= words[2] <= 1 and 0 < words[3] <= 1
        else:
            assert words == [None] * 4
    # accuracy is the final checkpoint's, as the run recorded it
    run = tmp_path / 'saved_models' / 'resnet18' / 'benchmark_quick_s0_lvw_double'
    assert values['lvw_double']['accuracy'] == pytest.approx(
        json.loads((run / 'run_summary.json').read_text())['final_accuracy'])
    for m in benchmark.METHODS:  # one seed: mean = the value, no sd
        assert report['summary'][m]['accuracy'] == {'mean': values[m]['accuracy'], 'sd': None, 'n': 1}
    first = report['claims'][1]['comparisons'][0]
    assert (first['a'], first['b'], first['seeds']) == ('lvw_double', 'protopnet', [0])
    assert first['diffs'] == [values['lvw_double']['iou_gradcam'] - values['protopnet']['iou_gradcam']]
    assert all(c['verdict'] == 'not decided by 1 seed' for claim in report['claims'] for c in claim['comparisons'])

    md = (out / 'toy_benchmark.md').read_text()
    assert md.count('\n| ') == 1 + len(benchmark.METRICS) + 1 + sum(len(c[1]) for c in benchmark.CLAIMS)
    assert '| test accuracy | %.3f |' % values['base']['accuracy'] in md
    assert json.loads((out / 'toy_benchmark.json').read_text())['per_seed']['gc']['0'] == values['gc']
    with Image.open(out / 'toy_benchmark.png') as img:
        assert img.size[0] > 800 and img.size[1] > 400

    again = benchmark.main(['-quick'])
    assert _steps_run(capsys.readouterr().out) == []
    assert again['per_seed'] == report['per_seed']

    # a seed that has not run: listed as missing, the claims rest on the seed that has
    partial = benchmark.main(['-quick', '-report', '-seeds', '0', '1', '-out', str(tmp_path / 'partial')])
    assert _steps_run(capsys.readouterr().out) == []
    assert partial['missing'] == ['seed 1: %s' % m for m in benchmark.METHODS]
    assert report['command'] == 'python benchmark.py -quick'  # -report names the command that made the runs
    assert partial['command'] == 'python benchmark.py -quick -seeds 0 1 -out %s' % (tmp_path / 'partial')
    assert partial['claims'] == report['claims']
    assert 'Not run yet: seed 1: base;' in (tmp_path / 'partial' / 'toy_benchmark.md').read_text()


def test_the_animal_mnist_plan(tmp_path, monkeypatch):
    """-dataset animal_mnist: the subset of make demo-real, the preset's MobileNetV2, its own files;
    the toy plan is as it was."""
    plan = benchmark.Plan(False, [0, 1], 'animal_mnist')
    assert plan.s['base_architecture'] == 'mobilenet_v2' and plan.s['pretrained'] is True
    assert plan.s['data_path'] == './data/animal_mnist_small/' and plan.s['num_train_epochs'] == 11
    assert plan.root == 'saved_models/benchmark_animal_mnist'
    assert plan.base_path(1) == 'saved_models/benchmark_animal_mnist/seed1/animal_mnist_mobilenet_v2.pth'
    assert plan.atts(0, 'test') == 'saved_models/benchmark_animal_mnist/seed0/grad_test_animal_mnist.npy'
    assert plan.settings(1)[:2] == ['-dataset', 'animal_mnist'] and 'seed=1' in plan.settings(1)
    toy = benchmark.Plan(False, [0])
    assert toy.root == 'saved_models/benchmark' and toy.base_path(0) == 'saved_models/benchmark/seed0/toy_resnet18.pth'
    assert toy.shared == ['%s=%r' % kv for kv in benchmark.FULL.items()]
    with pytest.raises(config.UserError, match='-quick runs on its own tiny toy data'):
        benchmark.Plan(True, [0], 'animal_mnist')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr('run.config.installed_package_file', lambda *a: None)
    with pytest.raises(config.UserError, match='pip install --no-deps animal-mnist==0.4'):
        benchmark.main(['-dataset', 'animal_mnist', '-seeds', '0'])
