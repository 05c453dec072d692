"""STL-10: the labelled binary train / test arrays rendered to PNG files."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import List

import numpy as np
from PIL import Image

from data.sources.common import Context, Item, Listing, MissingComponent, PrepareError, SPLITS, order_notes


# STL-10 binary format: uint8, 3 x 96 x 96 per image, each channel stored column-major.
STL_SIDE = 96
STL_IMAGE_BYTES = 3 * STL_SIDE * STL_SIDE
STL_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt")


def locate_stl10(ctx: Context) -> dict:
    """Find the stl10_binary folder with the labelled train/test files and class_names.txt."""
    base = ctx.find("train_X.bin", hint=" (stl10_binary.tar.gz)").parent
    for name in STL_FILES:
        if not (base / name).is_file():
            raise MissingComponent(f"cannot find file stl10_binary/{name} (stl10_binary.tar.gz) "
                                   f"in {ctx.described}")
    return {"base": base}


def stl_wanted(name: str) -> bool:
    """Only the labelled files are extracted (skips the 2.6 GB unlabeled_X.bin)."""
    return name.rsplit("/", 1)[-1] in STL_FILES


def render_stl(images: np.ndarray, index: int, dest: Path) -> None:
    """Write image ``index`` of an (N, 3, 96, 96) column-major STL-10 array as PNG."""
    # per channel the bytes run down the columns: [channel, column, row] -> [row, column, channel]
    pixels = np.ascontiguousarray(np.asarray(images[index]).transpose(2, 1, 0))
    Image.fromarray(pixels).save(dest, format="PNG")


def collect_stl10(ctx: Context, loc: dict) -> Listing:
    """train_X/y.bin -> train, test_X/y.bin -> test, decoded to PNG; folders from class_names.txt."""
    # torchvision.datasets.STL10 checks the MD5 of every .bin file (unlabeled_X.bin
    # included) even with download=False, so it refuses partial or miniature copies.
    # The format is a flat uint8 array, parsed here with numpy.
    base = loc["base"]
    names = [ln.strip() for ln in (base / "class_names.txt").read_text().splitlines() if ln.strip()]
    if not names or any("/" in n or n.startswith(".") for n in names):
        raise PrepareError("stl10_binary/class_names.txt holds no usable class names")
    items: List[Item] = []
    class_ids = {}
    for split in SPLITS:
        labels = np.fromfile(base / f"{split}_y.bin", dtype=np.uint8)
        xfile = base / f"{split}_X.bin"
        size = xfile.stat().st_size
        if size != labels.size * STL_IMAGE_BYTES or labels.size == 0:
            raise PrepareError(
                f"stl10_binary/{split}_X.bin holds {size} bytes but {split}_y.bin has {labels.size} "
                f"labels ({labels.size * STL_IMAGE_BYTES} bytes expected): truncated or corrupt file")
        bad = labels[(labels < 1) | (labels > len(names))]
        if bad.size:
            raise PrepareError(f"stl10_binary/{split}_y.bin holds label {int(bad[0])} outside 1..{len(names)}")
        images = np.memmap(xfile, dtype=np.uint8, mode="r",
                           shape=(labels.size, 3, STL_SIDE, STL_SIDE))
        for index, label in enumerate(labels.tolist()):
            folder = names[label - 1]
            class_ids[folder] = label
            items.append(Item(split, folder, f"{split}_{index:05d}.png", f"{split}_X.bin[{index}]",
                              render=partial(render_stl, images, index)))
    return Listing(
        items=items,
        recipe="train = train_X.bin/train_y.bin (all 5000 labelled training images; the "
               "10 fold_indices are not used), test = test_X.bin/test_y.bin; unlabeled_X.bin "
               "not used; images decoded to PNG named <split>_<index in the .bin>.png",
        class_ids=class_ids,
        expected={"train": {"images": 5000, "classes": 10}, "test": {"images": 8000, "classes": 10}},
        notes=order_notes(class_ids),
    )
