"""train_peer.py for every peer on 64 px toy data, then eval_metrics.py over all sources at once:
checkpoints, run folders, the table's rows and columns, and the new metrics against direct calls."""
import csv
import json
import os

import numpy as np
import pytest
import torch

import eval_iou
import eval_metrics as em
import gradcam_extract
import peers
import train_peer
from data.image_data import ImageDataset, normalize
from metrics import interp_metrics as im, scoring
from metrics.iou import map_iou
from peers import common
from run import config
from run.checkpoint import load_checkpoint
from tests.conftest import save_random_base_model, tiny_overrides
from tests.test_visualize import build_run

S = 64
PEER_SETS = {'scouter_epochs': 1, 'scouter_batch_size': 6, 'scouter_slots_per_class': {'+': 1, '-': 2},
             'scouter_to_k_layers': 1, 'gc_epochs': 1, 'gc_batch_size': 6, 'lfi_epochs': 1, 'lfi_batch_size': 6,
             'lfi_fin_convs': 1, 'save_threshold': -1.0}


def peer_args(toy, **extra):
    return ['-dataset', 'toy', '-set', *tiny_overrides(toy, **dict(PEER_SETS, **extra))]


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tiny_toy):
    """A random base model and its Grad-CAM, an LVW run (test_visualize.build_run) and one epoch of
    every peer, all under one working folder."""
    root = tmp_path_factory.mktemp('peers')
    cwd = os.getcwd()
    os.chdir(root)
    try:
        run = build_run(root, tiny_toy)
        test = ImageDataset(os.path.join(tiny_toy, 'test'), S)
        base_path = str(root / 'base.pth')
        base = save_random_base_model(base_path, run.s, test.classes, seed=5)
        atts = str(root / 'grad_test.npy')
        gradcam_extract.extract_split(base, os.path.join(tiny_toy, 'test'), S, atts, torch.device('cpu'))
        summaries = {m: train_peer.main(['-method', m, '-weights', base_path, *peer_args(tiny_toy)])
                     for m in peers.METHODS}
    finally:
        os.chdir(cwd)
    return {'root': root, 'toy': tiny_toy, 'base': base_path, 'atts': atts, 'test': test, 'summaries': summaries,
            'lvw': os.path.join(run.run, '1_0push0.6000.pth'), 'protopnet': os.path.join(run.run, '1nopush0.5000.pth')}


def checkpoint_of(trained, method):
    summary = trained['summaries'][method]
    return os.path.join(str(trained['root']), summary['run_dir'], summary['final_checkpoint'])


def test_each_peer_run_folder_and_checkpoint(trained):
    test = trained['test']
    images = normalize(torch.stack([test[i][0] for i in range(4)]))
    for method, summary in trained['summaries'].items():
        folder = os.path.join(str(trained['root']), summary['run_dir'])
        assert summary['run_dir'].endswith(os.path.join('resnet18', 'toy_' + peers.RUN_NAMES[method]))
        assert summary['final_checkpoint'] == '0epoch%.4f.pth' % summary['final_accuracy']
        with open(os.path.join(folder, 'metrics.csv')) as f:
            rows = list(csv.DictReader(f))
        assert [(r['epoch'], r['split']) for r in rows] == [('0', 'train'), ('0', 'test')]
        assert float(rows[1]['accuracy']) == pytest.approx(summary['final_accuracy'])
        assert float(rows[0]['total']) > 0 and float(rows[0]['cross_entropy']) > 0
        saved = json.load(open(os.path.join(folder, 'settings.json')))
        assert saved['method'] == method and saved['settings']['img_size'] == S
        raw = torch.load(checkpoint_of(trained, method), map_location='cpu', weights_only=True)
        assert raw['method'] == method and raw['class_names'] == test.classes and 'arch' not in raw
        model, s, m = peers.peer_from_checkpoint(raw)
        assert m == method and s['img_size'] == S and not model.training
        maps = peers.method_module(method).explain(model, images)
        assert maps.shape == (4, S, S) and float(maps.min()) >= 0 and float(maps.max()) <= 1
        # the trunk started from the base model: layer1 is frozen for SCOUTER (freeze 2) and equal to it
        if method.startswith('scouter'):
            base = torch.load(trained['base'], weights_only=True)['state_dict']
            assert torch.equal(raw['state_dict']['trunk.layer1.0.conv1.weight'], base['layer1.0.conv1.weight'])


def test_eval_metrics_scores_every_source_in_one_table(trained, tmp_path):
    names = ['base', 'lvw', 'protopnet', *peers.METHODS]
    paths = {'base': trained['base'], 'lvw': trained['lvw'], 'protopnet': trained['protopnet'],
             **{m: checkpoint_of(trained, m) for m in peers.METHODS}}
    out = str(tmp_path / 'm')
    args = ['-test_atts', trained['atts'], '-out', out, '-auc_images', '2', '-step', '1024', '-batch_size', '4',
            '-purity_n', '3', '-device', 'cpu', *peer_args(trained['toy'])]
    for name in names:
        args += ['-source', '%s=%s' % (name, paths[name])]
    res = em.main(args)
    assert list(res['sources']) == names
    md = open(os.path.join(out, 'metrics.md')).read()
    assert '| metric | %s | better |' % ' | '.join(names) in md
    for label in ('test accuracy of the model', 'IoU with the base Grad-CAM, thr 50', 'pointing game (object)',
                  'stochastic pointing game', 'content heatmap', 'insertion AUC', 'deletion AUC', 'area size',
                  'precision (SCOUTER)'):
        line = next(row for row in md.splitlines() if row.startswith('| ' + label))
        assert line.count('n/a') == 0, line  # a value for every source
    assert len(res['stability_iou']) == len(names) * (len(names) - 1) // 2

    test = trained['test']
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = torch.tensor([label for _, label in test.samples])
    obj = scoring.load_masks([p for p, _ in test.samples], S)['object']
    reference = torch.from_numpy(np.load(trained['atts']))
    assert res['sources']['base']['metrics']['iou_gradcam']['value'] == pytest.approx(1.0)
    # LVW: the same IoU as eval_iou.py on the same checkpoint and maps
    lvw_dir, lvw_name = os.path.split(trained['lvw'])
    direct = eval_iou.main(['-modeldir', lvw_dir, '-model', lvw_name, '-test_atts', trained['atts'], '-thr', '50',
                            ])
    assert res['sources']['lvw']['metrics']['iou_gradcam']['value'] == pytest.approx(direct['iou'], abs=1e-9)
    # every peer: accuracy, IoU, area size, precision and content heatmap from its own explain()
    for method in peers.METHODS:
        model, _, _ = peers.peer_from_checkpoint(load_checkpoint(checkpoint_of(trained, method)))
        # in eval_metrics.py's batches of 4: a map that differs by rounding can flip a pixel at the median
        explain = peers.method_module(method).explain
        maps = torch.cat([explain(model, normalize(chunk)) for chunk in images.split(4)])
        with torch.no_grad():
            accuracy = float((model(normalize(images)).argmax(1) == labels).double().mean())
        m = res['sources'][method]['metrics']
        assert res['sources'][method]['accuracy'] == pytest.approx(accuracy)
        assert m['iou_gradcam']['value'] == pytest.approx(float(map_iou(maps, reference, 50).mean()), abs=1e-6)
        assert m['area_size']['value'] == pytest.approx(float(maps.double().mean()), abs=1e-6)
        assert m['precision']['value'] == pytest.approx(im.image_mean(im.box_precision(maps, obj))[0], abs=1e-6)
        assert m['content_heatmap']['value'] == pytest.approx(im.image_mean(im.content_heatmap(maps, obj))[0], abs=1e-3)
        assert 0 <= m['insertion_auc']['value'] <= 1 and 0 <= m['deletion_auc']['value'] <= 1
        assert method in res['sources'][method]['map'] or peers.LABELS[method] in res['sources'][method]['map']


def test_legacy_flags_still_work_beside_sources(trained, tmp_path):
    res = em.main(['-lvw', trained['lvw'], '-base', trained['base'], '-test_atts', trained['atts'],
                   '-source', 'gc=%s' % checkpoint_of(trained, 'gc'), '-out', str(tmp_path), '-auc_images', '0',
                   *peer_args(trained['toy'])])
    assert list(res['sources']) == ['lvw', 'gradcam', 'gc']
    assert res['sources']['gradcam']['metrics']['iou_gradcam']['value'] == pytest.approx(1.0)


def test_source_and_train_peer_user_errors(trained, tmp_path, monkeypatch):
    args = peer_args(trained['toy'])
    with pytest.raises(config.UserError, match='expects NAME=CHECKPOINT'):
        em.main(['-source', trained['lvw'], *args])
    with pytest.raises(config.UserError, match='given twice'):
        em.main(['-source', 'a=%s' % trained['lvw'], '-source', 'a=%s' % trained['lvw'], *args])
    with pytest.raises(config.UserError, match='-source x: file not found'):
        em.main(['-source', 'x=%s' % (tmp_path / 'none.pth'), *args])
    monkeypatch.chdir(trained['root'])
    with pytest.raises(config.UserError, match='already holds a run'):
        train_peer.main(['-method', 'gc', *args])
    with pytest.raises(config.UserError, match='weights file not found'):
        train_peer.main(['-method', 'gc', '-weights', str(tmp_path / 'none.pth'), *args])
    with pytest.raises(SystemExit):
        train_peer.main(['-method', 'protopnet', *args])
    with pytest.raises(config.UserError, match='scouter_lr'):
        train_peer.main(['-method', 'gc', *peer_args(trained['toy'], scouter_lr='fast')])


def test_make_optimizer_follows_the_recipe_settings(tiny_settings):
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1), requires_grad=False)]
    s = dict(tiny_settings, scouter_milestones=[1, 3], scouter_gamma=0.5, scouter_lr=0.2)
    opt, sched = common.make_optimizer(params, s, 'scouter')
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]['weight_decay'] == 0.01
    assert len(opt.param_groups[0]['params']) == 1  # frozen parameters are left out
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]['lr'])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2, 0.1, 0.1, 0.05])
    opt, _ = common.make_optimizer(params, config.resolve_settings('pets'), 'lfi')
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]['momentum'] == 0.9
    assert opt.param_groups[0]['lr'] == 0.01 and opt.param_groups[0]['weight_decay'] == 1e-4
    with pytest.raises(config.UserError, match='gc_optimizer'):
        common.make_optimizer(params, dict(tiny_settings, gc_optimizer='lion'), 'gc')


def test_to_unit_maps_and_loader_batches(tiny_toy):
    maps = torch.tensor([[[0.0, 2.0], [4.0, 8.0]]])
    unit = common.to_unit_maps(maps, 4)
    assert unit.shape == (1, 4, 4) and float(unit.min()) == 0 and float(unit.max()) == pytest.approx(1, abs=1e-6)
    images = torch.rand(2, 3, 8, 8)
    composite = torch.rand(2, 3, 16, 16)
    x, y, extra = train_peer.to_device((images, torch.tensor([0, 1]), composite, torch.tensor([2, 3])), 'cpu')
    assert torch.allclose(x, normalize(images)) and torch.allclose(extra[0], normalize(composite))
    assert torch.equal(extra[1], torch.tensor([2, 3])) and torch.equal(y, torch.tensor([0, 1]))


def test_peer_settings_resolve_and_bare_run_names(tiny_toy):
    s = config.resolve_settings('toy', ['peer_run=my_scouter', "scouter_lambda={'+': 3.0, '-': 1.0}"])
    assert s['peer_run'] == 'my_scouter' and s['scouter_lambda']['+'] == 3.0
    assert train_peer.peer_run_dir(s, 'scouter+') == os.path.join('saved_models', 'resnet18', 'my_scouter')
    s = config.resolve_settings('toy')
    assert train_peer.peer_run_dir(s, 'scouter-') == os.path.join('saved_models', 'resnet18', 'toy_scouter_minus')
    # the module-level recipes are the spec's; the toy preset only shortens them
    pets = config.resolve_settings('pets')
    assert (pets['scouter_lr'], pets['scouter_weight_decay'], pets['scouter_milestones']) == (1e-4, 0.01, [70, 140])
    assert (pets['gc_lambda'], pets['lfi_conv1_stride']) == (25.0, 1)
    # LFI-CAM from a trained trunk: GC's fine-tuning schedule, not the from-scratch lr 0.1 over 300 epochs
    assert (pets['lfi_lr'], pets['lfi_epochs'], pets['lfi_milestones'], pets['lfi_weight_decay']) == (0.01, 36, [24, 30], 1e-4)
    assert s['scouter_lr'] == pets['scouter_lr'] and s['gc_lambda'] == pets['gc_lambda']
