"""Pictures of a trained LVW / ProtoPNet run and its one-page report.

    python visualize.py saved_models/resnet18/toy_lvw [-checkpoint 6_2push0.9296.pth] [-by_class]

Writes, for the run's final checkpoint (or -checkpoint):
    img/epoch-E/gallery-<page>.png   every visual word of the push of epoch E: its nearest training
                                     patch (the 95th-percentile crop) beside its activation on the
                                     source image (box = the crop), the word index, the class of the
                                     source image and the classes that use the word (50 words a page;
                                     -by_class: gallery-class<k>.png, one page per class, and
                                     gallery-unused.png)
    report/weights.png               the class x word last-layer matrix and the classes per word
    report/curves.png                accuracy and every loss term per pass, from metrics.csv
    report.md                        the key numbers, linking all of the above (and metrics/,
                                     local_analysis/ when they exist)

A word is *used* by class c when W[c, p] > 0 and W[c, p] >= 0.5 max_c' W[c', p]
(word_metrics.classes_per_word). Nothing happens at import time; matplotlib is imported inside
the functions that need it, with its object-oriented API (no pyplot, no global backend change).
"""
import argparse
import csv
import glob
import math
import os
import re
from functools import lru_cache

import numpy as np

import config

WORDS_PER_PAGE = 50
USE_REL = 0.5   # the relative threshold of word_metrics.classes_per_word
PHASE_COLOURS = {'warm': '#8c8c8c', 'joint': '#1f77b4', 'push': '#d62728', 'last': '#2ca02c'}
CHECKPOINT_RE = re.compile(r'^(\d+)(?:_(\d+))?(nopush|push)(\d+(?:\.\d+)?)\.pth$')


# ---- small helpers -------------------------------------------------------------------------------

def short_class_names(names, maxlen=14):
    """Names for pictures: a leading WordNet id ('n02085620-') dropped, then cut to `maxlen`
    characters with an ellipsis; when cutting makes two names equal, they get their index in front."""
    out = []
    for name in names:
        text = re.sub(r'^n\d{8}[-_]', '', str(name))
        if len(text) > maxlen:
            text = text[:maxlen - 1] + '\u2026'
        out.append(text)
    if len(set(out)) < len(out):
        out = ['%d:%s' % (i, t) for i, t in enumerate(out)]
    return out


def word_users(weight, rel=USE_REL):
    """For each word, the classes that use it (the rule of word_metrics.classes_per_word),
    ordered by decreasing weight. weight: (C, P) array or tensor -> list of P lists of class indices."""
    w = _as_numpy(weight).astype(np.float64)
    wmax = w.max(axis=0, keepdims=True)
    use = (w > 0) & (w >= rel * wmax)
    users = []
    for p in range(w.shape[1]):
        classes = np.nonzero(use[:, p])[0]
        users.append([int(c) for c in classes[np.argsort(-w[classes, p], kind='stable')]])
    return users


def _as_numpy(x):
    if hasattr(x, 'detach'):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def parse_checkpoint_name(name):
    """'<E>nopush<acc>.pth' | '<E>push<acc>.pth' | '<E>_<i>push<acc>.pth' ->
    dict(epoch, kind ('nopush' | 'push' | 'last'), iteration, accuracy), or None for other names."""
    m = CHECKPOINT_RE.match(os.path.basename(name))
    if not m:
        return None
    epoch, iteration, word, acc = m.groups()
    kind = 'nopush' if word == 'nopush' else ('last' if iteration is not None else 'push')
    return {'epoch': int(epoch), 'kind': kind, 'iteration': None if iteration is None else int(iteration),
            'accuracy': float(acc)}


def checkpoint_info(ckpt, path):
    """epoch and kind of a loaded checkpoint: its own entries, else its file name."""
    parsed = parse_checkpoint_name(path) or {}
    epoch = ckpt.get('epoch', parsed.get('epoch'))
    kind = ckpt.get('kind', parsed.get('kind'))
    return (None if epoch is None else int(epoch)), kind


def push_folder(run_dir, epoch):
    return os.path.join(run_dir, 'img', 'epoch-%d' % epoch)


def word_source_folder(run_dir, epoch, kind):
    """Where the words of a checkpoint come from: (folder or None, note).

    Only checkpoints written at or after a push ('push', 'last') have words that are training
    patches, and their pictures are in img/epoch-<epoch>/. A 'nopush' checkpoint's words have moved
    since the last push (or never were pushed)."""
    if kind == 'nopush':
        return None, ('checkpoint taken before the push of epoch %s: its words are not training patches yet, '
                      'so no source patch is shown' % epoch)
    if kind not in ('push', 'last') or epoch is None:
        return None, 'unknown checkpoint kind %r: no source patches shown' % (kind,)
    folder = push_folder(run_dir, epoch)
    if not os.path.isfile(os.path.join(folder, 'bb%d.npy' % epoch)):
        return None, ('no push pictures in %s (push_save_images was off, or the folder was removed): '
                      'no source patches shown' % folder)
    return folder, 'words are the training patches pushed at epoch %d (%s)' % (epoch, folder)


def read_push_folder(img_dir, epoch=None):
    """The push artefacts of one epoch: {'epoch', 'bb' ((P, 6) int or None), 'num_words'}.
    The epoch is read from the folder name (epoch-E) when not given."""
    if epoch is None:
        m = re.search(r'epoch-(\d+)$', os.path.normpath(img_dir))
        epoch = int(m.group(1)) if m else None
    bb = None
    if epoch is not None and os.path.isfile(os.path.join(img_dir, 'bb%d.npy' % epoch)):
        from image_data import load_npy
        bb = load_npy(os.path.join(img_dir, 'bb%d.npy' % epoch), 'push boxes', ndim=2, columns=6)
    num_words = bb.shape[0] if bb is not None else len(glob.glob(os.path.join(img_dir, 'prototype-img[0-9]*.png')))
    return {'epoch': epoch, 'bb': bb, 'num_words': num_words}


@lru_cache(maxsize=8)
def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the small bitmap font
        return ImageFont.load_default()


def _fit(text, font, width):
    """`text` cut with an ellipsis to fit `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + '\u2026') > width:
        text = text[:-1]
    return text + '\u2026'


def _wrap_names(prefix, names, font, width, max_lines=2):
    """'prefix name, name, ...' over at most `max_lines` lines of `width` px; the names that do
    not fit are counted as ' +k' at the end."""
    lines, current, shown = [], prefix, 0
    for name in names:
        first = current in (prefix, '')
        candidate = current + (name if first else ', ' + name)
        if first or font.getlength(candidate) <= width:
            current, shown = candidate, shown + 1
            continue
        if len(lines) + 1 >= max_lines:
            break
        lines.append(current + ',')
        current, shown = name, shown + 1
    lines.append(current)
    left = len(names) - shown
    if left > 0:
        tail = ' +%d' % left
        lines[-1] = _fit(lines[-1], font, width - font.getlength(tail)) + tail
    return [_fit(line, font, width) for line in lines]


def _thumbnail(path, size, background=(235, 235, 235)):
    """The image at `path` fitted (aspect kept) into a size x size tile; None if it is missing."""
    from PIL import Image
    if not os.path.isfile(path):
        return None, 1.0
    with Image.open(path) as img:
        img = img.convert('RGB')
        scale = min(size / img.width, size / img.height)
        w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
        img = img.resize((w, h), Image.BICUBIC if scale > 1 else Image.LANCZOS)
    tile = Image.new('RGB', (size, size), background)
    tile.paste(img, ((size - w) // 2, (size - h) // 2))
    return tile, scale


def _placeholder(size, text, font):
    from PIL import Image, ImageDraw
    tile = Image.new('RGB', (size, size), (225, 225, 225))
    draw = ImageDraw.Draw(tile)
    for i, line in enumerate(text.split('\n')):
        draw.text((4, 4 + i * (font.size + 2)), _fit(line, font, size - 8), fill=(90, 90, 90), font=font)
    return tile


def _draw_box(draw, box, scale, offset, colour=(255, 255, 255), width=2):
    """box [h0, h1, w0, w1) in image pixels drawn at `scale` from `offset` (x, y)."""
    h0, h1, w0, w1 = box
    x0, y0 = offset[0] + w0 * scale, offset[1] + h0 * scale
    x1, y1 = offset[0] + w1 * scale - 1, offset[1] + h1 * scale - 1
    draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)


# ---- gallery ------------------------------------------------------------------------------------

def _word_cell(img_dir, p, bb_row, users, source_class, short, shorter, thumb, font, font_bold):
    """One gallery cell: crop | overlay, then 'word p  src: class' and 'used by n: ...'."""
    from PIL import Image, ImageDraw
    pad, line = 6, font.size + 3
    width = 2 * thumb + 3 * pad
    height = thumb + 2 * pad + 3 * line + 2
    cell = Image.new('RGB', (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(cell)
    draw.rectangle([0, 0, width - 1, height - 1], outline=(200, 200, 200))
    pushed = bb_row is None or int(bb_row[0]) >= 0
    crop, _ = _thumbnail(os.path.join(img_dir, 'prototype-img%d.png' % p), thumb) if pushed else (None, 1)
    over_path = os.path.join(img_dir, 'prototype-img-original_with_self_act%d.png' % p)
    overlay, scale = _thumbnail(over_path, thumb) if pushed else (None, 1)
    cell.paste(crop or _placeholder(thumb, 'no patch\n(not pushed)', font), (pad, pad))
    cell.paste(overlay or _placeholder(thumb, 'no source\nimage', font), (2 * pad + thumb, pad))
    if overlay is not None and bb_row is not None and int(bb_row[0]) >= 0:
        _draw_box(draw, [int(v) for v in bb_row[1:5]], scale, (2 * pad + thumb, pad))
    y = thumb + 2 * pad
    draw.text((pad, y), 'word %d' % p, fill=(0, 0, 0), font=font_bold)
    x_src = pad + font_bold.getlength('word %d' % p) + 8
    src = 'src: %s' % (short[source_class] if source_class is not None and source_class >= 0 else '-')
    draw.text((x_src, y + 1), _fit(src, font, width - x_src - pad), fill=(60, 60, 60), font=font)
    names = [(short if len(users) == 1 else shorter)[c] for c in users]
    if names:
        lines = _wrap_names('used by %d: ' % len(names), names, font, width - 2 * pad)
    else:
        lines = ['used by no class']
    for i, text in enumerate(lines):
        draw.text((pad, y + (i + 1) * line + 1), text, fill=(0, 0, 120) if names else (150, 0, 0), font=font)
    return cell


def _compose_page(cells, columns, header_lines, font_title, font):
    from PIL import Image, ImageDraw
    gap = 6
    cw, ch = cells[0].size if cells else (200, 100)
    rows = max(1, math.ceil(len(cells) / columns))
    header = 10 + font_title.size + 6 + (font.size + 4) * (len(header_lines) - 1) + 6
    width = columns * cw + (columns + 1) * gap
    page = Image.new('RGB', (width, header + rows * (ch + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    draw.text((gap, 8), _fit(header_lines[0], font_title, width - 2 * gap), fill=(0, 0, 0), font=font_title)
    for i, text in enumerate(header_lines[1:]):
        draw.text((gap, 10 + font_title.size + 6 + i * (font.size + 4)), _fit(text, font, width - 2 * gap),
                  fill=(70, 70, 70), font=font)
    for i, cell in enumerate(cells):
        r, c = divmod(i, columns)
        page.paste(cell, (gap + c * (cw + gap), header + gap + r * (ch + gap)))
    return page


def draw_gallery(img_dir, weight, class_names, out_dir=None, words_per_page=WORDS_PER_PAGE, by_class=False,
                 title=None, thumb=96, columns=None, epoch=None, weights_note=None):
    """Gallery of every visual word of one push folder (img/epoch-E/).

    weight: the (C, P) last layer that decides which classes use each word; class_names: C names.
    Pages of `words_per_page` words in index order (gallery-1.png, gallery-2.png, ...), or with
    `by_class` one page per class holding the words it uses, by decreasing weight
    (gallery-class<k>.png), plus gallery-unused.png for the words no class uses.
    Returns [(path, [word indices drawn on that page])]; every word appears at least once."""
    weight = _as_numpy(weight)
    info = read_push_folder(img_dir, epoch)
    C, P = weight.shape
    if len(class_names) != C:
        raise ValueError('%d class names for a last layer of %d classes' % (len(class_names), C))
    if info['bb'] is not None and info['bb'].shape[0] != P:
        from config import UserError
        raise UserError('%s holds %d words but the last layer has %d (push boxes of another run?)'
                        % (img_dir, info['bb'].shape[0], P))
    out_dir = out_dir or img_dir
    os.makedirs(out_dir, exist_ok=True)
    short = short_class_names(class_names, 24)   # one class: the long name, cut to the cell width
    shorter = short_class_names(class_names, 12)  # several classes: short names, more per line
    users = word_users(weight)
    font, font_bold, font_title = _font(11), _font(12), _font(16)
    title = title or 'Visual words'
    if info['epoch'] is not None:
        title += ', push of epoch %d' % info['epoch']
    explain = ('left: the nearest training patch (95th-percentile crop of its activation); right: its activation '
               'on the source image, box = the crop')
    rule = 'used by: classes with W[c,p] > 0 and >= %.1f max_c W[c,p], by decreasing weight' % USE_REL
    if weights_note:
        rule += ' (%s)' % weights_note

    def cell(p):
        bb_row = info['bb'][p] if info['bb'] is not None else None
        source = int(bb_row[5]) if bb_row is not None else None
        return _word_cell(img_dir, p, bb_row, users[p], source, short, shorter, thumb, font, font_bold)

    if by_class:
        groups = []
        for c in range(C):
            words = [p for p in range(P) if c in users[p]]
            words.sort(key=lambda p: -weight[c, p])
            groups.append(('gallery-class%d.png' % c, words,
                           '%s - class %d: %s, %d words' % (title, c, class_names[c], len(words))))
        unused = [p for p in range(P) if not users[p]]
        if unused:
            groups.append(('gallery-unused.png', unused, '%s - %d words no class uses' % (title, len(unused))))
        stale = glob.glob(os.path.join(out_dir, 'gallery-class*.png')) + glob.glob(os.path.join(out_dir, 'gallery-unused.png'))
    else:
        per = max(1, int(words_per_page))
        n_pages = max(1, math.ceil(P / per))
        groups = []
        for k in range(n_pages):
            words = list(range(k * per, min(P, (k + 1) * per)))
            groups.append(('gallery-%d.png' % (k + 1), words,
                           '%s - words %d-%d of %d (page %d/%d)' % (title, words[0] if words else 0,
                                                                      words[-1] if words else 0, P, k + 1, n_pages)))
        stale = glob.glob(os.path.join(out_dir, 'gallery-[0-9]*.png'))
    for path in stale:
        os.remove(path)
    written = []
    cache = {}
    for name, words, head in groups:
        cells = [cache.setdefault(p, cell(p)) for p in words]
        cols = columns or max(1, min(5, len(cells)))
        page = _compose_page(cells, cols, [head, explain, rule], font_title, font)
        path = os.path.join(out_dir, name)
        page.save(path, optimize=True)
        written.append((path, list(words)))
    return written


# ---- weights and sharing ----------------------------------------------------------------------

def _new_figure(width, height):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=100)


def draw_weight_heatmap(weight, class_names, out_path, title=None):
    """The class x word last-layer matrix (diverging colours, 0 = white, dots on the weights that
    make a class use a word) above a bar chart of the number of classes using each word.
    Returns {'path', 'classes_per_word' (P,) list, 'mean_classes_per_word'}."""
    import word_metrics
    import torch
    w = _as_numpy(weight).astype(np.float64)
    C, P = w.shape
    counts, mean = word_metrics.classes_per_word(torch.from_numpy(w), rel=USE_REL)
    counts = counts.numpy()
    short = short_class_names(class_names, 22)
    width = min(24.0, max(8.0, 2.5 + 0.13 * P))
    heat_h = min(14.0, max(2.6, 0.28 * C + 1.0))
    fig = _new_figure(width, heat_h + 2.6)
    grid = fig.add_gridspec(2, 2, height_ratios=[heat_h, 2.0], width_ratios=[1, 0.015], hspace=0.28, wspace=0.02)
    ax = fig.add_subplot(grid[0, 0])
    lim = max(float(np.abs(w).max()), 1e-6)
    im = ax.imshow(w, aspect='auto', cmap='RdBu_r', vmin=-lim, vmax=lim, interpolation='nearest')
    if C * P <= 20000:
        use = (w > 0) & (w >= USE_REL * w.max(axis=0, keepdims=True))
        ys, xs = np.nonzero(use)
        ax.scatter(xs, ys, s=max(2.0, min(12.0, 900.0 / max(P, C))), c='k', marker='o', linewidths=0)
    step_c = max(1, math.ceil(C / 40))
    ax.set_yticks(range(0, C, step_c))
    ax.set_yticklabels([short[c] for c in range(0, C, step_c)], fontsize=8)
    step_p = max(1, math.ceil(P / 50))
    ax.set_xticks(range(0, P, step_p))
    ax.set_xticklabels([str(p) for p in range(0, P, step_p)], fontsize=7)
    ax.set_xlim(-0.5, P - 0.5)
    ax.set_ylabel('class')
    ax.set_title((title + ': ' if title else '') + 'last-layer weights W[class, word] '
                 '(dot: the class uses the word, W > 0 and >= %.1f max over classes)' % USE_REL, fontsize=10)
    fig.colorbar(im, cax=fig.add_subplot(grid[0, 1]))
    bar = fig.add_subplot(grid[1, 0], sharex=ax)
    bar.bar(np.arange(P), counts, width=0.8, color='#555555')
    bar.axhline(mean, color='#d62728', linestyle='--', linewidth=1)
    bar.set_ylabel('classes')
    bar.set_xlabel('word')
    bar.set_ylim(0, max(1, int(counts.max()) if P else 1) + 0.5)
    bar.yaxis.get_major_locator().set_params(integer=True)
    hist = np.bincount(counts, minlength=1)
    bar.set_title('classes using each word: mean %.2f (%s)' % (
        mean, ', '.join('%d word%s serve %d' % (n, '' if n == 1 else 's', k) for k, n in enumerate(hist) if n)),
        fontsize=9)
    bar.tick_params(axis='x', labelsize=7)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, bbox_inches='tight')
    return {'path': out_path, 'classes_per_word': counts.tolist(), 'mean_classes_per_word': mean}


# ---- training curves ----------------------------------------------------------------------------

CURVE_PANELS = (('accuracy', 'accuracy (%)'), ('cross_entropy', 'cross entropy'), ('cluster', 'cluster cost'),
                ('separation', 'separation cost'), ('attention', 'attention MSE'), ('l1', '|W|_1'),
                ('p_dist_pair', 'mean pairwise word distance'), ('lr_features', 'backbone lr'))


def read_metrics_csv(path):
    """metrics.csv -> list of dicts with floats (None where empty); epoch and iteration as int."""
    rows = []
    with open(path, newline='') as f:
        for raw in csv.DictReader(f):
            row = {}
            for key, value in raw.items():
                if key in ('phase', 'split'):
                    row[key] = value
                elif value in ('', None):
                    row[key] = None
                elif key in ('epoch', 'iteration'):
                    row[key] = int(float(value))
                else:
                    row[key] = float(value)
            rows.append(row)
    return rows


def pass_positions(rows):
    """x position of each row: the epoch for warm/joint passes; a push at epoch + 0.3; last-layer
    pass i of n at epoch + 0.3 + 0.6 (i + 1) / (n + 1)."""
    n_last = {}
    for r in rows:
        if r['phase'] == 'last' and r.get('iteration') is not None:
            n_last[r['epoch']] = max(n_last.get(r['epoch'], 0), r['iteration'] + 1)
    xs = []
    for r in rows:
        e = r['epoch']
        if r['phase'] == 'push':
            xs.append(e + 0.3)
        elif r['phase'] == 'last':
            xs.append(e + 0.3 + 0.6 * ((r.get('iteration') or 0) + 1) / (n_last.get(e, 1) + 1))
        else:
            xs.append(float(e))
    return xs


def plot_training_curves(metrics_csv, out_path, title=None):
    """One panel per logged quantity (accuracy, each loss term, |W|_1, word distance, lr): test
    (solid, markers coloured by phase) and train (dashed) per pass; dotted lines at the pushes.
    Returns {'path', 'panels': [names drawn]}."""
    rows = read_metrics_csv(metrics_csv)
    if not rows:
        raise ValueError('%s holds no rows' % metrics_csv)
    xs = pass_positions(rows)
    panels = [(k, label) for k, label in CURVE_PANELS
              if any(r.get(k) is not None and math.isfinite(r[k]) for r in rows)]
    pushes = sorted({r['epoch'] for r in rows if r['phase'] == 'push'})
    cols = 2
    nrows = math.ceil(len(panels) / cols)
    fig = _new_figure(12, 2.6 * nrows + 0.6)
    fig.suptitle(title or 'training curves', fontsize=12)
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(nrows, cols, i + 1)
        scale = 100.0 if key == 'accuracy' else 1.0
        for split, style in (('train', '--'), ('test', '-')):
            pts = [(x, r[key] * scale, r['phase']) for x, r in zip(xs, rows)
                   if r['split'] == split and r.get(key) is not None and math.isfinite(r[key])]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color='#333333' if split == 'test' else '#999999',
                    linewidth=1.2, label=split, zorder=1)
            if split == 'test':
                for phase, colour in PHASE_COLOURS.items():
                    sel = [p for p in pts if p[2] == phase]
                    if sel:
                        ax.scatter([p[0] for p in sel], [p[1] for p in sel], s=16, color=colour, zorder=2,
                                   label='%s (test)' % phase)
        for e in pushes:
            ax.axvline(e + 0.3, color=PHASE_COLOURS['push'], linestyle=':', linewidth=1, zorder=0)
        if key == 'lr_features':
            ax.set_yscale('log')
        ax.set_title(label, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if i >= len(panels) - cols:
            ax.set_xlabel('epoch (push and last-layer passes after the epoch\'s joint pass)', fontsize=8)
        if i == 0:
            ax.legend(fontsize=7, loc='best')
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path)
    return {'path': out_path, 'panels': [k for k, _ in panels]}


# ---- hooks for main.py --------------------------------------------------------------------------

def write_push_pictures(img_dir, weight, class_names, epoch, log=print):
    """After a push and its last-layer passes: the gallery pages and weights.png in `img_dir`.
    Does nothing when img_dir is None (push_save_images off). A failure is logged, not raised:
    a picture must not stop a training run. Returns the paths written."""
    if img_dir is None:
        return []
    try:
        run = os.path.basename(os.path.dirname(os.path.dirname(os.path.normpath(img_dir))))
        pages = draw_gallery(img_dir, weight, class_names, epoch=epoch, title='Visual words of %s' % run)
        heat = draw_weight_heatmap(weight, class_names, os.path.join(img_dir, 'weights.png'),
                                   title='%s, epoch %d' % (run, epoch))
        log('pictures: %d gallery page(s) and weights.png in %s; mean classes per word %.2f'
            % (len(pages), img_dir, heat['mean_classes_per_word']))
        return [p for p, _ in pages] + [heat['path']]
    except Exception as err:  # noqa: BLE001 - reported, training goes on
        log('warning: could not draw the push pictures in %s: %s: %s' % (img_dir, type(err).__name__, err))
        return []


# ---- report -------------------------------------------------------------------------------------

def load_word_checkpoint(path):
    """An LVW / ProtoPNet-mode checkpoint; any other file is one UserError line naming it."""
    from checkpoint import load_checkpoint, require_kind
    return require_kind(load_checkpoint(path), path, 'words', 'visualize.py')


def _checkpoints(run_dir):
    from config import LAST_STATE  # the resumable state of a run, not a checkpoint of its words
    names = [n for n in os.listdir(run_dir) if n.endswith('.pth') and n != LAST_STATE]
    parsed = [(n, parse_checkpoint_name(n)) for n in names]
    order = {'nopush': 0, 'push': 1, 'last': 2}
    known = sorted([(n, p) for n, p in parsed if p],
                   key=lambda t: (t[1]['epoch'], order[t[1]['kind']], t[1]['iteration'] or 0))
    return [n for n, _ in known] + sorted(n for n, p in parsed if not p)


def _pct(x):
    return 'n/a' if x is None else '%.2f%%' % (100 * x)


def _accuracy_table(rows):
    """Markdown rows: per epoch the test accuracy after its warm/joint pass, after the push and
    after the last last-layer pass."""
    per = {}
    for r in rows:
        if r['split'] != 'test' or r.get('accuracy') is None:
            continue
        entry = per.setdefault(r['epoch'], {})
        key = 'last' if r['phase'] == 'last' else ('push' if r['phase'] == 'push' else 'epoch')
        entry[key] = r['accuracy']
        entry['phase'] = entry.get('phase') or (r['phase'] if key == 'epoch' else None)
    lines = ['| epoch | phase | test acc. | after push | after last-layer passes |', '|---|---|---|---|---|']
    for e in sorted(per):
        v = per[e]
        lines.append('| %d | %s | %s | %s | %s |' % (e, v.get('phase') or '', _pct(v.get('epoch')),
                                                     _pct(v['push']) if 'push' in v else '',
                                                     _pct(v['last']) if 'last' in v else ''))
    return lines


def write_run_report(run_dir, checkpoint=None, by_class=False, log=print):
    """report.md in `run_dir`: mode and settings, key numbers, test accuracy per epoch, training
    curves, the gallery of the words of the final (or given) checkpoint, the weight matrix and
    the classes per word, and links to metrics/ and local_analysis/ when present. Draws what is
    missing (curves, weights; the gallery when the push folder has none). A failure is logged and
    None returned (training must not stop for a report)."""
    try:
        return _write_run_report(run_dir, checkpoint, by_class, log)
    except Exception as err:  # noqa: BLE001
        log('warning: could not write the report of %s: %s: %s' % (run_dir, type(err).__name__, err))
        return None


def _write_run_report(run_dir, checkpoint, by_class, log):
    if not os.path.isdir(run_dir):
        raise FileNotFoundError('run folder not found: %s' % run_dir)
    run_name = os.path.basename(os.path.normpath(run_dir))
    settings_file = config.read_json(os.path.join(run_dir, 'settings.json'), required=False) or {}
    s = settings_file.get('settings', {})
    summary = config.read_json(os.path.join(run_dir, 'run_summary.json'), required=False) or {}
    ckpts = _checkpoints(run_dir)
    final = checkpoint or summary.get('final_checkpoint') or (ckpts[-1] if ckpts else None)
    report_dir = os.path.join(run_dir, 'report')
    os.makedirs(report_dir, exist_ok=True)
    md = ['# Run report: %s' % run_name, '']
    mode = 'ProtoPNet mode (class-specific words)' if s.get('class_specific') else 'LVW (words shared across classes)'
    if s:
        md.append('%s; dataset `%s`, %s, %d px, %d words, %d classes; %d epochs (%d warm), pushes at %s, '
                  '%d last-layer passes after each; attention weight %s, top-k %s.'
                  % (mode, s.get('dataset'), s.get('base_architecture'), s.get('img_size', 0),
                     (s.get('prototype_shape') or [0])[0], s.get('num_classes', 0), s.get('num_train_epochs', 0),
                     s.get('num_warm_epochs', 0), s.get('push_epochs'), s.get('last_layer_iterations', 0),
                     s.get('attention_weight'), s.get('topk')))
        md.append('')
    md += ['## Key numbers', '', '| | |', '|---|---|']
    if final:
        md.append('| final checkpoint | `%s` |' % final)
    md.append('| final test accuracy | %s |' % _pct(summary.get('final_accuracy')))
    if summary.get('best_checkpoint'):
        md.append('| best checkpoint | `%s` (%s) |' % (summary['best_checkpoint'], _pct(summary.get('best_accuracy'))))
    if summary.get('train_seconds') is not None:
        md.append('| training time | %.0f s |' % summary['train_seconds'])

    ckpt = None
    if final and os.path.isfile(os.path.join(run_dir, final)):
        ckpt = load_word_checkpoint(os.path.join(run_dir, final))
    heat = None
    if ckpt is not None:
        weight = ckpt['state_dict']['last_layer.weight']
        heat = draw_weight_heatmap(weight, ckpt['class_names'], os.path.join(report_dir, 'weights.png'),
                                   title='%s, %s' % (run_name, final))
        hist = np.bincount(np.asarray(heat['classes_per_word']), minlength=1)
        md.append('| classes per word | mean %.2f; %s |' % (
            heat['mean_classes_per_word'],
            ', '.join('%d word%s serve%s %d' % (n, '' if n == 1 else 's', 's' if n == 1 else '', k)
                      for k, n in enumerate(hist) if n)))
    metrics = config.read_json(os.path.join(run_dir, 'metrics', 'metrics.json'), required=False)
    if metrics:
        for name, src in metrics.get('sources', {}).items():
            if src.get('checkpoint') and os.path.dirname(os.path.abspath(src['checkpoint'])) == os.path.abspath(run_dir):
                m = src.get('metrics', {})
                vals = ', '.join('%s %.4g' % (k, m[k]['value']) for k in
                                 ('pointing_game', 'stochastic_pointing_game', 'content_heatmap',
                                  'insertion_auc', 'deletion_auc')
                                 if k in m and m[k].get('value') is not None)
                md.append('| interpretability (%s, [metrics](metrics/metrics.md)) | %s |' % (name, vals))
    md.append('')

    csv_path = os.path.join(run_dir, 'metrics.csv')
    rows = read_metrics_csv(csv_path) if os.path.isfile(csv_path) else []
    if rows:
        plot_training_curves(csv_path, os.path.join(report_dir, 'curves.png'), title='%s: training curves' % run_name)
        md += ['## Training curves', '',
               'Test (solid; markers by phase: grey warm, blue joint, red push, green last layer) and train '
               '(dashed) per pass; dotted red lines mark the pushes. From `metrics.csv`.', '',
               '![training curves](report/curves.png)', '', '### Test accuracy per epoch', '']
        md += _accuracy_table(rows) + ['']

    if ckpt is not None:
        epoch, kind = checkpoint_info(ckpt, final)
        folder, note = word_source_folder(run_dir, epoch, kind)
        if folder is None and kind == 'nopush':
            earlier = [e for e in (s.get('push_epochs') or []) if epoch is not None and e < epoch
                       and os.path.isdir(push_folder(run_dir, e))]
            if earlier:
                folder = push_folder(run_dir, earlier[-1])
                note += '; the gallery below is the push of epoch %d, before the words moved' % earlier[-1]
        md += ['## Visual words', '']
        if folder is not None:
            info = read_push_folder(folder)
            pattern = 'gallery-class*.png' if by_class else 'gallery-[0-9]*.png'
            pages = sorted(glob.glob(os.path.join(folder, pattern)),
                           key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', p)])
            if not pages:
                written = draw_gallery(folder, ckpt['state_dict']['last_layer.weight'], ckpt['class_names'],
                                       by_class=by_class, title='Visual words of %s' % run_name,
                                       weights_note='weights of %s' % final)
                pages = [p for p, _ in written]
            md.append('%s. Each word: its nearest training patch, its activation on the source image, '
                      'the class of that image (src) and the classes that use it.' % (note[0].upper() + note[1:]))
            md.append('')
            rel = [os.path.relpath(p, run_dir).replace(os.sep, '/') for p in pages]
            md.append('![visual words](%s)' % rel[0])
            if len(rel) > 1:
                md.append('')
                md.append('All pages: ' + ', '.join('[%d](%s)' % (i + 1, r) for i, r in enumerate(rel)))
            others = sorted(int(m.group(1)) for m in (re.search(r'epoch-(\d+)$', d) for d in
                                                      glob.glob(os.path.join(run_dir, 'img', 'epoch-*'))) if m)
            others = [e for e in others if e != info['epoch']]
            if others:
                md.append('')
                md.append('Other pushes: ' + ', '.join('[epoch %d](img/epoch-%d/)' % (e, e) for e in others))
        else:
            md.append(note[0].upper() + note[1:] + '.')
        md.append('')
    if heat is not None:
        md += ['## Word sharing', '',
               'Last layer of `%s`: rows are classes, columns words; a dot marks a class that uses the word '
               '(W > 0 and W >= %.1f of the word\'s largest weight). The bars count the classes per word: '
               '1 everywhere means no sharing (ProtoPNet), more means words shared across classes (LVW).'
               % (final, USE_REL), '', '![weights](report/weights.png)', '']
    if metrics:
        md += ['## Interpretability metrics', '', 'From `eval_metrics.py`: [metrics/metrics.md](metrics/metrics.md).', '']
        summary_md = os.path.join(run_dir, 'metrics', 'metrics.md')
        if os.path.isfile(summary_md):
            with open(summary_md) as f:
                text = f.read()
            table = text.split('\n\n')[1] if '\n\n' in text else ''
            if table.startswith('|'):
                md += [table.strip(), '']
    analyses = sorted(glob.glob(os.path.join(run_dir, 'local_analysis', '*.png')))
    if analyses:
        md += ['## Local analyses', '', 'Why single images got their label (`local_analysis.py`):', '']
        md += ['- [%s](%s)' % (os.path.basename(p), os.path.relpath(p, run_dir).replace(os.sep, '/')) for p in analyses]
        md.append('')
    files = [(label, name) for label, name in (('settings', 'settings.json'), ('log', 'train.log'),
                                                ('per-pass numbers', 'metrics.csv'), ('summary', 'run_summary.json'))
             if os.path.isfile(os.path.join(run_dir, name))]
    md += ['## Files', '']
    if files:
        md.append('- ' + ', '.join('%s: [%s](%s)' % (label, name, name) for label, name in files))
    md += ['- checkpoints: ' + (', '.join('`%s`' % c for c in ckpts) if ckpts else 'none'), '']
    path = os.path.join(run_dir, 'report.md')
    text = '\n'.join(md)
    config.atomic_write(path, lambda f: f.write(text))
    log('report: %s' % path)
    return path


# ---- command line ------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('run_dir', help='run folder, saved_models/<arch>/<experiment_run>')
    parser.add_argument('-checkpoint', default=None, help='checkpoint file name in run_dir (default: the final one)')
    parser.add_argument('-by_class', action='store_true', help='gallery as one page per class instead of pages of 50')
    parser.add_argument('-redraw', action='store_true', help='redraw the gallery even if it exists')
    args = parser.parse_args(argv)
    if not os.path.isdir(args.run_dir):
        raise config.UserError('run folder not found: %s' % args.run_dir)
    if args.checkpoint and not os.path.isfile(os.path.join(args.run_dir, args.checkpoint)):
        raise config.UserError('checkpoint not found: %s' % os.path.join(args.run_dir, args.checkpoint))
    summary = config.read_json(os.path.join(args.run_dir, 'run_summary.json'), required=False) or {}
    name = args.checkpoint or summary.get('final_checkpoint') or (_checkpoints(args.run_dir) or [None])[-1]
    ckpt = None
    if name and os.path.isfile(os.path.join(args.run_dir, name)):  # checked here, before any picture is drawn
        ckpt = load_word_checkpoint(os.path.join(args.run_dir, name))
    if args.redraw:
        if name is None:
            raise config.UserError('%s holds no checkpoint' % args.run_dir)
        ckpt = ckpt or load_word_checkpoint(os.path.join(args.run_dir, name))
        epoch, kind = checkpoint_info(ckpt, name)
        folder, note = word_source_folder(args.run_dir, epoch, kind)
        if folder is None:
            print(note)
        else:
            draw_gallery(folder, ckpt['state_dict']['last_layer.weight'], ckpt['class_names'], by_class=args.by_class,
                         title='Visual words of %s' % os.path.basename(os.path.normpath(args.run_dir)),
                         weights_note='weights of %s' % name)
    path = _write_run_report(args.run_dir, args.checkpoint, args.by_class, print)
    return path


if __name__ == '__main__':
    config.run_cli(main)
