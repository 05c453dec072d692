"""Grad-CAM against an independent per-image autograd computation; IoU properties."""
import cv2
import numpy as np
import pytest
import torch
import torchvision

from gradcam_extract import gradcam
from metrics.iou import map_iou, mask_iou, percentile_masks


def reference_gradcam(model, image, target=None):
    """One image at a time, with a forward hook and retain_grad, numpy + cv2 for the rest,
    following pytorch-grad-cam's steps."""
    store = {}

    def hook(_module, _inputs, output):
        output.retain_grad()
        store['a'] = output

    handle = model.layer4[-1].register_forward_hook(hook)
    logits = model(image[None])
    handle.remove()
    t = int(logits.argmax()) if target is None else target
    model.zero_grad()
    logits[0, t].backward()
    a, g = store['a'][0].detach().numpy(), store['a'].grad[0].numpy()
    cam = np.maximum((g.mean(axis=(1, 2))[:, None, None] * a).sum(0), 0)
    cam = cam - cam.min()
    cam = cam / (cam.max() + 1e-7)
    cam = cv2.resize(cam, (image.shape[-1], image.shape[-2]))
    cam = np.maximum(cam, 0)
    cam = cam - cam.min()
    return cam / (cam.max() + 1e-7)


@pytest.mark.parametrize('use_labels', [False, True])
def test_gradcam_matches_an_independent_computation(use_labels):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    images = torch.randn(3, 3, 64, 64)
    targets = torch.tensor([3, 0, 2]) if use_labels else None
    maps, logits = gradcam(model, images, targets, 64)
    assert maps.shape == (3, 64, 64) and maps.dtype == torch.float32
    for i in range(3):
        ref = reference_gradcam(model, images[i].clone(), None if targets is None else int(targets[i]))
        assert np.abs(maps[i].numpy() - ref).max() < 1e-5
        assert ref.max() > 0.9  # a real map, not all zeros
    assert torch.allclose(logits, model(images), atol=1e-5)


def test_percentile_masks_match_numpy_with_ties():
    torch.manual_seed(0)
    maps = torch.rand(4, 10, 10)
    maps[0, :7] = 0  # 70 % exact zeros, as Grad-CAM often has
    for thr in (30, 50, 80):
        low = percentile_masks(maps, thr, 'low')
        for i in range(4):
            a = maps[i].numpy()
            expected = ~(a > np.percentile(a, thr))  # the reference: where(value > q, 0, 1)
            assert (low[i].numpy() == expected).all()
        assert (percentile_masks(maps, thr, 'top') == ~low).all()
    assert percentile_masks(maps, 50, 'low')[0].float().mean() == pytest.approx(0.7)


def test_iou_properties():
    torch.manual_seed(0)
    a, b = torch.rand(5, 16, 16), torch.rand(5, 16, 16)
    assert torch.allclose(map_iou(a, a, 50), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(map_iou(a, a, 80, 'top'), torch.ones(5, dtype=torch.float64))
    # at thr 50 without ties both masks cover half the image, so low-region IoU = top-region IoU
    assert torch.allclose(map_iou(a, b, 50, 'low'), map_iou(a, b, 50, 'top'))
    # at other thresholds they differ (bottom 80 % vs top 20 %)
    assert not torch.allclose(map_iou(a, b, 80, 'low'), map_iou(a, b, 80, 'top'))
    # hand example, 2 x 2: low halves {(0,0),(0,1)} and {(0,0),(1,0)} -> IoU 1/3
    x = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    y = torch.tensor([[[0.0, 2.0], [1.0, 3.0]]])
    assert map_iou(x, y, 50).item() == pytest.approx((1 + 1e-6) / (3 + 1e-6))
    assert map_iou(x, x.flip(-1).flip(-2), 50).item() == pytest.approx(1e-6 / (4 + 1e-6))
    # a constant map gives a finite IoU (its low region is the whole image)
    const = map_iou(torch.full((1, 2, 2), 0.3), x, 50)
    assert torch.isfinite(const).all() and const.item() == pytest.approx(0.5, rel=1e-5)
    empty = mask_iou(torch.zeros(1, 3, 3, dtype=torch.bool), torch.zeros(1, 3, 3, dtype=torch.bool))
    assert empty.item() == pytest.approx(1.0)
