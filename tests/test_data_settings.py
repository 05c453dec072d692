"""Toy data generator, image/Grad-CAM pairing and flips, settings resolution."""
import itertools
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data import make_toy
from data.image_data import ImageDataset, sidecar_path
from run import config


# ---- toy data ---------------------------------------------------------------------------------

def test_class_design_shares_every_variant():
    rows = make_toy.orthogonal_array_l9()
    assert len(set(rows)) == 9
    for slot in range(4):  # every variant of every slot is used by exactly 3 classes
        assert sorted(sum(r[slot] == v for r in rows) for v in range(3)) == [3, 3, 3]
    for a, b in itertools.combinations(rows, 2):  # two classes agree in at most one slot
        assert sum(x == y for x, y in zip(a, b)) <= 1
    sep = make_toy.separating_parts(9)
    assert all(len(sep[i][j]) >= 3 for i in range(9) for j in range(9) if i != j)
    assert sep[0][1] == sep[1][0] and sep[4][4] == []


def test_rendering_is_deterministic_and_masks_are_consistent():
    img_a, m_a = make_toy.render_image(np.random.default_rng([0, 1, 2]), (0, 1, 2, 0), 64)
    img_b, m_b = make_toy.render_image(np.random.default_rng([0, 1, 2]), (0, 1, 2, 0), 64)
    assert np.array_equal(img_a, img_b) and np.array_equal(m_a['parts'], m_b['parts'])
    assert img_a.shape == (64, 64, 3) and img_a.dtype == np.uint8
    parts, obj = m_a['parts'], m_a['object']
    assert parts.shape == (4, 64, 64) and list(m_a['part_names']) == ['head', 'body', 'tail', 'marking']
    assert all(p.sum() > 0 for p in parts)
    assert not (parts & ~obj).any()  # each part lies inside the object
    assert not (m_a['distractors'] & obj).any() or (m_a['distractors'] & obj).sum() < 10
    # the body (variant 'box', green) is where the mask says: its pixels are green-dominant
    body_only = parts[1] & ~parts[3] & ~parts[0]
    rgb = img_a[body_only].astype(int).mean(0)
    assert rgb[1] > rgb[0] and rgb[1] > rgb[2]


def test_generated_folder_layout(tiny_toy):
    classes = sorted(os.listdir(os.path.join(tiny_toy, 'train')))
    assert classes == make_toy.class_names(3)
    for split, n in (('train', 6), ('test', 3)):
        for c in classes:
            files = sorted(os.listdir(os.path.join(tiny_toy, split, c)))
            assert len([f for f in files if f.endswith('.png')]) == n
            assert len([f for f in files if f.endswith('.masks.npz')]) == n
    meta_before = os.path.getmtime(os.path.join(tiny_toy, 'meta.json'))
    make_toy.generate(tiny_toy, size=64, train_per_class=6, test_per_class=3, num_classes=3, workers=1)
    assert os.path.getmtime(os.path.join(tiny_toy, 'meta.json')) == meta_before  # same parameters: nothing written
    with pytest.raises(FileExistsError):
        make_toy.generate(tiny_toy, size=32, train_per_class=1, test_per_class=1, num_classes=3, workers=1)


# ---- Grad-CAM pairing ---------------------------------------------------------------------------

def write_maps(path, maps, paths=None):
    np.save(path, maps.astype(np.float32))
    if paths is not None:
        with open(sidecar_path(path), 'w') as f:
            f.write(''.join(p + '\n' for p in paths))


def test_attention_pairing_is_checked(tiny_toy, tmp_path):
    test_dir = os.path.join(tiny_toy, 'test')
    paths = ImageDataset(test_dir, 64).paths
    good = tmp_path / 'good.npy'
    write_maps(good, np.random.rand(len(paths), 64, 64), paths)
    ds = ImageDataset(test_dir, 64, attention=str(good))
    image, att, label = ds[4]
    assert image.shape == (3, 64, 64) and att.shape == (64, 64) and label == 1

    swapped = paths[:]
    swapped[2], swapped[5] = swapped[5], swapped[2]
    bad = tmp_path / 'swapped.npy'
    write_maps(bad, np.random.rand(len(paths), 64, 64), swapped)
    with pytest.raises(config.UserError, match='row 2 is %s in its sidecar but %s in the folder'
                       % (swapped[2], paths[2])):
        ImageDataset(test_dir, 64, attention=str(bad))

    short = tmp_path / 'short.npy'
    write_maps(short, np.random.rand(len(paths) - 1, 64, 64), paths[:-1])
    with pytest.raises(config.UserError, match='has 8 maps for 9 images .first unmatched: %s' % paths[-1]):
        ImageDataset(test_dir, 64, attention=str(short))

    no_sidecar = tmp_path / 'plain.npy'
    write_maps(no_sidecar, np.random.rand(len(paths), 64, 64))
    warnings = []
    ImageDataset(test_dir, 64, attention=str(no_sidecar), log=warnings.append)
    assert len(warnings) == 1 and 'no sidecar' in warnings[0]

    for maps, message in ((np.random.rand(len(paths), 32, 32), 'shape'), (255 * np.random.rand(len(paths), 64, 64), r'\[0, 1\]')):
        path = tmp_path / 'wrong.npy'
        write_maps(path, maps, paths)
        with pytest.raises(config.UserError, match=message):
            ImageDataset(test_dir, 64, attention=str(path))


def test_joint_flip_keeps_image_and_map_aligned(tmp_path):
    root = tmp_path / 'set' / 'a'
    root.mkdir(parents=True)
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[:, :4] = 255  # bright left band
    Image.fromarray(pixels).save(root / 'x.png')
    maps = tmp_path / 'maps.npy'
    write_maps(maps, (pixels[None, :, :, 0] / 255.0), ['a/x.png'])

    def misaligned_fraction(flip):
        torch.manual_seed(0)
        ds = ImageDataset(str(tmp_path / 'set'), 16, attention=str(maps), flip=flip)
        bad = 0
        for _ in range(200):
            image, att, _ = ds[0]
            bad += int(not torch.allclose(image[0], att, atol=1e-6))
        return bad / 200

    assert misaligned_fraction('joint') == 0.0
    assert 0.38 < misaligned_fraction('double') < 0.62  # the reference's bug: half the targets mirrored
    assert misaligned_fraction('none') == 0.0


# ---- settings -------------------------------------------------------------------------------------

def test_pets_preset_is_the_reference():
    s = config.resolve_settings('pets')
    assert s['base_architecture'] == 'resnet34' and s['img_size'] == 224
    assert s['prototype_shape'] == (185, 128, 1, 1) and s['num_classes'] == 37
    assert (s['train_batch_size'], s['test_batch_size'], s['train_push_batch_size']) == (80, 100, 75)
    assert s['joint_optimizer_lrs'] == {'features': 1e-4, 'add_on_layers': 3e-3, 'prototype_vectors': 3e-3}
    assert s['warm_optimizer_lrs'] == {'add_on_layers': 3e-3, 'prototype_vectors': 3e-3}
    assert s['last_layer_optimizer_lr'] == 1e-4 and s['joint_lr_step_size'] == 5
    assert s['coefs'] == {'crs_ent': 1, 'clst': 0.8, 'sep': -0.08, 'l1': 1e-4}
    assert (s['num_train_epochs'], s['num_warm_epochs'], s['push_start']) == (201, 10, 10)
    assert s['push_epochs'] == list(range(0, 201, 10))
    assert (s['attention_weight'], s['topk'], s['last_layer_iterations'], s['save_threshold']) == (10, 10, 20, 0.70)
    assert s['class_specific'] is False
    assert s['train_dir'] == './data/pets/train/' and s['train_push_dir'] == s['train_dir']


@pytest.mark.parametrize('name,classes', [('dogs', 120), ('awa2', 50), ('flowers', 102), ('stl10', 10),
                                          ('pets', 37), ('food101', 101), ('toy', 9)])
def test_presets_have_five_words_per_class(name, classes):
    s = config.resolve_settings(name)
    assert s['num_classes'] == classes and s['prototype_shape'][0] == 5 * classes


def test_overrides():
    s = config.resolve_settings('toy', ['num_train_epochs=21', 'push_interval=10', 'push_epochs=None',
                                        'experiment_run=my_run', "coefs={'crs_ent': 1, 'clst': 0.5, 'sep': 0, 'l1': 0}",
                                        'data_path=/x/y/'])
    assert s['push_epochs'] == [0, 10, 20] and s['experiment_run'] == 'my_run'
    assert s['coefs']['clst'] == 0.5 and s['test_dir'] == '/x/y/test/'
    for bad, message in ((['nope=1'], "unknown settings name 'nope'"), (['img_size=big'], 'not a Python literal'),
                         (['img_size=1.5e'], 'not a Python literal'), (['class_specific=1'], 'expected a value like'),
                         (['topk=99'], 'topk must be'), (['attention_flip="sideways"'], 'attention_flip must be'),
                         (['dataset="pets"'], '-dataset'), (['img_size'], 'NAME=VALUE')):
        with pytest.raises(config.UserError, match=message):
            config.resolve_settings('toy', bad)
    with pytest.raises(config.UserError, match="unknown dataset 'imagenet'"):
        config.resolve_settings('imagenet')
