"""SCOUTER+/- (peers/scouter.py): each formula against an independent computation, hand-computed
losses and maps, freezing, and the explanation's target rules, on resnet18 at 64 px (2 x 2 grid)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from peers import scouter
from run import config

SIZE = 64


def settings(**extra):
    values = {'base_architecture': 'resnet18', 'img_size': SIZE, 'num_classes': 3,
              'prototype_shape': (15, 128, 1, 1), 'scouter_slots_per_class': {'+': 2, '-': 2},
              'scouter_hidden_dim': 16, 'scouter_to_k_layers': 2, 'scouter_iterations': 3,
              'scouter_freeze_layers': 2, 'pretrained': False}
    values.update(extra)
    return config.resolve_settings('toy', ['%s=%r' % (k, v) for k, v in values.items()])


def make(method, seed=0, **extra):
    torch.manual_seed(seed)
    return scouter.build(settings(**extra), 3, method)


def images(seed=1, batch=2):
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('method', ['scouter+', 'scouter-'])
def test_forward_shapes(method):
    model = make(method).eval()
    x = images()
    with torch.no_grad():
        logits, attention, hw = model.forward_with_attention(x)
        plain = model(x)
    assert hw == (2, 2)
    assert logits.shape == (2, 3) and plain.shape == (2, 3)
    assert attention.shape == (2, 6, 4)  # 3 classes x 2 slots, 2 x 2 positions
    assert torch.allclose(plain, logits)
    assert model.initial_slots.shape == (6, 16)
    assert model.sign == (1 if method == 'scouter+' else -1)


def test_sine_position_encoding_per_position():
    d, h, w = 8, 2, 3
    pe = scouter.sine_position_encoding(d, h, w, dtype=torch.float64)
    assert pe.shape == (d, h, w)
    q = d // 2
    for i in range(h):
        for j in range(w):
            y = (i + 1) / (h + 1e-6) * 2 * math.pi
            x = (j + 1) / (w + 1e-6) * 2 * math.pi
            for k in range(q):
                f = 10000 ** (2 * (k // 2) / q)
                trig = math.sin if k % 2 == 0 else math.cos
                assert pe[k, i, j].item() == pytest.approx(trig(y / f), abs=1e-9)       # y part first
                assert pe[q + k, i, j].item() == pytest.approx(trig(x / f), abs=1e-9)   # then x part
    # the last row / column sits at 2 pi (just under): sin(2 pi) ~ 0, cos ~ 1 at frequency 1
    assert pe[0, -1, 0].item() == pytest.approx(0.0, abs=1e-4) and pe[1, -1, 0].item() == pytest.approx(1.0)
    assert scouter.sine_position_encoding(16, 3, 5).shape == (16, 3, 5)


def test_slot_attention_step_against_a_loop():
    torch.manual_seed(0)
    b, num_slots, n, d = 2, 3, 4, 8
    # positive slots and keys keep every row sum away from 0 (the re-normalisation divides by it)
    slots = torch.rand(b, num_slots, d, dtype=torch.float64)
    keys = torch.rand(b, n, d, dtype=torch.float64)
    values = torch.randn(b, n, d, dtype=torch.float64)
    cell = nn.GRUCell(d, d).double()
    new_slots, attention, updates = scouter.slot_attention_step(slots, keys, values, cell)

    gru = nn.GRU(d, d).double()
    with torch.no_grad():
        for name in ('weight_ih', 'weight_hh', 'bias_ih', 'bias_hh'):
            getattr(gru, name + '_l0').copy_(getattr(cell, name))
    for bi in range(b):
        raw = [[sum(slots[bi, s, j].item() * keys[bi, m, j].item() for j in range(d)) / math.sqrt(d)
                for m in range(n)] for s in range(num_slots)]
        total = sum(sum(row) for row in raw)
        expected_u = torch.zeros(num_slots, d, dtype=torch.float64)
        for s in range(num_slots):
            for m in range(n):
                a = 1 / (1 + math.exp(-raw[s][m] * total / sum(raw[s])))
                assert attention[bi, s, m].item() == pytest.approx(a, rel=1e-9)
                expected_u[s] += a * values[bi, m] / d
        assert torch.allclose(updates[bi], expected_u)
        out, _ = gru(expected_u[None], slots[bi][None])
        assert torch.allclose(new_slots[bi], out[0])
    assert not torch.allclose(new_slots, slots)


def test_slot_logits_by_hand():
    updates = torch.tensor([[[1.0, 2.0], [3.0, 0.5], [-1.0, 4.0], [0.0, 0.25]]])  # 4 slots, d = 2
    # slots 0, 1 -> class 0: 3 + 3.5; slots 2, 3 -> class 1: 3 + 0.25
    assert torch.allclose(scouter.slot_logits(updates, 2, 1), torch.tensor([[6.5, 3.25]]))
    assert torch.allclose(scouter.slot_logits(updates, 2, -1), torch.tensor([[-6.5, -3.25]]))
    assert torch.allclose(scouter.slot_logits(updates, 1, 1), torch.tensor([[3.0, 3.5, 3.0, 0.25]]))


def test_forward_uses_last_iteration_before_its_gru_update():
    model = make('scouter+').eval()
    x = images()
    with torch.no_grad():
        logits, attention, _ = model.forward_with_attention(x)
        feats = F.relu(model.channel_reduce(model.trunk(x)))
        pos = scouter.sine_position_encoding(16, 2, 2)
        keys = model.to_k((feats + pos).flatten(2).transpose(1, 2))
        values = feats.flatten(2).transpose(1, 2)
        slots = model.initial_slots.expand(2, -1, -1)
        history = []
        for _ in range(3):
            slots, a, u = scouter.slot_attention_step(slots, keys, values, model.gru)
            history.append((a, u))
    assert torch.allclose(attention, history[-1][0])
    assert torch.allclose(logits, history[-1][1].sum(2).view(2, 3, 2).sum(2))
    assert not torch.allclose(attention, history[0][0])  # the iterations do change the attention


def test_logits_equal_attention_weighted_channel_mean():
    x = images()
    results = {}
    for method, sign in (('scouter+', 1), ('scouter-', -1)):
        model = make(method).eval()  # same seed: the same weights for both signs
        with torch.no_grad():
            logits, attention, _ = model.forward_with_attention(x)
            channel_mean = F.relu(model.channel_reduce(model.trunk(x))).flatten(2).mean(1)  # (B, N)
        expected = torch.zeros(2, 3)
        for b in range(2):
            for s in range(6):
                expected[b, s // 2] += sign * (attention[b, s] * channel_mean[b]).sum()
        assert torch.allclose(logits, expected, atol=1e-6)
        results[method] = logits
    assert torch.allclose(results['scouter-'], -results['scouter+'], atol=1e-6)


def test_area_loss_by_hand():
    attention = torch.tensor([[[0.2, 0.4], [0.6, 0.8]]])  # mean 0.5
    assert scouter.area_loss(attention, 3.0, 2).item() == pytest.approx(0.75)
    assert scouter.area_loss(attention, 2.0, 1).item() == pytest.approx(1.0)


@pytest.mark.parametrize('method,lam', [('scouter+', 4.0), ('scouter-', 2.0)])
def test_batch_loss_by_hand(method, lam):
    s = settings(scouter_lambda={'+': 4.0, '-': 2.0}, scouter_power=3)
    model = scouter.build(s, 3, method)
    # softmax([ln 2, 0, 0]) = [1/2, 1/4, 1/4]: CE(label 0) = ln 2; uniform logits: CE = ln 3
    logits = torch.tensor([[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]])
    attention = torch.full((2, 6, 4), 0.25)
    attention[0, 0, 0], attention[0, 0, 1] = 0.0, 0.5  # mean stays 0.25
    model.forward_with_attention = lambda x: (logits, attention, (2, 2))
    terms, out = scouter.batch_loss(model, images(), torch.tensor([0, 1]), (), s, method)
    ce = (math.log(2.0) + math.log(3.0)) / 2
    assert terms['cross_entropy'].item() == pytest.approx(ce, rel=1e-6)
    assert float(terms['area']) == pytest.approx(0.25)
    assert terms['total'].item() == pytest.approx(ce + lam * 0.25 ** 3, rel=1e-6)
    assert out is logits


def test_freezing():
    model = make('scouter+', scouter_freeze_layers=2)
    trainable = scouter.trainable_parameters(model, settings(scouter_freeze_layers=2))
    for name in ('conv1', 'bn1', 'layer1', 'layer2'):
        assert not any(p.requires_grad for p in getattr(model.trunk, name).parameters()), name
    for name in ('layer3', 'layer4'):
        assert all(p.requires_grad for p in getattr(model.trunk, name).parameters()), name
    head = [p for n, p in model.named_parameters() if not n.startswith('trunk.')]
    assert head and all(p.requires_grad for p in head)
    assert {id(p) for p in trainable} == {id(p) for p in model.parameters() if p.requires_grad}
    assert any(p is model.initial_slots for p in trainable)
    assert not any(p is model.trunk.conv1.weight for p in trainable)

    all_trainable = scouter.trainable_parameters(model, settings(scouter_freeze_layers=0))
    assert len(all_trainable) == len(list(model.parameters()))
    assert all(p.requires_grad for p in model.parameters())


def test_explanation_maps_joint_normalisation_by_hand():
    # 2 classes x 1 slot on a 2 x 2 grid; joint min 0.2, max 1.0
    attention = torch.tensor([[[0.2, 0.4, 0.6, 1.0], [0.2, 0.3, 0.3, 0.2]]])
    weak = scouter.explanation_maps(attention, (2, 2), 1, torch.tensor([1]), 2)
    assert torch.allclose(weak[0], torch.tensor([[0.0, 0.125], [0.125, 0.0]]), atol=1e-6)  # not renormalised
    strong = scouter.explanation_maps(attention, (2, 2), 1, torch.tensor([0]), 2)
    assert torch.allclose(strong[0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]), atol=1e-6)
    # 2 classes x 2 slots, summed first: class 0 = [0.4, 0.7, 0.9, 1.2], class 1 = [0.1, 0.2, 0.3, 0.3];
    # joint min 0.1, max 1.2
    four = torch.tensor([[[0.1, 0.2, 0.3, 0.5], [0.3, 0.5, 0.6, 0.7], [0.1, 0.1, 0.2, 0.1], [0.0, 0.1, 0.1, 0.2]]])
    class0 = scouter.explanation_maps(four, (2, 2), 2, torch.tensor([0]), 2)
    class1 = scouter.explanation_maps(four, (2, 2), 2, torch.tensor([1]), 2)
    assert torch.allclose(class0[0].flatten(), torch.tensor([3.0, 6.0, 8.0, 11.0]) / 11, atol=1e-6)
    assert torch.allclose(class1[0].flatten(), torch.tensor([0.0, 1.0, 2.0, 2.0]) / 11, atol=1e-6)
    up = scouter.explanation_maps(attention, (2, 2), 1, torch.tensor([0]), 4)
    assert up.shape == (1, 4, 4)
    assert torch.allclose(up[0], F.interpolate(strong[:, None], size=(4, 4), mode='bilinear',
                                               align_corners=False)[0, 0])


def joint_class_maps(model, x):
    """The pre-resize jointly normalised class maps (B, K, h, w) and the logits, computed here."""
    with torch.no_grad():
        logits, attention, (h, w) = model.forward_with_attention(x)
    maps = attention.view(x.shape[0], 3, 2, h, w).sum(2)
    lo = maps.flatten(1).min(1).values.view(-1, 1, 1, 1)
    hi = maps.flatten(1).max(1).values.view(-1, 1, 1, 1)
    return (maps - lo) / (hi - lo), logits


def upsample(maps):
    return F.interpolate(maps[:, None], size=(SIZE, SIZE), mode='bilinear', align_corners=False)[:, 0]


def test_explain_range_and_joint_normalisation():
    model = make('scouter+').eval()
    x = images()
    maps = scouter.explain(model, x)
    assert maps.shape == (2, SIZE, SIZE)
    assert maps.min() >= 0 and maps.max() <= 1
    joint, logits = joint_class_maps(model, x)
    assert torch.allclose(joint.flatten(1).amax(1), torch.ones(2))
    chosen = joint[torch.arange(2), logits.argmax(1)]
    assert (chosen.flatten(1).amax(1) <= 1).all()
    assert torch.allclose(maps, upsample(chosen), atol=1e-5)


@pytest.mark.parametrize('method', ['scouter+', 'scouter-'])
def test_explain_default_target(method):
    model = make(method).eval()
    x = images()
    joint, logits = joint_class_maps(model, x)
    best, worst = logits.argmax(1), logits.argmin(1)
    assert (best != worst).all()
    expected = best if method == 'scouter+' else worst
    other = worst if method == 'scouter+' else best
    maps = scouter.explain(model, x)
    assert torch.allclose(maps, scouter.explain(model, x, target=expected))
    assert torch.allclose(maps, upsample(joint[torch.arange(2), expected]), atol=1e-5)
    assert not torch.allclose(maps, scouter.explain(model, x, target=other))


def test_explain_explicit_target_and_input_dependence():
    model = make('scouter+').eval()
    x = images()
    joint, _ = joint_class_maps(model, x)
    for target in (0, 1, 2):
        maps = scouter.explain(model, x, target=target)
        assert torch.allclose(maps, upsample(joint[:, target]), atol=1e-5)
    assert torch.allclose(scouter.explain(model, x, target=torch.tensor([2, 0])),
                          upsample(joint[torch.arange(2), torch.tensor([2, 0])]), atol=1e-5)
    assert not torch.allclose(scouter.explain(model, x, target=1), scouter.explain(model, images(seed=7), target=1))


def test_explain_restores_mode():
    model = make('scouter-')
    x = images()
    model.train()
    in_train = scouter.explain(model, x)
    assert model.training
    model.eval()
    assert torch.allclose(in_train, scouter.explain(model, x))  # explain always runs in eval mode
    assert not model.training


def test_gradient_step_on_batch_loss():
    s = settings(scouter_freeze_layers=2)
    model = make('scouter+', scouter_freeze_layers=2).train()
    params = scouter.trainable_parameters(model, s)
    assert scouter.train_dataset('the dataset', s) == 'the dataset'
    terms, logits = scouter.batch_loss(model, images(), torch.tensor([0, 2]), (), s, 'scouter+')
    assert set(terms) == {'cross_entropy', 'area', 'total'} and logits.shape == (2, 3)
    assert torch.isfinite(terms['total'])
    terms['total'].backward()
    for p in (model.initial_slots, model.channel_reduce.weight, model.to_k[0].weight, model.gru.weight_ih,
              model.trunk.layer4[0].conv1.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert model.trunk.conv1.weight.grad is None  # frozen
    before = model.initial_slots.detach().clone()
    torch.optim.AdamW(params, lr=1e-3).step()
    assert not torch.allclose(model.initial_slots, before)
