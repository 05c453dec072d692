"""local_analysis.py: one PNG and one JSON per image, numbers equal to a direct model computation,
source patches only for checkpoints whose words are patches."""
import json
import os
import re
import shutil

import pytest
import torch
from PIL import Image

import local_analysis
from data.image_data import load_image, normalize
from model import model_from_checkpoint
from run import config
from run.checkpoint import load_checkpoint
from tests.test_visualize import build_run


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory, tiny_toy):
    return build_run(tmp_path_factory.mktemp('local'), tiny_toy)


@pytest.fixture(scope='module')
def test_images(tiny_toy):
    classes = sorted(os.listdir(os.path.join(tiny_toy, 'test')))
    folder = os.path.join(tiny_toy, 'test', classes[1])
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith('.png')][:2]


def direct(ckpt_path, image_path):
    model, s = model_from_checkpoint(load_checkpoint(ckpt_path))
    with torch.no_grad():
        out = model(normalize(load_image(image_path, s['img_size'])[None]))
    return out, model.last_layer.weight.detach()


def test_json_matches_the_model_and_patches_are_shown(tiny_run, test_images, tmp_path):
    ckpt = os.path.join(tiny_run.run, '1_0push0.6000.pth')
    results = local_analysis.main([ckpt, *test_images, '-out', str(tmp_path), '-topk', '4', '-device', 'cpu'])
    assert len(results) == 2
    for path, res in zip(test_images, results):
        stem = os.path.splitext(os.path.basename(path))[0]
        png, js = tmp_path / (stem + '.png'), tmp_path / (stem + '.json')
        assert png.is_file() and js.is_file()
        info = json.loads(js.read_text())
        out, weight = direct(ckpt, path)
        pred = int(out.logits[0].argmax())
        sims = out.similarities[0]
        assert info['prediction']['index'] == pred
        assert info['prediction']['probability'] == pytest.approx(float(torch.softmax(out.logits[0], 0)[pred]), abs=1e-6)
        words = [w['word'] for w in info['words']]
        assert words == torch.argsort(sims, descending=True, stable=True)[:4].tolist()
        assert [w['rank'] for w in info['words']] == [1, 2, 3, 4]
        got = [w['similarity'] for w in info['words']]
        assert got == sorted(got, reverse=True)
        for w in info['words']:
            p = w['word']
            assert w['similarity'] == pytest.approx(float(sims[p]), abs=1e-5)
            assert w['weight'] == pytest.approx(float(weight[pred, p]), abs=1e-6)
            assert w['contribution'] == pytest.approx(float(weight[pred, p] * sims[p]), abs=1e-5)
            assert w['contribution'] == pytest.approx(w['weight'] * w['similarity'], abs=1e-5)
            h0, h1, w0, w1 = w['activation_box']
            assert 0 <= h0 < h1 <= 64 and 0 <= w0 < w1 <= 64
            src = w['source']
            assert src is not None and os.path.isfile(src['patch_png']) and os.path.isfile(src['source_overlay_png'])
            assert os.path.dirname(src['patch_png']) == tiny_run.img_dir
            assert src['train_image_index'] == int(tiny_run.found['image'][p])
            assert src['class'] == tiny_run.classes[int(tiny_run.found['label'][p])]
        # the logit of the prediction is the sum of all P contributions (no bias)
        assert info['logit_predicted'] == pytest.approx(float((weight[pred] * sims).sum()), abs=1e-4)
        assert info['words_are_patches'] is True and info['kind'] == 'last' and info['epoch'] == 1
        assert info['true_class']['name'] == tiny_run.classes[1] and info['correct'] == (pred == 1)
        with Image.open(png) as img:
            assert img.width == 60 + 3 * (112 + 8) + 430 + 16
            assert img.height == (224 + 16 + 22) + 22 + 4 * 120 + 8


def test_nopush_checkpoint_shows_no_patches(tiny_run, test_images, tmp_path):
    ckpt = os.path.join(tiny_run.run, '1nopush0.5000.pth')
    info = local_analysis.main([ckpt, test_images[0], '-out', str(tmp_path), '-topk', '3'])[0]
    assert info['words_are_patches'] is False and info['kind'] == 'nopush'
    assert 'not training patches' in info['patch_note']
    assert all(w['source'] is None for w in info['words'])
    out, weight = direct(ckpt, test_images[0])
    pred = info['prediction']['index']
    for w in info['words']:
        assert w['contribution'] == pytest.approx(float(weight[pred, w['word']] * out.similarities[0, w['word']]), abs=1e-5)


def test_push_checkpoint_without_pictures(tiny_run, test_images, tmp_path):
    run = tmp_path / 'copy'
    run.mkdir()
    shutil.copy(os.path.join(tiny_run.run, '1push0.6000.pth'), run)
    info = local_analysis.main([str(run / '1push0.6000.pth'), test_images[0], '-topk', '2'])[0]
    assert info['words_are_patches'] is False and 'no push pictures' in info['patch_note']
    stem = os.path.splitext(os.path.basename(test_images[0]))[0]
    assert (run / 'local_analysis' / (stem + '.png')).is_file()  # the default output folder


def test_same_stem_twice_and_errors(tiny_run, test_images, tmp_path):
    ckpt = os.path.join(tiny_run.run, '1_0push0.6000.pth')
    other = tmp_path / 'elsewhere'
    other.mkdir()
    shutil.copy(test_images[0], other)
    copy = str(other / os.path.basename(test_images[0]))
    results = local_analysis.main([ckpt, test_images[0], copy, '-out', str(tmp_path / 'o'), '-topk', '1'])
    assert [os.path.basename(r['png']) for r in results] == [
        os.path.basename(test_images[0]), os.path.basename(test_images[0])[:-4] + '_2.png']
    assert results[1]['true_class'] is None  # not inside a class folder
    with pytest.raises(config.UserError, match='image not found'):
        local_analysis.main([ckpt, str(tmp_path / 'nope.png')])
    with pytest.raises(config.UserError, match='-topk must be between 1 and the number of words'):
        local_analysis.main([ckpt, test_images[0], '-topk', '16'])
    with pytest.raises(config.UserError, match='checkpoint not found'):
        local_analysis.main([str(tmp_path / 'x.pth'), test_images[0]])
    bad = tmp_path / 'bad.png'
    bad.write_text('not an image')
    with pytest.raises(config.UserError, match='cannot decode image %s: ' % re.escape(str(bad))):
        local_analysis.main([ckpt, str(bad), '-out', str(tmp_path / 'o')])
