"""The settings for words shared across classes (docs/shared_words.md): each checked on a tiny case
with a hand-computed or brute-force answer, and each default checked to be the reference."""
import math

import numpy as np
import pytest
import torch

import push
import train_and_test as tnt
from data.image_data import normalize
from model import LVWNet, ResNetFeatures, build_model, initial_last_layer, squared_distances
from run import config, distributed
from tests.test_push import TensorImages

QUIET = dict(log=lambda *_: None)


def test_last_layer_init_classwise_is_the_reference_and_zero_is_zero():
    identity = torch.zeros(4, 2)
    identity[[0, 1], 0] = 1
    identity[[2, 3], 1] = 1
    expected = torch.tensor([[1.0, 1.0, -0.5, -0.5], [-0.5, -0.5, 1.0, 1.0]])
    assert torch.equal(initial_last_layer(identity, 'classwise', -0.5), expected)
    assert torch.equal(initial_last_layer(identity, 'zero', -0.5), torch.zeros(2, 4))
    s = config.resolve_settings('toy', ['pretrained=False'])
    assert s['last_layer_init'] == 'classwise'
    torch.manual_seed(0)
    net = build_model(s, log=lambda *_: None)
    assert torch.equal(net.last_layer.weight, initial_last_layer(net.prototype_class_identity, 'classwise', -0.5))
    zero = build_model(dict(s, last_layer_init='zero'), log=lambda *_: None)
    assert zero.last_layer.weight.abs().sum().item() == 0


def _warm_step(s):
    torch.manual_seed(0)
    net = LVWNet(ResNetFeatures('resnet18'), (6, 128, 1, 1), 3)
    warm, joint, _, _ = tnt.make_optimizers(net, s)
    before = net.last_layer.weight.detach().clone()
    tnt.warm_only(net)
    out = net(torch.rand(2, 3, 64, 64))
    loss = torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 2]))
    warm.zero_grad()
    loss.backward()
    warm.step()
    return net, warm, joint, before


def test_last_layer_joint_lr_adds_w_to_the_warm_and_joint_optimisers_only_when_set():
    s = config.resolve_settings('toy')
    assert s['last_layer_joint_lr'] is None
    net, warm, joint, before = _warm_step(s)
    assert torch.equal(net.last_layer.weight, before)  # the reference: W frozen outside the last-layer phase
    assert len(warm.param_groups) == 2 and len(joint.param_groups) == 3
    net, warm, joint, before = _warm_step(dict(s, last_layer_joint_lr=0.01))
    for opt in (warm, joint):
        assert opt.param_groups[-1]['params'] == [net.last_layer.weight]
        assert opt.param_groups[-1]['lr'] == 0.01
    # Adam's first step moves every entry with a non-zero gradient by lr
    moved = (net.last_layer.weight - before).abs()
    assert moved.max().item() == pytest.approx(0.01, rel=1e-3)


def test_word_diversity_on_a_hand_example():
    words = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    # cos(0, 1) = cos(1, 2) = 1/sqrt(2), cos(0, 2) = 0; margin 0.5: 2 * (0.70711 - 0.5)^2 / 3 pairs
    expected = 2 * (1 / math.sqrt(2) - 0.5) ** 2 / 3
    assert tnt.word_diversity(words, 0.5).item() == pytest.approx(expected, rel=1e-6)
    assert tnt.word_diversity(words[:, :, None, None], 0.5).item() == pytest.approx(expected, rel=1e-6)
    assert tnt.word_diversity(words, 0.8).item() == 0
    assert tnt.word_diversity(torch.eye(3), 0.0).item() == 0  # orthogonal words
    # d cos(p0, p1) / d p0 = p1 / (|p0| |p1|) - cos p0 / |p0|^2 = (0, 1/sqrt(2)): descent turns word 0
    # away from word 1; word 1, pulled alike by words 0 and 2, gets no gradient
    w = words.clone().requires_grad_(True)
    tnt.word_diversity(w, 0.5).backward()
    scale = 2 * (1 / math.sqrt(2) - 0.5) / 3
    assert w.grad[0].tolist() == pytest.approx([0.0, scale / math.sqrt(2)], abs=1e-6)
    assert w.grad[1].tolist() == pytest.approx([0.0, 0.0], abs=1e-6)


def test_diversity_term_only_with_a_positive_coefficient():
    net = LVWNet(ResNetFeatures('resnet18'), (3, 2, 1, 1), 3)
    with torch.no_grad():
        net.prototype_vectors.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])[:, :, None, None])
    logits, labels = torch.zeros(2, 3), torch.tensor([0, 1])
    min_d = torch.ones(2, 3)
    s = config.resolve_settings('toy', ['num_classes=3', 'prototype_shape=(3, 2, 1, 1)', 'topk=2'])
    plain = tnt.combine_losses(logits, min_d, labels, None, net, s, False)
    assert 'diversity' not in plain
    more = tnt.combine_losses(logits, min_d, labels, None, net, dict(s, diversity_coef=2.0), False)
    expected = 2 * (1 / math.sqrt(2) - 0.5) ** 2 / 3
    assert more['diversity'].item() == pytest.approx(expected, rel=1e-6)
    assert (more['total'] - plain['total']).item() == pytest.approx(2.0 * expected, rel=1e-5)


def test_word_anchor_is_each_words_nearest_patch_by_brute_force():
    torch.manual_seed(0)
    d = torch.rand(3, 4, 4, 4)  # (B, P, H, W)
    inner = ~push.border_cells(4, 4)
    for cells in (None, inner):
        nearest = []
        for p in range(4):
            best = math.inf
            for i in range(3):
                for h in range(4):
                    for w in range(4):
                        if cells is None or cells[h, w]:
                            best = min(best, d[i, p, h, w].item())
            nearest.append(best)
        assert tnt.word_anchor(d, cells).item() == pytest.approx(sum(nearest) / 4, rel=1e-6)
    # only the nearest patch of each word gets a gradient, 1 / P
    x = d.clone().requires_grad_(True)
    tnt.word_anchor(x, inner).backward()
    assert (x.grad != 0).sum().item() == 4
    assert x.grad.sum().item() == pytest.approx(1.0, rel=1e-6)
    assert x.grad[:, :, push.border_cells(4, 4)].abs().sum().item() == 0


def test_push_cells_are_what_the_push_searches():
    assert push.push_cells(4, 4, False).all()
    assert push.push_cells(4, 4, True).tolist() == (~push.border_cells(4, 4)).tolist()
    assert push.push_cells(4, 4, True).sum().item() == 4
    assert push.push_cells(2, 2, True).all()  # no inner cell: the push searches every cell


def test_word_anchor_term_only_with_a_positive_coefficient_and_trainable_words():
    torch.manual_seed(0)
    net = LVWNet(ResNetFeatures('resnet18'), (3, 128, 1, 1), 3)
    s = config.resolve_settings('toy', ['num_classes=3', 'prototype_shape=(3, 128, 1, 1)', 'topk=2'])
    assert s['word_anchor_coef'] == 0
    out = net(torch.rand(2, 3, 96, 96))  # a 3 x 3 grid
    labels = torch.tensor([0, 1])
    plain = tnt.batch_losses(out, labels, None, net, s, False)
    assert 'anchor' not in plain
    ringed = dict(s, word_anchor_coef=0.5, push_exclude_border=True)
    anchored = tnt.batch_losses(out, labels, None, net, ringed, False)
    expected = out.distances[:, :, 1, 1].amin(dim=0).mean().item()  # the one inner cell of a 3 x 3 grid
    assert anchored['anchor'].item() == pytest.approx(expected, rel=1e-6)
    assert (anchored['total'] - plain['total']).item() == pytest.approx(0.5 * expected, rel=1e-4)
    tnt.last_only(net)  # frozen words: no anchor, as in the cached last-layer passes
    assert 'anchor' not in tnt.batch_losses(out, labels, None, net, ringed, False)


def _candidates(rows):
    """rows: per word a list of (distance, image, h, w), sorted -> a candidate dict (P, k)."""
    t = torch.tensor(rows, dtype=torch.float64)
    return {'distance': t[..., 0].float(), 'image': t[..., 1].long(), 'h': t[..., 2].long(), 'w': t[..., 3].long()}


def test_unique_assignment_greedy_by_distance():
    A, B, C, D = (0, 0, 0), (1, 0, 0), (2, 0, 0), (3, 0, 0)
    rows = [[(1.0, *A), (3.0, *B)],   # word 0 takes A at 1.0
            [(2.0, *A), (2.5, *C)],   # word 1 wants A too, gets C
            [(0.5, *D), (4.0, *A)]]   # word 2 goes first (0.5)
    assert push.unique_assignment(_candidates(rows)).tolist() == [0, 1, 0]
    # equal distances: the lower word index first
    rows = [[(1.0, *A), (2.0, *B)], [(1.0, *A), (2.0, *C)]]
    assert push.unique_assignment(_candidates(rows)).tolist() == [0, 1]
    # an empty slot (image -1) is never taken
    rows = [[(1.0, *A), (float('inf'), -1, 0, 0)], [(1.0, *A), (float('inf'), -1, 0, 0)]]
    assert push.unique_assignment(_candidates(rows)).tolist() == [0, 0]


def _push_setup(size=64, n=7, P=6):
    torch.manual_seed(0)
    net = LVWNet(ResNetFeatures('resnet18'), (P, 128, 1, 1), 3).eval()
    images = torch.rand(n, 3, size, size)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0][:n])
    loader = torch.utils.data.DataLoader(TensorImages(images, labels), batch_size=3, shuffle=False)
    return net, images, loader


def test_push_unique_gives_identical_words_the_p_nearest_patches():
    """All six words start as one vector: the reference push puts them all on its nearest patch;
    push_unique gives the six words the six nearest patches, one each."""
    net, images, loader = _push_setup()
    with torch.no_grad():
        net.prototype_vectors.copy_(net.prototype_vectors[:1].expand_as(net.prototype_vectors))
        d = squared_distances(net.conv_features(normalize(images)), net.prototype_vectors[:1])[:, 0]  # (N, H, W)
    ranked = d.flatten().sort().values
    start = net.prototype_vectors.detach().clone()
    plain = push.nearest_patches(net, loader, torch.device('cpu'), False)
    assert len({(i, h, w) for i, h, w in zip(plain['image'].tolist(), plain['h'].tolist(), plain['w'].tolist())}) == 1
    with torch.no_grad():
        net.prototype_vectors.copy_(start)
    found = push.push_prototypes(net, loader, torch.device('cpu'), False, unique=True, **QUIET)
    patches = list(zip(found['image'].tolist(), found['h'].tolist(), found['w'].tolist()))
    assert len(set(patches)) == 6
    # which word gets which of the six is a tie between equal words (float noise decides): compare the set
    assert torch.allclose(found['distance'].sort().values, ranked[:6], atol=1e-4)
    H, W = d.shape[1:]
    for p, (i, h, w) in enumerate(patches):
        assert d[i, h, w].item() == pytest.approx(found['distance'][p].item(), abs=1e-4)
        assert 0 <= h < H and 0 <= w < W
    # the words now sit on their patches, so they are six distinct vectors
    assert torch.unique(net.prototype_vectors.detach().reshape(6, -1), dim=0).shape[0] == 6


def test_push_unique_changes_nothing_when_the_nearest_patches_differ():
    """Words set on six different patches (image p, cell (p % 2, 0)) have those as their nearest,
    at distance 0: push_unique finds exactly what the reference push finds."""
    net, images, loader = _push_setup()
    with torch.no_grad():
        z = net.conv_features(normalize(images))
        net.prototype_vectors.copy_(torch.stack([z[p, :, p % 2, 0] for p in range(6)])[:, :, None, None])
    start = net.prototype_vectors.detach().clone()
    plain = push.nearest_patches(net, loader, torch.device('cpu'), False)
    assert list(zip(plain['image'].tolist(), plain['h'].tolist(), plain['w'].tolist())) == \
        [(p, p % 2, 0) for p in range(6)]
    unique = push.nearest_patches(net, loader, torch.device('cpu'), False, unique=True)
    for key in ('image', 'h', 'w', 'label', 'distance', 'patch', 'similarity_map'):
        assert torch.equal(unique[key], plain[key]), key
    assert torch.equal(net.prototype_vectors, start)  # nearest_patches itself moves nothing


def test_push_exclude_border_searches_the_inner_cells_only():
    net, images, loader = _push_setup(size=128)   # resnet18 at 128 px: a 4 x 4 grid
    found = push.nearest_patches(net, loader, torch.device('cpu'), False, exclude_border=True)
    with torch.no_grad():
        d = squared_distances(net.conv_features(normalize(images)), net.prototype_vectors)  # (N, P, 4, 4)
    inner = d[:, :, 1:3, 1:3].permute(1, 0, 2, 3).reshape(d.shape[1], -1)
    assert set(found['h'].tolist()) <= {1, 2} and set(found['w'].tolist()) <= {1, 2}
    assert torch.allclose(found['distance'], inner.min(dim=1).values, atol=1e-4)
    assert push.border_cells(4, 4).sum().item() == 12
    # a 2 x 2 grid has no inner cell: every cell is searched, as without the setting, and the push says so
    small_net, _, small = _push_setup(size=64)
    plain = push.nearest_patches(small_net, small, torch.device('cpu'), False)
    said = []
    found = push.push_prototypes(small_net, small, torch.device('cpu'), False, exclude_border=True, log=said.append)
    assert torch.equal(found['distance'], plain['distance']) and torch.equal(found['image'], plain['image'])
    assert said[0] == ('warning: push_exclude_border: the 2 x 2 word grid has no inner cell; the push searches '
                       'every cell')


def test_best_candidates_keeps_the_earlier_patch_on_ties():
    kept = {'distance': torch.tensor([[1.0, 2.0]]), 'image': torch.tensor([[0, 1]])}
    new = {'distance': torch.tensor([[1.0, 1.5]]), 'image': torch.tensor([[5, 6]])}
    best = push.best_candidates(kept, new, 3)
    assert best['distance'].tolist() == [[1.0, 1.0, 1.5]] and best['image'].tolist() == [[0, 5, 6]]


def test_nearest_across_ranks_merges_candidates_in_single_process_order(monkeypatch):
    """Two ranks' candidate lists (images 0, 2 on rank 0 and 1, 3 on rank 1): the merge keeps the
    k best by distance, ties to the smaller image, then the earlier cell."""
    def rank_set(distance, image, h, w):
        t = lambda v, dtype=torch.long: torch.tensor(v, dtype=dtype)
        return {'distance': t(distance, torch.float32), 'image': t(image), 'h': t(h), 'w': t(w),
                'label': t(image), 'similarity_map': torch.zeros(1, 2, 2, 2)}
    rank0 = rank_set([[1.0, 3.0]], [[2, 0]], [[0, 1]], [[0, 0]])
    rank1 = rank_set([[1.0, 3.0]], [[1, 3]], [[1, 0]], [[1, 0]])
    name_of = {id(v): k for k, v in rank0.items()}  # this process is rank 0; rank 1's values come in the gather
    monkeypatch.setattr(distributed, 'all_gather_stack',
                        lambda v: torch.stack([rank0[name_of[id(v)]], rank1[name_of[id(v)]]]))
    merged = push.nearest_across_ranks(rank0)
    assert merged['image'].tolist() == [[1, 2]]  # both at 1.0: image 1 before image 2
    assert merged['distance'].tolist() == [[1.0, 1.0]]
    assert merged['h'].tolist() == [[1, 0]] and merged['w'].tolist() == [[1, 0]]


@pytest.mark.parametrize('name, value, message', [
    ('last_layer_init', "'random'", "setting last_layer_init must be one of 'classwise', 'zero', got 'random'"),
    ('push_unique', '1', '-set push_unique: expected a value like False, got 1'),
    ('diversity_coef', '-1', 'setting diversity_coef must be'),
    ('diversity_margin', '2', 'setting diversity_margin must be'),
    ('word_anchor_coef', '-0.1', 'setting word_anchor_coef must be'),
    ('last_layer_joint_lr', '0', 'setting last_layer_joint_lr must be None or a number > 0, got 0'),
])
def test_bad_shared_word_settings_are_one_line_errors(name, value, message):
    with pytest.raises(config.UserError, match=message.replace('(', r'\(').replace(')', r'\)')):
        config.resolve_settings('toy', ['%s=%s' % (name, value)])


def test_the_defaults_are_the_reference():
    s = config.resolve_settings('toy')
    assert (s['last_layer_init'], s['last_layer_joint_lr'], s['push_unique'], s['push_exclude_border'],
            s['diversity_coef'], s['word_anchor_coef']) == ('classwise', None, False, False, 0, 0)
    np.testing.assert_equal(push.border_cells(3, 3).numpy(), ~np.pad(np.ones((1, 1), bool), 1))


def test_the_shared_variant_sets_its_values_and_the_command_line_still_wins():
    import settings
    s = config.resolve_settings('toy', ['lvw_variant="shared"'])
    for name, value in settings.variants['shared'].items():
        assert s[name] == value, name
    assert s['img_size'] == 112  # the dataset's values stay
    s = config.resolve_settings('toy', ['push_unique=False', 'lvw_variant="shared"'])
    assert s['push_unique'] is False and s['last_layer_joint_lr'] == 0.05
    reference = config.resolve_settings('toy')
    assert reference == config.resolve_settings('toy', ['lvw_variant="reference"'])
    with pytest.raises(config.UserError, match="setting lvw_variant must be one of 'reference', 'shared', got 'x'"):
        config.resolve_settings('toy', ['lvw_variant="x"'])


def test_backbone_padding_pads_by_reflection_and_zeros_is_the_default():
    import torch.nn as nn
    import finetune_backbone
    from model import set_padding_mode
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.rand(1, 2, 5, 5)
    zero = conv(x)
    set_padding_mode(conv, 'reflect')
    expected = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode='reflect'),
                                          conv.weight, conv.bias)
    assert torch.allclose(conv(x), expected, atol=1e-6)
    assert torch.allclose(conv(x)[..., 1:-1, 1:-1], zero[..., 1:-1, 1:-1], atol=1e-6)  # inner outputs alike
    assert not torch.allclose(conv(x)[..., 0, :], zero[..., 0, :], atol=1e-3)
    s = config.resolve_settings('toy', ['pretrained=False'])
    assert s['backbone_padding'] == 'zeros'

    def modes(module):
        return {m.padding_mode for m in module.modules() if isinstance(m, nn.Conv2d) and m.padding != (0, 0)}
    assert modes(build_model(s, log=lambda *_: None).features) == {'zeros'}
    assert modes(build_model(dict(s, backbone_padding='reflect'), log=lambda *_: None).features) == {'reflect'}
    assert modes(finetune_backbone.make_base_model('resnet18', 3, 'replicate')) == {'replicate'}
    assert modes(finetune_backbone.make_base_model('resnet18', 3)) == {'zeros'}
    with pytest.raises(config.UserError, match="setting backbone_padding must be one of"):
        config.resolve_settings('toy', ["backbone_padding='circular'"])


def test_a_base_model_reloads_with_the_padding_it_was_trained_with(tmp_path):
    import torch.nn as nn
    import finetune_backbone
    from run.checkpoint import save_checkpoint
    s = config.resolve_settings('toy', ["backbone_padding='reflect'"])
    torch.manual_seed(0)
    model = finetune_backbone.make_base_model('resnet18', 3, 'reflect').eval()
    path = save_checkpoint(model, str(tmp_path / 'base.pth'), s, ['a', 'b', 'c'], arch='resnet18', img_size=64)
    loaded, _ = finetune_backbone.load_base_model(path)
    x = torch.rand(1, 3, 64, 64)
    assert torch.allclose(loaded(x), model(x), atol=1e-5)
    assert {m.padding_mode for m in loaded.modules() if isinstance(m, nn.Conv2d) and m.padding != (0, 0)} == {'reflect'}
