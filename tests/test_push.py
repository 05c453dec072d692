"""Push picks the brute-force nearest patch; artefacts and boxes."""

import numpy as np
import pytest
import torch

from data.image_data import normalize
from model import LVWNet, ResNetFeatures, squared_distances
from push import high_activation_boxes, push_prototypes


class TensorImages(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def setup(seed=0, n=7, P=6):
    torch.manual_seed(seed)
    net = LVWNet(ResNetFeatures('resnet18'), (P, 128, 1, 1), 3).eval()
    images = torch.rand(n, 3, 64, 64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0][:n])
    loader = torch.utils.data.DataLoader(TensorImages(images, labels), batch_size=3, shuffle=False)
    return net, images, labels, loader


def brute_force(net, images, labels, class_specific):
    """For each word, loop over every image and position; keep the first strict minimum."""
    with torch.no_grad():
        z = net.conv_features(normalize(images))
    P = net.prototype_vectors.shape[0]
    words = net.prototype_vectors.view(P, -1)
    word_class = net.prototype_class_identity.argmax(1)
    picks = []
    for p in range(P):
        best, where = float('inf'), None
        for i in range(len(images)):
            if class_specific and labels[i] != word_class[p]:
                continue
            for h in range(z.shape[2]):
                for w in range(z.shape[3]):
                    d = ((z[i, :, h, w] - words[p]) ** 2).sum().item()
                    if d < best - 1e-6:
                        best, where = d, (i, h, w)
        picks.append(where)
    return z, picks


@pytest.mark.parametrize('class_specific', [False, True])
def test_push_picks_the_brute_force_nearest_patch(class_specific):
    net, images, labels, loader = setup()
    z, expected = brute_force(net, images, labels, class_specific)
    found = push_prototypes(net, loader, torch.device('cpu'), class_specific, log=lambda *_: None)
    got = list(zip(found['image'].tolist(), found['h'].tolist(), found['w'].tolist()))
    assert got == expected
    for p, (i, h, w) in enumerate(expected):
        assert torch.allclose(net.prototype_vectors[p, :, 0, 0], z[i, :, h, w], atol=1e-6)
        assert found['label'][p].item() == labels[i].item()
    if class_specific:  # every word lands on an image of its own class
        assert (found['label'] == net.prototype_class_identity.argmax(1)).all()
    # after the push every word sits exactly on a patch: its min distance over the set is ~0
    with torch.no_grad():
        d = squared_distances(net.conv_features(normalize(images)), net.prototype_vectors)
    assert d.amin(dim=(0, 2, 3)).max().item() < 1e-4


def test_push_writes_the_artefacts(tmp_path):
    net, images, labels, loader = setup()
    folder = tmp_path / 'img' / 'epoch-3'
    found = push_prototypes(net, loader, torch.device('cpu'), False, epoch=3, folder=str(folder),
                            rf_info=[2, 32, 435, 0.5], img_size=64, log=lambda *_: None)
    bb = np.load(folder / 'bb3.npy')
    bb_rf = np.load(folder / 'bb-receptive_field3.npy')
    assert bb.shape == (6, 6) and bb_rf.shape == (6, 6)
    assert (bb[:, 0] == found['image'].numpy()).all() and (bb[:, 5] == found['label'].numpy()).all()
    assert (bb_rf[:, 1:5] == [0, 64, 0, 64]).all()  # ResNet receptive fields cover a 64 px image
    from PIL import Image
    for p in range(6):
        for name in ('prototype-img-original%d.png', 'prototype-img-original_with_self_act%d.png'):
            assert Image.open(folder / (name % p)).size == (64, 64)
        h0, h1, w0, w1 = bb[p, 1:5]
        assert Image.open(folder / ('prototype-img%d.png' % p)).size == (w1 - w0, h1 - h0)
        assert np.load(folder / ('prototype-self-act%d.npy' % p)).shape == (2, 2)


def test_high_activation_box_matches_numpy_percentile():
    torch.manual_seed(1)
    maps = torch.rand(3, 4, 4)
    boxes, up = high_activation_boxes(maps, 32)
    for p in range(3):
        a = up[p].numpy()
        mask = a >= np.percentile(a, 95)
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        assert boxes[p].tolist() == [rows[0], rows[-1] + 1, cols[0], cols[-1] + 1]
    peak = torch.zeros(1, 4, 4)
    peak[0, 0, 3] = 1.0  # top-right cell
    (h0, h1, w0, w1), = high_activation_boxes(peak, 32)[0].tolist()
    assert h0 == 0 and w1 == 32 and h1 <= 12 and w0 >= 20
