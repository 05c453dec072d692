"""Every setting is checked once, at resolution (config.finish_settings, table settings_rules.RULES):
each mistake is a one-line UserError naming the setting and the bad value."""
import json
import os
import subprocess
import sys

import pytest

import settings
from run import config, settings_rules
from run.checkpoint import checkpoint_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LRS = "{'features': 1e-4, 'add_on_layers': 3e-3, 'prototype_vectors': 3e-3}"

MISTAKES = [  # (-set item, name the message must contain)
    ('num_train_epochs=1.5', 'num_train_epochs'),
    ('num_train_epochs=2.0', 'num_train_epochs'),
    ('num_train_epochs=0', 'num_train_epochs'),
    ('train_batch_size=True', 'train_batch_size'),
    ('train_batch_size=0', 'train_batch_size'),
    ('test_batch_size=-4', 'test_batch_size'),
    ('gc_batch_size=0', 'gc_batch_size'),
    ('num_workers=-1', 'num_workers'),
    ('num_warm_epochs=-1', 'num_warm_epochs'),
    ('last_layer_optimizer_lr=-0.1', 'last_layer_optimizer_lr'),
    ('lfi_lr=0', 'lfi_lr'),
    ('weight_decay=-1e-3', 'weight_decay'),
    ('gc_gamma=0', 'gc_gamma'),
    ("joint_optimizer_lrs={'features': 1e-4, 'add_on_layers': 3e-3}", 'joint_optimizer_lrs'),
    ("warm_optimizer_lrs={'add_on_layers': 3e-3, 'prototype_vectors': 3e-3, 'features': 1}", 'warm_optimizer_lrs'),
    ("joint_optimizer_lrs={'features': -1e-4, 'add_on_layers': 3e-3, 'prototype_vectors': 3e-3}",
     "joint_optimizer_lrs['features']"),
    ('coefs={}', 'coefs'),
    ("coefs={'crs_ent': 1, 'clst': 0.8, 'sep': -0.08, 'l1': 1e-4, 'cls': 1}", 'coefs'),
    ("coefs={'crs_ent': 1, 'clst': '0.8', 'sep': -0.08, 'l1': 1e-4}", "coefs['clst']"),
    ('attention_weight=-1', 'attention_weight'),
    ("amp='fp32'", 'amp'),
    ('channels_last=1', 'channels_last'),
    ('sync_batchnorm=None', 'sync_batchnorm'),
    ('save_threshold=1.5', 'save_threshold'),
    ('save_threshold=-2', 'save_threshold'),
    ('keep_checkpoints=0', 'keep_checkpoints'),
    ('keep_checkpoints=1.0', 'keep_checkpoints'),
    ('joint_lr_step_size=0', 'joint_lr_step_size'),
    ('push_epochs=[3, 7]', 'push_epochs[1]'),
    ('push_epochs=[-1]', 'push_epochs[0]'),
    ('gc_milestones=[3, 1.5]', 'gc_milestones[1]'),
    ('gc_milestones=[30, 24]', 'gc_milestones'),
    ('lfi_milestones=[4, 4]', 'lfi_milestones'),
    ('gc_epochs=0', 'gc_epochs'),
    ('scouter_epochs=0', 'scouter_epochs'),
    ('lfi_epochs=0', 'lfi_epochs'),
    ('epsilon=0', 'epsilon'),
    ('img_size=16', 'img_size'),
    ('image_check="fast"', 'image_check'),
    ("experiment_run=''", 'experiment_run'),
    ('experiment_run=..', 'experiment_run'),
    ('experiment_run=.', 'experiment_run'),
    ('experiment_run=a/b', 'experiment_run'),
    ('experiment_run=-x', 'experiment_run'),
    ("experiment_run=' x'", 'experiment_run'),
    ('peer_run=..', 'peer_run'),
    ("scouter_slots_per_class={'+': 5, 'minus': 3}", 'scouter_slots_per_class'),
    ("scouter_slots_per_class={'+': 5, '-': 0}", "scouter_slots_per_class['-']"),
    ("scouter_lambda={'+': -1.0, '-': 1.0}", "scouter_lambda['+']"),
    ('scouter_freeze_layers=5', 'scouter_freeze_layers'),
    ('lfi_conv1_stride=3', 'lfi_conv1_stride'),
    ('lfi_conv1_stride=2.0', 'lfi_conv1_stride'),
    ('gc_optimizer="adam"', 'gc_optimizer'),
    ('gc_maxpool=1', 'gc_maxpool'),
    ('seed=0.5', 'seed'),
    ('data_path=3', 'data_path'),
    ('base_architecture="vgg16"', 'base_architecture'),
    ('prototype_shape=(45, 128.0, 1, 1)', 'prototype_shape'),
    ('prototype_shape=(3, 128, 1, 1)', 'prototype_shape'),
    ('topk=0', 'topk'),
    ('topk=46', 'topk'),
    ('attention_flip="sideways"', 'attention_flip'),
]


@pytest.mark.parametrize('item,name', MISTAKES)
def test_mistakes_are_one_line_naming_the_setting(item, name):
    with pytest.raises(config.UserError) as err:
        config.resolve_settings('toy', [item])
    message = str(err.value)
    assert '\n' not in message and name in message, message


@pytest.mark.parametrize('items', [
    ['last_layer_optimizer_lr=1'], ['finetune_lr=1', 'gc_lr=1'], ['save_threshold=0.0'], ['save_threshold=1.0'],
    ['save_threshold=1'], ['save_threshold=-1.0'], ['keep_checkpoints=None'], ['num_warm_epochs=0', 'push_start=0'],
    ['gc_epochs=1', 'scouter_epochs=1', 'lfi_epochs=1', 'finetune_epochs=0'], ['num_workers=0'],
    ['push_epochs=None'], ['push_epochs=[]'], ['push_epochs=(0, 6)'], ['gc_milestones=()'],
    ["coefs={'crs_ent': 1, 'clst': 0, 'sep': -1, 'l1': 0.0}"], ['attention_weight=0'], ['weight_decay=0'],
    ['lfi_conv1_stride=1'], ['scouter_optimizer="sgd"', 'lfi_optimizer="adamw"'], ['peer_run=None'],
    ['peer_run=my.run-1'], ['experiment_run=run 2'], ['experiment_run=..x'], ['train_dir=/data/x/train/'],
    ['image_check="full"'], ['image_check="off"'], ['seed=-3'], ['prototype_shape=[9, 2, 1, 1]', 'topk=9'],
    ["joint_optimizer_lrs={'features': 1, 'add_on_layers': 2, 'prototype_vectors': 3}"],
])
def test_valid_edge_values_pass(items):
    config.resolve_settings('toy', items)


def test_every_setting_has_one_rule():
    names = set(config.default_settings()) - {'presets'}
    assert set(settings_rules.RULES) == names


def test_presets_resolve_as_before():
    """settings_snapshot.json: each preset as it resolved before the checks were added."""
    with open(os.path.join(ROOT, 'tests', 'settings_snapshot.json')) as f:
        before = json.load(f)
    assert set(before) == set(settings.presets)
    for dataset, values in before.items():
        now = config.to_jsonable(config.resolve_settings(dataset))
        assert {name: now.get(name) for name in values} == values, dataset


def test_checkpoint_settings_are_checked():
    s = config.resolve_settings('toy')
    assert checkpoint_settings({'settings': config.to_jsonable(s)}) == s
    stored = dict(config.to_jsonable(s), experiment_run='..')
    with pytest.raises(config.UserError, match="setting experiment_run must be a plain folder name"):
        checkpoint_settings({'settings': stored})


def test_module_level_and_preset_values_are_checked(monkeypatch):
    monkeypatch.setattr(settings, 'num_workers', -1)
    with pytest.raises(config.UserError, match='setting num_workers must be a whole number >= 0, got -1'):
        config.resolve_settings('pets')
    monkeypatch.setitem(settings.presets, 'toy', dict(settings.presets['toy'], train_batch_size=0))
    with pytest.raises(config.UserError, match='setting train_batch_size must be a whole number >= 1, got 0'):
        config.resolve_settings('toy')


def test_messages():
    cases = {
        'num_train_epochs=1.5': 'setting num_train_epochs must be a whole number >= 1, got 1.5',
        'experiment_run=..': "setting experiment_run must be a plain folder name (no '/' or control character, not '.' or '..', "
                             "not empty or starting with '-' or a space), got '..'",
        'coefs={}': "setting coefs must be a dict with exactly the keys 'crs_ent', 'clst', 'sep', 'l1' "
                    "(missing 'crs_ent', 'clst', 'sep', 'l1'), got {}",
        'push_epochs=[3, 7]': 'setting push_epochs[1] must be an epoch in [0, 7) as num_train_epochs is 7, got 7',
        'keep_checkpoints=0': 'setting keep_checkpoints must be None or a whole number >= 1, got 0',
    }
    for item, message in cases.items():
        with pytest.raises(config.UserError) as err:
            config.resolve_settings('toy', [item])
        assert str(err.value) == message


def test_set_type_error_and_rule_agree():
    """-set's early type check (config._check_type) and the rule refuse a bool for an int alike."""
    with pytest.raises(config.UserError, match='-set train_batch_size: expected a value like 32, got True'):
        config.resolve_settings('toy', ['train_batch_size=True'])
    monkeypatched = dict(config.resolve_settings('toy'), train_batch_size=True)
    with pytest.raises(config.UserError, match='setting train_batch_size must be a whole number >= 1, got True'):
        config.finish_settings(monkeypatched)


def test_command_line_error_is_one_line():
    result = subprocess.run([sys.executable, 'main.py', '-dataset', 'toy', '-set', 'num_train_epochs=1.5'],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith('error: setting num_train_epochs'), result.stderr
    assert 'Traceback' not in result.stderr + result.stdout
