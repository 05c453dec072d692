"""Food-101: the official meta/train.json and meta/test.json splits."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from data.sources.common import (Context, Item, Listing, MissingComponent, PrepareError, SPLITS, describe_exc,
                                 order_notes, record_class_id, require_file, tv_root)


def locate_food101(ctx: Context) -> dict:
    """Find the food-101 folder (meta/train.json, meta/test.json, images/)."""
    meta = ctx.find("meta/train.json", hint=" (food-101.tar.gz)").parent
    if not (meta / "test.json").is_file():
        raise MissingComponent(f"cannot find file food-101/meta/test.json (food-101.tar.gz) "
                               f"in {ctx.described}")
    if not (meta.parent / "images").is_dir():
        raise MissingComponent(f"cannot find folder food-101/images (food-101.tar.gz) "
                               f"in {ctx.described}")
    return {"base": meta.parent}


def collect_food101(ctx: Context, loc: dict) -> Listing:
    """meta/train.json -> train, meta/test.json -> test, read through torchvision's Food101."""
    from torchvision.datasets import Food101

    base = loc["base"]
    root = tv_root(ctx.ws, "food")
    (root / "food-101").symlink_to(base.resolve())
    tv_images = root / "food-101" / "images"
    classes_txt = base / "meta" / "classes.txt"
    official = {}
    if classes_txt.is_file():
        official = {c.strip(): i for i, c in
                    enumerate((c for c in classes_txt.read_text().splitlines() if c.strip()), 1)}
    items: List[Item] = []
    class_ids: Dict[str, Optional[int]] = {}
    for split in SPLITS:
        try:
            # loader=str makes ds[i] return the image path instead of decoding it
            ds = Food101(str(root), split=split, download=False, loader=str)
            pairs = [ds[i] for i in range(len(ds))]
        except (ValueError, OSError, RuntimeError, AttributeError, TypeError) as exc:
            raise PrepareError(f"cannot read food-101/meta/{split}.json: {describe_exc(exc)}") from None
        for path, label in pairs:
            rel = Path(path).relative_to(tv_images)
            folder = ds.classes[label]
            record_class_id(class_ids, folder, official.get(folder), f"meta/{split}.json")
            image = base / "images" / rel
            require_file(image, f"food-101/images/{rel.as_posix()}", f"listed in meta/{split}.json")
            items.append(Item(split, folder, rel.name, f"images/{rel.as_posix()}", source=image))
    return Listing(
        items=items,
        recipe="train = meta/train.json, test = meta/test.json (official split)",
        class_ids=class_ids,
        expected={"train": {"images": 75750, "classes": 101}, "test": {"images": 25250, "classes": 101}},
        notes=order_notes(class_ids),
    )
