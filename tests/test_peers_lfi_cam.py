"""LFI-CAM peer (peers/lfi_cam.py): each formula on hand-made tensors, the forward recomputed from
its parts, the loss, gradients and the explanation maps, on a tiny resnet18 at 64 px."""
import pytest
import torch
import torch.nn.functional as F

import peers
from peers import lfi_cam
from run import config

SIZE, BATCH, CLASSES = 64, 2, 3


def tiny_settings(**extra):
    values = {'base_architecture': 'resnet18', 'img_size': SIZE, 'num_classes': CLASSES,
              'prototype_shape': (15, 128, 1, 1), 'lfi_fin_convs': 2, 'lfi_conv1_stride': 1,
              'pretrained': False}
    values.update(extra)
    return config.resolve_settings('toy', ['%s=%r' % item for item in values.items()])


def tiny_model(seed=0, **extra):
    torch.manual_seed(seed)
    return peers.build_peer('lfi_cam', tiny_settings(**extra), CLASSES)


def tiny_images(seed=1):
    return torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_conv1_stride():
    images = tiny_images()
    model = tiny_model().eval()
    assert isinstance(model, lfi_cam.LFICAMNet) and lfi_cam.PREFIX == 'lfi'
    logits, attention, weights = model.forward_with_attention(images)
    assert logits.shape == (BATCH, CLASSES) and model(images).shape == (BATCH, CLASSES)
    # stride 1: conv1 64 -> maxpool 32 -> layer4 4x4; a standard ResNet (stride 2) gives 2x2
    assert model.trunk(images).shape == (BATCH, 512, 4, 4)
    assert attention.shape == (BATCH, 4, 4) and weights.shape == (BATCH, 512)
    standard = tiny_model(lfi_conv1_stride=2).eval()
    assert standard.trunk(images).shape == (BATCH, 512, 2, 2)
    assert standard.forward_with_attention(images)[1].shape == (BATCH, 2, 2)
    # the stride leaves the weights alone: one model's state_dict loads into the other
    standard.load_state_dict(model.state_dict())


def test_normalise_features_on_a_hand_made_tensor():
    features = torch.tensor([[[[2.0, 4.0], [6.0, 10.0]],     # min 2, max 10
                              [[3.0, 3.0], [3.0, 3.0]],      # constant, non-zero -> all 1
                              [[0.0, 0.0], [0.0, 0.0]],      # constant zero -> 1, then E == 0 -> 0
                              [[-2.0, 0.0], [2.0, 6.0]]]])   # min-max, then the E == 0 spot -> 0
    expected = torch.tensor([[[[0.0, 0.25], [0.5, 1.0]],
                              [[1.0, 1.0], [1.0, 1.0]],
                              [[0.0, 0.0], [0.0, 0.0]],
                              [[0.0, 0.0], [0.5, 1.0]]]])
    assert torch.equal(lfi_cam.normalise_features(features), expected)
    # per image: a second image with other values does not change the first one's result
    pair = torch.cat([features, features * 3 + 1])
    out = lfi_cam.normalise_features(pair)
    assert torch.equal(out[0], expected[0])
    assert torch.allclose(out[1, 0], expected[0, 0]) and torch.equal(out[1, 2], torch.ones(2, 2))


def test_normalise_features_gradient_is_finite_for_constant_channels():
    features = torch.tensor([[[[5.0, 5.0], [5.0, 5.0]],
                              [[0.0, 0.0], [0.0, 0.0]],
                              [[1.0, 2.0], [3.0, 5.0]]]], requires_grad=True)
    (lfi_cam.normalise_features(features) * torch.arange(12.0).view(1, 3, 2, 2)).sum().backward()
    assert torch.isfinite(features.grad).all()
    assert features.grad[0, 2].abs().sum() > 0       # the ordinary channel still learns


def test_image_mask_is_the_resized_rgb_mean():
    images = tiny_images()
    expected = F.interpolate(images.mean(dim=1, keepdim=True), size=(4, 4), mode='bilinear',
                             align_corners=False)
    mask = lfi_cam.image_mask(images, (4, 4))
    assert mask.shape == (BATCH, 1, 4, 4) and torch.allclose(mask, expected)
    # a hand-computed case: a 2x2 gray image halves to 1x1 = the mean of its 4 pixels
    rgb = torch.tensor([[1.0, 3.0], [5.0, 7.0]]).expand(1, 3, 2, 2) + torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    assert lfi_cam.image_mask(rgb, (1, 1)).item() == pytest.approx(4.0)


def test_importance_weighted_attention_matches_a_loop_over_channels():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(2, 5, 3, 3, generator=generator)          # signed, so ReLU matters
    weights = torch.randn(2, 5, generator=generator)
    expected = torch.zeros(2, 3, 3)
    for channel in range(5):
        expected += weights[:, channel].view(2, 1, 1) * features[:, channel]
    expected = expected.clamp_min(0)
    attention = lfi_cam.importance_weighted_attention(features, weights)
    assert attention.shape == (2, 3, 3) and torch.allclose(attention, expected, atol=1e-6)
    assert (attention == 0).any() and (attention > 0).any()


def test_minmax_attention_per_image_and_constant_maps_kept():
    attention = torch.tensor([[[1.0, 3.0], [5.0, 9.0]],
                              [[7.0, 7.0], [7.0, 7.0]],
                              [[0.0, 0.0], [0.0, 0.0]],
                              [[2.0, 2.0], [2.0, 4.0]]])
    expected = torch.tensor([[[0.0, 0.25], [0.5, 1.0]],
                             [[7.0, 7.0], [7.0, 7.0]],
                             [[0.0, 0.0], [0.0, 0.0]],
                             [[0.0, 0.0], [0.0, 1.0]]])
    assert torch.equal(lfi_cam.minmax_attention(attention), expected)


def test_importance_weights_are_a_softmax_of_the_fin():
    images = tiny_images()
    model = tiny_model().eval()
    with torch.no_grad():
        _, _, weights = model.forward_with_attention(images)
        features = model.trunk(images)
        masked = lfi_cam.normalise_features(features) * lfi_cam.image_mask(images, (4, 4))
        expected = F.softmax(model.fin(masked), dim=1)
    assert torch.allclose(weights.sum(dim=1), torch.ones(BATCH), atol=1e-5)
    assert (weights > 0).all() and torch.allclose(weights, expected, atol=1e-6)
    # the FIN of the requested depth: 2 x (conv, BN, ReLU), then pool and flatten
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.fin) == 2


def test_forward_logits_are_fc_of_the_attended_features():
    images = tiny_images()
    model = tiny_model().eval()
    with torch.no_grad():
        logits, attention, weights = model.forward_with_attention(images)
        features = model.trunk(images)
        expected_attention = lfi_cam.minmax_attention(lfi_cam.importance_weighted_attention(features, weights))
        expected = model.fc((attention[:, None] * features + features).mean(dim=(2, 3)))
    assert torch.allclose(attention, expected_attention, atol=1e-6)
    assert attention.min() >= 0 and attention.max() <= 1
    assert torch.allclose(logits, expected, atol=1e-5)
    # the attention matters: without it the logits differ
    assert not torch.allclose(logits, model.fc(features.mean(dim=(2, 3))), atol=1e-5)


def test_batch_loss_is_a_single_cross_entropy():
    images, labels = tiny_images(), torch.tensor([2, 0])
    model = tiny_model().eval()
    s = tiny_settings()
    terms, logits = lfi_cam.batch_loss(model, images, labels, (), s, 'lfi_cam')
    log_probs = logits - logits.exp().sum(dim=1, keepdim=True).log()
    expected = -(log_probs[0, 2] + log_probs[1, 0]) / 2
    assert set(terms) == {'cross_entropy', 'total'}
    assert terms['total'].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms['cross_entropy'].item() == terms['total'].item()
    assert lfi_cam.train_dataset('a dataset', s) == 'a dataset'


def test_backward_reaches_the_fin_and_the_trunk():
    model = tiny_model().train()
    s = tiny_settings()
    parameters = lfi_cam.trainable_parameters(model, s)
    assert len(parameters) == len(list(model.parameters()))
    terms, _ = lfi_cam.batch_loss(model, tiny_images(), torch.tensor([1, 2]), (), s, 'lfi_cam')
    terms['total'].backward()
    for name, grad in (('fin', model.fin[0].weight.grad), ('trunk conv1', model.trunk.conv1.weight.grad),
                       ('trunk layer4', model.trunk.layer4[-1].conv2.weight.grad), ('fc', model.fc.weight.grad)):
        assert grad is not None and torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name


def test_explain_maps_are_class_agnostic_and_follow_the_input():
    images = tiny_images()
    model = tiny_model().train()
    maps = lfi_cam.explain(model, images)
    assert maps.shape == (BATCH, SIZE, SIZE) and not maps.requires_grad
    assert maps.min() >= 0 and maps.max() <= 1 and maps.amax(dim=(1, 2)).min() > 0.99
    assert model.training                       # the previous mode is back
    for target in (torch.tensor([0, 1]), torch.tensor([2, 2])):
        assert torch.equal(lfi_cam.explain(model, images, target), maps)
    other = lfi_cam.explain(model, tiny_images(seed=5))
    assert not torch.allclose(other, maps, atol=1e-3)
    # eval-mode attention, post-processed as the base model's Grad-CAM
    from peers import common
    with torch.no_grad():
        attention = model.eval().forward_with_attention(images)[1]
    assert torch.allclose(maps, common.to_unit_maps(attention, SIZE), atol=1e-6)
