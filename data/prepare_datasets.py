#!/usr/bin/env python
"""Convert the six Learnable-Visual-Words benchmarks into torchvision ImageFolder layout.

    python data/prepare_datasets.py NAME --src DIR_OR_ARCHIVE [--src ...] --out data/NAME

NAME is one of pets, dogs, awa2, flowers, stl10, food101.  ``--src`` is the official
archive (repeat it for datasets that ship several), a folder holding the official
archives, or an already extracted folder.  The result is

    OUT/train/<class>/<image>      OUT/test/<class>/<image>      OUT/manifest.json

plus, for Oxford-IIIT Pet (trimaps) and Stanford Dogs (bounding boxes), a
``<stem>.masks.npz`` beside every image with an ``object`` foreground mask (bool, H x W)
and, for Dogs, ``boxes`` (int32, M x 4, [x0, y0, x1, y1), image pixels).

Guarantees: counts are compared with the official release (warning, or an error with
``--strict``); train and test are checked to be disjoint by sha256 of the file bytes
(an error unless ``--allow-overlap``); images PIL cannot decode are listed by path (an
error unless ``--skip-unreadable``); the tree is built in a hidden sibling folder and
renamed into place only once complete, with ``manifest.json`` written last; a second
run with the same sources and options finds the matching manifest and does nothing.

User documentation: data/DATASETS.md.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import re
import secrets
import shutil
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

TOOL = "prepare_datasets"
FORMAT_VERSION = 1
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
MASK_SUFFIX = ".masks.npz"
SAMPLE_MEMBERS = 40          # archive members read to recognise which dataset it holds
SEARCH_DEPTH = 3             # how deep below a source folder the dataset layout is searched

# Oxford-IIIT Pet trimap values: 1 foreground, 2 background, 3 boundary / not classified.
PET_FOREGROUND = {"fg_boundary": (1, 3), "fg": (1,)}
# Oxford 102 Flowers official splits (keys of setid.mat) and their sizes.
FLOWER_SPLIT_KEYS = {"trn": "trnid", "val": "valid", "tst": "tstid"}
FLOWER_SPLIT_SIZES = {"trn": 1020, "val": 1020, "tst": 6149}
# STL-10 binary format: uint8, 3 x 96 x 96 per image, each channel stored column-major.
STL_SIDE = 96
STL_IMAGE_BYTES = 3 * STL_SIDE * STL_SIDE
STL_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt")

# Options that only apply to one dataset: option -> (dataset, default).
DATASET_OPTIONS = {
    "pets_foreground": ("pets", "fg_boundary"),
    "flowers_train": ("flowers", "trn,val"),
    "flowers_test": ("flowers", "tst"),
    "awa2_test_fraction": ("awa2", 0.3),
    "awa2_seed": ("awa2", 0),
}


class PrepareError(Exception):
    """A failure reported to the user as one line, without a traceback."""


class MissingComponent(PrepareError):
    """A file or folder of the official layout is not among the sources."""


# --------------------------------------------------------------------------- data types


@dataclass
class Item:
    """One image to place in the output tree.

    Exactly one of ``source`` (an existing file, linked or copied) and ``render``
    (a function writing the file, used for STL-10) is set.  ``masks(width, height)``
    returns the arrays of the ``.masks.npz`` file, or is None when the dataset has none.
    """

    split: str
    label: str
    name: str
    origin: str
    source: Optional[Path] = None
    render: Optional[Callable[[Path], None]] = None
    masks: Optional[Callable[[int, int], Dict[str, np.ndarray]]] = None

    @property
    def rel(self) -> str:
        """Path of the image relative to the output folder."""
        return f"{self.split}/{self.label}/{self.name}"


@dataclass
class Listing:
    """What a dataset adapter found: the images and how the split was made."""

    items: List[Item]
    recipe: str
    class_ids: Dict[str, Optional[int]]
    expected: Dict[str, Dict[str, int]]
    masks: Optional[dict] = None
    notes: List[str] = field(default_factory=list)


@dataclass
class Context:
    """Where an adapter looks for the dataset, and the options it was given."""

    roots: List[Path]
    ws: Path
    opts: dict
    described: str

    def find(self, rel: str, is_dir: bool = False, hint: str = "") -> Path:
        """Return the shallowest ``<root>/.../rel`` or raise MissingComponent."""
        hit = find_entry(self.roots, rel, is_dir)
        if hit is None:
            kind = "folder" if is_dir else "file"
            raise MissingComponent(f"cannot find {kind} {rel}{hint} in {self.described}")
        return hit


@dataclass(frozen=True)
class Spec:
    """Everything the generic machinery needs to know about one dataset."""

    name: str
    title: str
    archives: tuple
    member_patterns: tuple
    dir_signatures: tuple
    locate: Callable[[Context], dict]
    collect: Callable[[Context, dict], Listing]
    wanted: Callable[[str], bool]


# --------------------------------------------------------------------------- messages


def info(msg: str) -> None:
    """Print a progress/info line on stdout."""
    print(msg, flush=True)


def warn(msg: str) -> None:
    """Print a warning line on stderr."""
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


def describe_exc(exc: BaseException) -> str:
    """One-line description of an exception."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def progress(iterable=None, total=None, desc: str = ""):
    """A tqdm bar on stderr, hidden when stderr is not a terminal."""
    return tqdm(iterable, total=total, desc=desc, unit="img", file=sys.stderr,
                disable=None, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------- searching


def iter_dirs(roots: Sequence[Path], max_depth: int = SEARCH_DEPTH):
    """Yield folders breadth-first below every root (roots first), skipping hidden ones."""
    level = [Path(r) for r in roots]
    for depth in range(max_depth + 1):
        deeper = []
        for folder in level:
            yield folder
            if depth == max_depth:
                continue
            try:
                with os.scandir(folder) as entries:
                    subs = sorted(e.path for e in entries
                                  if not e.name.startswith(".") and e.is_dir())
            except OSError:
                continue
            deeper.extend(Path(s) for s in subs)
        level = deeper


def find_entry(roots: Sequence[Path], rel: str, is_dir: Optional[bool] = False) -> Optional[Path]:
    """Shallowest existing ``<folder>/rel`` below the roots (is_dir None: file or folder)."""
    for folder in iter_dirs(roots):
        candidate = folder / rel
        if is_dir is None:
            ok = candidate.exists()
        else:
            ok = candidate.is_dir() if is_dir else candidate.is_file()
        if ok:
            return candidate
    return None


def require_file(path: Path, shown: str, context: str = "") -> None:
    """Raise a missing-file error naming ``shown`` unless ``path`` is a file."""
    if not path.is_file():
        where = f" ({context})" if context else ""
        raise PrepareError(f"missing file {shown}{where}: not found in the source")


# --------------------------------------------------------------------------- archives


def archive_kind(path: Path) -> Optional[str]:
    """'zip', 'tar' or None, judged by the file name."""
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    return None


def normalize_member(name: str) -> str:
    """Archive member name without a leading './' or '/'."""
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def sample_members(path: Path, limit: int = SAMPLE_MEMBERS) -> List[str]:
    """Names of the first ``limit`` files in an archive (cheap: reads only its start)."""
    names: List[str] = []
    try:
        if archive_kind(path) == "zip":
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if not n.endswith("/")][:limit]
        else:
            with tarfile.open(path, "r:*") as tf:
                for member in tf:
                    if member.isfile():
                        names.append(member.name)
                        if len(names) >= limit:
                            break
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error,
            lzma.LZMAError, ValueError) as exc:
        raise PrepareError(f"cannot read archive {path}: {describe_exc(exc)}") from None
    return [normalize_member(n) for n in names]


def identify_members(names: Sequence[str], specs: Dict[str, Spec]) -> Dict[str, str]:
    """Datasets whose archive-member patterns match, each with one matching name."""
    found: Dict[str, str] = {}
    for spec in specs.values():
        for name in names:
            if any(re.search(p, name) for p in spec.member_patterns):
                found[spec.name] = name
                break
    return found


def _extract_tar_member(tf: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    """Extract one regular file, refusing paths that leave ``dest``."""
    if hasattr(tarfile, "data_filter"):
        tf.extract(member, dest, filter="data")
        return
    target = (dest / member.name).resolve()
    if not str(target).startswith(str(dest.resolve()) + os.sep):
        raise PrepareError(f"unsafe member path {member.name!r} in archive")
    tf.extract(member, dest)


def extract_archive(path: Path, dest: Path, wanted: Callable[[str], bool]) -> int:
    """Extract the wanted regular files of a tar/zip archive into ``dest``; return how many."""
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    try:
        if archive_kind(path) == "zip":
            with zipfile.ZipFile(path) as zf:
                infos = [i for i in zf.infolist()
                         if not i.is_dir() and wanted(normalize_member(i.filename))]
                for info_ in progress(infos, desc=f"extract {path.name}"):
                    zf.extract(info_, dest)
                    count += 1
        else:
            with tarfile.open(path, "r:*") as tf:
                bar = progress(desc=f"extract {path.name}")
                for member in tf:
                    if member.isfile() and wanted(normalize_member(member.name)):
                        _extract_tar_member(tf, member, dest)
                        count += 1
                        bar.update()
                bar.close()
    except PrepareError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error,
            lzma.LZMAError, ValueError) as exc:
        raise PrepareError(f"cannot read archive {path}: {describe_exc(exc)}") from None
    return count


# --------------------------------------------------------------------------- sources


def classify_sources(srcs: Sequence[Path]):
    """Split --src values into folders, archives and loose files (e.g. .mat); check existence."""
    dirs, archives, loose = [], [], []
    for src in srcs:
        if not src.exists():
            raise PrepareError(f"source not found: {src}")
        if src.is_dir():
            dirs.append(src)
        elif archive_kind(src):
            archives.append(src)
        else:
            loose.append(src)
    return dirs, archives, loose


def stage_loose(files: Sequence[Path], ws: Path) -> Path:
    """Gather loose source files into one workspace folder (as symlinks) to search them."""
    folder = ws / "loose"
    folder.mkdir()
    for f in files:
        link = folder / f.name
        if link.exists() or link.is_symlink():
            raise PrepareError(f"two --src files share the name {f.name}")
        link.symlink_to(f.resolve())
    return folder


def extract_checked(spec: Spec, archive: Path, ws: Path, specs: Dict[str, Spec]) -> Path:
    """Check that an archive belongs to ``spec`` (by its first members), then extract it."""
    found = identify_members(sample_members(archive), specs)
    if found and spec.name not in found:
        other = sorted(found)[0]
        raise PrepareError(
            f"{archive} looks like {specs[other].title} (member {found[other]}), "
            f"not {spec.title}; convert it with `prepare_datasets.py {other}`")
    dest = ws / f"archive-{len(list(ws.glob('archive-*')))}"
    n = extract_archive(archive, dest, spec.wanted)
    info(f"extracted {n} files from {archive.name}")
    return dest


def folder_archives(dirs: Sequence[Path], spec: Spec) -> List[Path]:
    """Archives at the top of source folders: the official ones for ``spec``, else all."""
    found = []
    for d in dirs:
        found.extend(p for p in sorted(d.iterdir()) if p.is_file() and archive_kind(p))
    official = [p for p in found if p.name in spec.archives]
    return official or found


def detect_datasets(roots: Sequence[Path], specs: Dict[str, Spec]) -> Dict[str, Path]:
    """Datasets whose characteristic files or folders appear below the roots."""
    hits = {}
    for spec in specs.values():
        for rel in spec.dir_signatures:
            hit = find_entry(roots, rel, None)
            if hit is not None:
                hits[spec.name] = hit
                break
    return hits


def diagnose(spec: Spec, roots: Sequence[Path], err: MissingComponent,
             specs: Dict[str, Spec]) -> PrepareError:
    """Turn a missing component into a wrong-dataset error when the source is another dataset."""
    hits = detect_datasets(roots, specs)
    others = {n: p for n, p in hits.items() if n != spec.name}
    if others and spec.name not in hits:
        name, path = sorted(others.items())[0]
        shown = "/".join(path.parts[-2:])
        return PrepareError(
            f"the source looks like {specs[name].title} (found {shown}), not {spec.title}; "
            f"convert it with `prepare_datasets.py {name}`")
    return PrepareError(f"{spec.title}: {err}")


def gather_listing(spec: Spec, srcs: Sequence[Path], ws: Path, opts: dict,
                   specs: Dict[str, Spec]) -> Listing:
    """Stage the sources (extracting archives) and let the adapter list the images."""
    dirs, archives, loose = classify_sources(srcs)
    roots = list(dirs)
    if loose:
        roots.append(stage_loose(loose, ws))
    for archive in archives:
        roots.append(extract_checked(spec, archive, ws, specs))
    ctx = Context(roots, ws, opts, ", ".join(str(s) for s in srcs))
    try:
        located = spec.locate(ctx)
    except MissingComponent as err:
        pending = folder_archives(dirs, spec)
        if not pending:
            raise diagnose(spec, roots, err, specs) from None
        for archive in pending:
            ctx.roots.append(extract_checked(spec, archive, ws, specs))
        try:
            located = spec.locate(ctx)
        except MissingComponent as err2:
            raise diagnose(spec, ctx.roots, err2, specs) from None
    return spec.collect(ctx, located)


# --------------------------------------------------------------------------- helpers for adapters


def load_mat(path: Path, shown: str) -> dict:
    """scipy.io.loadmat with a one-line error naming the file."""
    import scipy.io

    try:
        return scipy.io.loadmat(str(path))
    except Exception as exc:  # scipy raises several unrelated types for corrupt files
        raise PrepareError(f"cannot read {shown}: {describe_exc(exc)}") from None


def mat_key(mat: dict, key: str, shown: str):
    """``mat[key]`` or an error naming the file and the key."""
    if key not in mat:
        raise PrepareError(f"{shown} has no variable {key!r} (wrong or damaged file)")
    return mat[key]


def mat_ints(arr) -> List[int]:
    """Flatten a MATLAB numeric array to Python ints."""
    return [int(v) for v in np.asarray(arr).ravel()]


def mat_strings(arr) -> List[str]:
    """Flatten a MATLAB cell array of strings (as loaded by loadmat) to Python strings."""
    out = []
    for cell in np.asarray(arr, dtype=object).ravel():
        inner = np.asarray(cell).ravel()
        out.append(str(inner[0]) if inner.size else "")
    return out


def record_class_id(class_ids: dict, folder: str, cid: Optional[int], where: str) -> None:
    """Remember the official id of a class folder; conflicting ids are an error."""
    if folder in class_ids and class_ids[folder] != cid:
        raise PrepareError(f"class {folder} has ids {class_ids[folder]} and {cid} in {where}")
    class_ids[folder] = cid


def order_notes(class_ids: Dict[str, Optional[int]]) -> List[str]:
    """Note when ImageFolder's alphabetical label order differs from the official ids."""
    known = {f: i for f, i in class_ids.items() if i is not None}
    by_id: Dict[int, str] = {}
    for folder, cid in known.items():
        if cid in by_id:
            raise PrepareError(f"classes {by_id[cid]} and {folder} share the official id {cid}")
        by_id[cid] = folder
    if sorted(known) != sorted(known, key=known.get):
        return ["ImageFolder label order (alphabetical folders) differs from the official "
                "class ids; see class_ids for the mapping"]
    return []


def tv_root(ws: Path, tag: str) -> Path:
    """A fresh workspace folder to build the layout torchvision expects (via symlinks)."""
    root = ws / f"tv-{tag}"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()
    return root


def want_all(_name: str) -> bool:
    """Archive member filter that keeps everything."""
    return True


# --------------------------------------------------------------------------- Oxford-IIIT Pet


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


# --------------------------------------------------------------------------- Stanford Dogs


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


# --------------------------------------------------------------------------- Oxford 102 Flowers


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


# --------------------------------------------------------------------------- STL-10


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


# --------------------------------------------------------------------------- Food-101


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


# --------------------------------------------------------------------------- AWA2


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


def awa2_test_count(n: int, fraction: float) -> int:
    """Test images for a class of n: round(n * fraction), at least 1 and at most n - 1."""
    if n < 2:
        return 0
    return min(max(int(n * fraction + 0.5), 1), n - 1)


def awa2_split_key(seed: int, cls: str, fname: str) -> str:
    """Sort key of the seeded split: sha256 of '<seed>/<class>/<file name>'."""
    return hashlib.sha256(f"{seed}/{cls}/{fname}".encode()).hexdigest()


def awa2_test_files(cls: str, files: Sequence[str], fraction: float, seed: int) -> List[str]:
    """The files of one class that go to test (stable across platforms and library versions)."""
    ordered = sorted(files, key=lambda f: awa2_split_key(seed, cls, f))
    return ordered[:awa2_test_count(len(files), fraction)]


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
        test = set(awa2_test_files(cls, files, fraction, seed))
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


# --------------------------------------------------------------------------- registry


def dataset_specs() -> Dict[str, Spec]:
    """The six supported datasets."""
    specs = [
        Spec("pets", "Oxford-IIIT Pet", ("images.tar.gz", "annotations.tar.gz"),
             (r"^images/[^/]+_\d+\.\w+$", r"^annotations/"),
             ("annotations/trainval.txt", "annotations/trimaps"),
             locate_pets, collect_pets, want_all),
        Spec("dogs", "Stanford Dogs", ("images.tar", "annotation.tar", "lists.tar"),
             (r"^(?:Images|Annotation)/n\d+-", r"^(?:file|train|test)_list\.mat$"),
             ("train_list.mat", "file_list.mat", "Annotation"),
             locate_dogs, collect_dogs, want_all),
        Spec("awa2", "Animals with Attributes 2", ("AwA2-data.zip",),
             (r"^Animals_with_Attributes2/",),
             ("Animals_with_Attributes2", "JPEGImages"),
             locate_awa2, collect_awa2, awa2_wanted),
        Spec("flowers", "Oxford 102 Flowers", ("102flowers.tgz",),
             (r"^jpg/image_\d+\.jpg$", r"^(?:imagelabels|setid)\.mat$"),
             ("imagelabels.mat", "setid.mat", "jpg"),
             locate_flowers, collect_flowers, want_all),
        Spec("stl10", "STL-10", ("stl10_binary.tar.gz",),
             (r"^stl10_binary/",),
             ("stl10_binary", "train_X.bin", "test_X.bin"),
             locate_stl10, collect_stl10, stl_wanted),
        Spec("food101", "Food-101", ("food-101.tar.gz",),
             (r"^food-101/",),
             ("food-101", "meta/train.json", "meta/classes.txt"),
             locate_food101, collect_food101, want_all),
    ]
    return {s.name: s for s in specs}


# --------------------------------------------------------------------------- building the tree


def mask_rel(rel: str) -> str:
    """Relative path of the .masks.npz file beside an image."""
    return str(Path(rel).with_suffix("")) + MASK_SUFFIX


def check_destinations(items: Sequence[Item]) -> None:
    """Every image (and its mask file) must get its own output path."""
    seen: Dict[str, str] = {}
    for item in items:
        for key in (item.rel, mask_rel(item.rel)):
            if key in seen and seen[key] != item.origin:
                raise PrepareError(f"{seen[key]} and {item.origin} would both be written to {key}")
            seen[key] = item.origin


def place_file(src: Path, dest: Path, mode: str, ws: Path) -> str:
    """Hard-link or copy ``src`` to ``dest``; files we extracted ourselves are always linked."""
    real = os.path.realpath(src)
    extracted = real.startswith(os.path.realpath(ws) + os.sep)
    if mode == "hard" or extracted:
        try:
            os.link(real, dest)
            return "extracted" if extracted else "hard"
        except OSError:
            pass  # other filesystem, or links unsupported: copy instead
    shutil.copy2(real, dest)
    return "extracted" if extracted else "copy"


def process_item(item: Item, tree: Path, mode: str, ws: Path) -> dict:
    """Place one image, hash it, decode it, and write its masks; return its manifest record."""
    dest = tree / item.rel
    if item.render is not None:
        item.render(dest)
        method = "decoded"
    else:
        method = place_file(item.source, dest, mode, ws)
    data = dest.read_bytes()
    rec = {"path": item.rel, "split": item.split, "class": item.label, "source": item.origin,
           "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "method": method}
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            width, height = im.size
    except Image.UnidentifiedImageError:
        rec["error"] = "UnidentifiedImageError: PIL cannot identify the image format"
        return rec
    except Exception as exc:  # anything else PIL raises also means "cannot decode"
        rec["error"] = describe_exc(exc)
        return rec
    rec["width"], rec["height"] = width, height
    if item.masks is not None:
        try:
            arrays = item.masks(width, height)
        except PrepareError:
            raise
        except Exception as exc:
            raise PrepareError(f"cannot build the mask of {item.origin}: {describe_exc(exc)}") from None
        if arrays["object"].shape != (height, width):
            raise PrepareError(f"mask of {item.origin} is {arrays['object'].shape[1]}x"
                               f"{arrays['object'].shape[0]} but the image is {width}x{height}")
        mrel = mask_rel(item.rel)
        np.savez_compressed(tree / mrel, **arrays)
        mdata = (tree / mrel).read_bytes()
        rec.update(mask=mrel, mask_sha256=hashlib.sha256(mdata).hexdigest(), mask_bytes=len(mdata))
    return rec


def materialize(items: Sequence[Item], tree: Path, mode: str, ws: Path, workers: int) -> List[dict]:
    """Process every item with a thread pool (hashing, decoding and zlib release the GIL)."""
    for folder in sorted({f"{it.split}/{it.label}" for it in items}):
        (tree / folder).mkdir(parents=True, exist_ok=True)
    records = []
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = [pool.submit(process_item, it, tree, mode, ws) for it in items]
        for fut in progress(as_completed(futures), total=len(futures), desc="images"):
            records.append(fut.result())
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    records.sort(key=lambda r: r["path"])
    return records


def count_records(records: Sequence[dict]) -> dict:
    """Images and classes per split, with per-class counts, plus the total."""
    counts = {}
    for split in SPLITS:
        per_class = Counter(r["class"] for r in records if r["split"] == split)
        counts[split] = {"images": sum(per_class.values()), "classes": len(per_class),
                         "per_class": dict(sorted(per_class.items()))}
    counts["total"] = {"images": len(records),
                       "classes": len({r["class"] for r in records})}
    return counts


def check_counts(expected: dict, counts: dict) -> List[dict]:
    """Differences between the official counts and the ones found."""
    mismatches = []
    for key, exp in expected.items():
        for kind, value in exp.items():
            found = counts[key][kind]
            if found != value:
                mismatches.append({"split": key, "kind": kind, "expected": value, "found": found})
    return mismatches


def mismatch_line(title: str, m: dict) -> str:
    """A warning line naming the expected and the found count."""
    return (f"{title} {m['split']}: expected {m['expected']} {m['kind']} (official release), "
            f"found {m['found']}")


def find_overlaps(records: Sequence[dict]):
    """Identical files (sha256) in train and test, and duplicate groups inside one split."""
    by_hash: Dict[str, Dict[str, List[str]]] = {}
    for r in records:
        by_hash.setdefault(r["sha256"], {s: [] for s in SPLITS})[r["split"]].append(r["path"])
    overlaps, duplicates = [], []
    for digest, where in sorted(by_hash.items()):
        if where["train"] and where["test"]:
            overlaps.append({"sha256": digest, **where})
        elif len(where["train"]) + len(where["test"]) > 1:
            duplicates.append({"sha256": digest, "paths": where["train"] + where["test"]})
    return overlaps, duplicates


def remove_files(tree: Path, rels: Sequence[str]) -> None:
    """Delete files from the tree, and class folders left empty."""
    for rel in rels:
        (tree / rel).unlink()
        parent = (tree / rel).parent
        if not any(parent.iterdir()):
            parent.rmdir()


def manifest_text(manifest: dict) -> str:
    """JSON text of a manifest: indented, with one line per entry of the (long) file list."""
    head = {k: v for k, v in manifest.items() if k != "files"}
    text = json.dumps(head, indent=1)
    files = ",\n".join("  " + json.dumps(rec) for rec in manifest.get("files", []))
    return text[:-2] + ',\n "files": [\n' + files + "\n ]\n}\n"


def write_manifest(tree: Path, manifest: dict) -> None:
    """Write manifest.json (the last file of a build)."""
    tmp = tree / "manifest.json.tmp"
    tmp.write_text(manifest_text(manifest))
    os.replace(tmp, tree / "manifest.json")


# --------------------------------------------------------------------------- output state


def fingerprint_source(path: Path) -> dict:
    """What identifies a source between runs: size/mtime of a file, or of every file in a folder."""
    if path.is_dir():
        digest = hashlib.sha256()
        n = 0
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for fname in sorted(filenames):
                full = os.path.join(dirpath, fname)
                try:
                    st = os.stat(full)
                except OSError:
                    continue
                rel = os.path.relpath(full, path)
                digest.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
                n += 1
        return {"kind": "directory", "name": path.name, "files": n, "digest": digest.hexdigest()}
    st = path.stat()
    return {"kind": "archive" if archive_kind(path) else "file", "name": path.name,
            "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_manifest(out: Path) -> Optional[dict]:
    """The manifest of a previous output, or None."""
    try:
        data = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == TOOL else None


def diff_request(old: Optional[dict], new: dict) -> List[str]:
    """Human-readable differences between the request of a previous run and this one."""
    if not isinstance(old, dict):
        return ["previous request unknown"]
    diffs = []
    if old.get("dataset") != new["dataset"]:
        diffs.append(f"dataset {old.get('dataset')} -> {new['dataset']}")
    if old.get("sources") != new["sources"]:
        diffs.append("sources differ (other files, or changed since)")
    old_opts = old.get("options") or {}
    for key in sorted(set(old_opts) | set(new["options"])):
        if old_opts.get(key) != new["options"].get(key):
            diffs.append(f"option {key}: {old_opts.get(key)!r} -> {new['options'].get(key)!r}")
    return diffs


def verify_tree(out: Path, manifest: dict) -> List[str]:
    """Files listed in a manifest that are missing or have another size."""
    problems = []
    for rec in manifest.get("files", []):
        for key, size_key in (("path", "bytes"), ("mask", "mask_bytes")):
            rel = rec.get(key)
            if rel is None:
                continue
            try:
                size = (out / rel).stat().st_size
            except OSError:
                problems.append(f"{rel} missing")
                continue
            if size != rec.get(size_key):
                problems.append(f"{rel} changed size")
        if len(problems) >= 3:
            break
    return problems


def inspect_output(out: Path, request: dict, overwrite: bool):
    """'absent', 'empty', 'replace' or ('match', manifest) for the output folder; else an error."""
    if not out.exists():
        return "absent", None
    if not out.is_dir():
        raise PrepareError(f"--out {out} exists and is not a folder")
    if not any(out.iterdir()):
        return "empty", None
    manifest = read_manifest(out)
    if manifest is None:
        raise PrepareError(f"output folder {out} is not empty and holds no manifest.json from "
                           f"this tool; choose a new or empty --out")
    problems = diff_request(manifest.get("request"), request)
    if not problems and not manifest.get("complete"):
        problems = ["previous output incomplete"]
    if not problems:
        problems = verify_tree(out, manifest)
    if not problems:
        return "match", manifest
    if overwrite:
        return "replace", None
    raise PrepareError(f"output folder {out} is not empty and is not a matching previous output "
                       f"({'; '.join(problems[:3])}); pass --overwrite to rebuild it")


def check_paths(srcs: Sequence[Path], out: Path) -> None:
    """The output must not lie inside a source folder, nor a source inside the output."""
    out_real = os.path.realpath(out)
    for src in srcs:
        src_real = os.path.realpath(src)
        if src.is_dir() and (out_real == src_real or out_real.startswith(src_real + os.sep)):
            raise PrepareError(f"--out {out} lies inside the source folder {src}; choose another --out")
        if src_real.startswith(out_real + os.sep):
            raise PrepareError(f"source {src} lies inside --out {out}")


def leftovers(out: Path) -> List[Path]:
    """Hidden work folders left beside ``out`` by interrupted runs."""
    if not out.parent.is_dir():
        return []
    return sorted(p for pattern in (".partial-*", ".work-*", ".old-*")
                  for p in out.parent.glob(f".{out.name}{pattern}"))


def install_tree(tree: Path, out: Path, state: str) -> None:
    """Rename the finished tree to ``out`` (replacing an empty or a previous output)."""
    if state == "empty":
        out.rmdir()
    if state == "replace":
        old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.rename(out, old)
        try:
            os.rename(tree, out)
        except OSError:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    os.rename(tree, out)


# --------------------------------------------------------------------------- options and run


def resolve_options(name: str, args: argparse.Namespace) -> dict:
    """Options that shape the output (recorded in the manifest and compared between runs)."""
    opts = {"link": args.link, "skip_unreadable": args.skip_unreadable,
            "allow_overlap": args.allow_overlap}
    for key, (owner, default) in DATASET_OPTIONS.items():
        value = getattr(args, key)
        if owner != name:
            if value is not None:
                warn(f"--{key.replace('_', '-')} applies to {owner} only; ignored for {name}")
            continue
        opts[key] = default if value is None else value
    if name == "flowers":
        for key in ("flowers_train", "flowers_test"):
            parts = [p.strip() for p in str(opts[key]).split(",") if p.strip()]
            bad = [p for p in parts if p not in FLOWER_SPLIT_KEYS]
            if not parts or bad:
                raise PrepareError(f"--{key.replace('_', '-')} {opts[key]!r}: use a comma list of "
                                   f"{', '.join(FLOWER_SPLIT_KEYS)}")
            opts[key] = sorted(set(parts), key=list(FLOWER_SPLIT_KEYS).index)
        shared = set(opts["flowers_train"]) & set(opts["flowers_test"])
        if shared:
            raise PrepareError(f"--flowers-train and --flowers-test share {sorted(shared)}")
    if name == "awa2" and not 0.0 < float(opts["awa2_test_fraction"]) < 1.0:
        raise PrepareError(f"--awa2-test-fraction {opts['awa2_test_fraction']} must lie strictly "
                           f"between 0 and 1")
    return opts


def build_manifest(spec: Spec, srcs, request, opts, listing, records, unreadable,
                   overlaps, duplicates, counts, listed, mismatches) -> dict:
    """The manifest.json content."""
    return {
        "tool": TOOL,
        "format_version": FORMAT_VERSION,
        "complete": True,
        "dataset": spec.name,
        "title": spec.title,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "request": request,
        "sources": [{"path": str(s), **fp} for s, fp in zip(srcs, request["sources"])],
        "options": opts,
        "split_recipe": listing.recipe,
        "classes": sorted({r["class"] for r in records}),
        "label_order": "ImageFolder label = index of the class folder in sorted(classes)",
        "class_ids": dict(sorted(listing.class_ids.items())),
        "masks": listing.masks,
        "counts": counts,
        "listed_counts": listed,
        "expected": listing.expected,
        "count_check": {"ok": not mismatches, "mismatches": mismatches},
        "unreadable": [{k: r[k] for k in ("path", "source", "error", "sha256")} for r in unreadable],
        "overlaps": overlaps,
        "duplicates_within_split": duplicates,
        "methods": dict(Counter(r["method"] for r in records)),
        "notes": listing.notes,
        "files": [{k: r[k] for k in ("path", "source", "sha256", "bytes", "width", "height",
                                     "mask", "mask_sha256", "mask_bytes") if k in r}
                  for r in records],
    }


def build(spec: Spec, srcs, out: Path, state: str, request: dict, opts: dict,
          args: argparse.Namespace, specs: Dict[str, Spec]) -> dict:
    """Build the tree in hidden sibling folders and rename it into place; return the manifest."""
    token = secrets.token_hex(4)
    ws = out.parent / f".{out.name}.work-{token}"
    tree = out.parent / f".{out.name}.partial-{token}"
    ws.mkdir()
    try:
        tree.mkdir()
        listing = gather_listing(spec, srcs, ws, opts, specs)
        if not listing.items:
            raise PrepareError(f"{spec.title}: the source lists no images")
        check_destinations(listing.items)
        listed = count_records([{"split": it.split, "class": it.label} for it in listing.items])
        if args.strict:
            early = check_counts(listing.expected, listed)
            if early:
                raise PrepareError(f"--strict: {mismatch_line(spec.title, early[0])}")
        info(f"{spec.title}: {listed['train']['images']} train / {listed['test']['images']} "
             f"test images listed; placing them in {out}")
        records = materialize(listing.items, tree, opts["link"], ws, args.workers)
        unreadable = [r for r in records if "error" in r]
        for r in unreadable:
            warn(f"UNREADABLE image {r['source']} ({r['path']}): {r['error']}")
        if unreadable and not opts["skip_unreadable"]:
            raise PrepareError(f"{len(unreadable)} unreadable image(s), listed above (first: "
                               f"{unreadable[0]['source']}); fix the source, or pass "
                               f"--skip-unreadable to leave them out (they are then listed in "
                               f"manifest.json)")
        remove_files(tree, [r["path"] for r in unreadable])
        records = [r for r in records if "error" not in r]
        overlaps, duplicates = find_overlaps(records)
        for o in overlaps:
            warn(f"OVERLAP: identical bytes in train {o['train']} and test {o['test']}")
        if overlaps and not opts["allow_overlap"]:
            raise PrepareError(f"{len(overlaps)} image(s) occur in both train and test (same "
                               f"sha256, listed above); pass --allow-overlap to keep them")
        if duplicates:
            info(f"note: {len(duplicates)} group(s) of identical images inside one split "
                 f"(listed in manifest.json)")
        counts = count_records(records)
        mismatches = check_counts(listing.expected, counts)
        for m in mismatches:
            warn(mismatch_line(spec.title, m))
        if mismatches and args.strict:
            raise PrepareError(f"--strict: {mismatch_line(spec.title, mismatches[0])}")
        if set(counts["train"]["per_class"]) != set(counts["test"]["per_class"]):
            listing.notes.append("train and test hold different class sets")
            warn(f"{spec.title}: train and test hold different class sets")
        for note in listing.notes:
            info(f"note: {note}")
        manifest = build_manifest(spec, srcs, request, opts, listing, records, unreadable,
                                  overlaps, duplicates, counts, listed, mismatches)
        write_manifest(tree, manifest)
        install_tree(tree, out, state)
        return manifest
    finally:
        shutil.rmtree(ws, ignore_errors=True)
        if tree.exists():
            shutil.rmtree(tree, ignore_errors=True)


def prepare(args: argparse.Namespace) -> int:
    """Convert one dataset as described by the parsed command line."""
    specs = dataset_specs()
    spec = specs[args.name]
    srcs = [Path(os.path.abspath(os.path.expanduser(s))) for s in args.src]
    out = Path(os.path.abspath(os.path.expanduser(args.out or os.path.join("data", args.name))))
    for src in srcs:
        if not src.exists():
            raise PrepareError(f"source not found: {src}")
    check_paths(srcs, out)
    opts = resolve_options(spec.name, args)
    request = {"dataset": spec.name, "sources": [fingerprint_source(s) for s in srcs],
               "options": opts}
    state, previous = inspect_output(out, request, args.overwrite)
    if state == "match":
        failed = previous.get("count_check", {}).get("mismatches") or []
        if args.strict and failed:
            raise PrepareError(f"--strict: existing output {out}: "
                               f"{mismatch_line(spec.title, failed[0])}")
        info(f"{out} is up to date (matching manifest.json); nothing to do")
        return 0
    for stale in leftovers(out):
        warn(f"leftover from an interrupted run (safe to delete): {stale}")
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = build(spec, srcs, out, state, request, opts, args, specs)
    c = manifest["counts"]
    info(f"{spec.title}: wrote {c['train']['images']} train / {c['test']['images']} test images, "
         f"{c['total']['classes']} classes, to {out} (manifest.json)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="prepare_datasets.py",
        description="Convert an official dataset release into ImageFolder train/ and test/ "
                    "folders with a manifest.json (see data/DATASETS.md).")
    p.add_argument("name", choices=sorted(dataset_specs()), help="dataset to convert")
    p.add_argument("--src", action="append", required=True, metavar="PATH",
                   help="official archive, folder holding the official archives, or extracted "
                        "folder; repeat for datasets that ship several files")
    p.add_argument("--out", default=None, help="output folder (default: data/NAME)")
    p.add_argument("--link", choices=("hard", "copy"), default="hard",
                   help="hard-link source images (default; copies when linking fails, e.g. "
                        "across filesystems) or copy them; files extracted from archives are "
                        "moved in either way")
    p.add_argument("--strict", action="store_true",
                   help="fail when image/class counts differ from the official release")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="leave out images PIL cannot decode (listed in manifest.json) instead "
                        "of failing")
    p.add_argument("--allow-overlap", action="store_true",
                   help="keep files whose bytes occur in both train and test instead of failing")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output of this tool made with other sources/options")
    p.add_argument("--workers", type=int, default=min(16, 2 * (os.cpu_count() or 1)),
                   help="threads for linking, hashing and decoding")
    g = p.add_argument_group("dataset-specific options")
    g.add_argument("--pets-foreground", choices=sorted(PET_FOREGROUND), default=None,
                   help="pets: trimap values forming the 'object' mask: fg_boundary = 1 and 3 "
                        "(default), fg = 1 only")
    g.add_argument("--flowers-train", default=None, metavar="LIST",
                   help="flowers: official splits merged into train, from trn,val,tst "
                        "(default trn,val)")
    g.add_argument("--flowers-test", default=None, metavar="LIST",
                   help="flowers: official splits used as test (default tst)")
    g.add_argument("--awa2-test-fraction", type=float, default=None,
                   help="awa2: fraction of each class put in test (default 0.3)")
    g.add_argument("--awa2-seed", type=int, default=None, help="awa2: split seed (default 0)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; errors exit non-zero with one line on stderr."""
    args = build_parser().parse_args(argv)
    try:
        return prepare(args)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("error: interrupted; no output was installed (work folders removed)",
              file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except OSError as exc:
        print(f"error: {describe_exc(exc)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    sys.exit(main())
