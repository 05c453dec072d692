"""The picture of each class's words (eval_metrics.py writes it as parts_<source>.png for word
models on data with part masks): one row per class, its words in order of the class's weight
W[c, p] (the words it uses, word_metrics.word_use, up to `per_class`), each shown as the crop of
the word's top test image around its top cell (the cell's footprint and one cell around it),
framed in the colour of the part that cell points at (word_metrics.cell_parts; grey: background).
"""
import numpy as np
from PIL import Image, ImageDraw

from metrics import word_metrics as wm

PART_COLOURS = [(220, 40, 40), (40, 170, 60), (40, 90, 220), (240, 150, 0), (225, 225, 0), (170, 60, 200)]
BACKGROUND_COLOUR = (150, 150, 150)
TILE, FRAME, LABEL_W = 56, 4, 70
STEP = TILE + 2 * FRAME + 4  # one framed tile and its gap, across and down


def category_colour(k, K):
    """The frame colour of category k of K parts (k = K: the background)."""
    return BACKGROUND_COLOUR if k >= K else PART_COLOURS[k % len(PART_COLOURS)]


def cell_crop(image, h, w, grid):
    """image (S, S, 3) uint8 -> the crop of cell (h, w)'s footprint grown by one cell on each side."""
    S = image.shape[0]
    y0, y1, x0, x1 = wm.cell_box(h, w, grid, S)
    dy, dx = y1 - y0, x1 - x0
    return image[max(y0 - dy, 0):min(y1 + dy, S), max(x0 - dx, 0):min(x1 + dx, S)]


def draw_class_words(path, image_of, top_cells, categories, weight, class_names, part_names, grid, per_class=6):
    """Write the picture. image_of(i) -> (S, S, 3) uint8 test image i; top_cells (P, n, 3) long
    (image, h, w), best first; categories (P, n) in 0..K; weight (C, P)."""
    K = len(part_names)
    use = wm.word_use(weight)
    C = weight.shape[0]
    width = LABEL_W + per_class * STEP
    legend_h = 20
    canvas = Image.new('RGB', (width, legend_h + C * STEP), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 4
    for k, name in enumerate(list(part_names) + ['background']):
        draw.rectangle([x, 4, x + 10, 14], fill=category_colour(k, K))
        draw.text((x + 14, 3), name, fill=(0, 0, 0))
        x += 14 + 7 * len(name) + 10
    for c in range(C):
        top = legend_h + c * STEP
        draw.text((4, top + TILE // 2), str(class_names[c])[:10], fill=(0, 0, 0))
        words = [p for p in np.argsort(-weight[c].double().numpy(), kind='stable').tolist() if use[c, p]][:per_class]
        for j, p in enumerate(words):
            i, h, w = (int(v) for v in top_cells[p, 0])
            crop = Image.fromarray(cell_crop(image_of(i), h, w, grid)).resize((TILE, TILE), Image.NEAREST)
            left = LABEL_W + j * STEP
            draw.rectangle([left, top, left + TILE + 2 * FRAME - 1, top + TILE + 2 * FRAME - 1],
                           fill=category_colour(int(categories[p, 0]), K))
            canvas.paste(crop, (left + FRAME, top + FRAME))
            draw.text((left + FRAME + 2, top + FRAME + 1), str(p), fill=(255, 255, 255))
        if not words:
            draw.text((LABEL_W, top + TILE // 2), 'no word with a positive weight', fill=(0, 0, 0))
    canvas.save(path)
    return path
