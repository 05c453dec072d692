"""Model math against brute force, initialisation, receptive field, ImageNet weight loading."""
import math

import pytest
import torch

import model as lvw_model
from model import LVWNet, ResNetFeatures, build_model, log_similarity, squared_distances
from receptive_field import layer_specs, rf_box, word_layer_rf_info
from run import config


def test_squared_distances_match_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    z = torch.rand(2, 4, 3, 5, generator=g)
    p = torch.rand(6, 4, 1, 1, generator=g) * 2 - 0.5
    d = squared_distances(z, p)
    assert d.shape == (2, 6, 3, 5)
    for b in range(2):
        for j in range(6):
            for h in range(3):
                for w in range(5):
                    expected = sum((z[b, c, h, w].item() - p[j, c, 0, 0].item()) ** 2 for c in range(4))
                    assert d[b, j, h, w].item() == pytest.approx(expected, abs=1e-5)


def test_squared_distance_is_never_negative_for_identical_vectors():
    z = torch.full((1, 128, 2, 2), 0.7311)
    p = torch.full((1, 128, 1, 1), 0.7311)
    d = squared_distances(z, p)
    assert (d >= 0).all() and d.max().item() < 1e-4


def test_log_similarity_values():
    d = torch.tensor([0.0, 1.0, 10.0])
    g = log_similarity(d, 1e-4)
    assert g[0].item() == pytest.approx(math.log(1e4), rel=1e-6)  # 9.2103
    assert g[1].item() == pytest.approx(math.log(2 / 1.0001), rel=1e-6)
    assert g[2].item() == pytest.approx(math.log(11 / 10.0001), rel=1e-6)
    assert (g[:-1] > g[1:]).all()


def tiny_net(activation='log', P=6, C=3):
    torch.manual_seed(0)
    return LVWNet(ResNetFeatures('resnet18'), (P, 128, 1, 1), C, activation).eval()


def test_forward_outputs_agree_with_direct_computation():
    net = tiny_net()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = net(x)
        z = net.add_on_layers(net.features(x))
        d = squared_distances(z, net.prototype_vectors)
    assert out.logits.shape == (2, 3) and out.similarity_maps.shape == (2, 6, 2, 2)
    assert torch.allclose(out.min_distances, d.flatten(2).min(2).values)
    assert torch.allclose(out.similarities, log_similarity(out.min_distances))
    assert torch.allclose(out.similarity_maps, log_similarity(d))
    # min-pooling distance = max-pooling similarity, since g decreases
    assert torch.allclose(out.similarities, out.similarity_maps.flatten(2).max(2).values, atol=1e-6)
    assert torch.allclose(out.logits, out.similarities @ net.last_layer.weight.t(), atol=1e-5)
    assert ((z > 0) & (z < 1)).all()


def test_linear_activation_runs_and_uses_max_dist():
    net = tiny_net('linear')
    assert net.max_dist == 128.0
    with torch.no_grad():
        out = net(torch.randn(1, 3, 64, 64))
    assert torch.allclose(out.similarities, 128.0 - out.min_distances)


def test_initialisation():
    net = tiny_net(P=15, C=3)
    w = net.last_layer.weight
    for c in range(3):
        for j in range(15):
            assert w[c, j].item() == (1.0 if j // 5 == c else -0.5)
    words = net.prototype_vectors
    assert words.shape == (15, 128, 1, 1) and words.min() >= 0 and words.max() < 1
    convs = [m for m in net.add_on_layers if isinstance(m, torch.nn.Conv2d)]
    assert [c.weight.shape[:2] for c in convs] == [(128, 512), (128, 128)]
    assert all((c.bias == 0).all() for c in convs)
    # kaiming normal, fan_out = 128 -> std sqrt(2 / 128) = 0.125
    assert convs[0].weight.std().item() == pytest.approx(0.125, rel=0.05)
    assert isinstance(net.add_on_layers[-1], torch.nn.Sigmoid)


def test_bottleneck_add_on_halves_to_word_depth():
    layers = lvw_model.make_add_on_layers('bottleneck', 2048, 128)
    convs = [m for m in layers if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [1024, 1024, 512, 512, 256, 256, 128, 128]
    assert isinstance(layers[-1], torch.nn.Sigmoid)


@pytest.mark.parametrize('arch,size,expected', [
    ('resnet34', 224, [7, 32, 899, 0.5]),
    ('resnet50', 224, [7, 32, 427, 0.5]),
    ('resnet18', 224, [7, 32, 435, 0.5]),
    ('resnet18', 112, [4, 32, 435, 0.5]),
])
def test_receptive_field(arch, size, expected):
    assert word_layer_rf_info(size, layer_specs(ResNetFeatures(arch))) == expected


@pytest.mark.parametrize('size', [64, 100, 112])
def test_receptive_field_grid_matches_the_network(size):
    features = ResNetFeatures('resnet18')
    n = word_layer_rf_info(size, layer_specs(features))[0]
    with torch.no_grad():
        assert features(torch.zeros(1, 3, size, size)).shape[-1] == n


def test_receptive_field_box_of_resnet34_is_the_whole_image():
    info = [7, 32, 899, 0.5]
    assert all(rf_box(info, h, w, 224) == [0, 224, 0, 224] for h in range(7) for w in range(7))
    assert rf_box([4, 32, 99, 0.5], 0, 3, 112) == [0, 50, 47, 112]


def test_imagenet_weights_from_a_local_file(tmp_path):
    import torchvision
    donor = torchvision.models.resnet18(weights=None)
    path = tmp_path / 'r18.pth'
    torch.save(donor.state_dict(), path)
    s = config.resolve_settings('toy', ['img_size=64', 'num_classes=3', 'prototype_shape=(15,128,1,1)'])
    net = build_model(s, weights=str(path), log=lambda *_: None)
    assert torch.equal(net.features.layer3[1].conv2.weight, donor.layer3[1].conv2.weight)


def test_mismatched_weights_are_refused_with_the_first_bad_key(tmp_path):
    import torchvision
    path = tmp_path / 'r18.pth'
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    s = config.resolve_settings('toy', ['base_architecture="resnet34"', 'num_classes=3', 'prototype_shape=(15,128,1,1)'])
    with pytest.raises(config.UserError, match=r"missing key 'layer1.2.conv1.weight'"):
        build_model(s, weights=str(path))
    bad = tmp_path / 'r34.pth'
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), bad)
    s18 = config.resolve_settings('toy', ['num_classes=3', 'prototype_shape=(15,128,1,1)'])
    with pytest.raises(config.UserError, match=r"unexpected key 'layer1.2.conv1.weight'"):
        build_model(s18, weights=str(bad))
    with pytest.raises(config.UserError, match='weights file not found'):
        build_model(s18, weights=str(tmp_path / 'missing.pth'))


def test_weights_are_found_in_torchvision_cache_once(tmp_path, monkeypatch):
    import torchvision
    from model import find_imagenet_weights
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    assert find_imagenet_weights('resnet18') is None
    cache = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
    cache.mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), cache / 'resnet18-f37072fd.pth')
    assert find_imagenet_weights('resnet18') == str(cache / 'resnet18-f37072fd.pth')
    messages = []
    s = config.resolve_settings('toy', ['pretrained=True', 'num_classes=3', 'prototype_shape=(15,128,1,1)'])
    build_model(s, log=messages.append)
    assert messages == ['backbone: starting weights from %s' % (cache / 'resnet18-f37072fd.pth')]
    (cache / 'resnet18-f37072fd.pth').unlink()
    messages.clear()
    build_model(s, log=messages.append)
    assert len(messages) == 1 and messages[0].startswith('warning: no ImageNet weights for resnet18')


def test_finetune_starts_from_a_weights_file(tmp_path, tiny_settings):
    import torchvision
    from finetune_backbone import finetune
    donor = torchvision.models.resnet18(weights=None)
    path = tmp_path / 'imagenet.pth'
    torch.save(donor.state_dict(), path)
    net, accuracy, classes, source = finetune(dict(tiny_settings, finetune_epochs=0), torch.device('cpu'),
                                              weights=str(path), log=lambda *_: None)
    assert source == str(path) and len(classes) == 3 and 0 <= accuracy <= 1
    assert torch.equal(net.layer2[0].conv1.weight, donor.layer2[0].conv1.weight)
    assert net.fc.out_features == 3
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(config.UserError, match="key 'layer1.0.conv1.weight' has shape"):
        finetune(dict(tiny_settings, finetune_epochs=0), torch.device('cpu'), weights=str(path))
