"""Oxford 102 Flowers: the splits of setid.mat (trn, val, tst), the labels of imagelabels.mat."""
from __future__ import annotations

from typing import Dict, List, Optional

from data.sources.common import (Context, Item, Listing, PrepareError, SPLITS, load_mat, mat_ints, mat_key,
                                 record_class_id, require_file)


# Oxford 102 Flowers official splits (keys of setid.mat) and their sizes.
FLOWER_SPLIT_KEYS = {"trn": "trnid", "val": "valid", "tst": "tstid"}
FLOWER_SPLIT_SIZES = {"trn": 1020, "val": 1020, "tst": 6149}


def locate_flowers(ctx: Context) -> dict:
    """Find jpg/ (102flowers.tgz), imagelabels.mat and setid.mat."""
    return {
        "jpg": ctx.find("jpg", is_dir=True, hint=" (102flowers.tgz)"),
        "labels": ctx.find("imagelabels.mat", hint=" (downloaded beside 102flowers.tgz)"),
        "setid": ctx.find("setid.mat", hint=" (downloaded beside 102flowers.tgz)"),
    }


def collect_flowers(ctx: Context, loc: dict) -> Listing:
    """Train/test from setid.mat per --flowers-train/--flowers-test; folders 001..102."""
    # torchvision.datasets.Flowers102 verifies the MD5 sums of imagelabels.mat and
    # setid.mat before reading them, so it rejects any copy that is not byte-identical
    # to the official files (the miniature archives of the tests, for one).  The two
    # files are plain MATLAB arrays, read here directly with scipy.io.loadmat.
    labels = mat_ints(mat_key(load_mat(loc["labels"], "imagelabels.mat"), "labels", "imagelabels.mat"))
    setid = load_mat(loc["setid"], "setid.mat")
    chosen = {"train": ctx.opts["flowers_train"], "test": ctx.opts["flowers_test"]}
    items: List[Item] = []
    class_ids: Dict[str, Optional[int]] = {}
    for split in SPLITS:
        ids = set()
        for key in chosen[split]:
            ids.update(mat_ints(mat_key(setid, FLOWER_SPLIT_KEYS[key], "setid.mat")))
        for image_id in sorted(ids):
            if not 1 <= image_id <= len(labels):
                raise PrepareError(f"setid.mat lists image {image_id}, but imagelabels.mat "
                                   f"has {len(labels)} labels")
            label = labels[image_id - 1]
            folder = f"{label:03d}"
            record_class_id(class_ids, folder, label, "imagelabels.mat")
            name = f"image_{image_id:05d}.jpg"
            image = loc["jpg"] / name
            require_file(image, f"jpg/{name}", "listed in setid.mat")
            items.append(Item(split, folder, name, f"jpg/{name}", source=image))
    describe = {s: "+".join(FLOWER_SPLIT_KEYS[k] for k in chosen[s]) for s in SPLITS}
    return Listing(
        items=items,
        recipe=f"train = setid.mat {describe['train']}, test = setid.mat {describe['test']}; "
               "class folder = imagelabels.mat label, zero-padded to 3 digits",
        class_ids=class_ids,
        expected={s: {"images": sum(FLOWER_SPLIT_SIZES[k] for k in chosen[s]), "classes": 102}
                  for s in SPLITS},
    )
