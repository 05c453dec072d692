"""The pictures of a run's visual words: the gallery pages of a push (each word's nearest training
patch beside its activation on the source image) and the class x word weight heatmap.

A word is *used* by class c when W[c, p] > 0 and W[c, p] >= 0.5 max_c' W[c', p]
(word_metrics.classes_per_word).
"""
import glob
import math
import os
import re

import numpy as np

from figures.drawing import draw_box, fit_text, get_font, load_thumbnail, new_figure, placeholder_tile, wrap_names


WORDS_PER_PAGE = 50
USE_REL = 0.5   # the relative threshold of word_metrics.classes_per_word


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
        from data.image_data import load_npy
        bb = load_npy(os.path.join(img_dir, 'bb%d.npy' % epoch), 'push boxes', ndim=2, columns=6)
    num_words = bb.shape[0] if bb is not None else len(glob.glob(os.path.join(img_dir, 'prototype-img[0-9]*.png')))
    return {'epoch': epoch, 'bb': bb, 'num_words': num_words}


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
    crop, _ = load_thumbnail(os.path.join(img_dir, 'prototype-img%d.png' % p), thumb) if pushed else (None, 1)
    over_path = os.path.join(img_dir, 'prototype-img-original_with_self_act%d.png' % p)
    overlay, scale = load_thumbnail(over_path, thumb) if pushed else (None, 1)
    cell.paste(crop or placeholder_tile(thumb, 'no patch\n(not pushed)', font), (pad, pad))
    cell.paste(overlay or placeholder_tile(thumb, 'no source\nimage', font), (2 * pad + thumb, pad))
    if overlay is not None and bb_row is not None and int(bb_row[0]) >= 0:
        draw_box(draw, [int(v) for v in bb_row[1:5]], scale, (2 * pad + thumb, pad))
    y = thumb + 2 * pad
    draw.text((pad, y), 'word %d' % p, fill=(0, 0, 0), font=font_bold)
    x_src = pad + font_bold.getlength('word %d' % p) + 8
    src = 'src: %s' % (short[source_class] if source_class is not None and source_class >= 0 else '-')
    draw.text((x_src, y + 1), fit_text(src, font, width - x_src - pad), fill=(60, 60, 60), font=font)
    names = [(short if len(users) == 1 else shorter)[c] for c in users]
    if names:
        lines = wrap_names('used by %d: ' % len(names), names, font, width - 2 * pad)
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
    draw.text((gap, 8), fit_text(header_lines[0], font_title, width - 2 * gap), fill=(0, 0, 0), font=font_title)
    for i, text in enumerate(header_lines[1:]):
        draw.text((gap, 10 + font_title.size + 6 + i * (font.size + 4)), fit_text(text, font, width - 2 * gap),
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
        from run.config import UserError
        raise UserError('%s holds %d words but the last layer has %d (push boxes of another run?)'
                        % (img_dir, info['bb'].shape[0], P))
    out_dir = out_dir or img_dir
    os.makedirs(out_dir, exist_ok=True)
    short = short_class_names(class_names, 24)   # one class: the long name, cut to the cell width
    shorter = short_class_names(class_names, 12)  # several classes: short names, more per line
    users = word_users(weight)
    font, font_bold, font_title = get_font(11), get_font(12), get_font(16)
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


def draw_weight_heatmap(weight, class_names, out_path, title=None):
    """The class x word last-layer matrix (diverging colours, 0 = white, dots on the weights that
    make a class use a word) above a bar chart of the number of classes using each word.
    Returns {'path', 'classes_per_word' (P,) list, 'mean_classes_per_word'}."""
    from metrics import word_metrics
    import torch
    w = _as_numpy(weight).astype(np.float64)
    C, P = w.shape
    counts, mean = word_metrics.classes_per_word(torch.from_numpy(w), rel=USE_REL)
    counts = counts.numpy()
    short = short_class_names(class_names, 22)
    width = min(24.0, max(8.0, 2.5 + 0.13 * P))
    heat_h = min(14.0, max(2.6, 0.28 * C + 1.0))
    fig = new_figure(width, heat_h + 2.6)
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
