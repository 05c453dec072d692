"""Every file a script reads: missing, empty, truncated, of the wrong format or a checkpoint of the
wrong kind is one 'error: ...' line naming it (exit 2, no traceback); the Grad-CAM sidecar's
checksum refuses maps changed after extraction; eval_iou's -thr range and per-map-file CSV names."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import eval_iou
import eval_metrics
import gradcam_extract
import local_analysis
import main as lvw_main
import visualize
from data.image_data import ImageDataset, open_attention_maps, sidecar_path
from metrics import scoring
from model import build_model
from run import config
from run.checkpoint import save_checkpoint
from tests.conftest import ROOT, save_random_base_model, tiny_overrides

LVW_NAME = '1push0.5000.pth'


@pytest.fixture(scope='module')
def files(tmp_path_factory, tiny_toy):
    """A words checkpoint (untrained), a base model and its real Grad-CAM maps of both splits."""
    root = tmp_path_factory.mktemp('inputs')
    sets = tiny_overrides(tiny_toy)
    s = config.resolve_settings('toy', sets)
    test_set = ImageDataset(s['test_dir'], s['img_size'])
    run = root / 'run'
    torch.manual_seed(0)
    net = build_model(s, log=lambda *_: None).eval()
    lvw = save_checkpoint(net, str(run / LVW_NAME), s, test_set.classes, epoch=1, kind='push')
    base = str(root / 'base' / 'toy_resnet18.pth')
    os.makedirs(os.path.dirname(base))
    save_random_base_model(base, s, test_set.classes, seed=0)
    out = gradcam_extract.main(['-model', base, '-out_dir', str(root / 'data'), '-device', 'cpu',
                                '-dataset', 'toy', '-set', *sets])
    return {'root': root, 'run': str(run), 'lvw': lvw, 'base': base, 'sets': sets, 's': s, 'toy': tiny_toy,
            'paths': test_set.paths, 'test_maps': out['test']['path'], 'train_maps': out['train']['path'],
            'image': test_set.samples[0][0]}


def error_line(capsys, main_fn, argv, printed=None):
    """Run `main_fn(argv)` as the scripts do; returns the one stderr line (exit 2, no traceback).
    What it printed on stdout is appended to `printed` when given."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        config.run_cli(main_fn, argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    if printed is not None:
        printed.append(out)
    assert 'Traceback' not in err
    assert err.endswith('\n') and len(err.splitlines()) == 1, err
    return err.rstrip('\n')


def copy_maps(files, tmp_path, name='maps.npy'):
    """A copy of the test maps and their sidecar (checksum line included) under `tmp_path`."""
    path = str(tmp_path / name)
    shutil.copy(files['test_maps'], path)
    shutil.copy(sidecar_path(files['test_maps']), sidecar_path(path))
    return path


def iou_args(files, maps, model=LVW_NAME, modeldir=None, thr='50'):
    return ['-modeldir', modeldir or files['run'], '-model', model, '-test_atts', maps, '-thr', thr, '-device', 'cpu']


# ---- checkpoints -------------------------------------------------------------------------------

def test_zero_byte_checkpoint(files, tmp_path, capsys):
    (tmp_path / 'empty.pth').write_bytes(b'')
    line = error_line(capsys, eval_iou.main, iou_args(files, files['test_maps'], 'empty.pth', str(tmp_path)))
    assert line == 'error: cannot read checkpoint %s: the file is empty (0 bytes)' % (tmp_path / 'empty.pth')


def test_truncated_checkpoint(files, tmp_path, capsys):
    data = open(files['lvw'], 'rb').read()
    (tmp_path / 'half.pth').write_bytes(data[:len(data) // 2])
    line = error_line(capsys, eval_iou.main, iou_args(files, files['test_maps'], 'half.pth', str(tmp_path)))
    assert line == ('error: cannot read checkpoint %s: it is truncated or corrupt (an incomplete zip archive of '
                    '%d bytes; copy or save it again)' % (tmp_path / 'half.pth', len(data) // 2))


def test_base_model_given_to_the_lvw_scripts(files, capsys):
    base = files['base']
    wrong = '%s is a base-model checkpoint (finetune_backbone.py); %s needs an LVW checkpoint (main.py)'
    line = error_line(capsys, eval_iou.main, iou_args(files, files['test_maps'], os.path.basename(base),
                                                      os.path.dirname(base)))
    assert line == 'error: ' + wrong % (base, 'eval_iou.py')
    line = error_line(capsys, local_analysis.main, [base, files['image'], '-device', 'cpu'])
    assert line == 'error: ' + wrong % (base, 'local_analysis.py')
    line = error_line(capsys, visualize.main, [os.path.dirname(base), '-checkpoint', os.path.basename(base)])
    assert line == 'error: ' + wrong % (base, 'visualize.py')
    assert not os.path.exists(os.path.join(os.path.dirname(base), 'report.md'))


def test_lvw_checkpoint_given_to_gradcam_extract(files, tmp_path, capsys):
    argv = ['-model', files['lvw'], '-out_dir', str(tmp_path), '-device', 'cpu',
            '-dataset', 'toy', '-set', *files['sets']]
    line = error_line(capsys, gradcam_extract.main, argv)
    assert line == ('error: %s is an LVW checkpoint (main.py); gradcam_extract.py needs a base-model checkpoint '
                    '(finetune_backbone.py)' % files['lvw'])


@pytest.mark.parametrize('flag,which,message', [
    ('-base', 'lvw', '%s is an LVW checkpoint (main.py); eval_metrics.py -base needs a base-model checkpoint '
                     '(finetune_backbone.py)'),
    ('-lvw', 'base', '%s is a base-model checkpoint (finetune_backbone.py); eval_metrics.py -lvw needs an LVW '
                     'checkpoint (main.py)'),
])
def test_wrong_kind_given_to_eval_metrics(files, tmp_path, capsys, flag, which, message):
    line = error_line(capsys, eval_metrics.main, [flag, files[which], '-out', str(tmp_path), '-device', 'cpu',
                                                  '-dataset', 'toy', '-set', *files['sets']])
    assert line == 'error: ' + message % files[which]


def test_empty_weights_file_to_main(files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'empty.pth').write_bytes(b'')
    line = error_line(capsys, lvw_main.main, ['-dataset', 'toy', '-set', *files['sets'], '-device', 'cpu',
                                              '-train_atts', files['train_maps'], '-test_atts', files['test_maps'],
                                              '-weights', 'empty.pth'])
    assert line == 'error: cannot read weights file empty.pth: the file is empty (0 bytes)'


# ---- other files ---------------------------------------------------------------------------------

def test_push_boxes_of_local_analysis(files, tmp_path, capsys):
    run = tmp_path / 'run'
    shutil.copytree(files['run'], run, ignore=shutil.ignore_patterns('*.csv'))
    (run / 'img' / 'epoch-1').mkdir(parents=True)
    (run / 'img' / 'epoch-1' / 'bb1.npy').write_bytes(b'')
    line = error_line(capsys, local_analysis.main, [str(run / LVW_NAME), files['image'], '-device', 'cpu'])
    boxes = run / 'img' / 'epoch-1' / 'bb1.npy'
    assert line == 'error: cannot read push boxes %s: the file is empty (0 bytes)' % boxes


def test_mask_file_of_eval_metrics(tmp_path):
    image = tmp_path / 'a.png'
    image.write_bytes(b'')
    mask = tmp_path / 'a.masks.npz'
    cut = 'it is truncated or corrupt (an incomplete zip archive of 24 bytes)'
    for content, reason in ((b'', 'the file is empty (0 bytes)'), (b'PK\x03\x04' + b'\0' * 20, cut)):
        mask.write_bytes(content)
        with pytest.raises(config.UserError) as err:
            scoring.load_masks([str(image)], 64)
        assert str(err.value) == 'cannot read mask file %s: %s' % (mask, reason)
    np.save(str(tmp_path / 'plain.npy'), np.zeros((4, 4)))
    os.replace(tmp_path / 'plain.npy', mask)
    with pytest.raises(config.UserError, match='it is a single .npy array, not an .npz archive'):
        scoring.load_masks([str(image)], 64)


# ---- Grad-CAM maps ---------------------------------------------------------------------------------

def test_zero_byte_maps(files, tmp_path, capsys):
    maps = copy_maps(files, tmp_path)
    open(maps, 'wb').close()
    line = error_line(capsys, eval_iou.main, iou_args(files, maps))
    assert line == 'error: cannot read attention maps %s: the file is empty (0 bytes)' % maps


def test_npz_given_as_maps(files, tmp_path, capsys):
    maps = str(tmp_path / 'maps.npz')
    np.savez(maps, maps=np.load(files['test_maps']))
    line = error_line(capsys, eval_iou.main, iou_args(files, maps))
    assert line == ('error: cannot read attention maps %s: it is an .npz archive (or another zip file), '
                    'not a .npy array' % maps)


def test_truncated_maps(files, tmp_path, capsys):
    maps = copy_maps(files, tmp_path)
    data = open(maps, 'rb').read()
    open(maps, 'wb').write(data[:len(data) // 2])
    line = error_line(capsys, eval_iou.main, iou_args(files, maps))
    assert line == ('error: cannot read attention maps %s: it is truncated (%d bytes, shorter than its header says)'
                    % (maps, len(data) // 2))


def test_object_and_flat_arrays_as_maps(files, tmp_path):
    maps = copy_maps(files, tmp_path)
    np.save(maps, np.array([{'a': 1}] * len(files['paths']), dtype=object), allow_pickle=True)
    with pytest.raises(config.UserError) as err:
        open_attention_maps(maps, files['paths'], 64)
    assert str(err.value) == ('cannot read attention maps %s: it holds Python objects (an object array), not numbers'
                              % maps)
    np.save(maps, np.zeros((len(files['paths']), 64 * 64), dtype=np.float32))
    with pytest.raises(config.UserError, match=r'has shape \(9, 4096\); expected \(N, 64, 64\)'):
        open_attention_maps(maps, files['paths'], 64)


@pytest.mark.parametrize('thr,why', [
    ('0', " (at 0 a mask keeps only each map's minimum, or all but it)"),
    ('100', ' (at 100 every map binarises to all-ones and the IoU is 1 for any model)'),
])
def test_thr_must_be_strictly_inside(files, capsys, thr, why):
    line = error_line(capsys, eval_iou.main, iou_args(files, files['test_maps'], thr=thr))
    assert line == 'error: -thr must be a percentile strictly between 0 and 100, got %s%s' % (thr, why)


def changed_line(maps):
    return ('error: %s does not match the checksum in its sidecar maps.txt: the maps changed after extraction; '
            'run gradcam_extract.py again' % maps)


def test_permuted_maps_are_refused(files, tmp_path, capsys):
    maps = copy_maps(files, tmp_path)
    array = np.load(maps)
    array[[0, 1]] = array[[1, 0]]
    np.save(maps, array)  # the sidecar still lists the rows in their first order
    assert error_line(capsys, eval_iou.main, iou_args(files, maps)) == changed_line(maps)


def test_changed_value_is_refused(files, tmp_path, capsys):
    maps = copy_maps(files, tmp_path)
    array = np.load(maps)
    array[4, 10, 10] = 0.5 if array[4, 10, 10] != 0.5 else 0.25  # still a valid map value
    np.save(maps, array)
    assert error_line(capsys, eval_iou.main, iou_args(files, maps)) == changed_line(maps)


def test_untouched_maps_are_accepted(files):
    warnings = []
    maps = open_attention_maps(files['test_maps'], files['paths'], 64, log=warnings.append)
    assert maps.shape == (len(files['paths']), 64, 64) and warnings == []
    with open(sidecar_path(files['test_maps'])) as f:
        assert f.readline().startswith('# maps crc32 ')


def test_sidecar_without_checksum_is_accepted_with_a_warning(files, tmp_path):
    maps = copy_maps(files, tmp_path)
    with open(sidecar_path(maps), 'w') as f:
        f.write(''.join(p + '\n' for p in files['paths']))  # as extractions before the checksum wrote it
    warnings = []
    array = open_attention_maps(maps, files['paths'], 64, log=warnings.append)
    assert np.array_equal(array, np.load(files['test_maps']))
    assert warnings == ['warning: the sidecar maps.txt of %s has no checksum line (an older extraction?); the maps '
                        'are not checked for changes since extraction' % maps]


# ---- eval_iou outputs -------------------------------------------------------------------------------------

def test_two_map_files_write_two_csvs(files, tmp_path, capsys):
    run = tmp_path / 'run'
    shutil.copytree(files['run'], run)
    other = copy_maps(files, tmp_path, 'grad_test_other.npy')
    first = eval_iou.main(iou_args(files, files['test_maps'], modeldir=str(run)))
    printed = capsys.readouterr().out
    assert 'test accuracy: %.4f' % first['accuracy'] in printed and 'test iou: %.4f' % first['iou'] in printed
    second = eval_iou.main(iou_args(files, other, modeldir=str(run)))
    assert second['iou'] == first['iou']
    assert sorted(f for f in os.listdir(run) if f.endswith('.csv')) == [
        '1push0.5000_grad_test_other_iou_thr50_low.csv', '1push0.5000_grad_test_toy_iou_thr50_low.csv']
    assert first['csv'] == str(run / '1push0.5000_grad_test_toy_iou_thr50_low.csv')


def refuse(*_, **__):
    """mkstemp in a read-only folder (chmod cannot show it: tests may run as root)."""
    raise PermissionError(13, 'Permission denied')


def test_unwritable_output_folder_is_refused_before_the_work(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(config.tempfile, 'mkstemp', refuse)
    printed = []
    line = error_line(capsys, eval_iou.main, iou_args(files, files['test_maps']), printed)
    assert line == 'error: cannot write to the output folder %s (Permission denied)' % files['run']
    assert 'test iou' not in printed[0]


def test_gradcam_extract_refuses_an_unwritable_folder_before_extracting(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(config.tempfile, 'mkstemp', refuse)
    out = tmp_path / 'out'
    line = error_line(capsys, gradcam_extract.main, ['-model', files['base'], '-out_dir', str(out), '-device', 'cpu',
                                                     '-dataset', 'toy', '-set', *files['sets']])
    assert line == 'error: cannot write to the output folder %s (Permission denied)' % out
    assert os.listdir(out) == []


def test_eval_iou_as_a_command(tmp_path):
    (tmp_path / 'empty.pth').write_bytes(b'')
    done = subprocess.run([sys.executable, 'eval_iou.py', '-modeldir', str(tmp_path), '-model', 'empty.pth',
                           '-test_atts', str(tmp_path / 'maps.npy'), '-thr', '50'],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert 'Traceback' not in done.stderr
    assert done.stderr.splitlines() == ['error: cannot read checkpoint %s: the file is empty (0 bytes)'
                                        % (tmp_path / 'empty.pth')]


def test_weights_file_of_another_kind(files):
    from model import read_start_state
    with pytest.raises(config.UserError) as err:
        read_start_state(files['lvw'])
    assert str(err.value) == ('%s is an LVW checkpoint (main.py); -weights needs an ImageNet state_dict (torchvision '
                              'format) or a base-model checkpoint (finetune_backbone.py)' % files['lvw'])
    assert 'conv1.weight' in read_start_state(files['base'])  # a base model is a valid start
