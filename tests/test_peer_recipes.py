"""The peers' training recipes as their authors ran them (augmentation, last batch, FIN init), and
image modes and sizes the loaders must not misread."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import train_peer
from data import image_data
from data.image_data import ImageDataset, image_problem, load_image, to_rgb
from peers import lfi_cam
from run import config

S = 64


def test_each_peer_draws_its_authors_augmentation_by_default(tiny_toy):
    pets = config.resolve_settings('pets')
    toy = config.resolve_settings('toy')
    for s in (pets, toy):
        assert (s['scouter_augment'], s['gc_augment'], s['lfi_augment']) == ('none', 'flip', 'crop_flip')
        assert (s['scouter_drop_last'], s['gc_drop_last'], s['lfi_drop_last']) == (True, False, False)
        assert s['lfi_fin_init'] == 'kaiming'
    s = config.resolve_settings('toy', ['data_path=%r' % (tiny_toy + '/'), 'img_size=%d' % S])
    drawn = {prefix: train_peer.training_images(s, prefix, log=lambda *_: None) for prefix in ('scouter', 'gc', 'lfi')}
    assert (drawn['scouter'].flip, drawn['scouter'].random_crop) == ('none', False)
    assert (drawn['gc'].flip, drawn['gc'].random_crop) == ('joint', False)
    assert (drawn['lfi'].flip, drawn['lfi'].random_crop) == ('joint', True)
    with pytest.raises(config.UserError, match="setting lfi_augment must be one of 'none', 'flip', 'crop_flip'"):
        config.resolve_settings('toy', ['lfi_augment="crop"'])


def test_scouter_drops_the_last_incomplete_batch(tiny_toy):
    """18 training images in batches of 4: SCOUTER sees 4 batches (16 images), GC 5."""
    sets = ['data_path=%r' % (tiny_toy + '/'), 'img_size=%d' % S, 'num_classes=3', 'scouter_batch_size=4',
            'gc_batch_size=4', 'pretrained=False', 'scouter_slots_per_class={"+": 1, "-": 1}',
            'scouter_to_k_layers=1']
    s = config.resolve_settings('toy', sets)
    quiet = lambda *_: None
    scouter = train_peer.prepare(s, 'scouter+', torch.device('cpu'), log=quiet)
    gc = train_peer.prepare(s, 'gc', torch.device('cpu'), log=quiet)
    assert len(scouter.train_loader.dataset) == 18 and len(scouter.train_loader) == 4
    assert sum(len(batch[1]) for batch in scouter.train_loader) == 16
    assert len(gc.train_loader) == 5


def test_random_crop_is_torchvisions_box_of_the_original_image(tmp_path):
    """A 90 x 60 image of known pixels: the loaded crop is that box of the original, resized."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    path = str(tmp_path / 'a.png')
    Image.fromarray(pixels).save(path)
    torch.manual_seed(3)
    loaded = load_image(path, 32, random_crop=True)
    torch.manual_seed(3)
    box = image_data.random_crop_box(Image.fromarray(pixels))
    left, top, right, bottom = box
    assert 0 <= left < right <= 90 and 0 <= top < bottom <= 60
    area = (right - left) * (bottom - top) / (90 * 60)
    assert 0.08 - 1e-9 <= area <= 1.0
    expected = Image.fromarray(pixels).crop(box).resize((32, 32), Image.BILINEAR)
    assert torch.equal(loaded, torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1).float() / 255)
    # boxes differ between draws; without the crop the whole image is resized, as before
    assert len({image_data.random_crop_box(Image.fromarray(pixels)) for _ in range(5)}) > 1
    whole = np.asarray(Image.fromarray(pixels).resize((32, 32), Image.BILINEAR))
    assert torch.equal(load_image(path, 32), torch.from_numpy(whole.copy()).permute(2, 0, 1).float() / 255)


def test_random_crop_refuses_attention_maps(tiny_toy):
    with pytest.raises(ValueError, match='attention maps'):
        ImageDataset(os.path.join(tiny_toy, 'train'), S, attention='x.npy', random_crop=True)


def _fin_conv_stds(init):
    torch.manual_seed(0)
    s = dict(config.resolve_settings('pets'), pretrained=False, base_architecture='resnet18', lfi_fin_init=init,
             lfi_fin_convs=2)
    model = lfi_cam.LFICAMNet(s, num_classes=3)
    return [float(m.weight.detach().std()) for m in model.fin if isinstance(m, nn.Conv2d)]


def test_lfi_fin_starts_from_kaiming_fan_out():
    """3x3 convs 512 -> 512: kaiming_normal_(fan_out, relu) has std sqrt(2 / (9 * 512)) = 0.02083;
    torch's default (uniform, bound 1 / sqrt(fan_in)) has std sqrt(1 / (27 * 512)) = 0.00851.
    Each std is estimated from 2.36M weights: within 1 %."""
    kaiming, default = _fin_conv_stds('kaiming'), _fin_conv_stds('torch')
    for std in kaiming:
        assert std == pytest.approx(math.sqrt(2 / (9 * 512)), rel=0.01)
    for std in default:
        assert std == pytest.approx(math.sqrt(1 / (27 * 512)), rel=0.01)
    assert kaiming[0] / default[0] == pytest.approx(math.sqrt(6), rel=0.02)


def test_lfi_unsafe_division_nan_is_masked_by_the_final_relu():
    """The reference's 0 / 0 on a dead channel: NaN in dL/dE, but E = ReLU(X) keeps dL/dX finite;
    a constant non-zero channel (a 1 x 1 grid) is not masked, which the safe division avoids."""
    def unsafe_normalise(features):
        flat = features.flatten(2)
        shifted = flat - flat.amin(dim=2, keepdim=True)
        scaled = shifted / shifted.amax(dim=2, keepdim=True)
        return torch.where(torch.isnan(scaled), torch.ones_like(scaled), scaled)

    x = torch.randn(1, 2, 3, 3)
    x[0, 0] = -1.0  # channel 0 dead after the ReLU
    x.requires_grad_(True)
    features = torch.relu(x)
    features.retain_grad()
    unsafe_normalise(features).sum().backward()
    assert torch.isnan(features.grad[0, 0]).all() and torch.isfinite(x.grad).all()

    constant = torch.full((1, 2, 1, 1), 0.5, requires_grad=True)
    unsafe_normalise(torch.relu(constant)).sum().backward()
    assert torch.isnan(constant.grad).all()
    safe = torch.full((1, 2, 1, 1), 0.5, requires_grad=True)
    lfi_cam.normalise_features(torch.relu(safe)).sum().backward()
    assert torch.isfinite(safe.grad).all()


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    """A 16-bit PNG with values 0, 257 * 128 and 65535: read as 0, 128 and 255 (not 0, 255, 255)."""
    values = np.array([[0, 257 * 128, 65535, 257 * 64]], dtype=np.uint16).repeat(4, axis=0)
    path = str(tmp_path / 'deep.png')
    Image.fromarray(values).save(path)
    with Image.open(path) as img:
        assert img.mode in image_data.SIXTEEN_BIT_MODES + ('I',)
        rgb = np.asarray(to_rgb(img, path))
    assert rgb.shape == (4, 4, 3) and rgb.dtype == np.uint8
    assert rgb[0, :, 0].tolist() == [0, 128, 255, 64] and (rgb[..., 0] == rgb[..., 2]).all()
    image = load_image(path, 4)
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0 and 0.2 < float(image.mean()) < 0.6


def test_float_images_are_refused_with_a_line(tmp_path):
    path = str(tmp_path / 'float.tif')
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(path)
    with pytest.raises(config.UserError, match=r'image .*float\.tif is floating point \(mode F'):
        load_image(path, 8)


def test_an_image_over_pillows_size_limit_is_a_line(tmp_path, monkeypatch):
    """Pillow refuses images over 2 x MAX_IMAGE_PIXELS (a decompression bomb) with an error that is
    not an OSError; the pre-check and the loader report it as a line naming the file."""
    path = str(tmp_path / 'huge.png')
    Image.new('RGB', (64, 64)).save(path)
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)
    assert 'exceeds limit' in image_problem(path)
    with pytest.raises(config.UserError, match=r'cannot decode image .*huge\.png: Image size \(4096 pixels\)'):
        load_image(path, 8)
    with pytest.raises(config.UserError, match='huge.png'):
        image_data.check_images([path], 'header', 'train images', workers=1)

