"""Oxford-IIIT Pet: the official trainval / test lists, a foreground mask from each trimap."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

from data.sources.common import (Context, Item, Listing, MissingComponent, PrepareError, describe_exc, order_notes,
                                 record_class_id, require_file, tv_root)


# Oxford-IIIT Pet trimap values: 1 foreground, 2 background, 3 boundary / not classified.
PET_FOREGROUND = {"fg_boundary": (1, 3), "fg": (1,)}


def locate_pets(ctx: Context) -> dict:
    """Find annotations/ (with trainval.txt, test.txt, trimaps/) and images/."""
    ann = ctx.find("annotations/trainval.txt", hint=" (annotations.tar.gz)").parent
    if not (ann / "test.txt").is_file():
        raise MissingComponent(f"cannot find file annotations/test.txt (annotations.tar.gz) "
                               f"in {ctx.described}")
    if not (ann / "trimaps").is_dir():
        raise MissingComponent(f"cannot find folder annotations/trimaps (annotations.tar.gz) "
                               f"in {ctx.described}")
    images = ann.parent / "images"
    if not images.is_dir():
        images = ctx.find("images", is_dir=True, hint=" (images.tar.gz)")
    return {"annotations": ann, "images": images}


def pet_masks(trimap: Path, foreground: tuple, width: int, height: int) -> Dict[str, np.ndarray]:
    """Foreground mask from an Oxford-IIIT Pet trimap (values in ``foreground`` count)."""
    with Image.open(trimap) as im:
        arr = np.array(im)
    if arr.ndim == 3:
        arr = arr[..., 0]
    return {"object": np.isin(arr, foreground)}


def collect_pets(ctx: Context, loc: dict) -> Listing:
    """trainval.txt -> train, test.txt -> test; class folder = lower-cased breed name."""
    from torchvision.datasets import OxfordIIITPet

    root = tv_root(ctx.ws, "pets")
    (root / "oxford-iiit-pet").mkdir()
    (root / "oxford-iiit-pet" / "images").symlink_to(loc["images"].resolve())
    (root / "oxford-iiit-pet" / "annotations").symlink_to(loc["annotations"].resolve())
    fg = PET_FOREGROUND[ctx.opts["pets_foreground"]]
    items: List[Item] = []
    class_ids: Dict[str, Optional[int]] = {}
    for split, tv_split in (("train", "trainval"), ("test", "test")):
        listed = f"annotations/{tv_split}.txt"
        try:
            ds = OxfordIIITPet(str(root), split=tv_split, download=False)
            # torchvision keeps the parsed list in these attributes; reading them avoids
            # decoding every image through __getitem__.
            paths, labels = list(ds._images), list(ds._labels)
        except (ValueError, OSError, RuntimeError, AttributeError, IndexError) as exc:
            raise PrepareError(f"cannot parse {listed}: {describe_exc(exc)}") from None
        for path, label in zip(paths, labels):
            stem = Path(path).stem
            folder = stem.rsplit("_", 1)[0].lower()
            record_class_id(class_ids, folder, int(label) + 1, listed)
            image = loc["images"] / f"{stem}.jpg"
            trimap = loc["annotations"] / "trimaps" / f"{stem}.png"
            require_file(image, f"images/{stem}.jpg", f"listed in {listed}")
            require_file(trimap, f"annotations/trimaps/{stem}.png", f"listed in {listed}")
            items.append(Item(split, folder, image.name, f"images/{image.name}", source=image,
                              masks=partial(pet_masks, trimap, fg)))
    return Listing(
        items=items,
        recipe="train = annotations/trainval.txt (official trainval), "
               "test = annotations/test.txt (official test)",
        class_ids=class_ids,
        expected={"train": {"images": 3680, "classes": 37}, "test": {"images": 3669, "classes": 37}},
        masks={"source": "annotations/trimaps", "object": f"trimap value in {list(fg)}",
               "trimap_values": "1 foreground, 2 background, 3 boundary/not classified"},
        notes=order_notes(class_ids),
    )
