"""Setting amp (autocast of the backbone and add-on layers) and channels_last, on CPU: the words'
distances, similarities, logits and losses stay float32, a bf16 training step gives the float32
loss to within bf16's precision, and whole runs with fp16 (GradScaler) and channels-last finish."""
import json
import math
import os

import pytest
import torch

import main as lvw_main
import train_and_test as tnt
from model import LVWNet, ResNetFeatures
from run import config
from tests.conftest import tiny_overrides
from tests.test_resume import SCHEDULE, run_path


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return LVWNet(ResNetFeatures('resnet18'), (15, 128, 1, 1), 3)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(4, 3, 64, 64, generator=g)
    gradcam = torch.rand(4, 64, 64, generator=g)
    return images, gradcam, torch.tensor([0, 1, 2, 1])


def one_step(amp, s):
    """Loss of one joint training step from the same start, and the step's output dtypes."""
    net = tiny_net()
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    images, gradcam, labels = batch()
    device = torch.device('cpu')
    with tnt.amp_context(device, amp):
        z = net.conv_features(tnt.model_input(images, device, s))
        out = net(tnt.model_input(images, device, s))
    terms = tnt.batch_losses(out, labels, gradcam, net, s, use_attention=True)
    optimizer.zero_grad()
    terms['total'].backward()
    optimizer.step()
    dtypes = {'z': z.dtype, **{name: getattr(out, name).dtype for name in out._fields}, 'total': terms['total'].dtype}
    return terms, dtypes


def test_amp_none_adds_no_autocast():
    with tnt.amp_context(torch.device('cpu'), None):
        assert not torch.is_autocast_enabled('cpu')
    with tnt.amp_context(torch.device('cpu'), 'bf16'):
        assert torch.is_autocast_enabled('cpu')


@pytest.mark.parametrize('amp, low', [('bf16', torch.bfloat16), ('fp16', torch.float16)])
def test_autocast_step_keeps_distances_and_losses_in_float32(tiny_settings, amp, low):
    reference, dtypes = one_step(None, tiny_settings)
    assert set(dtypes.values()) == {torch.float32}
    terms, dtypes = one_step(amp, tiny_settings)
    assert dtypes['z'] == low  # the backbone and add-on layers ran in low precision ...
    for name in ('logits', 'min_distances', 'similarities', 'similarity_maps', 'total'):
        assert dtypes[name] == torch.float32, name  # ... everything after them in float32
    # bf16 keeps 8 bits of mantissa (relative error 2^-8 = 0.4 % per rounding), fp16 11
    tolerance = 0.05 if amp == 'bf16' else 0.01
    for name in ('total', 'cross_entropy', 'cluster', 'attention'):
        assert terms[name].item() == pytest.approx(reference[name].item(), rel=tolerance), name


def test_channels_last_gives_the_same_outputs(tiny_settings):
    net = tiny_net().eval()
    images = tnt.model_input(batch()[0], torch.device('cpu'), tiny_settings)
    with torch.no_grad():
        plain = net(images)
        net = net.to(memory_format=torch.channels_last)
        last = net(tnt.model_input(batch()[0], torch.device('cpu'), dict(tiny_settings, channels_last=True)))
    assert net.features.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(plain, last):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('extra', [['amp="fp16"', 'channels_last=True'], ['amp="bf16"', 'last_layer_cache=True']])
def test_whole_run_with_amp(tiny_workspace, monkeypatch, extra):
    monkeypatch.chdir(tiny_workspace)
    name = 'amp_' + extra[0][5:9]
    summary = lvw_main.main(['-dataset', 'toy', '-set', *tiny_overrides('./data/toy', experiment_run=name),
                             *SCHEDULE, *extra])
    assert 0 <= summary['final_accuracy'] <= 1
    with open(os.path.join(run_path(name), 'settings.json')) as f:
        assert json.load(f)['settings']['amp'] == extra[0][5:9]
    with open(os.path.join(run_path(name), 'metrics.csv')) as f:
        lines = f.read().splitlines()[1:]
    assert lines and all(math.isfinite(float(v)) for line in lines for v in line.split(',')[5:9] if v)


def test_amp_value_is_checked():
    with pytest.raises(config.UserError, match="setting amp must be one of None, 'bf16', 'fp16', got 'fp32'"):
        config.resolve_settings('toy', ["amp='fp32'"])
