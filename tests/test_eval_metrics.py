"""eval_metrics.py: every number in metrics.json equals a direct interp_metrics call on maps built
here; errors for missing masks, mismatched classes and missing files."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import eval_metrics as em
from data.image_data import ImageDataset, normalize
from finetune_backbone import load_base_model
from gradcam_extract import gradcam
from metrics import interp_metrics as im, perturbation_metrics as pert, scoring, word_metrics as wm
from model import model_from_checkpoint
from run import config
from run.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import save_random_base_model, tiny_overrides
from tests.test_visualize import build_run
from train_and_test import word_attention_map

S = 64


@pytest.fixture(scope='module')
def setup(tmp_path_factory, tiny_toy):
    root = tmp_path_factory.mktemp('metrics')
    run = build_run(root, tiny_toy)
    test = ImageDataset(os.path.join(tiny_toy, 'test'), S)
    base_path = str(root / 'base.pth')
    save_random_base_model(base_path, run.s, test.classes, seed=3)
    atts = str(root / 'grad_test.npy')
    rng = np.random.default_rng(0)
    np.save(atts, rng.random((len(test), S, S), dtype=np.float32))
    with open(atts[:-4] + '.txt', 'w') as f:
        f.write(''.join(p + '\n' for p in test.paths))
    return {'run': run, 'test': test, 'base': base_path, 'atts': atts, 'root': root, 'toy': tiny_toy,
            'lvw': os.path.join(run.run, '1_0push0.6000.pth'), 'other': os.path.join(run.run, '1nopush0.5000.pth')}


def settings_args(toy, **extra):
    return ['-dataset', 'toy', '-set', *tiny_overrides(toy, **extra)]


def word_maps(ckpt_path, images):
    model, s = model_from_checkpoint(load_checkpoint(ckpt_path))
    with torch.no_grad():
        out = model(normalize(images))
    maps = word_attention_map(out.similarity_maps, out.min_distances, s['topk'], S,
                              s['eval_map_interpolation'], s['eval_map_normalisation'])
    return maps, out, model, s


def test_metrics_equal_direct_interp_metrics_calls(setup, tmp_path):
    out_dir = str(tmp_path / 'm')
    res = em.main(['-lvw', setup['lvw'], '-protopnet', setup['other'], '-base', setup['base'],
                   '-test_atts', setup['atts'], '-out', out_dir, '-auc_images', '3', '-step', '1024',
                   '-batch_size', '4', '-purity_n', '3', '-device', 'cpu', *settings_args(setup['toy'])])
    saved = json.load(open(os.path.join(out_dir, 'metrics.json')))
    md = open(os.path.join(out_dir, 'metrics.md')).read()
    assert '| metric | lvw | protopnet | gradcam | better |' in md
    assert saved['n_images'] == 9 and saved['auc_images'] == 3 and set(saved['sources']) == {'lvw', 'protopnet', 'gradcam'}

    test = setup['test']
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = torch.tensor([label for _, label in test.samples])
    gt = scoring.load_masks([p for p, _ in test.samples], S)
    obj, parts = gt['object'], gt['parts']
    assert gt['part_names'] == ['head', 'body', 'tail', 'marking'] and parts.shape == (9, 4, S, S)
    tau = im.pointing_tolerance(S)
    gradcam_maps = torch.from_numpy(np.load(setup['atts']))
    lvw_maps, lvw_out, lvw_model, s = word_maps(setup['lvw'], images)
    other_maps = word_maps(setup['other'], images)[0]
    all_maps = {'lvw': lvw_maps, 'protopnet': other_maps, 'gradcam': gradcam_maps}

    for name, maps in all_maps.items():
        m = saved['sources'][name]['metrics']
        summary = im.pointing_game_summary(im.pointing_game_hits(maps, obj, tau), labels, 3)
        # the headline is the class mean over the classes present (issue 8); all 3 are here
        assert m['pointing_game']['value'] == pytest.approx(summary['class_mean_present'], abs=1e-9)
        assert m['pointing_game']['averaging'] == 'class mean over the 3 of 3 classes present'
        assert m['pointing_game']['classes_present'] == 3
        assert m['pointing_game']['class_mean_all_classes_torchray'] == pytest.approx(summary['class_mean_all'])
        assert m['pointing_game']['image_mean'] == pytest.approx(summary['image_mean'], abs=1e-9)
        assert m['pointing_game']['params']['tau_px'] == pytest.approx(tau, abs=1e-4)
        spg = torch.tensor([float(im.stochastic_pointing_game(maps[i:i + 1], obj[i:i + 1], tau, 100, seed=i)[0])
                            for i in range(9)])
        assert m['stochastic_pointing_game']['value'] == pytest.approx(im.image_mean(spg)[0], abs=1e-4)
        assert m['content_heatmap']['value'] == pytest.approx(im.image_mean(im.content_heatmap(maps, obj))[0], abs=1e-4)
        head = im.pointing_game_hits(maps, parts[:, 0], tau)
        assert m['pointing_game_head']['value'] == pytest.approx(im.image_mean(head)[0], abs=1e-9)
        assert m['content_heatmap_tail']['value'] == pytest.approx(
            im.image_mean(im.content_heatmap(maps, parts[:, 2]))[0], abs=1e-4)
        for key in ('pointing_game', 'stochastic_pointing_game', 'content_heatmap', 'insertion_auc', 'deletion_auc'):
            assert m[key]['averaging'] and isinstance(m[key]['params'], dict)
        assert 0 <= m['pointing_game']['value'] <= 1 and 0 <= m['content_heatmap']['value'] <= 100
        assert 0 <= m['insertion_auc']['value'] <= 1 and 0 <= m['deletion_auc']['value'] <= 1
        assert len(m['insertion_auc']['mean_curve']) == math.ceil(S * S / 1024) + 1

    for pair, value in saved['stability_iou'].items():
        a, b = pair.split(' vs ')
        direct = im.image_mean(im.stability_iou(all_maps[a], all_maps[b]))[0]
        assert value['value'] == pytest.approx(direct, abs=1e-9)
    assert set(saved['stability_iou']) == {'lvw vs protopnet', 'lvw vs gradcam', 'protopnet vs gradcam'}

    # insertion / deletion of the LVW map with the LVW softmax on the 3 evenly spaced images
    sub = [0, 4, 8]
    proba = lambda x: torch.softmax(lvw_model(x).logits, dim=1)  # noqa: E731
    ins = pert.insertion_auc(proba, normalize(images[sub]), lvw_maps[sub], step=1024)
    dele = pert.deletion_auc(proba, normalize(images[sub]), lvw_maps[sub], step=1024)
    lvw = saved['sources']['lvw']
    assert lvw['metrics']['insertion_auc']['value'] == pytest.approx(float(ins.mean()), abs=1e-4)
    assert lvw['metrics']['deletion_auc']['value'] == pytest.approx(float(dele.mean()), abs=1e-4)
    assert lvw['accuracy'] == pytest.approx(float((lvw_out.logits.argmax(1) == labels).double().mean()))

    # words: classes per word from the last layer, part purity of the top locations
    counts, mean = wm.classes_per_word(lvw_model.last_layer.weight)
    assert lvw['words']['classes_per_word']['value'] == pytest.approx(mean)
    assert lvw['words']['classes_per_word']['counts'] == counts.tolist()
    up = torch.nn.functional.interpolate(lvw_out.similarity_maps, size=(S, S), mode='bicubic', align_corners=False)
    locations = wm.top_locations(up, 3)
    purity = wm.part_purity(locations, parts, gt['part_names'])
    assert lvw['words']['part_purity']['value'] == pytest.approx(purity['mean_purity'], abs=1e-9)
    assert lvw['words']['part_purity']['dominant'] == purity['dominant']
    on_object = obj[locations[..., 0], locations[..., 1], locations[..., 2]].double().mean(1)
    assert lvw['words']['top_locations_on_object']['value'] == pytest.approx(float(on_object.mean()))
    assert 1 <= lvw['words']['image_classes_per_word']['value'] <= 3
    assert res['sources']['lvw']['metrics']['pointing_game']['value'] == lvw['metrics']['pointing_game']['value']

    # the fair rules: each word's top cells (raw maps), and the Grad-CAM map's argmax cell per image
    grid = tuple(lvw_out.similarity_maps.shape[2:])
    cells = wm.top_locations(lvw_out.similarity_maps, 3)
    assert lvw['cells']['top_cells_on_object']['value'] == pytest.approx(
        float(wm.cells_on_mask(cells, obj, grid).double().mean()), abs=1e-12)
    assert lvw['cells']['top_cells_near_object']['value'] == pytest.approx(
        float(wm.cells_near_mask(cells, obj, grid, tau).double().mean()), abs=1e-12)
    assert lvw['cells']['distinct_words']['value'] == wm.distinct_words(lvw_model.prototype_vectors)
    g_cells = wm.map_top_cells(gradcam_maps, grid)
    assert saved['sources']['gradcam']['cells']['top_cells_on_object']['value'] == pytest.approx(
        float(wm.cells_on_mask(g_cells, obj, grid).double().mean()), abs=1e-12)
    assert saved['sources']['gradcam']['cells']['top_cells_on_object']['n'] == 9
    # the part-level rules: each top cell's part, each word's dominant one, each class's coverage
    counts = wm.word_part_counts(wm.cell_parts(cells, parts, grid), 4)
    assert lvw['cells']['top_cells_on_parts']['counts'] == counts.tolist()
    assert lvw['cells']['top_cells_on_parts']['value'] == pytest.approx(
        float((counts[:, :4].sum(1).double() / counts.sum(1).double()).mean()), abs=1e-12)
    covered = wm.class_part_coverage(wm.word_use(lvw_model.last_layer.weight), counts.argmax(1), 4)
    assert lvw['cells']['class_part_coverage']['value'] == pytest.approx(float(covered.double().mean()), abs=1e-12)
    assert 'top_cells_on_parts' not in saved['sources']['gradcam']['cells']
    assert '| classes: share of their parts covered by their words |' in md
    assert lvw['cells']['top_cells_on_parts']['top_cells'] == cells.tolist()
    from PIL import Image
    picture = Image.open(os.path.join(out_dir, 'parts_lvw.png'))
    assert picture.size[1] == 20 + 3 * (56 + 2 * 4 + 4)  # a legend and one row per class
    assert not os.path.exists(os.path.join(out_dir, 'parts_gradcam.png'))


def test_gradcam_computed_from_the_base_model(setup, tmp_path):
    res = em.main(['-base', setup['base'], '-out', str(tmp_path), '-auc_images', '0', '-max_images', '5',
                   *settings_args(setup['toy'])])
    test = setup['test']
    idx = scoring.evenly_spaced(9, 5)
    assert idx == [0, 2, 4, 6, 8] and res['n_images'] == 5
    images = torch.stack([test[i][0] for i in idx])
    model, _ = load_base_model(setup['base'])
    maps, _ = gradcam(model, normalize(images))
    obj = scoring.load_masks([test.samples[i][0] for i in idx], S)['object']
    labels = torch.tensor([test.samples[i][1] for i in idx])
    summary = im.pointing_game_summary(im.pointing_game_hits(maps, obj, im.pointing_tolerance(S)), labels, 3)
    m = res['sources']['gradcam']['metrics']
    assert m['pointing_game']['value'] == pytest.approx(summary['class_mean_present'], abs=1e-9)
    assert 'insertion_auc' not in m and res['auc_images'] == 0
    assert res['stability_iou'] == {}


def test_class_mean_over_the_classes_present(setup, tmp_path, capsys):
    # Issue 8: -max_images 2 of 9 images (3 per class) takes images 0 and 8, of classes 0 and 2.
    # The headline pointing game averages those 2 classes; class 1, with no image, no longer counts
    # as 0 (TorchRay's all-class mean is kept beside it, and the run says so).
    res = em.main(['-test_atts', setup['atts'], '-out', str(tmp_path), '-auc_images', '0', '-max_images', '2',
                   *settings_args(setup['toy'])])
    test = setup['test']
    obj = scoring.load_masks([test.samples[i][0] for i in (0, 8)], S)['object']
    maps = torch.from_numpy(np.load(setup['atts'])[[0, 8]])
    hits = im.pointing_game_hits(maps, obj, im.pointing_tolerance(S))
    pg = res['sources']['gradcam']['metrics']['pointing_game']
    assert pg['value'] == pytest.approx(float(hits.double().mean()))  # (acc_0 + acc_2) / 2, one image each
    assert pg['class_mean_all_classes_torchray'] == pytest.approx(float(hits.double().sum()) / 3)
    assert pg['averaging'] == 'class mean over the 2 of 3 classes present' and pg['classes_present'] == 2
    assert pg['per_class'][1] is None
    assert ('pointing game: the 2 images evaluated cover 2 of the 3 classes; its class mean is over those 2 '
            '(TorchRay\'s mean over all 3, absent classes as 0, is reported beside it)') in capsys.readouterr().out
    md = open(os.path.join(str(tmp_path), 'metrics.md')).read()
    assert '| pointing game (object), TorchRay mean over all 3 classes (absent = 0) |' in md


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_nonfinite_map_is_a_one_line_user_error(setup, tmp_path, monkeypatch, capsys, bad):
    # Issue 8: a NaN map's argmax fell outside the image and could score a hit. eval_metrics now
    # checks every source's maps once, before any metric, and names the source and the image.
    batch = em.GradCamSource.batch

    def broken_batch(self, images_n, labels, indices):
        maps, preds = batch(self, images_n, labels, indices)
        maps = maps.clone()
        for j, i in enumerate(indices):
            if i in (4, 7):  # 4 is the first offending image, in the second batch of 3
                maps[j, 5, 6] = bad
        return maps, preds

    monkeypatch.setattr(em.GradCamSource, 'batch', broken_batch)
    argv = ['-test_atts', setup['atts'], '-out', str(tmp_path), '-auc_images', '0', '-batch_size', '3',
            *settings_args(setup['toy'])]
    image = os.path.relpath(setup['test'].samples[4][0], os.path.join(setup['toy'], 'test'))
    with pytest.raises(SystemExit) as exit_info:
        config.run_cli(em.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == 'error: source gradcam: the map of test image %s holds NaN or inf values\n' % image
    assert not os.path.exists(os.path.join(str(tmp_path), 'metrics.json'))


def test_masks_are_resized_with_nearest(tmp_path):
    img = tmp_path / 'a.png'
    img.write_bytes(b'')
    big = np.zeros((128, 96), dtype=bool)
    big[10:70, 20:50] = True
    np.savez(str(tmp_path / 'a.masks.npz'), object=big)
    gt = scoring.load_masks([str(img)], 64)
    assert gt['object'].shape == (1, 64, 64) and gt['parts'] is None
    from PIL import Image
    expected = np.asarray(Image.fromarray(big.astype(np.uint8) * 255).resize((64, 64), Image.NEAREST)) > 127
    assert np.array_equal(gt['object'][0].numpy(), expected)


def test_user_errors(setup, tmp_path):
    args = settings_args(setup['toy'])
    with pytest.raises(config.UserError, match='give at least one map source'):
        em.main(args)
    with pytest.raises(config.UserError, match='-lvw: file not found'):
        em.main(['-lvw', str(tmp_path / 'nope.pth'), *args])
    # a test set without masks, and one with a mask missing
    bare = tmp_path / 'bare'
    shutil.copytree(os.path.join(setup['toy'], 'test'), bare / 'test', ignore=shutil.ignore_patterns('*.npz'))
    with pytest.raises(config.UserError, match='has no ground-truth masks'):
        em.main(['-lvw', setup['lvw'], *settings_args(str(bare))])
    partial = tmp_path / 'partial'
    shutil.copytree(os.path.join(setup['toy'], 'test'), partial / 'test')
    first = sorted(p for p in (partial / 'test').rglob('*.masks.npz'))[0]
    first.unlink()
    with pytest.raises(config.UserError, match='1 of 9 test images have no mask file'):
        em.main(['-lvw', setup['lvw'], *settings_args(str(partial))])
    # a checkpoint of other classes
    ckpt = load_checkpoint(setup['lvw'])
    model, s = model_from_checkpoint(ckpt)
    other = str(tmp_path / '1push0.1000.pth')
    save_checkpoint(model, other, s, ['x', 'y', 'z'], epoch=1, kind='push')
    with pytest.raises(config.UserError, match='different classes'):
        em.main(['-lvw', other, *args])
    with pytest.raises(SystemExit):
        em.main(['-lvw', setup['lvw'], '-auc_images', 'many', *args])
