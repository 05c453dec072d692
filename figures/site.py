"""The explorer: a static, self-contained HTML site of a word model (no server, no network, no
framework; one short inline script that counts images that failed to load). Written from a
bundle of plain arrays (figures.explorer.compute_bundle), so it builds fast for large runs:

    index.html                the run, its accuracy, the metrics table, the training curves, links
    words/word-<p>.html       a word: its source patch and the word map on its source image, the
                              classes that use it with their weights, its top-k training images
                              with its map on each, the part or background its top cells hit
    classes/class-<c>.html    a class: its words by decreasing weight
    images/test-<n>.html      a test image: the prediction and the words that decided it, with maps
    assets/                   each image used, copied once; a map is a small H x W PNG that the
                              page scales over its image (CSS), one file per (word, image) pair

A word map is the word's similarity over the latent grid (H x W), JET-coloured after min-max
scaling, drawn at 45 % opacity over the image.
"""
import html
import os
import shutil

import cv2
import numpy as np
from PIL import Image

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
a { color: #1f5fa8; text-decoration: none; } a:hover { text-decoration: underline; }
.tiles { display: flex; flex-wrap: wrap; gap: 10px; }
.tile { width: 128px; font-size: 12px; }
.stack { position: relative; width: 128px; height: 128px; background: #eee; }
.stack img { position: absolute; left: 0; top: 0; width: 128px; height: 128px; }
.stack img.map { opacity: 0.45; }
.big .stack, .big .stack img, .big.tile { width: 224px; height: 224px; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ccc; padding: 3px 6px; }
.note { color: #666; font-size: 13px; }
"""
# counts the images that did not load (0 when every file resolves); the browser test reads it
CHECK_SCRIPT = """<script>
window.addEventListener('load', function () {
  var broken = Array.prototype.filter.call(document.images, function (im) { return !im.complete || im.naturalWidth === 0; });
  document.body.setAttribute('data-images', String(document.images.length));
  document.body.setAttribute('data-broken-images', String(broken.length));
});
</script>"""


def page(title, body, depth):
    """A whole HTML page; `depth` folders below the site root (for the links to the index)."""
    up = '../' * depth
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>%s</title><style>%s</style></head>\n'
            '<body><p><a href="%sindex.html">index</a></p>\n<h1>%s</h1>\n%s\n%s\n</body></html>\n'
            % (html.escape(title), STYLE, up, html.escape(title), body, CHECK_SCRIPT))


def heat_png(cell_map, path):
    """An (H, W) similarity map as a JET-coloured H x W PNG (min-max scaled first)."""
    m = np.asarray(cell_map, dtype=np.float64)
    m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
    rgb = cv2.applyColorMap(np.uint8(np.round(255 * m)), cv2.COLORMAP_JET)[..., ::-1]
    Image.fromarray(np.ascontiguousarray(rgb)).save(path)


def stack(image_src, map_src=None, caption='', href=None, big=False):
    """A tile: the image, the map over it when given, a caption; a link around it when given."""
    imgs = '<img src="%s" alt="">' % html.escape(image_src)
    if map_src:
        imgs += '<img class="map" src="%s" alt="">' % html.escape(map_src)
    inner = '<div class="stack">%s</div>' % imgs
    if href:
        inner = '<a href="%s">%s</a>' % (html.escape(href), inner)
    return '<div class="tile%s">%s<div>%s</div></div>' % (' big' if big else '', inner, caption)


class Assets:
    """Copies each image into assets/ once, whatever the number of pages that show it."""

    def __init__(self, root):
        self.root, self.done, self.heats = root, {}, set()
        for sub in ('train', 'test', 'words', 'maps', 'report'):
            os.makedirs(os.path.join(root, 'assets', sub), exist_ok=True)

    def image(self, kind, index, source_path):
        """assets/<kind>/<index><ext>, relative to the site root."""
        key = (kind, index)
        if key not in self.done:
            rel = os.path.join('assets', kind, '%d%s' % (index, os.path.splitext(source_path)[1].lower()))
            shutil.copyfile(source_path, os.path.join(self.root, rel))
            self.done[key] = rel
        return self.done[key]

    def file(self, sub, name, source_path):
        rel = os.path.join('assets', sub, name)
        shutil.copyfile(source_path, os.path.join(self.root, rel))
        return rel

    def heat(self, name, cell_map):
        rel = os.path.join('assets', 'maps', name + '.png')
        if rel not in self.heats:
            heat_png(cell_map, os.path.join(self.root, rel))
            self.heats.add(rel)
        return rel


def word_href(p, depth=1):
    return '../' * depth + 'words/word-%d.html' % p


def class_href(c, depth=1):
    return '../' * depth + 'classes/class-%d.html' % c


def test_href(n, depth=1):
    return '../' * depth + 'images/test-%d.html' % n


def users_text(users, class_names, weight_column, depth=1):
    """The classes that use a word, each linked, with its weight."""
    if not users:
        return 'used by no class'
    return 'used by ' + ', '.join('<a href="%s">%s</a> (%+.3f)' % (class_href(c, depth), html.escape(class_names[c]),
                                                                    weight_column[c]) for c in users)


def write_site(out_dir, bundle, log=print):
    """Every page of the bundle into `out_dir`; returns the index path."""
    os.makedirs(out_dir, exist_ok=True)
    for sub in ('words', 'classes', 'images'):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    assets = Assets(out_dir)
    names, weight, users = bundle['class_names'], np.asarray(bundle['weight']), bundle['users']
    train_paths, test_paths = bundle['train_paths'], bundle['test_paths']
    up = lambda rel: '../' + rel  # noqa: E731 - pages sit one folder below the root

    for p, word in enumerate(bundle['words']):
        parts = []
        source = word.get('source')
        if source:
            patch = assets.file('words', 'patch-%d.png' % p, source['patch_png'])
            overlay = assets.file('words', 'source-%d.png' % p, source['overlay_png'])
            parts.append('<h2>Source</h2><div class="tiles">%s%s</div><p class="note">the training patch the push '
                         'projected the word onto, and its activation on the source image (class %s)</p>'
                         % (stack(up(patch), caption='patch', big=True),
                            stack(up(overlay), caption='on its source image', big=True), html.escape(source['class'])))
        else:
            parts.append('<p class="note">%s</p>' % html.escape(bundle.get('source_note') or 'no source patch'))
        parts.append('<h2>Classes</h2><p>%s</p>' % users_text(users[p], names, weight[:, p]))
        if word.get('hits'):
            parts.append('<h2>Where its top cells fall</h2><p>%s</p>' % html.escape(word['hits']))
        tiles = []
        for rank, (idx, sim, cell_map) in enumerate(word['top']):
            img = assets.image('train', idx, train_paths[idx])
            heat = assets.heat('w%d-train%d' % (p, idx), cell_map)
            label = names[bundle['train_labels'][idx]]
            tiles.append(stack(up(img), up(heat), '%d. %s, similarity %.3f' % (rank + 1, html.escape(label), sim)))
        parts.append('<h2>Top %d training images</h2><div class="tiles">%s</div>' % (len(tiles), ''.join(tiles)))
        with open(os.path.join(out_dir, 'words', 'word-%d.html' % p), 'w') as f:
            f.write(page('Word %d' % p, '\n'.join(parts), 1))

    for c, name in enumerate(names):
        order = [int(p) for p in np.argsort(-weight[c], kind='stable') if weight[c, p] > 0]
        tiles = []
        for p in order:
            word = bundle['words'][p]
            if word['top']:
                idx, _, cell_map = word['top'][0]
                img, heat = up(assets.image('train', idx, train_paths[idx])), up(assets.heat('w%d-train%d' % (p, idx), cell_map))
            else:
                img, heat = '', None
            tiles.append(stack(img, heat, 'word %d, weight %+.3f' % (p, weight[c, p]), href=word_href(p)))
        body = '<p>%d words with a positive weight, by decreasing weight</p><div class="tiles">%s</div>' % (
            len(order), ''.join(tiles))
        with open(os.path.join(out_dir, 'classes', 'class-%d.html' % c), 'w') as f:
            f.write(page('Class %s' % name, body, 1))

    for n, test in enumerate(bundle['tests']):
        img = up(assets.image('test', test['image'], test_paths[test['image']]))
        verdict = 'correct' if test['pred'] == test['label'] else 'wrong'
        head = ('<div class="tiles">%s</div><p>prediction <a href="%s">%s</a> (probability %.3f, %s; true class %s)</p>'
                % (stack(img, caption='', big=True), class_href(test['pred']), html.escape(names[test['pred']]),
                   test['probability'], verdict, html.escape(names[test['label']])))
        tiles = []
        for p, sim, w, contribution, cell_map in test['words']:
            heat = up(assets.heat('test%d-w%d' % (test['image'], p), cell_map))
            tiles.append(stack(img, heat, 'word %d: similarity %.3f x weight %+.3f = %+.3f' % (p, sim, w, contribution),
                               href=word_href(p)))
        body = head + '<h2>The words that decided it</h2><div class="tiles">%s</div>' % ''.join(tiles)
        with open(os.path.join(out_dir, 'images', 'test-%d.html' % n), 'w') as f:
            f.write(page('Test image %d' % test['image'], body, 1))

    parts = ['<p>%s</p>' % html.escape(bundle['description'])]
    if bundle.get('metrics_md'):
        parts.append('<h2>Metrics</h2>' + markdown_table_html(bundle['metrics_md']))
    parts.append('<h2>Classes</h2><p>%s</p>' % ', '.join('<a href="%s">%s</a>' % (class_href(c, 0), html.escape(nm))
                                                         for c, nm in enumerate(names)))
    parts.append('<h2>Words</h2><p>%s</p>' % ' '.join('<a href="%s">%d</a>' % (word_href(p, 0), p)
                                                      for p in range(len(bundle['words']))))
    parts.append('<h2>Test images</h2><p>%s</p>' % ' '.join(
        '<a href="%s">%d%s</a>' % (test_href(n, 0), t['image'], '' if t['pred'] == t['label'] else '&#10007;')
        for n, t in enumerate(bundle['tests'])))
    if bundle.get('curves_png') and os.path.isfile(bundle['curves_png']):
        parts.append('<h2>Training</h2><img src="%s" alt="training curves" style="max-width:900px; width:100%%">'
                     % html.escape(assets.file('report', 'curves.png', bundle['curves_png'])))
    index = os.path.join(out_dir, 'index.html')
    with open(index, 'w') as f:
        f.write(page(bundle['title'], '\n'.join(parts), 0))
    log('explorer: %s (%d word, %d class and %d test-image pages, %d images copied once each)'
        % (index, len(bundle['words']), len(names), len(bundle['tests']), len(assets.done)))
    return index


def markdown_table_html(md):
    """The first markdown table of `md` as an HTML table (cells escaped)."""
    rows = [line.strip().strip('|').split('|') for line in md.splitlines() if line.strip().startswith('|')]
    rows = [r for r in rows if not all(set(c.strip()) <= set('-: ') for c in r)]
    if not rows:
        return ''
    head, *body = rows
    cell = lambda tag, c: '<%s>%s</%s>' % (tag, html.escape(c.strip()), tag)  # noqa: E731
    return '<table><tr>%s</tr>%s</table>' % (''.join(cell('th', c) for c in head),
                                             ''.join('<tr>%s</tr>' % ''.join(cell('td', c) for c in r) for r in body))
