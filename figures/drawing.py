"""PIL and matplotlib helpers shared by the pictures: fonts, text that fits, thumbnails, boxes,
figures made with matplotlib's object-oriented API (no pyplot, no global backend change).
"""
import os
from functools import lru_cache


@lru_cache(maxsize=8)
def get_font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the small bitmap font
        return ImageFont.load_default()


def fit_text(text, font, width):
    """`text` cut with an ellipsis to fit `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + '\u2026') > width:
        text = text[:-1]
    return text + '\u2026'


def wrap_names(prefix, names, font, width, max_lines=2):
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
        lines[-1] = fit_text(lines[-1], font, width - font.getlength(tail)) + tail
    return [fit_text(line, font, width) for line in lines]


def load_thumbnail(path, size, background=(235, 235, 235)):
    """The image at `path` fitted (aspect kept) into a size x size tile; None if it is missing."""
    from PIL import Image
    if not os.path.isfile(path):
        return None, 1.0
    from data.image_data import to_rgb
    with Image.open(path) as img:
        img = to_rgb(img, path)
        scale = min(size / img.width, size / img.height)
        w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
        img = img.resize((w, h), Image.BICUBIC if scale > 1 else Image.LANCZOS)
    tile = Image.new('RGB', (size, size), background)
    tile.paste(img, ((size - w) // 2, (size - h) // 2))
    return tile, scale


def placeholder_tile(size, text, font):
    from PIL import Image, ImageDraw
    tile = Image.new('RGB', (size, size), (225, 225, 225))
    draw = ImageDraw.Draw(tile)
    for i, line in enumerate(text.split('\n')):
        draw.text((4, 4 + i * (font.size + 2)), fit_text(line, font, size - 8), fill=(90, 90, 90), font=font)
    return tile


def draw_box(draw, box, scale, offset, colour=(255, 255, 255), width=2):
    """box [h0, h1, w0, w1) in image pixels drawn at `scale` from `offset` (x, y)."""
    h0, h1, w0, w1 = box
    x0, y0 = offset[0] + w0 * scale, offset[1] + h0 * scale
    x1, y1 = offset[0] + w1 * scale - 1, offset[1] + h1 * scale - 1
    draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)


def new_figure(width, height):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=100)
