"""The explorer (explore.py, figures/site.py, figures/explorer.py): what main.py writes at the end
of a run, what its pages hold, that every image and link resolves, that each image is copied once;
and, in a real browser (headless Chromium; skipped with a message where none is installed), that
the index and a word page load with every image and show the word's classes."""
import glob
import html
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import explore
import main as lvw_main
from figures import explorer, site
from run import config
from tests.conftest import tiny_overrides

BROWSERS = ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable')


@pytest.fixture(scope='module')
def run(tiny_workspace):
    """A tiny LVW run of the shared workspace (its own name); main.py writes the site at its end."""
    cwd = os.getcwd()
    os.chdir(tiny_workspace)
    try:
        summary = lvw_main.main(['-dataset', 'toy', '-set', *tiny_overrides('./data/toy', experiment_run='explorer')])
    finally:
        os.chdir(cwd)
    folder = os.path.join(str(tiny_workspace), 'saved_models', 'resnet18', 'explorer')
    return {'folder': folder, 'checkpoint': summary['final_checkpoint'], 'site': os.path.join(folder, 'explorer')}


def pages_of(site_dir):
    return sorted(glob.glob(os.path.join(site_dir, '*.html')) + glob.glob(os.path.join(site_dir, '*', '*.html')))


def references(page_path):
    """Every src and href of a page, as paths on disk."""
    text = open(page_path).read()
    return [os.path.normpath(os.path.join(os.path.dirname(page_path), html.unescape(ref)))
            for ref in re.findall(r'(?:src|href)="([^"]+)"', text)]


def test_main_writes_the_site_with_a_page_for_everything(run):
    assert os.path.isfile(os.path.join(run['site'], 'index.html'))
    names = {os.path.relpath(p, run['site']) for p in pages_of(run['site'])}
    # tiny_overrides: 15 words, 3 classes, 3 test images a class
    assert names == ({'index.html'} | {'words/word-%d.html' % p for p in range(15)}
                     | {'classes/class-%d.html' % c for c in range(3)} | {'images/test-%d.html' % n for n in range(9)})


def test_every_image_and_link_resolves(run):
    for page in pages_of(run['site']):
        missing = [ref for ref in references(page) if not os.path.isfile(ref)]
        assert missing == [], page


def test_each_image_is_copied_once_and_maps_are_cell_grids(run):
    copied = glob.glob(os.path.join(run['site'], 'assets', 'train', '*')) + glob.glob(
        os.path.join(run['site'], 'assets', 'test', '*'))
    shown = {ref for page in pages_of(run['site']) for ref in references(page) if '/assets/t' in ref}
    assert sorted(copied) == sorted(shown)  # one file per image shown, whatever the pages showing it
    assert len(glob.glob(os.path.join(run['site'], 'assets', 'test', '*'))) == 9
    maps = glob.glob(os.path.join(run['site'], 'assets', 'maps', '*.png'))
    assert maps and all(Image.open(m).size == (2, 2) for m in maps[:20])  # the 2 x 2 word grid at 64 px


def test_a_word_page_shows_its_classes_and_top_images(run):
    bundle_weight = torch.load(os.path.join(run['folder'], run['checkpoint']),
                               weights_only=True)['state_dict']['last_layer.weight']
    p = 4
    text = open(os.path.join(run['site'], 'words', 'word-%d.html' % p)).read()
    users = [c for c in range(3) if bundle_weight[c, p] > 0 and bundle_weight[c, p] >= 0.5 * bundle_weight[:, p].max()]
    for c in users:
        assert 'class-%d.html' % c in text and '(%+.3f)' % bundle_weight[c, p] in text
    assert text.count('similarity ') == 5  # the top 5 training images
    assert 'of its top 5 cells on the object' in text  # the toy images have masks


def test_top_images_per_word_by_brute_force():
    """The running top-k over batches equals the top-k of all the scores at once (ties: earlier image)."""
    class Fixed(torch.nn.Module):
        def __init__(self, maps):
            super().__init__()
            self.maps = maps

        def forward(self, x):
            return type('Out', (), {'similarity_maps': self.maps[x[:, 0, 0, 0].long()]})()

    torch.manual_seed(0)
    maps = torch.randn(11, 4, 2, 3)
    maps[7, 1] = maps[2, 1]  # a tie: image 2 comes first
    images = torch.zeros(11, 3, 1, 1)
    images[:, 0, 0, 0] = torch.arange(11).float()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(11)), batch_size=4)
    original = explorer.normalize
    explorer.normalize = lambda x: x
    try:
        scores, indices, top_maps = explorer.top_images_per_word(Fixed(maps), loader, 3, 'cpu')
    finally:
        explorer.normalize = original
    flat = maps.flatten(2).amax(dim=2).t()  # (P, N)
    want = torch.sort(flat, dim=1, descending=True, stable=True)
    assert torch.equal(indices, want.indices[:, :3]) and torch.equal(scores, want.values[:, :3])
    assert torch.equal(top_maps[1, 0], maps[indices[1, 0], 1])


def test_a_large_site_copies_each_image_once(tmp_path):
    """A synthetic bundle with images shared by many words and test pages."""
    img = tmp_path / 'img.png'
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    P, N, C = 40, 30, 4
    rng = np.random.default_rng(0)
    bundle = {'title': 't', 'description': 'd', 'class_names': ['c%d' % c for c in range(C)],
              'weight': rng.normal(size=(C, P)), 'users': [[p % C] for p in range(P)],
              'words': [{'source': None, 'top': [(int(i), 0.5, rng.random((2, 2))) for i in rng.integers(0, 6, 5)]}
                        for p in range(P)],
              'tests': [{'image': n, 'label': n % C, 'pred': 0, 'probability': 0.9,
                         'words': [(p, 0.5, 0.1, 0.05, rng.random((2, 2))) for p in range(3)]} for n in range(N)],
              'train_paths': [str(img)] * 6, 'train_labels': [0] * 6, 'test_paths': [str(img)] * N}
    site.write_site(str(tmp_path / 'site'), bundle, log=lambda *_: None)
    used_train = {i for w in bundle['words'] for i, _, _ in w['top']}
    assert len(os.listdir(tmp_path / 'site' / 'assets' / 'train')) == len(used_train)
    assert len(os.listdir(tmp_path / 'site' / 'assets' / 'test')) == N


def test_explore_cli_and_its_errors(run, tmp_path, tiny_workspace, monkeypatch):
    monkeypatch.chdir(tiny_workspace)  # the run's settings name ./data/toy
    out = tmp_path / 'site'
    index = explore.main(['-modeldir', run['folder'], '-model', run['checkpoint'], '-out', str(out), '-topk', '2',
                          '-max_test', '4'])
    assert index == str(out / 'index.html')
    assert len(glob.glob(str(out / 'images' / '*.html'))) == 4
    assert open(out / 'words' / 'word-0.html').read().count('similarity ') == 2
    with pytest.raises(config.UserError, match='checkpoint not found'):
        explore.main(['-modeldir', run['folder'], '-model', 'nope.pth'])
    with pytest.raises(config.UserError, match='-topk must be at least 1'):
        explore.main(['-modeldir', run['folder'], '-model', run['checkpoint'], '-topk', '0'])


def browser():
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def headless(binary, *args):
    return subprocess.run([binary, '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars',
                           '--virtual-time-budget=5000', *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(browser() is None, reason='no Chromium installed (.ci/run installs it: apt-get install chromium)')
def test_in_a_real_browser(run, tmp_path):
    binary = browser()
    weight = torch.load(os.path.join(run['folder'], run['checkpoint']), weights_only=True)['state_dict']['last_layer.weight']
    p = int(weight.amax(dim=0).argmax())  # a word some class uses
    for name in ('index.html', 'words/word-%d.html' % p):
        url = 'file://' + os.path.join(run['site'], name)
        shot = tmp_path / (os.path.basename(name) + '.png')
        headless(binary, '--window-size=1100,900', '--screenshot=%s' % shot, url)
        with Image.open(shot) as im:
            pixels = np.asarray(im.convert('L'))
        assert im.size == (1100, 900) and pixels.std() > 5  # something was drawn
        dom = headless(binary, '--dump-dom', url).stdout
        images = int(re.search(r'data-images="(\d+)"', dom).group(1))
        assert images > 0 and 'data-broken-images="0"' in dom, name
    used_by = [c for c in range(weight.shape[0]) if weight[c, p] > 0 and weight[c, p] >= 0.5 * weight[:, p].max()]
    classes = os.listdir(os.path.join(os.path.dirname(run['folder']), '..', '..', 'data', 'toy', 'train'))
    assert used_by and all(sorted(classes)[c] in dom for c in used_by)
