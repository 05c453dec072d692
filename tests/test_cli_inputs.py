"""Every flag checked, reports that never overwrite results: a numeric flag out of its range, an
output path that is a folder (or lies under a file), a JSON file of the wrong shape, an edited
settings.py that does not run, a schedule of the wrong form, and a benchmark report that would
replace a fuller one are each refused with one line and exit status 2, before any work and
with nothing written or moved."""
import json
import os
import sys

import pytest
import torch

import bench
import benchmark
import demo
import eval_iou
import eval_metrics
import finetune_backbone
import gradcam_extract
import local_analysis
import receptive_field
import train_peer
import visualize
from data import make_toy, prepare_datasets
from model import build_model
from run import config
from run.checkpoint import save_checkpoint
from tests.conftest import save_random_base_model, tiny_overrides


def error_line(capsys, main_fn, argv):
    """Run `main_fn(argv)` as the scripts do; the one 'error: ...' line it ends with (exit 2, no
    traceback). argparse's own usage error counts: its message is its last line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        config.run_cli(main_fn, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    lines = err.strip().splitlines()
    assert lines and (len(lines) == 1 or lines[0].startswith('usage:')), err
    return lines[-1]


def flag_error(flag, expected, value):
    """The tail of argparse's line for a flag type's refusal."""
    return "error: argument %s: must be %s, got '%s'" % (flag, expected, value)


def tree(folder):
    """Every file under `folder` with its bytes: what must not change."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


@pytest.fixture(scope='module')
def made(tmp_path_factory, tiny_toy):
    """A base model, its Grad-CAM maps of both splits and an untrained words checkpoint."""
    root = tmp_path_factory.mktemp('cli_inputs')
    sets = tiny_overrides(tiny_toy)
    s = config.resolve_settings('toy', sets)
    base = str(root / 'base.pth')
    classes = sorted(os.listdir(s['test_dir']))
    save_random_base_model(base, s, classes, seed=0)
    maps = gradcam_extract.main(['-model', base, '-out_dir', str(root / 'maps'), '-device', 'cpu',
                                 '-dataset', 'toy', '-set', *sets])
    torch.manual_seed(0)
    lvw = save_checkpoint(build_model(s, log=lambda *_: None).eval(), str(root / 'run' / '1push0.5000.pth'), s,
                          classes, epoch=1, kind='push')
    return {'root': root, 'sets': sets, 'base': base, 'test_maps': maps['test']['path'], 'lvw': lvw}


# ---- 3. the schedules: every method trains at least one epoch; milestones increase -----------

@pytest.mark.parametrize('name', ['scouter_epochs', 'gc_epochs', 'lfi_epochs'])
def test_a_peer_trains_at_least_one_epoch(name):
    with pytest.raises(config.UserError) as err:
        config.resolve_settings('toy', ['%s=0' % name])
    assert str(err.value) == 'setting %s must be a whole number >= 1, got 0' % name


@pytest.mark.parametrize('item,shown', [('gc_milestones=[30, 24]', '[30, 24]'), ('lfi_milestones=[4, 4]', '[4, 4]'),
                                        ('scouter_milestones=(6, 2)', '(6, 2)')])
def test_milestones_increase_each_once(item, shown):
    with pytest.raises(config.UserError) as err:
        config.resolve_settings('toy', [item])
    name = item.split('=')[0]
    assert str(err.value) == 'setting %s must be a list in increasing order, each entry once, got %s' % (name, shown)


def test_schedules_that_stay_valid():
    s = config.resolve_settings('toy', ['gc_milestones=[3, 30]', 'lfi_milestones=[]', 'gc_epochs=1',
                                        'finetune_epochs=0'])  # 0: the start weights as the base model
    assert s['gc_milestones'] == [3, 30] and s['gc_epochs'] == 1 and s['finetune_epochs'] == 0


def test_train_peer_with_no_epoch_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = error_line(capsys, train_peer.main, ['-method', 'gc', '-dataset', 'toy', '-set', 'gc_epochs=0'])
    assert line == 'error: setting gc_epochs must be a whole number >= 1, got 0'
    assert os.listdir(tmp_path) == []


# ---- 7. an edited settings.py that does not run ---------------------------------------------------

@pytest.mark.parametrize('text,where', [
    ("dataset = 'toy'\nsizes = [1, 2,\n", "line 2, column 9: SyntaxError: '[' was never closed"),
    ("dataset = 'toy'\nimg_size = 224\ndataset = pets\n", "line 3, column 11: NameError: name 'pets' is not defined"),
    ("presets = {'toy': {'img_size': 1 / 0}}\n", 'line 1, column 32: ZeroDivisionError: division by zero'),
])
def test_a_settings_file_that_fails_is_one_line(tmp_path, text, where):
    path = tmp_path / 'settings.py'
    path.write_text(text)
    with pytest.raises(config.UserError) as err:
        config.load_settings(str(path))
    assert str(err.value) == '%s, %s' % (path, where)


def test_the_settings_on_the_import_path_are_loaded_as_before():
    import settings
    assert config.load_settings() is settings
    assert config.default_settings()['img_size'] == settings.img_size
    assert config.load_settings(settings.__file__).img_size == settings.img_size  # a file: run afresh


@pytest.mark.parametrize('text,where', [
    ('dataset = pets\n', "line 1, column 11: NameError: name 'pets' is not defined"),
    ('presets = {\n', "line 1, column 11: SyntaxError: '{' was never closed"),
])
def test_a_script_with_a_broken_settings_py_says_where(tmp_path, monkeypatch, capsys, text, where):
    """The settings.py a script imports (here one first on the import path) fails: one line."""
    (tmp_path / 'settings.py').write_text(text)
    monkeypatch.delitem(sys.modules, 'settings')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    line = error_line(capsys, gradcam_extract.main, ['-device', 'cpu'])
    assert line == 'error: %s, %s' % (tmp_path / 'settings.py', where)


# ---- 2. JSON files of the wrong shape ---------------------------------------------------------------

@pytest.mark.parametrize('content,problem', [
    ('[1, 2]', 'it holds a list'), ('"done"', 'it holds a string'),
    ('{"seed 0: base model and its Grad-CAM": "12 s"}', "'seed 0: base model and its Grad-CAM' is a string"),
    ('{"seed 0: metrics of base": true}', "'seed 0: metrics of base' is true or false"),
])
def test_steps_json_of_the_wrong_shape(tmp_path, monkeypatch, capsys, content, problem):
    monkeypatch.chdir(tmp_path)
    steps = tmp_path / 'saved_models' / 'benchmark_quick' / 'steps.json'
    steps.parent.mkdir(parents=True)
    steps.write_text(content)
    line = error_line(capsys, benchmark.main, ['-quick', '-report', '-out', str(tmp_path / 'out')])
    assert line == ("error: cannot use saved_models/benchmark_quick/steps.json: expected benchmark.py's object of "
                    "finished steps and their seconds, but %s" % problem)
    with pytest.raises(config.UserError, match='but %s' % problem):
        benchmark.Steps(str(steps), print)
    assert not os.listdir(tmp_path / 'out')


@pytest.mark.parametrize('name,content,problem', [
    ('run_summary.json', '[]', 'it holds a list'),
    ('run_summary.json', '{"final_checkpoint": 3}', "'final_checkpoint' is a number"),
    ('settings.json', '{"settings": [1]}', "'settings' is a list"),
    ('metrics.json', '{"sources": null}', "'sources' is null"),
    ('notes.json', '3', 'it holds a number'),
])
def test_json_files_read_back_are_checked(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(config.UserError) as err:
        config.read_json(str(path))
    assert str(err.value).startswith('cannot use %s: expected ' % path) and str(err.value).endswith(problem)


def test_a_run_summary_of_the_wrong_shape_to_visualize(tmp_path, capsys):
    (tmp_path / 'run_summary.json').write_text('["done"]')
    line = error_line(capsys, visualize.main, [str(tmp_path)])
    assert line == ("error: cannot use %s: expected a finished run's summary object, but it holds a list"
                    % (tmp_path / 'run_summary.json'))


def test_metrics_json_without_the_method(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = benchmark.Plan(True, [0])
    path = plan.metrics_path(0, 'base')
    os.makedirs(os.path.dirname(path))
    config.save_json({'sources': {'gradcam': {}}}, path)
    with pytest.raises(config.UserError, match=r"expected its sources to hold an object 'base' .*found 'gradcam'"):
        benchmark.read_values(plan, 0, 'base')
    config.save_json({'sources': {'base': {'accuracy': '0.9'}}}, path)
    with pytest.raises(config.UserError, match="a number or null as the value of accuracy of 'base', got '0.9'"):
        benchmark.read_values(plan, 0, 'base')


# ---- 1. a benchmark report never replaces a fuller one -----------------------------------------------

def finished_base(plan, accuracy=0.5, iou=1.0):
    """The metrics.json of the base model of seed 0, as eval_metrics.py writes it, and its step."""
    config.save_json({'sources': {'base': {'accuracy': accuracy, 'metrics': {'iou_gradcam': {'value': iou}}}}},
                     plan.metrics_path(0, 'base'))
    config.save_json({'seed 0: base model and its Grad-CAM': 10.0, 'seed 0: metrics of base': 2.0},
                     os.path.join(plan.root, 'steps.json'))


def old_report(out, per_seed, steps, quick=True):
    """A report already in `out` (its .json, .md and .png as earlier runs left them)."""
    os.makedirs(out, exist_ok=True)
    config.save_json({'quick': quick, 'dataset': 'toy', 'per_seed': per_seed, 'steps_seconds': steps},
                     os.path.join(out, 'toy_benchmark.json'))
    for ext in ('.md', '.png'):
        with open(os.path.join(out, 'toy_benchmark' + ext), 'w') as f:
            f.write('earlier ' + ext)
    return tree(out)


FULLER = {'base': {'0': {'accuracy': 0.5, 'iou_gradcam': 1.0}}, 'lvw_double': {'0': {'accuracy': 0.7}},
          'gc': {'0': {'accuracy': 0.6, 'iou_gradcam': None}}}
FULLER_STEPS = {'seed 0: base model and its Grad-CAM': 10.0, 'seed 0: metrics of base': 2.0,
                'seed 0: train lvw_double': 50.0, 'seed 0: metrics of lvw_double': 3.0}


def test_report_with_nothing_finished_leaves_the_results(tmp_path, monkeypatch, capsys):
    """The incident: -report before any step had run replaced the committed results."""
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / 'results')
    before = old_report(out, FULLER, FULLER_STEPS)
    line = error_line(capsys, benchmark.main, ['-quick', '-report', '-out', out])
    assert line == ('error: no step of this benchmark has finished yet (0 steps in its steps.json): no report '
                    'written, %s/toy_benchmark.json left as it is' % out)
    assert tree(out) == before
    empty = str(tmp_path / 'empty')
    assert error_line(capsys, benchmark.main, ['-quick', '-report', '-out', empty]).startswith(
        'error: no step of this benchmark has finished yet')
    assert os.listdir(empty) == []


def test_report_that_lacks_values_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    finished_base(benchmark.Plan(True, [0]))
    out = str(tmp_path / 'results')
    before = old_report(out, FULLER, FULLER_STEPS)
    line = error_line(capsys, benchmark.main, ['-quick', '-report', '-out', out])
    assert line == ('error: %s/toy_benchmark.json holds a fuller report: this one lacks 2 of its 4 finished steps and '
                    '2 of its 4 values (seed 0: gc; seed 0: lvw_double); nothing written; pass -out DIR to write this '
                    'report elsewhere' % out)
    assert tree(out) == before
    # where it offers: beside it, the same report
    elsewhere = str(tmp_path / 'partial')
    report = benchmark.main(['-quick', '-report', '-out', elsewhere])
    assert report['per_seed']['base'][0]['accuracy'] == 0.5 and sorted(os.listdir(elsewhere)) == [
        'toy_benchmark.json', 'toy_benchmark.md', 'toy_benchmark.png']


def test_report_of_another_plan_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    finished_base(benchmark.Plan(True, [0]))
    out = str(tmp_path / 'results')
    before = old_report(out, {'base': {'0': {'accuracy': 0.5}}}, {}, quick=False)
    line = error_line(capsys, benchmark.main, ['-quick', '-report', '-out', out])
    assert line == ('error: %s/toy_benchmark.json holds the report of another benchmark (toy, not toy -quick); nothing '
                    'written; pass -out DIR to write this report elsewhere' % out)
    assert tree(out) == before


def test_a_fuller_report_replaces_a_poorer_one(tmp_path, monkeypatch):
    """The default behaviour: a report with at least the old one's steps and values is written."""
    monkeypatch.chdir(tmp_path)
    finished_base(benchmark.Plan(True, [0]), accuracy=0.55)
    out = str(tmp_path / 'results')
    old_report(out, {'base': {'0': {'accuracy': 0.5}}}, {'seed 0: metrics of base': 1.0})
    benchmark.main(['-quick', '-report', '-out', out])
    with open(os.path.join(out, 'toy_benchmark.json')) as f:
        written = json.load(f)
    assert written['per_seed']['base']['0']['accuracy'] == 0.55 and written['per_seed']['base']['0']['iou_gradcam'] == 1
    with open(os.path.join(out, 'toy_benchmark.md')) as f:
        assert f.read().startswith('# Toy benchmark')


def test_a_run_that_would_lose_values_is_refused_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / 'results')
    before = old_report(out, FULLER, FULLER_STEPS)
    monkeypatch.setattr(benchmark, 'run_benchmark', lambda *a: pytest.fail('trained before refusing'))
    line = error_line(capsys, benchmark.main, ['-quick', '-methods', 'base', '-out', out])
    assert line == ('error: %s/toy_benchmark.json holds a fuller report: this one lacks 2 of its 4 values (seed 0: gc; '
                    'seed 0: lvw_double); nothing written; pass -out DIR to write this report elsewhere' % out)
    assert tree(out) == before


def test_an_old_report_of_the_wrong_shape_is_not_replaced(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    finished_base(benchmark.Plan(True, [0]))
    out = tmp_path / 'results'
    out.mkdir()
    (out / 'toy_benchmark.json').write_text('{"per_seed": {"base": [0.5]}, "steps_seconds": {}}')
    line = error_line(capsys, benchmark.main, ['-quick', '-report', '-out', str(out)])
    assert line == ("error: cannot use %s: expected a benchmark report (an object with per_seed and steps_seconds "
                    "objects), but per_seed['base'] is not an object of seeds and their values" % (out / 'toy_benchmark.json'))
    assert os.listdir(out) == ['toy_benchmark.json']


def test_report_files_that_are_folders_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    finished_base(benchmark.Plan(True, [0]))
    (tmp_path / 'results' / 'toy_benchmark.png').mkdir(parents=True)
    line = error_line(capsys, benchmark.main, ['-quick', '-report', '-out', str(tmp_path / 'results')])
    assert line == 'error: the output file %s is a folder, not a file' % (tmp_path / 'results' / 'toy_benchmark.png')
    assert os.listdir(tmp_path / 'results') == ['toy_benchmark.png']


# ---- 4, 5. numeric flags: the settings' ranges --------------------------------------------------------

@pytest.mark.parametrize('argv,tail', [
    (['--train-per-class', '-3'], flag_error('--train-per-class', 'a whole number >= 1', '-3')),
    (['--test-per-class', '0'], flag_error('--test-per-class', 'a whole number >= 1', '0')),
    (['--size', '8'], flag_error('--size', 'a whole number in [16, 1024]', '8')),
    (['--size', '112.5'], flag_error('--size', 'a whole number in [16, 1024]', '112.5')),
    (['--classes', '10'], flag_error('--classes', 'a whole number in [1, 9]', '10')),
    (['--distractors', '-1'], flag_error('--distractors', 'a whole number >= 0', '-1')),
    (['--seed', '-2'], flag_error('--seed', 'a whole number >= 0', '-2')),
])
def test_make_toy_flags(tmp_path, capsys, argv, tail):
    out = tmp_path / 'toy'
    assert error_line(capsys, make_toy.main, ['--out', str(out), *argv]).endswith(tail)
    assert not out.exists()


def test_make_toy_out_naming_a_file(tmp_path, capsys):
    path = tmp_path / 'toy'
    path.write_text('mine')
    assert error_line(capsys, make_toy.main, ['--out', str(path)]) == (
        'error: %s is a file, not a folder; choose another --out' % path)
    assert error_line(capsys, make_toy.main, ['--out', str(path / 'sub')]) == (
        'error: --out %s: %s is a file, not a folder' % (path / 'sub', path))
    assert path.read_text() == 'mine'


def test_make_toy_with_a_meta_json_of_another_shape(tmp_path, capsys):
    out = tmp_path / 'toy'
    out.mkdir()
    (out / 'meta.json').write_text('[]')
    assert error_line(capsys, make_toy.main, ['--out', str(out)]) == (
        'error: %s exists and holds other data; remove it or choose another --out' % out)


@pytest.mark.parametrize('argv,tail', [
    (['-batch_size', '-1'], flag_error('-batch_size', 'a whole number >= 1', '-1')),
    (['-batch_size', '0'], flag_error('-batch_size', 'a whole number >= 1', '0')),
])
def test_eval_iou_batch_size(capsys, argv, tail):
    argv = ['-modeldir', 'run', '-model', 'x.pth', '-test_atts', 'maps.npy', *argv]
    assert error_line(capsys, eval_iou.main, argv).endswith(tail)


def test_eval_iou_thr_outside_the_percentiles(capsys):
    line = error_line(capsys, eval_iou.main, ['-modeldir', 'run', '-model', 'x.pth', '-test_atts', 'maps.npy',
                                              '-thr', '150'])
    assert line == 'error: -thr must be a percentile strictly between 0 and 100, got 150'


@pytest.mark.parametrize('main_fn,argv,tail', [
    (gradcam_extract.main, ['-batch_size', '0'], flag_error('-batch_size', 'a whole number >= 1', '0')),
    (eval_metrics.main, ['-batch_size', '-5'], flag_error('-batch_size', 'a whole number >= 1', '-5')),
    (eval_metrics.main, ['-spg_samples', '0'], flag_error('-spg_samples', 'a whole number >= 1', '0')),
    (eval_metrics.main, ['-max_images', 'all'], flag_error('-max_images', 'a whole number >= 1', 'all')),
    (eval_metrics.main, ['-tau', '-1'], flag_error('-tau', 'a number >= 0', '-1')),
    (eval_metrics.main, ['-tau', 'nan'], flag_error('-tau', 'a number >= 0', 'nan')),
    (eval_metrics.main, ['-auc_images', '-2'],
     flag_error('-auc_images', 'a whole number >= 0', '-2') + ' (0 skips insertion/deletion; or "all")'),
    (local_analysis.main, ['x.pth', 'a.png', '-topk', '0'], flag_error('-topk', 'a whole number >= 1', '0')),
    (benchmark.main, ['-seeds', '0', '-1'], flag_error('-seeds', 'a whole number >= 0', '-1')),
    (receptive_field.main, ['-img_size', '8'], flag_error('-img_size', 'a whole number >= 32', '8')),
    (prepare_datasets.main, ['toy', '--src', '.', '--workers', '0'], flag_error('--workers', 'a whole number >= 1', '0')),
    (bench.main, ['-batch', '0'], flag_error('-batch', 'a whole number >= 1', '0')),
    (bench.main, ['-schedule', '-push_epochs', '3', '-2'], flag_error('-push_epochs', 'a whole number >= 1', '-2')),
    (bench.main, ['-schedule', '-seed', '-1'], flag_error('-seed', 'a whole number >= 0', '-1')),
])
def test_numeric_flags_of_the_scripts(capsys, main_fn, argv, tail):
    if main_fn is prepare_datasets.main:  # its names are the real datasets'
        argv = ['animal_mnist', *argv[1:]]
    assert error_line(capsys, main_fn, argv).endswith(tail)


# ---- 6. output paths: a file path, not a folder, not under a file -------------------------------------

def test_finetune_out_naming_a_folder_moves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / 'models'
    mine.mkdir()
    (mine / 'keep.txt').write_text('mine')
    monkeypatch.setattr(finetune_backbone, 'finetune', lambda *a, **k: pytest.fail('trained before refusing'))
    for out in (str(mine), str(mine) + '/'):
        line = error_line(capsys, finetune_backbone.main, ['-dataset', 'toy', '-out', out, '-overwrite', '-device', 'cpu'])
        assert line == 'error: -out %s is a folder, not a file' % out
    assert os.listdir(tmp_path) == ['models'] and os.listdir(mine) == ['keep.txt']
    line = error_line(capsys, finetune_backbone.main, ['-dataset', 'toy', '-out', 'new/', '-device', 'cpu'])
    assert line == 'error: -out new/ is a folder, not a file' and not os.path.exists('new')
    line = error_line(capsys, finetune_backbone.main, ['-dataset', 'toy', '-out', 'models/keep.txt/base.pth',
                                                       '-device', 'cpu'])
    assert line == 'error: -out models/keep.txt/base.pth: %s is a file, not a folder' % (mine / 'keep.txt')


def test_gradcam_output_file_that_is_a_folder(made, tmp_path, capsys):
    (tmp_path / 'grad_test_toy.npy').mkdir()
    line = error_line(capsys, gradcam_extract.main, ['-model', made['base'], '-out_dir', str(tmp_path), '-device', 'cpu',
                                                     '-dataset', 'toy', '-set', *made['sets']])
    assert line == 'error: the output file %s is a folder, not a file' % (tmp_path / 'grad_test_toy.npy')
    assert os.listdir(tmp_path) == ['grad_test_toy.npy']  # the train maps were not extracted either
    (tmp_path / 'file').write_text('')
    line = error_line(capsys, gradcam_extract.main, ['-model', made['base'], '-out_dir', str(tmp_path / 'file'),
                                                     '-device', 'cpu', '-dataset', 'toy', '-set', *made['sets']])
    assert line == 'error: -out_dir %s: %s is a file, not a folder' % (tmp_path / 'file', tmp_path / 'file')


def test_eval_metrics_out_that_is_a_file_or_holds_a_folder(made, tmp_path, capsys):
    args = ['-test_atts', made['test_maps'], '-device', 'cpu', '-dataset', 'toy', '-set', *made['sets']]
    (tmp_path / 'out').write_text('mine')
    line = error_line(capsys, eval_metrics.main, [*args, '-out', str(tmp_path / 'out')])
    assert line == 'error: -out %s: %s is a file, not a folder' % (tmp_path / 'out', tmp_path / 'out')
    (tmp_path / 'res' / 'metrics.md').mkdir(parents=True)
    line = error_line(capsys, eval_metrics.main, [*args, '-out', str(tmp_path / 'res')])
    assert line == 'error: the output file %s is a folder, not a file' % (tmp_path / 'res' / 'metrics.md')
    assert os.listdir(tmp_path / 'res') == ['metrics.md'] and (tmp_path / 'out').read_text() == 'mine'


def test_eval_iou_csv_that_is_a_folder(made, capsys):
    run = os.path.dirname(made['lvw'])
    csv = os.path.join(run, eval_iou.csv_name(made['lvw'], made['test_maps'], 50, 'low'))
    os.makedirs(csv)
    try:
        line = error_line(capsys, eval_iou.main, ['-modeldir', run, '-model', os.path.basename(made['lvw']),
                                                  '-test_atts', made['test_maps'], '-device', 'cpu'])
    finally:
        os.rmdir(csv)
    assert line == 'error: the output file %s is a folder, not a file' % csv


def test_check_output_file_accepts_a_new_file(tmp_path):
    config.check_output_file(str(tmp_path / 'a' / 'b' / 'model.pth'))
    assert os.path.isdir(tmp_path / 'a' / 'b') and os.listdir(tmp_path / 'a' / 'b') == []
    (tmp_path / 'old.pth').write_text('x')
    config.check_output_file(str(tmp_path / 'old.pth'))  # an existing file: the caller decides (-overwrite)


def test_demo_out_naming_a_folder_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo.make_toy, 'generate', lambda *a, **k: pytest.fail('worked before refusing'))
    (tmp_path / 'results').mkdir()
    assert error_line(capsys, demo.main, ['--out', 'results']) == 'error: --out results is a folder, not a file'
    assert os.listdir(tmp_path) == ['results']
