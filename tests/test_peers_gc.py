"""Grad-CAM consistency (peers/gc_consistency.py): composites, targets, the loss on hand-made maps,
the element-wise Grad-CAM against per-image autograd, double backprop, the composite dataset."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from data.image_data import ImageDataset
from peers import common, gc_consistency as gc
from run import config

SIZE = 64


def tiny_settings(**extra):
    values = {'base_architecture': 'resnet18', 'img_size': SIZE, 'num_classes': 3,
              'prototype_shape': (15, 128, 1, 1), 'pretrained': False}
    values.update(extra)
    return config.resolve_settings('toy', ['%s=%r' % (k, v) for k, v in values.items()])


def tiny_model(seed=0, **extra):
    torch.manual_seed(seed)
    return gc.build(tiny_settings(**extra), 3, 'gc')


def quadrant_slices(q, size):
    row, col = divmod(q, 2)
    return slice(row * size, (row + 1) * size), slice(col * size, (col + 1) * size)


# ---------------------------------------------------------------- model


def test_model_shapes_and_pooling():
    model = tiny_model().eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    features, logits = model.features_and_logits(x)
    assert features.shape == (2, 512, 2, 2) and logits.shape == (2, 3)
    assert torch.allclose(model(x), logits)
    assert torch.allclose(logits, model.fc(features.mean(dim=(2, 3))), atol=1e-5)
    # a composite (2S) goes through the same network: a 4 x 4 grid
    assert model.features_and_logits(torch.randn(1, 3, 2 * SIZE, 2 * SIZE))[0].shape == (1, 512, 4, 4)
    gmp = tiny_model(gc_maxpool=True).eval()
    features, logits = gmp.features_and_logits(x)
    assert torch.allclose(logits, gmp.fc(features.amax(dim=(2, 3))), atol=1e-5)
    assert not torch.allclose(logits, gmp.fc(features.mean(dim=(2, 3))), atol=1e-3)
    assert len(gc.trainable_parameters(model, None)) == len(list(model.parameters()))


# ---------------------------------------------------------------- composite and target


def test_assemble_composite_matches_a_quadrant_loop():
    b, s = 4, 3
    ramp = torch.arange(s * s, dtype=torch.float32).view(s, s) * 0.01  # shows a transposed tile
    images = torch.stack([torch.full((3, s, s), 10.0 + i) + ramp for i in range(b)])
    distractors = torch.stack([torch.stack([torch.full((3, s, s), 100.0 + 10 * i + d) + ramp for d in range(3)])
                               for i in range(b)])
    for quadrants in (torch.tensor([0, 1, 2, 3]), torch.tensor([3, 3, 0, 2])):
        composite = gc.assemble_composite(images, distractors, quadrants)
        assert composite.shape == (b, 3, 2 * s, 2 * s)
        for i in range(b):
            q = int(quadrants[i])
            others = [j for j in range(4) if j != q]
            for j in range(4):
                expected = images[i] if j == q else distractors[i, others.index(j)]
                rows, cols = quadrant_slices(j, s)
                assert torch.equal(composite[i, :, rows, cols], expected), (i, q, j)
    # q = 1 is top-right: row 0, columns S..2S hold the image
    one = gc.assemble_composite(images[:1], distractors[:1], torch.tensor([1]))
    assert one[0, 0, 0, s].item() == pytest.approx(10.0)
    assert one[0, 0, s, 0].item() == pytest.approx(101.0)  # bottom-left: the 2nd distractor


def test_place_in_quadrant_by_hand_and_gradient_flows():
    maps = torch.tensor([[[1.0, 2.0], [3.0, 4.0]],
                         [[5.0, 6.0], [7.0, 8.0]]], requires_grad=True)
    target = gc.place_in_quadrant(maps, torch.tensor([1, 2]))
    expected = torch.tensor([[[0, 0, 1, 2], [0, 0, 3, 4], [0, 0, 0, 0], [0, 0, 0, 0]],
                             [[0, 0, 0, 0], [0, 0, 0, 0], [5, 6, 0, 0], [7, 8, 0, 0]]], dtype=torch.float32)
    assert torch.equal(target, expected)
    (target * torch.arange(16.0).view(4, 4)).sum().backward()
    # d/dmaps: the weights of the cells each map landed on
    assert torch.equal(maps.grad, torch.tensor([[[2.0, 3.0], [6.0, 7.0]], [[8.0, 9.0], [12.0, 13.0]]]))


def loop_l1(composite_maps, placed_source, quadrants):
    """mean |G_X - T| with T built by a per-quadrant loop."""
    b, hh, ww = composite_maps.shape
    h = hh // 2
    total = 0.0
    for i in range(b):
        target = torch.zeros(hh, ww)
        rows, cols = quadrant_slices(int(quadrants[i]), h)
        target[rows, cols] = placed_source[i]
        total += (composite_maps[i] - target).abs().sum()
    return total / (b * hh * ww)


def test_consistency_loss_exact_grid():
    # hand: uniform maps, image 1/4 per cell (2x2), composite 1/16 per cell (4x4):
    # 4 cells |1/16 - 1/4| = 3/16, 12 cells 1/16 -> (12/16 + 12/16) / 16
    loss = gc.consistency_loss(torch.full((1, 2, 2), 0.25), torch.full((1, 4, 4), 1 / 16), torch.tensor([3]), SIZE)
    assert loss.item() == pytest.approx(1.5 / 16)
    torch.manual_seed(1)
    cam_image = gc.normalise_cam(torch.rand(3, 2, 2))
    cam_composite = gc.normalise_cam(torch.rand(3, 4, 4))
    quadrants = torch.tensor([2, 0, 1])
    loss = gc.consistency_loss(cam_image, cam_composite, quadrants, SIZE)
    assert loss.item() == pytest.approx(loop_l1(cam_composite, cam_image, quadrants).item(), rel=1e-6)
    # a wrong quadrant gives a different loss
    assert loss.item() != pytest.approx(loop_l1(cam_composite, cam_image, torch.tensor([1, 0, 1])).item(), rel=1e-3)


def test_consistency_loss_upsamples_when_the_grid_is_not_twice():
    # hand: 2x2 of 1/4 -> 4x4 of 1/4; 3x3 of 1/9 -> 8x8 of 1/9 (no renormalisation):
    # 16 cells |1/9 - 1/4| = 5/36, 48 cells 1/9 -> (16 * 5/36 + 48/9) / 64
    loss = gc.consistency_loss(torch.full((1, 2, 2), 0.25), torch.full((1, 3, 3), 1 / 9), torch.tensor([0]), 4)
    assert loss.item() == pytest.approx((16 * 5 / 36 + 48 / 9) / 64, rel=1e-6)
    torch.manual_seed(2)
    cam_image = gc.normalise_cam(torch.rand(2, 2, 2))
    cam_composite = gc.normalise_cam(torch.rand(2, 3, 3))
    quadrants = torch.tensor([1, 3])
    up = lambda m, n: F.interpolate(m[:, None], size=(n, n), mode='bilinear', align_corners=False)[:, 0]
    expected = loop_l1(up(cam_composite, 8), up(cam_image, 4), quadrants)
    loss = gc.consistency_loss(cam_image, cam_composite, quadrants, 4)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# ---------------------------------------------------------------- Grad-CAM


def test_elementwise_gradcam_matches_per_image_autograd():
    model = tiny_model().eval()
    torch.manual_seed(3)
    x = torch.randn(2, 3, SIZE, SIZE)
    targets = torch.tensor([2, 0])
    features, logits = model.features_and_logits(x)
    cams = gc.elementwise_gradcam(features, logits, targets, create_graph=False)
    assert cams.shape == (2, 2, 2)
    for i in range(2):
        f_i, logits_i = model.features_and_logits(x[i:i + 1])
        grad, = torch.autograd.grad(logits_i[0, targets[i]], f_i)
        expected = F.relu((grad * f_i).sum(dim=1))[0]
        assert torch.allclose(cams[i], expected, atol=1e-5)
        # with average pooling dy_c/dF = w_c / (h w): the map is ReLU(w_c . F) / 4
        cam_formula = F.relu(torch.einsum('c,chw->hw', model.fc.weight[targets[i]], f_i[0])) / 4
        assert torch.allclose(cams[i], cam_formula, atol=1e-5)
    assert cams.sum() > 0
    # global max pooling: dy_c/dF_k is w_ck at channel k's argmax and 0 elsewhere, so the
    # element-wise map differs from the GAP-weighted (classical) one
    gmp = tiny_model(gc_maxpool=True).eval()
    features, logits = gmp.features_and_logits(x)
    cams = gc.elementwise_gradcam(features, logits, targets, create_graph=False)
    for i in range(2):
        flat = features[i].flatten(1)  # (C, h w)
        at_max = F.one_hot(flat.argmax(dim=1), 4).float() * gmp.fc.weight[targets[i]][:, None]
        expected = F.relu((at_max * flat).sum(dim=0)).view(2, 2)
        assert torch.allclose(cams[i], expected, atol=1e-5)
        classical = F.relu((at_max.mean(dim=1, keepdim=True) * flat).sum(dim=0)).view(2, 2)
        assert not torch.allclose(cams[i], classical, atol=1e-3)


def test_normalise_cam_sums_to_one():
    cams = torch.tensor([[[1.0, 3.0], [0.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    normalised = gc.normalise_cam(cams)
    assert torch.allclose(normalised[0], cams[0] / (8 + 1e-8) + 1e-8)
    assert normalised[0].sum().item() == pytest.approx(1 + 4e-8, abs=1e-7)
    assert torch.equal(normalised[1], torch.full((2, 2), 1e-8))  # an all-zero map stays finite


# ---------------------------------------------------------------- the training loss


def loss_inputs(seed=4):
    torch.manual_seed(seed)
    images = torch.randn(2, 3, SIZE, SIZE)
    composites = torch.randn(2, 3, 2 * SIZE, 2 * SIZE)
    return images, torch.tensor([1, 2]), (composites, torch.tensor([3, 1]))


def test_total_is_cross_entropy_plus_lambda_consistency():
    s = tiny_settings(gc_lambda=2.5)
    model = tiny_model().eval()
    images, labels, extra = loss_inputs()
    terms, logits = gc.batch_loss(model, images, labels, extra, s, 'gc')
    assert set(terms) == {'cross_entropy', 'consistency', 'total'}
    assert torch.allclose(logits, model(images), atol=1e-5)
    assert terms['cross_entropy'].item() == pytest.approx(F.cross_entropy(model(images), labels).item(), rel=1e-5)
    assert terms['consistency'].item() > 0
    assert terms['total'].item() == pytest.approx(
        terms['cross_entropy'].item() + 2.5 * terms['consistency'].item(), rel=1e-6)


def consistency_by_hand(model, images, labels, extra, detach_target, create_graph=True):
    composites, quadrants = extra
    features, logits = model.features_and_logits(images)
    cam_image = gc.normalise_cam(gc.elementwise_gradcam(features, logits, labels, create_graph))
    if detach_target:
        cam_image = cam_image.detach()
    features_x, logits_x = model.features_and_logits(composites)
    cam_composite = gc.normalise_cam(gc.elementwise_gradcam(features_x, logits_x, labels, create_graph))
    return gc.consistency_loss(cam_image, cam_composite, quadrants, SIZE)


def test_consistency_double_backpropagates_through_both_maps():
    s = tiny_settings()
    model = tiny_model().eval()
    images, labels, extra = loss_inputs()
    trunk_weight = model.trunk.layer3[0].conv1.weight
    terms, _ = gc.batch_loss(model, images, labels, extra, s, 'gc')
    grad_trunk, grad_fc = torch.autograd.grad(terms['consistency'], [trunk_weight, model.fc.weight])
    assert grad_trunk.abs().sum() > 0
    # the fc weight enters G only through dy_c/dF: a gradient there needs create_graph=True
    assert grad_fc.abs().sum() > 0
    no_graph = consistency_by_hand(model, images, labels, extra, False, create_graph=False)
    assert torch.autograd.grad(no_graph, model.fc.weight, allow_unused=True)[0] is None
    # T is not detached: batch_loss matches the version with T attached, not the detached one
    attached = torch.autograd.grad(consistency_by_hand(model, images, labels, extra, False), trunk_weight)[0]
    detached = torch.autograd.grad(consistency_by_hand(model, images, labels, extra, True), trunk_weight)[0]
    assert torch.allclose(grad_trunk, attached, rtol=1e-4, atol=1e-8)
    assert not torch.allclose(grad_trunk, detached, rtol=1e-3, atol=1e-8)


def test_batch_loss_trains_in_train_mode_and_backward_runs():
    s = tiny_settings()
    model = tiny_model().train()
    images, labels, extra = loss_inputs()
    terms, _ = gc.batch_loss(model, images, labels, extra, s, 'gc')
    terms['total'].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------- the composite dataset


def test_composite_dataset_shapes_and_image_quadrant(tiny_toy):
    dataset = ImageDataset(tiny_toy + '/train', SIZE, flip='joint')
    composites = gc.train_dataset(dataset, None)
    assert len(composites) == len(dataset) == 18
    assert composites.classes == dataset.classes and composites.paths == dataset.paths
    assert composites.samples == dataset.samples
    torch.manual_seed(5)
    image, label, composite, quadrant = composites[4]
    assert image.shape == (3, SIZE, SIZE) and composite.shape == (3, 2 * SIZE, 2 * SIZE)
    assert label == dataset.samples[4][1] and quadrant.dtype == torch.long and 0 <= int(quadrant) < 4
    assert 0 <= composite.min() and composite.max() <= 1
    dataset.flip = 'none'
    for index in (0, 7, 17):
        image, label, composite, quadrant = composites[index]
        rows, cols = quadrant_slices(int(quadrant), SIZE)
        assert torch.equal(image, dataset[index][0])
        assert torch.equal(composite[:, rows, cols], image)


def test_composite_distractors_come_from_other_classes(tiny_toy):
    dataset = ImageDataset(tiny_toy + '/train', SIZE, flip='joint')
    composites = gc.CompositeDataset(dataset)
    plain = ImageDataset(tiny_toy + '/train', SIZE)
    # every image and its mirror, to recognise a (possibly flipped) distractor
    known = [(plain[j][0], label) for j, (_, label) in enumerate(plain.samples)]
    known += [(img.flip(-1), label) for img, label in known]
    torch.manual_seed(6)
    distractor_labels = []
    for index in range(0, 18, 2):
        image, label, composite, quadrant = composites[index]
        rows, cols = quadrant_slices(int(quadrant), SIZE)
        assert torch.equal(composite[:, rows, cols], image)
        for q in range(4):
            if q == int(quadrant):
                continue
            rows, cols = quadrant_slices(q, SIZE)
            matches = [lab for img, lab in known if torch.equal(img, composite[:, rows, cols])]
            assert matches, 'quadrant %d holds no dataset image' % q
            assert label not in matches
            distractor_labels.append(matches[0])
    assert set(distractor_labels) == {0, 1, 2}


def test_composite_quadrants_and_distractor_classes_are_uniform(tiny_toy, monkeypatch):
    dataset = ImageDataset(tiny_toy + '/train', SIZE)
    composites = gc.CompositeDataset(dataset)
    # skip the image decoding: item j is a constant image holding j
    monkeypatch.setattr(ImageDataset, '__getitem__',
                        lambda self, j: (torch.full((3, 2, 2), float(j)), self.samples[j][1]))
    torch.manual_seed(7)
    quadrant_counts = torch.zeros(4)
    class_counts = torch.zeros(3)
    n = 400
    for k in range(n):
        index = k % 18  # labels 0..2 equally often
        _, label, composite, quadrant = composites[index]
        quadrant_counts[int(quadrant)] += 1
        for q in range(4):
            if q != int(quadrant):
                rows, cols = quadrant_slices(q, 2)
                source = int(composite[0, rows, cols][0, 0])
                assert dataset.samples[source][1] != label
                class_counts[dataset.samples[source][1]] += 1
    # expected 100 per quadrant (sd ~ 8.7), 400 distractors per class
    assert ((quadrant_counts > 70) & (quadrant_counts < 130)).all(), quadrant_counts
    assert ((class_counts > 330) & (class_counts < 470)).all(), class_counts


def test_composite_dataset_needs_two_classes():
    one_class = SimpleNamespace(classes=['a', 'b'], samples=[('x.png', 0), ('y.png', 0)], paths=['x.png', 'y.png'])
    with pytest.raises(config.UserError):
        gc.CompositeDataset(one_class)


# ---------------------------------------------------------------- explanations


def test_explain_maps_in_unit_range_follow_input_and_target():
    model = tiny_model().train()
    with torch.no_grad():
        model.fc.weight.abs_()  # positive class weights: every class has a non-empty map
    torch.manual_seed(8)
    x = torch.randn(2, 3, SIZE, SIZE)
    running_mean = model.trunk.bn1.running_mean.clone()
    with torch.no_grad():  # explain switches autograd on itself
        maps = gc.explain(model, x)
    assert maps.shape == (2, SIZE, SIZE)
    assert maps.min() >= 0 and maps.max() <= 1
    assert torch.allclose(maps.flatten(1).amax(1), torch.ones(2), atol=1e-5)
    assert model.training and torch.equal(model.trunk.bn1.running_mean, running_mean)  # ran in eval mode
    # the default target is the predicted class
    model.eval()

    def by_hand(targets):
        features, logits = model.features_and_logits(x)
        return common.to_unit_maps(gc.elementwise_gradcam(features, logits, targets, False).detach(), SIZE)

    predicted = model(x).argmax(1)
    assert torch.allclose(maps, by_hand(predicted), atol=1e-5)
    # an explicit target is honoured
    other = (predicted + 1) % 3
    expected_other = by_hand(other)
    assert torch.allclose(gc.explain(model, x, target=other), expected_other, atol=1e-5)
    assert not torch.allclose(expected_other, maps, atol=1e-3)
    assert torch.allclose(gc.explain(model, x, target=2)[0], gc.explain(model, x[:1], target=torch.tensor([2]))[0],
                          atol=1e-5)
    # another input, another map
    assert not torch.allclose(gc.explain(model, torch.randn(2, 3, SIZE, SIZE)), maps, atol=1e-3)
