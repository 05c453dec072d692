"""Animals with Attributes 2: no official split; a seeded per-class test fraction."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

from data.sources.common import (Context, IMAGE_SUFFIXES, Item, Listing, MissingComponent, PrepareError, order_notes,
                                 record_class_id, seeded_test_files, warn)


def locate_awa2(ctx: Context) -> dict:
    """Find Animals_with_Attributes2 (JPEGImages/ and classes.txt)."""
    jpeg = ctx.find("JPEGImages", is_dir=True, hint=" (AwA2-data.zip)")
    if not (jpeg.parent / "classes.txt").is_file():
        raise MissingComponent(f"cannot find file Animals_with_Attributes2/classes.txt "
                               f"(AwA2-data.zip) in {ctx.described}")
    return {"jpeg": jpeg, "classes": jpeg.parent / "classes.txt"}


def awa2_wanted(name: str) -> bool:
    """Extract only JPEGImages/ and classes.txt from AwA2-data.zip."""
    return "/JPEGImages/" in f"/{name}" or name.rsplit("/", 1)[-1] == "classes.txt"


def parse_awa2_classes(path: Path) -> List[tuple]:
    """(id, name) pairs from AWA2 classes.txt lines like ``1\\tantelope``."""
    pairs = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise PrepareError(f"classes.txt line {lineno}: expected '<id> <name>', got {line!r}")
        pairs.append((int(parts[0]), parts[1]))
    if not pairs:
        raise PrepareError("classes.txt lists no classes")
    return pairs


def collect_awa2(ctx: Context, loc: dict) -> Listing:
    """Seeded stratified split of JPEGImages/<class>/ for the classes in classes.txt."""
    fraction, seed = ctx.opts["awa2_test_fraction"], ctx.opts["awa2_seed"]
    pairs = parse_awa2_classes(loc["classes"])
    items: List[Item] = []
    class_ids: Dict[str, Optional[int]] = {}
    notes: List[str] = []
    for cid, cls in pairs:
        folder = loc["jpeg"] / cls
        if not folder.is_dir():
            raise PrepareError(f"missing folder JPEGImages/{cls}/ (listed in classes.txt)")
        files = sorted(e.name for e in os.scandir(folder)
                       if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise PrepareError(f"folder JPEGImages/{cls}/ holds no images")
        record_class_id(class_ids, cls, cid, "classes.txt")
        test = set(seeded_test_files(cls, files, fraction, seed))
        for fname in files:
            split = "test" if fname in test else "train"
            items.append(Item(split, cls, fname, f"JPEGImages/{cls}/{fname}", source=folder / fname))
    extra = sorted(e.name for e in os.scandir(loc["jpeg"])
                   if e.is_dir() and e.name not in class_ids)
    if extra:
        notes.append(f"folders in JPEGImages/ not listed in classes.txt were ignored: {extra}")
        warn(notes[-1])
    return Listing(
        items=items,
        recipe=(f"no official split: per class, files sorted by sha256('{seed}/<class>/<file>'); "
                f"the first round(n * {fraction}) (at least 1, at most n - 1) go to test, "
                "the rest to train"),
        class_ids=class_ids,
        expected={"total": {"images": 37322}, "train": {"classes": 50}, "test": {"classes": 50}},
        notes=notes + order_notes(class_ids),
    )
