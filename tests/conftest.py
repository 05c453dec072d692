import os
import sys

import pytest

# Tests import the top-level scripts (model.py, push.py, ...) as modules.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TINY_SIZE = 64


@pytest.fixture(scope='session')
def tiny_toy(tmp_path_factory):
    """Toy data at 64 px: 3 classes, 6 train and 3 test images per class (made once per session)."""
    from data import make_toy
    root = tmp_path_factory.mktemp('toy') / 'toy'
    make_toy.generate(str(root), size=TINY_SIZE, train_per_class=6, test_per_class=3, num_classes=3,
                      workers=1, progress=False)
    return str(root)


def tiny_overrides(data_path, **extra):
    """-set items for a tiny, fast run on `tiny_toy`."""
    values = {'data_path': data_path + '/', 'img_size': TINY_SIZE, 'num_classes': 3,
              'prototype_shape': (15, 128, 1, 1), 'topk': 5, 'train_batch_size': 8,
              'test_batch_size': 16, 'train_push_batch_size': 7, 'finetune_epochs': 1,
              'num_train_epochs': 3, 'num_warm_epochs': 1, 'push_start': 1, 'push_epochs': [1, 2],
              'last_layer_iterations': 1, 'keep_checkpoints': None, 'experiment_run': 'tiny'}
    values.update(extra)
    return ['%s=%r' % (k, v) for k, v in values.items()]


@pytest.fixture
def tiny_settings(tiny_toy):
    from run import config
    return config.resolve_settings('toy', tiny_overrides(tiny_toy))


def save_random_base_model(path, s, classes, seed):
    """An untrained base ResNet-18 saved as finetune_backbone.py saves one; returns the model (eval)."""
    import torch
    from run.checkpoint import save_checkpoint
    from finetune_backbone import make_base_model
    torch.manual_seed(seed)
    base = make_base_model('resnet18', len(classes)).eval()
    save_checkpoint(base, str(path), s, classes, arch='resnet18', img_size=TINY_SIZE)
    return base


@pytest.fixture(scope='session')
def tiny_workspace(tmp_path_factory):
    """A folder with tiny toy data (./data/toy), a base model fine-tuned for one epoch
    (saved_models/base/toy_resnet18.pth) and its Grad-CAM maps (./data/grad_{train,test}_toy.npy).
    Tests chdir into it and give each run a name of its own."""
    import finetune_backbone
    import gradcam_extract
    from data import make_toy
    root = tmp_path_factory.mktemp('workspace')
    cwd = os.getcwd()
    os.chdir(root)
    try:
        make_toy.main(['--out', 'data/toy', '--size', '64', '--train-per-class', '6', '--test-per-class', '3',
                       '--classes', '3'])
        finetune_backbone.main(['-dataset', 'toy', '-set', *tiny_overrides('./data/toy')])
        gradcam_extract.main(['-dataset', 'toy', '-set', *tiny_overrides('./data/toy')])
    finally:
        os.chdir(cwd)
    return root
