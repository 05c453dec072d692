"""visualize.py: gallery pages and per-class grids, weight heatmap, training curves, report.md,
and the two hooks in main.py. Uses a tiny run folder built here (64 px toy data, 15 words)."""
import math
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import push
import visualize as vis
from data.image_data import ImageDataset, MapChecksum, checksum_line, make_loader
from figures import curves, gallery, run_report
from metrics import word_metrics
from model import build_model
from receptive_field import layer_specs, word_layer_rf_info
from run import config
from run.checkpoint import save_checkpoint
from tests.conftest import tiny_overrides

NOOP = lambda *_, **__: None  # noqa: E731
CSV_FIELDS = ('epoch', 'phase', 'split', 'iteration', 'time', 'cross_entropy', 'cluster', 'separation',
              'attention', 'accuracy', 'l1', 'p_dist_pair', 'lr_features')


def build_run(root, toy):
    """A run folder as main.py leaves it after a push at epoch 1: checkpoints 1nopush (before the
    push), 1push and 1_0push (after), img/epoch-1/, settings.json, metrics.csv, run_summary.json.
    Word 0 is used by classes 0 and 1, word 14 by none."""
    s = config.resolve_settings('toy', tiny_overrides(toy, experiment_run='vis'))
    torch.manual_seed(0)
    net = build_model(s, log=NOOP).eval()
    with torch.no_grad():
        net.last_layer.weight[1, 0] = 0.9
        net.last_layer.weight[:, 14] = -0.5
    run = os.path.join(str(root), 'run')
    os.makedirs(run)
    classes = ImageDataset(s['train_dir'], s['img_size']).classes
    save_checkpoint(net, os.path.join(run, '1nopush0.5000.pth'), s, classes, epoch=1, kind='nopush',
                    iteration=None, accuracy=0.5)
    loader = make_loader(ImageDataset(s['train_push_dir'], s['img_size']), 7, False, 0, torch.device('cpu'))
    rf_info = word_layer_rf_info(s['img_size'], layer_specs(net.features))
    found = push.push_prototypes(net, loader, torch.device('cpu'), False, epoch=1,
                                 folder=os.path.join(run, 'img', 'epoch-1'), rf_info=rf_info,
                                 img_size=s['img_size'], log=NOOP)
    for name, kind, it in (('1push0.6000.pth', 'push', None), ('1_0push0.6000.pth', 'last', 0)):
        save_checkpoint(net, os.path.join(run, name), s, classes, epoch=1, kind=kind, iteration=it, accuracy=0.6)
    config.save_json({'settings': s}, os.path.join(run, 'settings.json'))
    rows = [(0, 'warm', 'train', None), (0, 'warm', 'test', None), (1, 'joint', 'train', None),
            (1, 'joint', 'test', None), (1, 'push', 'test', None), (1, 'last', 'train', 0), (1, 'last', 'test', 0)]
    with open(os.path.join(run, 'metrics.csv'), 'w') as f:
        f.write(','.join(CSV_FIELDS) + '\n')
        for k, (e, phase, split, it) in enumerate(rows):
            values = {'epoch': e, 'phase': phase, 'split': split, 'iteration': it, 'time': 1.0,
                      'cross_entropy': 1.0 / (k + 1), 'cluster': 0.5, 'separation': None, 'attention': 0.1,
                      'accuracy': 0.1 * k, 'l1': 22.5, 'p_dist_pair': 2.0, 'lr_features': 1e-4}
            f.write(','.join('' if values[c] is None else str(values[c]) for c in CSV_FIELDS) + '\n')
    config.save_json({'final_checkpoint': '1_0push0.6000.pth', 'final_accuracy': 0.6,
                      'best_checkpoint': '1_0push0.6000.pth', 'best_accuracy': 0.6, 'train_seconds': 1.0},
                     os.path.join(run, 'run_summary.json'))
    return SimpleNamespace(run=run, s=s, net=net, classes=classes, found=found,
                           img_dir=os.path.join(run, 'img', 'epoch-1'), weight=net.last_layer.weight.detach().clone())


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory, tiny_toy):
    return build_run(tmp_path_factory.mktemp('vis'), tiny_toy)


def cell_size(thumb=96, font_size=11):
    return 2 * thumb + 18, thumb + 12 + 3 * (font_size + 3) + 2


def test_word_users_follow_classes_per_word():
    torch.manual_seed(1)
    w = torch.randn(7, 40)
    w[:, 3] = -1.0  # nobody
    users = gallery.word_users(w)
    counts, _ = word_metrics.classes_per_word(w)
    assert [len(u) for u in users] == counts.tolist()
    assert users[3] == []
    for p, u in enumerate(users):
        weights = [float(w[c, p]) for c in u]
        assert weights == sorted(weights, reverse=True)


def test_short_class_names_are_short_and_unique():
    names = ['c0_round-ellipse-stick-star', 'n02085620-Chihuahua', 'abc']
    short = gallery.short_class_names(names, 10)
    assert short[1] == 'Chihuahua' and short[2] == 'abc' and len(short[0]) == 10
    clash = gallery.short_class_names(['american_bulldog_a', 'american_bulldog_b'], 10)
    assert len(set(clash)) == 2 and clash[0].startswith('0:')


def test_parse_checkpoint_name():
    assert run_report.parse_checkpoint_name('6_2push0.9296.pth') == {'epoch': 6, 'kind': 'last', 'iteration': 2,
                                                             'accuracy': 0.9296}
    assert run_report.parse_checkpoint_name('/x/10push0.5000.pth')['kind'] == 'push'
    assert run_report.parse_checkpoint_name('3nopush0.1000.pth')['kind'] == 'nopush'
    assert run_report.parse_checkpoint_name('model.pth') is None


def test_gallery_pages_draw_every_word(tiny_run, tmp_path):
    pages = gallery.draw_gallery(tiny_run.img_dir, tiny_run.weight, tiny_run.classes, out_dir=str(tmp_path),
                             words_per_page=4)
    assert [os.path.basename(p) for p, _ in pages] == ['gallery-%d.png' % k for k in range(1, 5)]
    assert [p for _, words in pages for p in words] == list(range(15))
    cw, ch = cell_size()
    for path, words in pages:
        with Image.open(path) as img:
            cols = min(5, len(words))
            rows = math.ceil(len(words) / cols)
            assert img.width == cols * cw + (cols + 1) * 6
            assert img.height > rows * (ch + 6)
            assert img.height < rows * (ch + 6) + 120  # the header
    # one page for the default 50 words; a second call replaces the old pages
    pages = gallery.draw_gallery(tiny_run.img_dir, tiny_run.weight, tiny_run.classes, out_dir=str(tmp_path))
    assert len(pages) == 1 and pages[0][1] == list(range(15))
    assert sorted(os.listdir(tmp_path)) == ['gallery-1.png']


def test_gallery_scales_to_many_words_in_pages(tmp_path):
    folder = tmp_path / 'img' / 'epoch-2'
    folder.mkdir(parents=True)
    # no pictures at all: every word is still drawn (as a placeholder), 50 a page
    weight = torch.randn(40, 160)
    pages = gallery.draw_gallery(str(folder), weight, ['class %d' % c for c in range(40)], thumb=24)
    assert len(pages) == 4 and [p for _, w in pages for p in w] == list(range(160))
    assert [len(w) for _, w in pages] == [50, 50, 50, 10]


def test_gallery_per_class_grid(tiny_run, tmp_path):
    pages = gallery.draw_gallery(tiny_run.img_dir, tiny_run.weight, tiny_run.classes, out_dir=str(tmp_path),
                             by_class=True)
    names = [os.path.basename(p) for p, _ in pages]
    assert names == ['gallery-class0.png', 'gallery-class1.png', 'gallery-class2.png', 'gallery-unused.png']
    words = dict((os.path.basename(p), w) for p, w in pages)
    users = gallery.word_users(tiny_run.weight)
    for c in range(3):
        page = words['gallery-class%d.png' % c]
        assert sorted(page) == [p for p in range(15) if c in users[p]]
        assert [float(tiny_run.weight[c, p]) for p in page] == sorted((float(tiny_run.weight[c, p]) for p in page),
                                                                      reverse=True)
    assert 0 in words['gallery-class0.png'] and 0 in words['gallery-class1.png']
    assert words['gallery-unused.png'] == [14]
    assert set(p for _, w in pages for p in w) == set(range(15))


def test_weight_heatmap_and_classes_per_word(tiny_run, tmp_path):
    out = gallery.draw_weight_heatmap(tiny_run.weight, tiny_run.classes, str(tmp_path / 'w.png'), title='t')
    counts, mean = word_metrics.classes_per_word(tiny_run.weight)
    assert out['classes_per_word'] == counts.tolist() and out['mean_classes_per_word'] == pytest.approx(mean)
    assert counts[0] == 2 and counts[14] == 0
    with Image.open(out['path']) as img:
        assert img.width >= 600 and img.height >= 300


def test_training_curves(tiny_run, tmp_path):
    out = curves.plot_training_curves(os.path.join(tiny_run.run, 'metrics.csv'), str(tmp_path / 'c.png'))
    assert out['panels'] == ['accuracy', 'cross_entropy', 'cluster', 'attention', 'l1', 'p_dist_pair', 'lr_features']
    with Image.open(out['path']) as img:
        assert img.width == 1200 and img.height == int(round(100 * (2.6 * 4 + 0.6)))
    rows = curves.read_metrics_csv(os.path.join(tiny_run.run, 'metrics.csv'))
    xs = curves.pass_positions(rows)
    assert xs == [0, 0, 1, 1, 1.3, 1.6, 1.6]


def test_run_report_links_existing_files(tiny_run):
    path = run_report.write_run_report(tiny_run.run, log=NOOP)
    assert path == os.path.join(tiny_run.run, 'report.md')
    text = open(path).read()
    links = re.findall(r'\]\(([^)]+)\)', text)
    for link in links:
        assert os.path.exists(os.path.join(tiny_run.run, link)), link
    for needed in ('report/curves.png', 'report/weights.png', 'img/epoch-1/gallery-1.png'):
        assert needed in links
    assert '60.00%' in text and 'LVW' in text and '1_0push0.6000.pth' in text
    assert 'mean %.2f' % word_metrics.classes_per_word(tiny_run.weight)[1] in text



def test_word_source_folder(tiny_run):
    folder, note = gallery.word_source_folder(tiny_run.run, 1, 'last')
    assert folder == tiny_run.img_dir and 'epoch 1' in note
    assert gallery.word_source_folder(tiny_run.run, 1, 'push')[0] == tiny_run.img_dir
    folder, note = gallery.word_source_folder(tiny_run.run, 1, 'nopush')
    assert folder is None and 'not training patches' in note
    folder, note = gallery.word_source_folder(tiny_run.run, 7, 'push')
    assert folder is None and 'no push pictures' in note


def test_push_hook_is_safe(tiny_run, tmp_path):
    assert gallery.write_push_pictures(None, tiny_run.weight, tiny_run.classes, 1) == []
    messages = []
    # 15 words in the folder, a last layer of 20: the hook logs and does not raise
    assert gallery.write_push_pictures(tiny_run.img_dir, torch.zeros(3, 20), tiny_run.classes, 1,
                                   log=messages.append) == []
    assert messages and messages[0].startswith('warning: could not draw the push pictures')
    assert run_report.write_run_report(str(tmp_path / 'missing'), log=messages.append) is None


def test_cli_redraws_by_class(tiny_run):
    path = vis.main([tiny_run.run, '-by_class', '-redraw'])
    assert os.path.isfile(path)
    assert os.path.isfile(os.path.join(tiny_run.img_dir, 'gallery-class0.png'))
    with pytest.raises(config.UserError, match='run folder not found'):
        vis.main([tiny_run.run + '_nope'])


def test_main_writes_gallery_and_report(tmp_path, tiny_toy, monkeypatch):
    """The two hooks in main.py: a gallery and weights.png after the push, report.md at the end."""
    import main as lvw_main
    monkeypatch.chdir(tmp_path)
    sets = tiny_overrides(tiny_toy, experiment_run='hooks', num_train_epochs=2, push_epochs=[1])
    atts = {}
    for split in ('train', 'test'):
        ds = ImageDataset(os.path.join(tiny_toy, split), 64)
        atts[split] = str(tmp_path / ('grad_%s.npy' % split))
        maps = np.random.default_rng(0).random((len(ds), 64, 64), dtype=np.float32)
        np.save(atts[split], maps)
        checksum = MapChecksum()
        checksum.update(maps)
        with open(atts[split][:-4] + '.txt', 'w') as f:  # as gradcam_extract.py writes it: no warning
            f.write(checksum_line(checksum, maps.shape, maps.dtype) + '\n' + ''.join(p + '\n' for p in ds.paths))
    lvw_main.main(['-dataset', 'toy', '-set', *sets, '-train_atts', atts['train'], '-test_atts', atts['test']])
    run = os.path.join('saved_models', 'resnet18', 'hooks')
    assert os.path.isfile(os.path.join(run, 'img', 'epoch-1', 'gallery-1.png'))
    assert os.path.isfile(os.path.join(run, 'img', 'epoch-1', 'weights.png'))
    assert os.path.isfile(os.path.join(run, 'report', 'curves.png'))
    text = open(os.path.join(run, 'report.md')).read()
    assert 'img/epoch-1/gallery-1.png' in text
    log = open(os.path.join(run, 'train.log')).read()
    assert 'pictures: 1 gallery page(s)' in log and 'warning' not in log
