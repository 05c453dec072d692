"""Procedural "toy creatures" dataset: the embedded default data of this project.

Each image shows one creature built from four part slots (head, body, tail, marking), each slot
in one of three variants (shape + colour + texture). A class is one tuple of variants, taken from
the L9 orthogonal array OA(9, 4, 3, 2): every variant is shared by exactly three classes, and any
two classes agree in at most one slot, so no single part gives the class and every pair of
classes is separated by at least three parts. That is what shared visual words should discover.

Nuisances: position, scale, rotation, mirroring, background texture, noise, and 0-2 distractor
shapes drawn from the same part primitives, away from the creature.

Layout written (torchvision ImageFolder, as the training scripts expect):

    <out>/train/<class>/<class>_<i>.png       the image
    <out>/train/<class>/<class>_<i>.masks.npz ground truth beside it:
        object (S, S) bool        union of the four parts
        parts (4, S, S) bool      one mask per part slot, in `part_names` order
        part_names (4,) str
        distractors (S, S) bool   pixels of distractor shapes
        variants (4,) int         the variant of each slot in this image
    <out>/test/...                the same
    <out>/meta.json               slots, variants, classes, which parts separate each class pair,
                                  and the generator parameters

Deterministic by seed: image i of class c in split s is drawn from its own generator seeded with
(seed, s, c, i), so any subset of images can be regenerated alone.
"""
import argparse
import json
import math
import multiprocessing
import os
import shutil
import sys
import time

import numpy as np
from PIL import Image, ImageChops, ImageDraw

if __package__ in (None, ''):  # run as `python data/make_toy.py`: the packages are in the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from run import config  # noqa: E402

SLOTS = ('head', 'body', 'tail', 'marking')
VARIANTS = {
    'head': ('round', 'triangle', 'square'),
    'body': ('ellipse', 'box', 'hexagon'),
    'tail': ('stick', 'fork', 'fan'),
    'marking': ('star', 'cross', 'ring'),
}
# Variant colours (RGB); each image jitters them. Distractors reuse them, so a colour alone
# does not say whether the part belongs to the creature.
COLOURS = {
    'head': ((215, 55, 55), (240, 155, 35), (195, 75, 200)),
    'body': ((65, 125, 220), (55, 165, 85), (150, 105, 65)),
    'tail': ((45, 45, 45), (80, 200, 205), (230, 215, 60)),
    'marking': ((250, 250, 250), (25, 25, 120), (255, 135, 165)),
}
SUPERSAMPLE = 2  # draw at 2x and box-filter down: smooth edges at small image sizes
MIN_SIZE, MAX_SIZE = 16, 1024  # image sides the generator draws (the parts stay a few pixels wide at 16)
GENERATOR_VERSION = 1


def orthogonal_array_l9():
    """The 9 x 4 orthogonal array of strength 2 over {0, 1, 2}: row (a, b) = (a, b, a+b, a+2b) mod 3."""
    return [(a, b, (a + b) % 3, (a + 2 * b) % 3) for a in range(3) for b in range(3)]


def class_names(num_classes):
    """Folder names: 'c<k>_<head>-<body>-<tail>-<marking>' (the prefix keeps ImageFolder order = k)."""
    rows = orthogonal_array_l9()[:num_classes]
    return ['c%d_%s' % (k, '-'.join(VARIANTS[s][v] for s, v in zip(SLOTS, row)))
            for k, row in enumerate(rows)]


def separating_parts(num_classes):
    """For every ordered class pair (i, j), the slots whose variants differ."""
    rows = orthogonal_array_l9()[:num_classes]
    return [[[s for s, a, b in zip(SLOTS, rows[i], rows[j]) if a != b] for j in range(num_classes)]
            for i in range(num_classes)]


# ----------------------------------------------------------------------------------------------
# Shapes in object coordinates (units of the image size; the body is centred at the origin,
# the head points to +x). Each returns a list of polygons (lists of (x, y)).

def _regular_polygon(cx, cy, r, n, phase=0.0):
    return [(cx + r * math.cos(phase + 2 * math.pi * k / n), cy + r * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)]


def _thick_segment(x0, y0, x1, y1, w):
    dx, dy = x1 - x0, y1 - y0
    n = math.hypot(dx, dy) or 1.0
    ox, oy = -dy / n * w / 2, dx / n * w / 2
    return [(x0 + ox, y0 + oy), (x1 + ox, y1 + oy), (x1 - ox, y1 - oy), (x0 - ox, y0 - oy)]


def part_polygons(slot, variant, cx=None, cy=0.0):
    """Polygons of one part variant, at its place on the creature (or centred at (cx, cy))."""
    name = VARIANTS[slot][variant]
    if slot == 'head':
        cx = 0.245 if cx is None else cx
        if name == 'round':
            return [_regular_polygon(cx, cy, 0.085, 28)]
        if name == 'triangle':
            return [_regular_polygon(cx, cy, 0.1, 3)]
        return [_regular_polygon(cx, cy, 0.095, 4, math.pi / 4)]
    if slot == 'body':
        cx = 0.0 if cx is None else cx
        if name == 'ellipse':
            return [[(cx + 0.175 * math.cos(t), cy + 0.11 * math.sin(t))
                     for t in np.linspace(0, 2 * math.pi, 36, endpoint=False)]]
        if name == 'box':
            return [[(cx - 0.16, cy - 0.1), (cx + 0.16, cy - 0.1), (cx + 0.16, cy + 0.1), (cx - 0.16, cy + 0.1)]]
        return [[(cx + 0.18 * math.cos(t), cy + 0.115 * math.sin(t))
                 for t in np.linspace(0, 2 * math.pi, 6, endpoint=False)]]
    if slot == 'tail':
        x0 = -0.15 if cx is None else cx + 0.08
        if name == 'stick':
            return [_thick_segment(x0, cy, x0 - 0.17, cy, 0.045)]
        if name == 'fork':
            return [_thick_segment(x0, cy, x0 - 0.15, cy - 0.085, 0.04),
                    _thick_segment(x0, cy, x0 - 0.15, cy + 0.085, 0.04)]
        return [[(x0, cy - 0.025), (x0 - 0.16, cy - 0.1), (x0 - 0.16, cy + 0.1), (x0, cy + 0.025)]]
    # marking
    cx = 0.0 if cx is None else cx
    if name == 'star':
        pts = []
        for k in range(10):
            r = 0.062 if k % 2 == 0 else 0.027
            t = -math.pi / 2 + math.pi * k / 5
            pts.append((cx + r * math.cos(t), cy + r * math.sin(t)))
        return [pts]
    if name == 'cross':
        return [_thick_segment(cx - 0.06, cy, cx + 0.06, cy, 0.03), _thick_segment(cx, cy - 0.06, cx, cy + 0.06, 0.03)]
    return [_regular_polygon(cx, cy, 0.055, 24), _regular_polygon(cx, cy, 0.028, 24)]  # ring: outer, hole


def _to_pixels(polys, size, centre, scale, angle, mirror):
    """Similarity transform of object-coordinate polygons to pixel coordinates."""
    c, s = math.cos(angle), math.sin(angle)
    out = []
    for poly in polys:
        pts = []
        for x, y in poly:
            x = -x if mirror else x
            pts.append((centre[0] + size * scale * (c * x - s * y), centre[1] + size * scale * (s * x + c * y)))
        out.append(pts)
    return out


def _draw_part(canvas, mask, slot, variant, polys_px, colour):
    """Fill the polygons into the RGB canvas and the part's own mask ('ring' has a hole)."""
    draw, mdraw = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)
    if slot == 'marking' and VARIANTS[slot][variant] == 'ring':
        outer, hole = polys_px
        local = Image.new('L', canvas.size, 0)
        ldraw = ImageDraw.Draw(local)
        ldraw.polygon(outer, fill=255)
        ldraw.polygon(hole, fill=0)
        canvas.paste(tuple(colour), mask=local)
        mask.paste(255, mask=local)
        return
    for poly in polys_px:
        draw.polygon(poly, fill=tuple(colour))
        mdraw.polygon(poly, fill=255)


def _texture(rng, slot, variant, part_mask, canvas, colour, angle, period):
    """Body textures in the creature's own frame: 'box' is striped, 'hexagon' dotted."""
    name = VARIANTS[slot][variant]
    if slot != 'body' or name == 'ellipse':
        return
    m = np.asarray(part_mask) > 0
    img = np.asarray(canvas).copy()
    yy, xx = np.nonzero(m)
    if len(yy) == 0:
        return
    c, s = math.cos(angle), math.sin(angle)
    u = c * xx + s * yy
    v = -s * xx + c * yy
    dark = (np.array(colour) * 0.55).astype(np.uint8)
    if name == 'box':
        on = (np.floor(u / period) % 2) == 0
    else:
        pu, pv = (u % period) - period / 2, (v % period) - period / 2
        on = pu ** 2 + pv ** 2 < (period * 0.3) ** 2
    img[yy[on], xx[on]] = dark
    canvas.paste(Image.fromarray(img))


def _background(rng, size):
    """A muted background: a colour gradient plus one of stripes, blobs or plain noise (float32 HxWx3).

    Every term is a sum or product of per-axis vectors, so it costs O(size^2) once.
    """
    base = rng.uniform(95, 185, size=3).astype(np.float32)
    tint = rng.uniform(-35, 35, size=3).astype(np.float32)
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    a = rng.uniform(0, 2 * math.pi)
    t = math.cos(a) * axis[None, :] + math.sin(a) * axis[:, None]
    img = base + tint * t[..., None]
    kind = rng.integers(3)
    if kind == 0:
        angle, period = rng.uniform(0, math.pi), rng.uniform(0.05, 0.15)
        phase = (math.cos(angle) * axis[None, :] + math.sin(angle) * axis[:, None]) / period
        img += np.float32(rng.uniform(6, 16)) * np.sin(2 * math.pi * phase)[..., None]
    elif kind == 1:
        for _ in range(rng.integers(4, 9)):
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
            blob = np.outer(np.exp(-(axis - cy) ** 2 / (2 * r * r)), np.exp(-(axis - cx) ** 2 / (2 * r * r)))
            img += rng.uniform(-25, 25, size=3).astype(np.float32) * blob[..., None]
    return img


def render_image(rng, variants, size, max_distractors=2):
    """Draw one creature with the given variant tuple; returns (uint8 image, masks dict).

    Drawing happens at SUPERSAMPLE x size and is box-filtered down; masks are the down-sampled
    coverage > 0.5, so they align with the visible edges of the final image.
    """
    big = size * SUPERSAMPLE
    # The background is smooth: draw it at the final size and only upsample.
    canvas = Image.fromarray(np.clip(_background(rng, size), 0, 255).astype(np.uint8)).resize((big, big))
    centre = (big * (0.5 + rng.uniform(-0.1, 0.1)), big * (0.5 + rng.uniform(-0.1, 0.1)))
    scale = rng.uniform(0.85, 1.12)
    angle = rng.uniform(-math.radians(35), math.radians(35))
    mirror = bool(rng.integers(2))

    part_masks = []
    for slot, variant in zip(SLOTS, variants):
        colour = np.clip(np.array(COLOURS[slot][variant]) + rng.integers(-18, 19, size=3), 0, 255)
        mask = Image.new('L', (big, big), 0)
        polys = _to_pixels(part_polygons(slot, variant), big, centre, scale, angle, mirror)
        _draw_part(canvas, mask, slot, variant, polys, colour)
        _texture(rng, slot, variant, mask, canvas, colour, angle, period=big * 0.045)
        part_masks.append(mask)
    # Part masks may overlap (the marking sits on the body); the object is their union.
    object_mask = part_masks[0]
    for m in part_masks[1:]:
        object_mask = ImageChops.lighter(object_mask, m)

    distractor_mask = Image.new('L', (big, big), 0)
    n_distract = rng.choice(max_distractors + 1) if max_distractors > 0 else 0
    for _ in range(n_distract):
        slot = SLOTS[rng.integers(4)]
        variant = int(rng.integers(3))
        colour = np.clip(np.array(COLOURS[slot][variant]) + rng.integers(-18, 19, size=3), 0, 255)
        for _attempt in range(12):
            pos = (rng.uniform(0.12, 0.88), rng.uniform(0.12, 0.88))
            polys = _to_pixels(part_polygons(slot, variant, cx=0.0, cy=0.0), big, (pos[0] * big, pos[1] * big),
                               rng.uniform(0.7, 0.9), rng.uniform(0, 2 * math.pi), False)
            mask = Image.new('L', (big, big), 0)
            scratch = Image.new('RGB', (big, big))
            _draw_part(scratch, mask, slot, variant, polys, colour)
            area = np.count_nonzero(np.asarray(mask))
            overlap = np.count_nonzero(np.asarray(ImageChops.multiply(mask, object_mask)))
            if area and overlap < 0.02 * area:
                canvas.paste(scratch, mask=mask)
                distractor_mask = ImageChops.lighter(distractor_mask, mask)
                break

    img = np.asarray(canvas.reduce(SUPERSAMPLE)).astype(np.float32)
    img += rng.normal(0, 5.0, size=img.shape).astype(np.float32)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)

    def down(mask):  # coverage of each final pixel > 1/2
        return np.asarray(mask.reduce(SUPERSAMPLE)) > 127

    masks = {'parts': np.stack([down(m) for m in part_masks]), 'object': down(object_mask),
             'distractors': down(distractor_mask), 'part_names': np.array(SLOTS),
             'variants': np.array(variants, dtype=np.int64)}
    return image, masks


def _image_seed(seed, split, class_index, index):
    return [seed, {'train': 0, 'test': 1}[split], class_index, index]


def _render_and_save(job):
    """Draw image `index` of class `class_index` and write it with its masks (one pool task)."""
    root, name, variants, split, class_index, index, seed, size, max_distractors = job
    rng = np.random.default_rng(_image_seed(seed, split, class_index, index))
    image, masks = render_image(rng, variants, size, max_distractors)
    stem = os.path.join(root, split, name, '%s_%04d' % (name, index))
    Image.fromarray(image).save(stem + '.png', compress_level=1)
    np.savez_compressed(stem + '.masks.npz', **masks)


class _InProcess:
    """Stand-in for multiprocessing.Pool when the job is small."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap_unordered(self, fn, jobs, chunksize=1):
        return map(fn, jobs)


def read_params(meta_path):
    """The generator parameters recorded in a meta.json, or None (no file, or one that is not a
    JSON object with a params object: not this generator's data)."""
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta.get('params') if isinstance(meta, dict) and isinstance(meta.get('params'), dict) else None


def generate(out_dir, size=112, train_per_class=60, test_per_class=30, num_classes=9, seed=0,
             max_distractors=2, progress=True, workers=None):
    """Write the dataset to `out_dir` (atomically: built beside it, then renamed).

    If `out_dir` already holds a dataset made with the same parameters, nothing is written.
    Returns the path of its meta.json.
    """
    if not 1 <= num_classes <= 9:
        raise ValueError('num_classes must be between 1 and 9 (the L9 design has 9 classes), got %r' % num_classes)
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError('size must be between %d and %d pixels, got %r' % (MIN_SIZE, MAX_SIZE, size))
    if train_per_class < 1 or test_per_class < 1:
        raise ValueError('train_per_class and test_per_class must be at least 1, got %r and %r'
                         % (train_per_class, test_per_class))
    if seed < 0 or max_distractors < 0:
        raise ValueError('seed and max_distractors must be at least 0, got %r and %r' % (seed, max_distractors))
    params = {'size': size, 'train_per_class': train_per_class, 'test_per_class': test_per_class,
              'num_classes': num_classes, 'seed': seed, 'max_distractors': max_distractors,
              'generator_version': GENERATOR_VERSION}
    meta_path = os.path.join(out_dir, 'meta.json')
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError('%s is a file, not a folder; choose another --out' % out_dir)
    if read_params(meta_path) == params:
        return meta_path
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError('%s exists and holds other data; remove it or choose another --out' % out_dir)

    names = class_names(num_classes)
    rows = orthogonal_array_l9()[:num_classes]
    tmp_dir = out_dir.rstrip('/') + '.tmp-%d' % os.getpid()
    shutil.rmtree(tmp_dir, ignore_errors=True)
    jobs = [(tmp_dir, names[k], rows[k], split, k, i, seed, size, max_distractors)
            for split, n in (('train', train_per_class), ('test', test_per_class))
            for k in range(num_classes) for i in range(n)]
    try:
        for split in ('train', 'test'):
            for name in names:
                os.makedirs(os.path.join(tmp_dir, split, name), exist_ok=True)
        workers = min(os.cpu_count() or 1, 8) if workers is None else workers
        with multiprocessing.Pool(workers) if workers > 1 and len(jobs) > 64 else _InProcess() as pool:
            done = pool.imap_unordered(_render_and_save, jobs, chunksize=16)
            if progress:
                from tqdm import tqdm
                done = tqdm(done, total=len(jobs), desc='toy data', unit='img', leave=False, disable=None)
            for _ in done:
                pass
        meta = {
            'description': 'toy creatures: 4 part slots x 3 variants, classes from the L9 orthogonal array',
            'slots': list(SLOTS), 'variants': {s: list(v) for s, v in VARIANTS.items()},
            'classes': {n: {s: VARIANTS[s][v] for s, v in zip(SLOTS, row)} for n, row in zip(names, rows)},
            'class_names': names,
            'separating_parts': separating_parts(num_classes),
            'mask_format': 'beside <stem>.png: <stem>.masks.npz with object (S,S) bool, parts (4,S,S) bool, '
                           'part_names (4,), distractors (S,S) bool, variants (4,) int',
            'params': params,
        }
        with open(os.path.join(tmp_dir, 'meta.json'), 'w') as f:
            json.dump(meta, f, indent=1)
        if os.path.exists(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
        os.replace(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return meta_path


def main(argv=None):
    """The command line; a mistake is one 'error: ...' line, exit status 2 (config.run_cli)."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='./data/toy', help='output folder (default ./data/toy)')
    parser.add_argument('--size', type=config.int_in(MIN_SIZE, MAX_SIZE), default=112,
                        help='image side in pixels, %d-%d (default 112)' % (MIN_SIZE, MAX_SIZE))
    parser.add_argument('--train-per-class', type=config.positive_int, default=60)
    parser.add_argument('--test-per-class', type=config.positive_int, default=30)
    parser.add_argument('--classes', type=config.int_in(1, 9), default=9, help='number of classes, 1-9 (default 9)')
    parser.add_argument('--distractors', type=config.nonnegative_int, default=2,
                        help='at most this many distractor shapes')
    parser.add_argument('--seed', type=config.nonnegative_int, default=0)
    args = parser.parse_args(argv)
    config.check_output_folder(os.path.dirname(os.path.abspath(args.out)), '--out', args.out)
    start = time.time()
    try:
        meta = generate(args.out, args.size, args.train_per_class, args.test_per_class, args.classes,
                        args.seed, args.distractors)
    except (ValueError, FileExistsError) as err:
        raise config.UserError(str(err)) from None
    n = (args.train_per_class + args.test_per_class) * args.classes
    print('toy data: %d images of %d px in %s (%.1fs); description in %s'
          % (n, args.size, args.out, time.time() - start, meta))


if __name__ == '__main__':
    config.run_cli(main)
