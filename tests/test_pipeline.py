"""The five scripts end to end on 64 px toy data, checkpoints, and the command-line errors."""
import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import eval_iou
import finetune_backbone
import gradcam_extract
import main as lvw_main
from data import make_toy
from model import build_model, model_from_checkpoint
from run import config
from run.checkpoint import CheckpointKeeper, load_checkpoint, save_checkpoint
from tests.conftest import ROOT, tiny_overrides


def test_checkpoint_round_trip_with_weights_only(tmp_path, tiny_settings):
    torch.manual_seed(0)
    net = build_model(tiny_settings, log=lambda *_: None).eval()
    path = save_checkpoint(torch.nn.DataParallel(net), str(tmp_path / '3push0.5000.pth'), tiny_settings,
                           ['a', 'b', 'c'], epoch=3, kind='push')
    raw = torch.load(path, map_location='cpu', weights_only=True)
    assert not any(k.startswith('module.') for k in raw['state_dict'])
    assert raw['class_names'] == ['a', 'b', 'c'] and raw['epoch'] == 3
    assert raw['settings']['prototype_shape'] == [15, 128, 1, 1]
    rebuilt, s = model_from_checkpoint(load_checkpoint(path))
    assert s['prototype_shape'] == (15, 128, 1, 1) and s['img_size'] == 64
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(net(x), rebuilt(x)):
            assert torch.equal(a, b)
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]


def test_failed_write_leaves_no_file(tmp_path):
    def boom(f):
        f.write('partial')
        raise RuntimeError('disk full')

    with pytest.raises(RuntimeError):
        config.atomic_write(str(tmp_path / 'x.json'), boom)
    assert os.listdir(tmp_path) == []


def test_checkpoint_keeper_threshold_and_pruning(tmp_path, tiny_settings):
    net = build_model(tiny_settings, log=lambda *_: None)
    keep = CheckpointKeeper(str(tmp_path), threshold=0.5, keep=2)
    assert keep(net, 'a.pth', 0.5, tiny_settings, []) is None  # not above the threshold
    for name, acc in (('b.pth', 0.9), ('c.pth', 0.6), ('d.pth', 0.7), ('e.pth', 0.8)):
        keep(net, name, acc, tiny_settings, [])
    assert sorted(os.listdir(tmp_path)) == ['b.pth', 'd.pth', 'e.pth']  # 2 newest + the best
    assert keep.best == (str(tmp_path / 'b.pth'), 0.9)


def test_end_to_end_through_the_five_scripts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_toy.main(['--out', 'data/toy', '--size', '64', '--train-per-class', '6', '--test-per-class', '3',
                   '--classes', '3'])
    sets = tiny_overrides('./data/toy')

    base = finetune_backbone.main(['-dataset', 'toy', '-set', *sets])
    assert base['path'] == os.path.join('saved_models', 'base', 'toy_resnet18.pth')
    ckpt = torch.load(base['path'], weights_only=True)
    assert ckpt['arch'] == 'resnet18' and ckpt['class_names'] == make_toy.class_names(3)
    assert 0 <= base['test_accuracy'] <= 1

    outputs = gradcam_extract.main(['-dataset', 'toy', '-set', *sets])
    for split, n in (('train', 18), ('test', 9)):
        maps = np.load(outputs[split]['path'])
        assert maps.shape == (n, 64, 64) and maps.dtype == np.float32
        assert maps.min() >= 0 and maps.max() <= 1 and maps.max(axis=(1, 2)).min() > 0.99
        with open(outputs[split]['path'][:-4] + '.txt') as f:
            header, *listed = f.read().split('\n')[:-1]
        assert re.fullmatch(r'# maps crc32 [0-9a-f]{8} shape %d,64,64 dtype float32' % n, header)
        assert len(listed) == n and listed[0].startswith(make_toy.class_names(3)[0] + '/')

    summary = lvw_main.main(['-dataset', 'toy', '-set', *sets])
    run = os.path.join('saved_models', 'resnet18', 'tiny')
    files = os.listdir(run)
    checkpoints = sorted(f for f in files if f.endswith('.pth'))
    kinds = [re.match(r'^(\d+)(nopush|push|_\d+push)0\.\d{4}\.pth$', f).group(1, 2) for f in checkpoints]
    assert sorted(kinds) == sorted([('0', 'nopush'), ('1', 'nopush'), ('1', 'push'), ('1', '_0push'),
                                    ('2', 'nopush'), ('2', 'push'), ('2', '_0push')])
    assert summary['final_checkpoint'].startswith('2_0push') and summary['final_checkpoint'] in files
    with open(os.path.join(run, 'metrics.csv')) as f:
        rows = list(csv.DictReader(f))
    assert [(r['epoch'], r['phase'], r['split']) for r in rows] == [
        ('0', 'warm', 'train'), ('0', 'warm', 'test'),
        ('1', 'joint', 'train'), ('1', 'joint', 'test'), ('1', 'push', 'test'), ('1', 'last', 'train'), ('1', 'last', 'test'),
        ('2', 'joint', 'train'), ('2', 'joint', 'test'), ('2', 'push', 'test'), ('2', 'last', 'train'), ('2', 'last', 'test')]
    with open(os.path.join(run, 'settings.json')) as f:
        saved = json.load(f)['settings']
    assert saved['img_size'] == 64 and saved['push_epochs'] == [1, 2] and saved['experiment_run'] == 'tiny'
    for epoch in (1, 2):
        assert os.path.isfile(os.path.join(run, 'img', 'epoch-%d' % epoch, 'bb%d.npy' % epoch))
    assert 'epoch 2 | last | test 0' in open(os.path.join(run, 'train.log')).read()

    capsys.readouterr()
    result = eval_iou.main(['-modeldir', run, '-model', summary['final_checkpoint'],
                            '-test_atts', outputs['test']['path'], '-thr', '50'])
    printed = capsys.readouterr().out
    assert 'test iou: %.4f' % result['iou'] in printed
    assert 0 < result['iou'] <= 1 and len(result['ious']) == 9
    assert result['accuracy'] == pytest.approx(summary['final_accuracy'], abs=1e-6)
    assert result['csv'] == os.path.join(run, '%s_grad_test_toy_iou_thr50_low.csv' % summary['final_checkpoint'][:-4])
    with open(result['csv']) as f:
        per_image = list(csv.DictReader(f))
    assert len(per_image) == 9 and np.mean([float(r['iou']) for r in per_image]) == pytest.approx(result['iou'], abs=1e-5)

    # ProtoPNet mode through the same code: every word pushed onto an image of its own class
    pp = lvw_main.main(['-dataset', 'toy', '-set', *sets, 'class_specific=True', 'attention_weight=0',
                        'experiment_run="tiny_pp"', 'num_train_epochs=2', 'push_epochs=[1]'])
    bb = np.load(os.path.join('saved_models', 'resnet18', 'tiny_pp', 'img', 'epoch-1', 'bb1.npy'))
    assert (bb[:, 5] == np.arange(15) // 5).all()
    assert pp['final_checkpoint'].startswith('1_0push')

    with pytest.raises(config.UserError, match='already holds a run'):
        lvw_main.main(['-dataset', 'toy', '-set', *sets])


def run_script(script, args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('script,args,message', [
    ('main.py', ['-train_atts', 'missing.npy', '-test_atts', 'also_missing.npy'],
     'error: attention maps not found: missing.npy (make them with gradcam_extract.py)'),
    ('main.py', ['-set', 'learning_rate=0.1'], "error: -set: unknown settings name 'learning_rate' (see settings.py)"),
    ('eval_iou.py', ['-modeldir', '.', '-model', 'x.pth', '-test_atts', 'y.npy', '-thr', '150'],
     'error: -thr must be a percentile strictly between 0 and 100, got 150'),
    ('eval_iou.py', ['-modeldir', 'runs', '-model', 'x.pth', '-test_atts', 'y.npy', '-thr', '50'],
     'error: checkpoint not found: runs/x.pth'),
    ('finetune_backbone.py', [], 'error: image folder not found: ./data/toy/train/'),
])
def test_user_errors_are_one_line(tmp_path, script, args, message):
    done = run_script(script, args, tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == message
    assert 'Traceback' not in done.stderr
