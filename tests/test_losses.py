"""Every loss term on a hand-computed 2-image, 3-word example; the top-k attention map; phases and LR."""
import math
from types import SimpleNamespace

import pytest
import torch

import train_and_test as tnt
from model import LVWNet, LVWOutput, ResNetFeatures
from run import config

# 2 images, 3 words, 2 classes. Word 0 -> class 0, words 1 and 2 -> class 1.
MIN_D = torch.tensor([[4.0, 1.0, 9.0],
                      [0.25, 16.0, 2.0]])
LABELS = torch.tensor([0, 1])
IDENTITY = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
W = torch.tensor([[1.0, -0.5, 2.0],
                  [-0.5, 1.0, 3.0]])
MAX_DIST = 10.0


def test_class_agnostic_cluster_cost():
    # LVW: min over all words per image: (1 + 0.25) / 2
    assert tnt.cluster_cost(MIN_D, LABELS, IDENTITY, False, MAX_DIST).item() == pytest.approx(0.625)


def test_class_specific_cluster_and_separation():
    # own-class words: image 0 -> {0}: 4; image 1 -> {1, 2}: min(16, 2) = 2; mean 3
    assert tnt.cluster_cost(MIN_D, LABELS, IDENTITY, True, MAX_DIST).item() == pytest.approx(3.0)
    # other-class words: image 0 -> {1, 2}: 1; image 1 -> {0}: 0.25; mean 0.625
    assert tnt.separation_cost(MIN_D, LABELS, IDENTITY, MAX_DIST).item() == pytest.approx(0.625)


def test_l1_unmasked_and_masked():
    assert tnt.l1_penalty(W, IDENTITY, False).item() == pytest.approx(8.0)  # 1+.5+2+.5+1+3
    # ProtoPNet keeps only other-class connections: W[0,1], W[0,2], W[1,0] -> .5 + 2 + .5
    assert tnt.l1_penalty(W, IDENTITY, True).item() == pytest.approx(3.0)


def test_mean_pairwise_word_distance_counts_the_diagonal():
    p = torch.tensor([[0.0, 0.0], [3.0, 4.0]]).view(2, 2, 1, 1)
    # pairs: 0, 25, 25, 0 -> 12.5
    assert tnt.mean_pairwise_word_distance(p).item() == pytest.approx(12.5, rel=1e-5)


# similarity maps (2 images, 3 words, 2x2) for the attention map
MAPS = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]],
                      [[4.0, 0.0], [0.0, 0.0]],
                      [[9.0, 9.0], [9.0, 9.0]]],
                     [[[0.0, 1.0], [0.0, 1.0]],
                      [[5.0, 5.0], [5.0, 5.0]],
                      [[2.0, 0.0], [0.0, 2.0]]]])


def test_word_attention_map_picks_the_k_nearest_words():
    # k = 2 smallest min distances: image 0 -> words 1, 0; image 1 -> words 0, 2
    att = tnt.word_attention_map(MAPS, MIN_D, 2, 2, 'bilinear', 'max')
    expected0 = torch.tensor([[4.0, 2.0], [3.0, 4.0]]) / (4 + 1e-5)
    expected1 = torch.tensor([[2.0, 1.0], [0.0, 2.0]]) / (2 + 1e-5)
    assert torch.allclose(att[0], expected0) and torch.allclose(att[1], expected1)
    minmax = tnt.word_attention_map(MAPS, MIN_D, 2, 2, 'bicubic', 'minmax')
    assert torch.allclose(minmax[0], torch.tensor([[1.0, 0.0], [0.5, 1.0]]))
    assert torch.allclose(minmax[1], torch.tensor([[1.0, 0.5], [0.0, 1.0]]))


def test_word_attention_map_upsampling_and_constant_maps():
    one = torch.tensor([[[[0.0, 1.0]]]]).expand(1, 1, 2, 2).contiguous()  # columns 0 | 1
    up = tnt.word_attention_map(one, torch.zeros(1, 1), 1, 5, 'bilinear', 'max')
    # align_corners=True: the corners keep the source values, the middle column is 0.5
    assert torch.allclose(up[0, 0], torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]) / (1 + 1e-5), atol=1e-6)
    const = tnt.word_attention_map(torch.full((1, 2, 3, 3), 7.0), torch.zeros(1, 2), 2, 6, 'bicubic', 'minmax')
    assert torch.isfinite(const).all() and (const == 0).all()


def test_attention_gradient_flows_to_maps_not_to_the_pick():
    maps = MAPS.clone().requires_grad_(True)
    min_d = MIN_D.clone().requires_grad_(True)
    att = tnt.word_attention_map(maps, min_d, 2, 2, 'bilinear', 'max')
    tnt.attention_loss(att, torch.zeros(2, 2, 2)).backward()
    assert maps.grad.abs().sum() > 0
    assert min_d.grad is None or min_d.grad.abs().sum() == 0
    # word 2 of image 0 was not picked: no gradient reaches it
    assert maps.grad[0, 2].abs().sum() == 0


def test_batch_losses_total_on_the_hand_example():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    ce = (math.log(1 + math.exp(-2)) + math.log(2)) / 2  # 0.410038
    out = LVWOutput(logits, MIN_D, torch.zeros(2, 3), MAPS)
    net = SimpleNamespace(prototype_class_identity=IDENTITY, max_dist=MAX_DIST,
                          last_layer=SimpleNamespace(weight=W))
    gradcam = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    # attention map as above (k = 2): image 0 [[1, .5], [.75, 1]], image 1 [[1, .5], [0, 1]] (up to 1e-5)
    a0 = torch.tensor([[4.0, 2.0], [3.0, 4.0]]) / (4 + 1e-5)
    a1 = torch.tensor([[2.0, 1.0], [0.0, 2.0]]) / (2 + 1e-5)
    attn = ((a0 - gradcam[0]) ** 2).sum().item() / 8 + ((a1 - gradcam[1]) ** 2).sum().item() / 8
    s = config.resolve_settings('toy', ['topk=2', 'num_classes=2', 'prototype_shape=(3,128,1,1)'])
    lvw = tnt.batch_losses(out, LABELS, gradcam, net, s, use_attention=True)
    assert lvw['cross_entropy'].item() == pytest.approx(ce, rel=1e-5)
    assert lvw['attention'].item() == pytest.approx(attn, rel=1e-5)
    assert 'separation' not in lvw
    assert lvw['total'].item() == pytest.approx(ce + 0.8 * 0.625 + 1e-4 * 8 + 10 * attn, rel=1e-5)
    warm = tnt.batch_losses(out, LABELS, gradcam, net, s, use_attention=False)
    assert warm['total'].item() == pytest.approx(ce + 0.8 * 0.625 + 1e-4 * 8, rel=1e-5)
    s_pp = dict(s, class_specific=True, attention_weight=0)
    pp = tnt.batch_losses(out, LABELS, gradcam, net, s_pp, use_attention=True)
    assert pp['total'].item() == pytest.approx(ce + 0.8 * 3.0 - 0.08 * 0.625 + 1e-4 * 3.0, rel=1e-5)


def test_phases_set_the_trainable_parts():
    net = LVWNet(ResNetFeatures('resnet18'), (6, 128, 1, 1), 3)
    grads = lambda: (any(p.requires_grad for p in net.features.parameters()),
                     all(p.requires_grad for p in net.add_on_layers.parameters()),
                     net.prototype_vectors.requires_grad, net.last_layer.weight.requires_grad)
    tnt.warm_only(net)
    assert grads() == (False, True, True, True)
    tnt.joint(net)
    assert grads() == (True, True, True, True)
    tnt.last_only(net)
    assert grads() == (False, False, False, True)


def test_optimizers_and_the_joint_lr_schedule():
    net = LVWNet(ResNetFeatures('resnet18'), (6, 128, 1, 1), 3)
    s = config.resolve_settings('pets')
    warm, joint, scheduler, last = tnt.make_optimizers(net, s)
    assert [g['lr'] for g in joint.param_groups] == [1e-4, 3e-3, 3e-3]
    assert [g['weight_decay'] for g in joint.param_groups] == [1e-3, 1e-3, 0]
    assert [g['lr'] for g in warm.param_groups] == [3e-3, 3e-3]
    assert last.param_groups[0]['lr'] == 1e-4 and last.param_groups[0]['params'][0] is net.last_layer.weight
    joint_params = {id(p) for g in joint.param_groups for p in g['params']}
    assert id(net.last_layer.weight) not in joint_params  # the last layer is not trained in joint epochs
    # stepped after each joint epoch: joint epochs 0-4 at x1, 5-9 at x0.1, 10-14 at x0.01
    seen = []
    for _ in range(12):
        seen.append(joint.param_groups[0]['lr'])
        joint.step()
        scheduler.step()
    assert seen == pytest.approx([1e-4] * 5 + [1e-5] * 5 + [1e-6] * 2)
