"""Stanford Dogs: the official train / test lists, a mask and the boxes from each VOC annotation."""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from data.sources.common import (Context, Item, Listing, PrepareError, SPLITS, describe_exc, load_mat, mat_ints,
                                 mat_key, mat_strings, order_notes, record_class_id, require_file)


def locate_dogs(ctx: Context) -> dict:
    """Find train_list.mat, test_list.mat (lists.tar), Images/ and Annotation/."""
    return {
        "train": ctx.find("train_list.mat", hint=" (lists.tar)"),
        "test": ctx.find("test_list.mat", hint=" (lists.tar)"),
        "images": ctx.find("Images", is_dir=True, hint=" (images.tar)"),
        "annotations": ctx.find("Annotation", is_dir=True, hint=" (annotation.tar)"),
    }


def read_voc_boxes(path: Path, shown: str) -> List[List[float]]:
    """[xmin, ymin, xmax, ymax] of every <object><bndbox> in a Pascal-VOC XML file."""
    try:
        root = ET.parse(path).getroot()
        boxes = []
        for obj in root.iter("object"):
            bb = obj.find("bndbox")
            if bb is None:
                continue
            boxes.append([float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
    except (ET.ParseError, TypeError, ValueError, OSError) as exc:
        raise PrepareError(f"cannot parse annotation {shown}: {describe_exc(exc)}") from None
    return boxes


def voc_to_pixel_box(box: Sequence[float], width: int, height: int) -> List[int]:
    """VOC box (1-based, inclusive) -> [x0, y0, x1, y1) in 0-based pixels, clamped to the image."""
    xmin, ymin, xmax, ymax = (int(round(v)) for v in box)
    x0 = min(max(xmin - 1, 0), width)
    y0 = min(max(ymin - 1, 0), height)
    x1 = min(max(xmax, x0), width)
    y1 = min(max(ymax, y0), height)
    return [x0, y0, x1, y1]


def dog_masks(xml: Path, shown: str, width: int, height: int) -> Dict[str, np.ndarray]:
    """Boxes of a Stanford Dogs annotation and their union rasterised as ``object``."""
    boxes = np.array([voc_to_pixel_box(b, width, height) for b in read_voc_boxes(xml, shown)],
                     dtype=np.int32).reshape(-1, 4)
    obj = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        obj[y0:y1, x0:x1] = True
    return {"object": obj, "boxes": boxes}


def collect_dogs(ctx: Context, loc: dict) -> Listing:
    """train_list.mat -> train, test_list.mat -> test; class folder = synset folder name."""
    items: List[Item] = []
    class_ids: Dict[str, Optional[int]] = {}
    for split in SPLITS:
        shown = f"{split}_list.mat"
        mat = load_mat(loc[split], shown)
        files = mat_strings(mat_key(mat, "file_list", shown))
        labels = mat_ints(mat_key(mat, "labels", shown))
        if "annotation_list" in mat:
            anns = mat_strings(mat["annotation_list"])
        else:
            anns = [os.path.splitext(f)[0] for f in files]
        if not (len(files) == len(labels) == len(anns)):
            raise PrepareError(f"{shown}: file_list, annotation_list and labels differ in length")
        for rel, ann_rel, label in zip(files, anns, labels):
            parts = rel.replace("\\", "/").split("/")
            if len(parts) != 2:
                raise PrepareError(f"{shown}: unexpected entry {rel!r} (want <synset>/<file>.jpg)")
            folder, fname = parts
            record_class_id(class_ids, folder, label, shown)
            image = loc["images"] / folder / fname
            xml = loc["annotations"] / ann_rel
            require_file(image, f"Images/{rel}", f"listed in {shown}")
            require_file(xml, f"Annotation/{ann_rel}", f"listed in {shown}")
            items.append(Item(split, folder, fname, f"Images/{rel}", source=image,
                              masks=partial(dog_masks, xml, f"Annotation/{ann_rel}")))
    return Listing(
        items=items,
        recipe="train = lists/train_list.mat, test = lists/test_list.mat (official split)",
        class_ids=class_ids,
        expected={"train": {"images": 12000, "classes": 120}, "test": {"images": 8580, "classes": 120}},
        masks={"source": "Annotation/ (Pascal-VOC XML)",
               "boxes": "VOC 1-based inclusive coordinates converted to 0-based [x0, y0, x1, y1) "
                        "with x1/y1 exclusive, clamped to the image",
               "object": "union of the boxes"},
        notes=order_notes(class_ids),
    )
