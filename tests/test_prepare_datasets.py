"""Tests for data/prepare_datasets.py on miniature copies of the six official releases.

Each builder writes real archives (tar.gz / tar / tgz / zip) with the official member
names, list formats and .mat files, for a few images in 2-3 classes, and returns what
the conversion must produce.
"""
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import pytest
import scipy.io as sio
from PIL import Image

from data import prepare_datasets as prep
from data.sources.common import seeded_test_count

REPO = Path(__file__).resolve().parents[1]
MTIME = 1_600_000_000
CORRUPT = b"\xff\xd8 definitely not a complete JPEG stream"


# --------------------------------------------------------------------------- helpers


def seed_of(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def jpeg(key: str, w: int = 36, h: int = 28) -> bytes:
    """A small noise JPEG whose bytes are unique to ``key``."""
    rng = np.random.default_rng(seed_of(key))
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def mat(variables: dict) -> bytes:
    buf = io.BytesIO()
    sio.savemat(buf, variables)
    return buf.getvalue()


def cell(strings) -> np.ndarray:
    """A MATLAB cell column of strings, as in the Stanford Dogs lists."""
    c = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        c[i, 0] = s
    return c


def write_tar(path: Path, members: Dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = MTIME
            tf.addfile(ti, io.BytesIO(data))
    return path


def write_zip(path: Path, members: Dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Mini:
    """A miniature release and what converting it must give."""

    srcs: list
    train: Dict[str, set] = field(default_factory=dict)
    test: Dict[str, set] = field(default_factory=dict)
    masks: Dict[str, dict] = field(default_factory=dict)   # output rel path -> arrays
    expected_train: int = 0                                 # official count named in the warning
    corrupt: Optional[str] = None                           # name the error must mention
    missing: Optional[str] = None
    check: Optional[Callable[[Path], None]] = None          # dataset-specific extra checks

    def add(self, split: str, cls: str, name: str) -> None:
        getattr(self, split).setdefault(cls, set()).add(name)


def extract_all(archives, dest: Path) -> Path:
    """Unpack tar archives into `dest` (an extracted-folder source); returns `dest`."""
    for archive in archives:
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data")
    return dest


def run(capsys, *argv):
    """main() -> (exit code, stdout+stderr)."""
    try:
        rc = prep.main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def convert(capsys, name, mini, out, *extra):
    srcs = [x for s in mini.srcs for x in ("--src", s)]
    return run(capsys, name, *srcs, "--out", out, *extra)


def tree_listing(out: Path) -> dict:
    """{split: {class: {image names}}} of an output tree (masks left out)."""
    res = {}
    for split in ("train", "test"):
        res[split] = {d.name: {p.name for p in d.iterdir() if not p.name.endswith(".masks.npz")}
                      for d in sorted((out / split).iterdir())}
    return res


def snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.stat().st_ino, p.stat().st_size)
            for p in out.rglob("*")}


def hidden_siblings(out: Path) -> list:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# --------------------------------------------------------------------------- builders

PET_BREEDS = [("Abyssinian", 1, 1), ("american_bulldog", 2, 2), ("Bengal", 6, 1)]


def pet_trimap(w: int, h: int) -> np.ndarray:
    tri = np.full((h, w), 2, np.uint8)   # background
    tri[2:10, 3:15] = 3                  # boundary ring
    tri[3:9, 4:14] = 1                   # foreground
    return tri


def pet_members(variant=None):
    images, anns, lines = {}, {}, {"trainval": [], "test": []}
    for breed, cid, species in PET_BREEDS:
        for k in range(1, 5):
            stem = f"{breed}_{k}"
            w, h = 30 + 3 * k, 22 + k
            images[f"images/{stem}.jpg"] = jpeg(stem, w, h)
            anns[f"annotations/trimaps/{stem}.png"] = png(pet_trimap(w, h))
            lines["trainval" if k <= 2 else "test"].append(f"{stem} {cid} {species} {k}")
    anns["annotations/trainval.txt"] = ("\n".join(lines["trainval"]) + "\n").encode()
    anns["annotations/test.txt"] = ("\n".join(lines["test"]) + "\n").encode()
    anns["annotations/list.txt"] = ("#Image CLASS-ID SPECIES BREED ID\n"
                                    + "\n".join(lines["trainval"] + lines["test"]) + "\n").encode()
    if variant == "corrupt":
        images["images/Bengal_3.jpg"] = CORRUPT
    if variant == "missing":
        del anns["annotations/test.txt"]
    if variant == "overlap":
        images["images/Bengal_3.jpg"] = images["images/Bengal_1.jpg"]
        anns["annotations/trimaps/Bengal_3.png"] = anns["annotations/trimaps/Bengal_1.png"]
    return images, anns


def build_pets(root: Path, variant=None) -> Mini:
    images, anns = pet_members(variant)
    write_tar(root / "images.tar.gz", images)
    write_tar(root / "annotations.tar.gz", anns)
    mini = Mini(srcs=[root / "images.tar.gz", root / "annotations.tar.gz"], expected_train=3680,
                corrupt="images/Bengal_3.jpg", missing="annotations/test.txt")
    for breed, _, _ in PET_BREEDS:
        for k in range(1, 5):
            split = "train" if k <= 2 else "test"
            mini.add(split, breed.lower(), f"{breed}_{k}.jpg")
            mini.masks[f"{split}/{breed.lower()}/{breed}_{k}.jpg"] = {
                "object": pet_trimap(30 + 3 * k, 22 + k) != 2}

    def check(out: Path) -> None:
        man = json.loads((out / "manifest.json").read_text())
        assert man["class_ids"] == {"abyssinian": 1, "american_bulldog": 2, "bengal": 6}
        assert man["masks"]["object"] == "trimap value in [1, 3]"
    mini.check = check
    return mini


DOG_CLASSES = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog"]
# VOC boxes (1-based inclusive) drawn per image index k, and their expected pixel boxes
DOG_BOXES = {
    0: ([(3, 4, 12, 15)], [[2, 3, 12, 15]]),
    1: ([(3, 4, 12, 15), (20, 2, 30, 9)], [[2, 3, 12, 15], [19, 1, 30, 9]]),
    2: ([(30, 20, 999, 999)], [[29, 19, 48, 34]]),          # clamped to the 48x34 image
}


def voc_xml(stem: str, w: int, h: int, boxes) -> bytes:
    objs = "".join(
        f"<object><name>dog</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>0</difficult><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
        f"<ymax>{d}</ymax></bndbox></object>" for a, b, c, d in boxes)
    return (f"<annotation><folder>x</folder><filename>{stem}</filename><source><database>"
            f"ImageNet database</database></source><size><width>{w}</width><height>{h}</height>"
            f"<depth>3</depth></size><segment>0</segment>{objs}</annotation>").encode()


def build_dogs(root: Path, variant=None) -> Mini:
    images, anns, lists = {}, {}, {"train": [], "test": []}
    mini = Mini(srcs=[root], expected_train=12000, corrupt="Images/n02085936-Maltese_dog/n02085936_1002.jpg",
                missing="test_list.mat")
    for label, synset in enumerate(DOG_CLASSES, 1):
        wnid = synset.split("-")[0]
        for k in range(3):
            stem = f"{wnid}_{1000 + k}"
            w, h = 40 + 4 * k, 30 + 2 * k
            images[f"Images/{synset}/{stem}.jpg"] = jpeg(stem, w, h)
            voc, pixel = DOG_BOXES[k]
            anns[f"Annotation/{synset}/{stem}"] = voc_xml(stem, w, h, voc)
            split = "train" if k < 2 else "test"
            lists[split].append((f"{synset}/{stem}.jpg", f"{synset}/{stem}", label))
            mini.add(split, synset, f"{stem}.jpg")
            obj = np.zeros((h, w), bool)
            for x0, y0, x1, y1 in pixel:
                obj[y0:y1, x0:x1] = True
            mini.masks[f"{split}/{synset}/{stem}.jpg"] = {"object": obj, "boxes": np.array(pixel)}
    if variant == "corrupt":
        images[mini.corrupt] = CORRUPT
    list_members = {}
    for name, entries in (("train_list.mat", lists["train"]), ("test_list.mat", lists["test"]),
                          ("file_list.mat", lists["train"] + lists["test"])):
        list_members[name] = mat({
            "file_list": cell([e[0] for e in entries]),
            "annotation_list": cell([e[1] for e in entries]),
            "labels": np.array([[e[2]] for e in entries], dtype=np.uint8)})
    if variant == "missing":
        del list_members["test_list.mat"]
    write_tar(root / "images.tar", images, "w")
    write_tar(root / "annotation.tar", anns, "w")
    write_tar(root / "lists.tar", list_members, "w")

    def check(out: Path) -> None:
        man = json.loads((out / "manifest.json").read_text())
        assert man["class_ids"] == {c: i for i, c in enumerate(DOG_CLASSES, 1)}
    mini.check = check
    return mini


FLOWER_LABELS = [77, 1, 2, 1, 77, 2, 1, 2, 77, 1, 2, 77]      # image ids 1..12
FLOWER_SETID = {"trnid": [2, 3, 5], "valid": [4, 8, 9], "tstid": [1, 6, 7, 10, 11, 12]}


def build_flowers(root: Path, variant=None) -> Mini:
    members = {f"jpg/image_{i:05d}.jpg": jpeg(f"flower{i}", 32 + i, 24) for i in range(1, 13)}
    if variant == "corrupt":
        members["jpg/image_00006.jpg"] = CORRUPT
    write_tar(root / "102flowers.tgz", members)
    sio.savemat(root / "imagelabels.mat", {"labels": np.array([FLOWER_LABELS], dtype=np.uint8)})
    srcs = [root / "102flowers.tgz", root / "imagelabels.mat"]
    if variant != "missing":
        sio.savemat(root / "setid.mat", {k: np.array([v]) for k, v in FLOWER_SETID.items()})
        srcs.append(root / "setid.mat")
    mini = Mini(srcs=srcs, expected_train=2040, corrupt="jpg/image_00006.jpg", missing="setid.mat")
    for split, ids in (("train", FLOWER_SETID["trnid"] + FLOWER_SETID["valid"]),
                       ("test", FLOWER_SETID["tstid"])):
        for i in ids:
            mini.add(split, f"{FLOWER_LABELS[i - 1]:03d}", f"image_{i:05d}.jpg")
    return mini


STL_NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
STL_LABELS = {"train": [1, 2, 3, 1, 2, 3], "test": [3, 2, 1, 1]}


def stl_image(split: str, i: int) -> np.ndarray:
    """Pixel (r, c) = (r, c, marker): rows and columns tell apart a wrong transpose."""
    r, c = np.meshgrid(np.arange(96), np.arange(96), indexing="ij")
    marker = (10 * i + (100 if split == "test" else 0)) % 256
    return np.stack([r, c, np.full_like(r, marker)], axis=-1).astype(np.uint8)


def build_stl10(root: Path, variant=None) -> Mini:
    members = {}
    mini = Mini(srcs=[root / "stl10_binary.tar.gz"], expected_train=5000, corrupt="train_X.bin",
                missing="test_y.bin")
    for split, labels in STL_LABELS.items():
        # each channel column-major (Fortran order), channels one after the other
        x = b"".join(stl_image(split, i)[:, :, ch].flatten(order="F").tobytes()
                     for i in range(len(labels)) for ch in range(3))
        members[f"stl10_binary/{split}_X.bin"] = x
        members[f"stl10_binary/{split}_y.bin"] = bytes(labels)
        for i, lab in enumerate(labels):
            mini.add(split, STL_NAMES[lab - 1], f"{split}_{i:05d}.png")
    members["stl10_binary/class_names.txt"] = ("\n".join(STL_NAMES) + "\n").encode()
    members["stl10_binary/unlabeled_X.bin"] = bytes(96 * 96 * 3)
    members["stl10_binary/fold_indices.txt"] = b"0 1 2\n3 4 5\n"
    if variant == "corrupt":
        members["stl10_binary/train_X.bin"] = members["stl10_binary/train_X.bin"][:-100]
    if variant == "missing":
        del members["stl10_binary/test_y.bin"]
    write_tar(root / "stl10_binary.tar.gz", members)

    def check(out: Path) -> None:
        for split, labels in STL_LABELS.items():
            for i, lab in enumerate(labels):
                got = np.array(Image.open(out / split / STL_NAMES[lab - 1] / f"{split}_{i:05d}.png"))
                np.testing.assert_array_equal(got, stl_image(split, i))
                assert got[5, 90, 0] == 5 and got[5, 90, 1] == 90   # row 5, column 90
    mini.check = check
    return mini


FOOD_CLASSES = ["apple_pie", "baby_back_ribs", "beignets"]


def build_food101(root: Path, variant=None) -> Mini:
    members, split_ids = {}, {"train": {}, "test": {}}
    mini = Mini(srcs=[root / "food-101.tar.gz"], expected_train=75750,
                corrupt="images/beignets/1303.jpg", missing="meta/test.json")
    for ci, cls in enumerate(FOOD_CLASSES):
        for k in range(4):
            img_id = str(1000 + 100 * ci + k + 1)
            members[f"food-101/images/{cls}/{img_id}.jpg"] = jpeg(f"{cls}{img_id}", 40, 30 + k)
            split = "train" if k < 3 else "test"
            split_ids[split].setdefault(cls, []).append(f"{cls}/{img_id}")
            mini.add(split, cls, f"{img_id}.jpg")
    for split in ("train", "test"):
        members[f"food-101/meta/{split}.json"] = json.dumps(split_ids[split]).encode()
        members[f"food-101/meta/{split}.txt"] = (
            "\n".join(i for ids in split_ids[split].values() for i in ids) + "\n").encode()
    members["food-101/meta/classes.txt"] = ("\n".join(FOOD_CLASSES) + "\n").encode()
    members["food-101/meta/labels.txt"] = b"Apple pie\nBaby back ribs\nBeignets\n"
    if variant == "corrupt":
        members["food-101/images/beignets/1204.jpg"] = CORRUPT
        mini.corrupt = "images/beignets/1204.jpg"
    if variant == "missing":
        del members["food-101/meta/test.json"]
    write_tar(root / "food-101.tar.gz", members)

    def check(out: Path) -> None:
        man = json.loads((out / "manifest.json").read_text())
        assert man["class_ids"] == {"apple_pie": 1, "baby_back_ribs": 2, "beignets": 3}
    mini.check = check
    return mini


AWA2_CLASSES = ["antelope", "grizzly+bear", "killer+whale"]


def awa2_expected_test(cls: str, files, seed: int = 0, n_test: int = 2) -> set:
    """The documented rule: sort by sha256('<seed>/<class>/<file>'), first round(n*f) to test."""
    key = lambda f: hashlib.sha256(f"{seed}/{cls}/{f}".encode()).hexdigest()  # noqa: E731
    return set(sorted(files, key=key)[:n_test])


def build_awa2(root: Path, variant=None) -> Mini:
    base = "Animals_with_Attributes2"
    members = {f"{base}/licenses/README.txt": b"license text",
               f"{base}/predicates.txt": b"1\tblack\n2\twhite\n"}
    mini = Mini(srcs=[root / "AwA2-data.zip"], expected_train=0, corrupt=None, missing="classes.txt")
    for cls in AWA2_CLASSES:
        files = [f"{cls}_{10001 + k}.jpg" for k in range(5)]
        for f in files:
            members[f"{base}/JPEGImages/{cls}/{f}"] = jpeg(f, 30, 24)
        test = awa2_expected_test(cls, files)
        for f in files:
            mini.add("test" if f in test else "train", cls, f)
    if variant == "corrupt":
        victim = f"{AWA2_CLASSES[1]}_10003.jpg"
        members[f"{base}/JPEGImages/{AWA2_CLASSES[1]}/{victim}"] = CORRUPT
        mini.corrupt = f"JPEGImages/{AWA2_CLASSES[1]}/{victim}"
    if variant != "missing":
        members[f"{base}/classes.txt"] = "".join(
            f"{i}\t{c}\n" for i, c in enumerate(AWA2_CLASSES, 1)).encode()
    write_zip(root / "AwA2-data.zip", members)

    def check(out: Path) -> None:
        man = json.loads((out / "manifest.json").read_text())
        assert man["options"]["awa2_test_fraction"] == 0.3 and man["options"]["awa2_seed"] == 0
        assert man["expected"]["total"] == {"images": 37322}
        assert "sha256('0/<class>/<file>')" in man["split_recipe"]
        assert not (out / "train" / "licenses").exists()
    mini.check = check
    return mini

AM_DIR = "animal_mnist/data/Animal_MNIST"


def am_block(k: int):
    """Image k of the miniature Animal-MNIST: a block of value 200 on a zero background, rows
    r0..r0+7 and columns c0..c0+11 (inclusive), placed by k so that no two images are equal."""
    r0, c0 = 2 + 2 * (k % 7), 3 + (k // 7) % 9
    return r0, r0 + 7, c0, c0 + 11


def am_mask_112(r0, r1, c0, c1):
    """The block's mask after PIL's bilinear upsampling 28 -> 112 px (scale 4, support 1): output
    pixel y samples input (y + 0.5) / 4 - 0.5 and is non-zero where that lies strictly inside
    (r0 - 1, r1 + 1), i.e. rows 4 r0 - 2 .. 4 r1 + 5; the same for columns."""
    mask = np.zeros((112, 112), bool)
    mask[4 * r0 - 2:4 * r1 + 6, 4 * c0 - 2:4 * c1 + 6] = True
    return mask


def build_animal_mnist(root: Path, variant=None) -> Mini:
    """The wheel's two pickles: 3 classes x 5 images, plus an exact duplicate (removed) and the same
    pixels under another label (kept: a duplicate is the same pixels *and* label)."""
    import gzip
    import pickle
    rows, labels = [], []
    for label in range(3):
        for j in range(5):
            rows.append(5 * label + j)
            labels.append(label)
    rows += [6, 6]          # index 15: image 6 again with its label 1 (duplicate); 16: image 6 as class 2
    labels += [1, 2]
    images = np.zeros((len(rows), 28, 28), np.uint8)
    for i, k in enumerate(rows):
        r0, r1, c0, c1 = am_block(k)
        images[i, r0:r1 + 1, c0:c1 + 1] = 200
    mini = Mini(srcs=[root / "animal_mnist-0.4-py3-none-any.whl"], corrupt="animal_data_version_3.gz",
                missing="animal_label_version_3.gz")
    names = ("bear", "bird", "cat")
    for label, cls in enumerate(names):
        files = {f"am_{i:05d}.png": rows[i] for i in range(len(rows)) if labels[i] == label and i != 15}
        test = awa2_expected_test(cls, files, n_test=2 if len(files) >= 5 else 1)
        for f, k in files.items():
            split = "test" if f in test else "train"
            mini.add(split, cls, f)
            mini.masks[f"{split}/{cls}/{f}"] = {"object": am_mask_112(*am_block(k))}
    data = gzip.compress(pickle.dumps(images))
    if variant == "corrupt":
        data = data[:len(data) // 2]
    members = {"animal_mnist/__init__.py": b"", f"{AM_DIR}/animal_data_version_3.gz": data,
               "animal_mnist-0.4.dist-info/METADATA": b"Name: animal_mnist\n"}
    if variant != "missing":
        members[f"{AM_DIR}/animal_label_version_3.gz"] = gzip.compress(pickle.dumps(np.array(labels, np.int64)))
    write_zip(root / "animal_mnist-0.4-py3-none-any.whl", members)

    def check(out: Path) -> None:
        man = json.loads((out / "manifest.json").read_text())
        assert man["options"]["animal_mnist_size"] == 112 and man["options"]["animal_mnist_seed"] == 0
        assert "1 exact duplicates removed" in man["notes"]
        for rel in mini.masks:
            with Image.open(out / rel) as im:
                assert im.mode == "RGB" and im.size == (112, 112)
                pixels = np.asarray(im)
            with np.load(out / (rel[:-4] + ".masks.npz")) as m:
                np.testing.assert_array_equal(m["object"], pixels[..., 0] > 0)  # the mask is the image's x > 0
    mini.check = check
    return mini


BUILDERS = {"pets": build_pets, "dogs": build_dogs, "flowers": build_flowers,
            "stl10": build_stl10, "food101": build_food101, "awa2": build_awa2, "animal_mnist": build_animal_mnist}
WITH_MASKS = {"pets", "dogs", "animal_mnist"}
OFFICIAL_TOTAL = {"awa2": 37322, "animal_mnist": 9716}
OFFICIAL_TRAIN = {"pets": 3680, "dogs": 12000, "flowers": 2040, "stl10": 5000, "food101": 75750}


def make(tmp_path: Path, name: str, variant=None, tag="src") -> Mini:
    root = tmp_path / f"{tag}-{name}-{variant or 'ok'}"
    root.mkdir()
    return BUILDERS[name](root, variant)


# --------------------------------------------------------------------------- per-dataset tests


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_convert_counts_membership_masks_manifest(tmp_path, capsys, name):
    mini = make(tmp_path, name)
    archives = {Path(s): sha(Path(s)) for s in mini.srcs if Path(s).is_file()}
    out = tmp_path / "out" / name
    rc, text = convert(capsys, name, mini, out)
    assert rc == 0, text

    # class names and exact split membership
    assert tree_listing(out) == {"train": mini.train, "test": mini.test}

    # masks: beside each image, same H x W, foreground where drawn
    npz = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.masks.npz"))
    if name in WITH_MASKS:
        assert npz == sorted(k[:-4] + ".masks.npz" for k in mini.masks)
        for rel, expected in mini.masks.items():
            with Image.open(out / rel) as im:
                w, h = im.size
            with np.load(out / (rel[:-4] + ".masks.npz")) as m:
                assert m["object"].dtype == bool and m["object"].shape == (h, w)
                np.testing.assert_array_equal(m["object"], expected["object"])
                if "boxes" in expected:
                    assert m["boxes"].dtype == np.int32
                    np.testing.assert_array_equal(m["boxes"], expected["boxes"])
    else:
        assert npz == []

    # manifest: counts, expected official counts, per-file sha256
    man = json.loads((out / "manifest.json").read_text())
    assert man["dataset"] == name and man["complete"] is True
    for split in ("train", "test"):
        want = getattr(mini, split)
        assert man["counts"][split]["images"] == sum(len(v) for v in want.values())
        assert man["counts"][split]["classes"] == len(want)
        assert man["counts"][split]["per_class"] == {c: len(v) for c, v in want.items()}
    images = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".jpg", ".png")]
    assert len(man["files"]) == len(images)
    for rec in man["files"]:
        assert rec["sha256"] == sha(out / rec["path"])
    assert man["unreadable"] == [] and man["overlaps"] == []
    assert man["count_check"]["ok"] is False
    if name in OFFICIAL_TRAIN:
        assert man["expected"]["train"]["images"] == OFFICIAL_TRAIN[name]
        assert f"expected {OFFICIAL_TRAIN[name]} images" in text
    else:
        assert "expected %d images" % OFFICIAL_TOTAL[name] in text
    if mini.check:
        mini.check(out)

    # the source is untouched and no work folders are left behind
    assert {p: sha(p) for p in archives} == archives
    assert hidden_siblings(out) == []


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_second_run_is_a_noop(tmp_path, capsys, name):
    mini = make(tmp_path, name)
    out = tmp_path / "out" / name
    assert convert(capsys, name, mini, out)[0] == 0
    before = snapshot(out)
    manifest = (out / "manifest.json").read_bytes()
    rc, text = convert(capsys, name, mini, out)
    assert rc == 0, text
    assert "up to date" in text
    assert snapshot(out) == before
    assert (out / "manifest.json").read_bytes() == manifest


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_corrupt_member_is_reported(tmp_path, capsys, name):
    mini = make(tmp_path, name, "corrupt")
    out = tmp_path / "out" / name
    rc, text = convert(capsys, name, mini, out)
    assert rc != 0
    assert mini.corrupt in text
    assert "Traceback" not in text
    assert not out.exists() and hidden_siblings(out) == []


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_missing_member_is_an_error(tmp_path, capsys, name):
    mini = make(tmp_path, name, "missing")
    out = tmp_path / "out" / name
    rc, text = convert(capsys, name, mini, out)
    assert rc != 0
    assert mini.missing in text and "error:" in text
    assert "Traceback" not in text
    assert not out.exists()


WRONG = {"pets": "food101", "dogs": "pets", "awa2": "stl10", "flowers": "awa2",
         "stl10": "dogs", "food101": "flowers", "animal_mnist": "stl10"}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_wrong_dataset_is_an_error(tmp_path, capsys, name):
    other = WRONG[name]
    mini = make(tmp_path, other)
    out = tmp_path / "out" / name
    rc, text = convert(capsys, name, mini, out)
    assert rc != 0
    assert prep.dataset_specs()[other].title in text
    assert f"prepare_datasets.py {other}" in text
    assert not out.exists()


# --------------------------------------------------------------------------- behaviour in detail


def test_extracted_folder_as_source(tmp_path, capsys):
    """An extracted folder is found and a Food-101 folder given to pets is rejected."""
    mini = make(tmp_path, "pets")
    extracted = extract_all(mini.srcs, tmp_path / "extracted")
    rc, text = run(capsys, "pets", "--src", extracted, "--out", tmp_path / "pets")
    assert rc == 0, text
    assert tree_listing(tmp_path / "pets") == {"train": mini.train, "test": mini.test}

    food = make(tmp_path, "food101")
    food_dir = extract_all(food.srcs[:1], tmp_path / "food-extracted")
    rc, text = run(capsys, "pets", "--src", food_dir, "--out", tmp_path / "wrong")
    assert rc != 0 and "Food-101" in text


def test_hard_link_and_copy_leave_the_source_alone(tmp_path, capsys):
    mini = make(tmp_path, "pets")
    src = extract_all(mini.srcs, tmp_path / "extracted")
    before = {p: (p.stat().st_mtime_ns, sha(p)) for p in src.rglob("*") if p.is_file()}
    source_img = src / "images" / "Abyssinian_1.jpg"

    rc, text = run(capsys, "pets", "--src", src, "--out", tmp_path / "hard", "--link", "hard")
    assert rc == 0, text
    assert (tmp_path / "hard/train/abyssinian/Abyssinian_1.jpg").stat().st_ino == source_img.stat().st_ino
    rc, text = run(capsys, "pets", "--src", src, "--out", tmp_path / "copy", "--link", "copy")
    assert rc == 0, text
    copied = tmp_path / "copy/train/abyssinian/Abyssinian_1.jpg"
    assert copied.stat().st_ino != source_img.stat().st_ino
    assert copied.read_bytes() == source_img.read_bytes()
    assert json.loads((tmp_path / "copy/manifest.json").read_text())["methods"] == {"copy": 12}
    assert {p: (p.stat().st_mtime_ns, sha(p)) for p in src.rglob("*") if p.is_file()} == before


def test_folder_of_archives_as_source(tmp_path, capsys):
    mini = make(tmp_path, "pets")
    folder = Path(mini.srcs[0]).parent
    rc, text = run(capsys, "pets", "--src", folder, "--out", tmp_path / "pets")
    assert rc == 0, text
    assert tree_listing(tmp_path / "pets") == {"train": mini.train, "test": mini.test}


def test_skip_unreadable_lists_and_leaves_out(tmp_path, capsys):
    mini = make(tmp_path, "pets", "corrupt")
    out = tmp_path / "pets"
    rc, text = convert(capsys, "pets", mini, out)
    assert rc != 0 and "--skip-unreadable" in text and "images/Bengal_3.jpg" in text
    rc, text = convert(capsys, "pets", mini, out, "--skip-unreadable")
    assert rc == 0, text
    assert "UNREADABLE image images/Bengal_3.jpg" in text
    man = json.loads((out / "manifest.json").read_text())
    assert [u["path"] for u in man["unreadable"]] == ["test/bengal/Bengal_3.jpg"]
    assert man["unreadable"][0]["source"] == "images/Bengal_3.jpg"
    assert tree_listing(out)["test"]["bengal"] == {"Bengal_4.jpg"}
    assert not (out / "test/bengal/Bengal_3.masks.npz").exists()
    assert man["counts"]["test"]["images"] == 5 and man["listed_counts"]["test"]["images"] == 6


def test_train_test_overlap_is_an_error_unless_allowed(tmp_path, capsys):
    mini = make(tmp_path, "pets", "overlap")
    out = tmp_path / "pets"
    rc, text = convert(capsys, "pets", mini, out)
    assert rc != 0
    assert "train/bengal/Bengal_1.jpg" in text and "test/bengal/Bengal_3.jpg" in text
    assert not out.exists()
    rc, text = convert(capsys, "pets", mini, out, "--allow-overlap")
    assert rc == 0, text
    man = json.loads((out / "manifest.json").read_text())
    assert man["overlaps"] == [{"sha256": sha(out / "test/bengal/Bengal_3.jpg"),
                                "train": ["train/bengal/Bengal_1.jpg"],
                                "test": ["test/bengal/Bengal_3.jpg"]}]
    assert man["options"]["allow_overlap"] is True


def test_strict_turns_count_mismatch_into_error(tmp_path, capsys):
    mini = make(tmp_path, "pets")
    out = tmp_path / "pets"
    rc, text = convert(capsys, "pets", mini, out, "--strict")
    assert rc != 0 and "expected 3680 images" in text and "found 6" in text
    assert not out.exists()
    # non-strict output exists; a strict re-run on it still refuses
    assert convert(capsys, "pets", mini, out)[0] == 0
    rc, text = convert(capsys, "pets", mini, out, "--strict")
    assert rc != 0 and "expected 3680" in text


def test_non_empty_out_is_refused(tmp_path, capsys):
    mini = make(tmp_path, "pets")
    out = tmp_path / "pets"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc, text = convert(capsys, "pets", mini, out)
    assert rc != 0 and "not empty" in text and str(out) in text
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # --overwrite never deletes a folder this tool did not make
    rc, text = convert(capsys, "pets", mini, out, "--overwrite")
    assert rc != 0 and (out / "notes.txt").exists()


def test_empty_out_is_accepted(tmp_path, capsys):
    mini = make(tmp_path, "stl10")
    out = tmp_path / "stl10"
    out.mkdir()
    rc, text = convert(capsys, "stl10", mini, out)
    assert rc == 0, text
    assert (out / "manifest.json").is_file()


def test_changed_options_need_overwrite(tmp_path, capsys):
    mini = make(tmp_path, "flowers")
    out = tmp_path / "flowers"
    assert convert(capsys, "flowers", mini, out)[0] == 0
    rc, text = convert(capsys, "flowers", mini, out, "--flowers-train", "trn")
    assert rc != 0 and "flowers_train" in text and "--overwrite" in text
    rc, text = convert(capsys, "flowers", mini, out, "--flowers-train", "trn", "--overwrite")
    assert rc == 0, text
    names = {n for v in tree_listing(out)["train"].values() for n in v}
    assert names == {f"image_{i:05d}.jpg" for i in FLOWER_SETID["trnid"]}
    man = json.loads((out / "manifest.json").read_text())
    assert man["options"]["flowers_train"] == ["trn"]
    assert man["expected"]["train"]["images"] == 1020
    assert "trnid" in man["split_recipe"] and "valid" not in man["split_recipe"]
    assert hidden_siblings(out) == []


def test_flowers_default_recipe_is_recorded(tmp_path, capsys):
    mini = make(tmp_path, "flowers")
    out = tmp_path / "flowers"
    rc, text = convert(capsys, "flowers", mini, out)
    assert rc == 0, text
    man = json.loads((out / "manifest.json").read_text())
    assert man["options"]["flowers_train"] == ["trn", "val"]
    assert man["options"]["flowers_test"] == ["tst"]
    assert man["split_recipe"].startswith("train = setid.mat trnid+valid, test = setid.mat tstid")
    assert man["class_ids"] == {"001": 1, "002": 2, "077": 77}
    assert man["expected"]["test"] == {"images": 6149, "classes": 102}


def test_flowers_overlapping_split_options_are_refused(tmp_path, capsys):
    mini = make(tmp_path, "flowers")
    rc, text = convert(capsys, "flowers", mini, tmp_path / "f", "--flowers-test", "val,tst")
    assert rc != 0 and "share" in text and "val" in text


def test_pets_foreground_only_option(tmp_path, capsys):
    mini = make(tmp_path, "pets")
    out = tmp_path / "pets"
    rc, text = convert(capsys, "pets", mini, out, "--pets-foreground", "fg")
    assert rc == 0, text
    with np.load(out / "train/bengal/Bengal_1.masks.npz") as m:
        obj = m["object"]
    want = np.zeros_like(obj)
    want[3:9, 4:14] = True
    np.testing.assert_array_equal(obj, want)


def test_awa2_seed_and_fraction(tmp_path, capsys):
    mini = make(tmp_path, "awa2")
    rc, _ = convert(capsys, "awa2", mini, tmp_path / "a")
    assert rc == 0
    rc, _ = convert(capsys, "awa2", mini, tmp_path / "b", "--awa2-seed", "0")
    assert rc == 0
    assert tree_listing(tmp_path / "a") == tree_listing(tmp_path / "b")   # same seed, same split
    rc, text = convert(capsys, "awa2", mini, tmp_path / "c", "--awa2-seed", "7",
                       "--awa2-test-fraction", "0.4")
    assert rc == 0, text
    listing = tree_listing(tmp_path / "c")
    for cls in AWA2_CLASSES:
        files = [f"{cls}_{10001 + k}.jpg" for k in range(5)]
        assert listing["test"][cls] == awa2_expected_test(cls, files, seed=7, n_test=2)
        assert listing["train"][cls] == set(files) - listing["test"][cls]
    assert listing != tree_listing(tmp_path / "a")
    man = json.loads((tmp_path / "c/manifest.json").read_text())
    assert man["options"]["awa2_seed"] == 7 and man["options"]["awa2_test_fraction"] == 0.4
    rc, text = convert(capsys, "awa2", mini, tmp_path / "d", "--awa2-test-fraction", "1.5")
    assert rc != 0 and "1.5" in text


def test_awa2_test_count_rule():
    assert [seeded_test_count(n, 0.3) for n in (0, 1, 2, 5, 10, 100)] == [0, 0, 1, 2, 3, 30]
    assert seeded_test_count(3, 0.99) == 2


def test_corrupt_archive_is_an_error(tmp_path, capsys):
    bad = tmp_path / "food-101.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08 this is not gzip data at all" * 10)
    rc, text = run(capsys, "food101", "--src", bad, "--out", tmp_path / "food")
    assert rc != 0 and "cannot read archive" in text and "food-101.tar.gz" in text
    assert "Traceback" not in text

    mini = make(tmp_path, "food101")
    data = Path(mini.srcs[0]).read_bytes()
    cut = tmp_path / "cut" / "food-101.tar.gz"
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) // 2])
    rc, text = run(capsys, "food101", "--src", cut, "--out", tmp_path / "food")
    assert rc != 0 and "cannot read archive" in text and str(cut) in text
    assert not (tmp_path / "food").exists()


def test_missing_source_path(tmp_path, capsys):
    rc, text = run(capsys, "pets", "--src", tmp_path / "nope.tar.gz", "--out", tmp_path / "o")
    assert rc != 0 and "source not found" in text and "nope.tar.gz" in text


def test_interrupted_run_leaves_no_output(tmp_path, capsys, monkeypatch):
    mini = make(tmp_path, "dogs")
    out = tmp_path / "dogs"

    def interrupt(tree, manifest):
        assert (tree / "train").is_dir()        # the tree was being built beside out
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "write_manifest", interrupt)
    rc, text = convert(capsys, "dogs", mini, out)
    assert rc == 130 and "interrupted" in text
    assert not out.exists() and hidden_siblings(out) == []
    monkeypatch.undo()
    rc, text = convert(capsys, "dogs", mini, out)
    assert rc == 0, text


def test_cli_runs_from_repo_root(tmp_path):
    mini = make(tmp_path, "stl10")
    cmd = [sys.executable, "data/prepare_datasets.py", "stl10", "--src", str(mini.srcs[0]),
           "--out", str(tmp_path / "stl")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "stl/manifest.json").is_file()
    done = subprocess.run(cmd[:-1] + [str(tmp_path / "stl2")] + ["--flowers-train", "trn"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ignored for stl10" in done.stderr
    cmd = [sys.executable, "data/prepare_datasets.py", "pets", "--src", str(mini.srcs[0]),
           "--out", str(tmp_path / "p")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "STL-10" in done.stderr and "Traceback" not in done.stderr


def test_animal_mnist_from_the_installed_package_folder(tmp_path, capsys):
    mini = make(tmp_path, "animal_mnist")
    site = tmp_path / "site-packages"
    with zipfile.ZipFile(mini.srcs[0]) as zf:
        zf.extractall(site)
    out = tmp_path / "out"
    rc, text = run(capsys, "animal_mnist", "--src", site / "animal_mnist", "--out", out)
    assert rc == 0, text
    assert tree_listing(out) == {"train": mini.train, "test": mini.test}


def test_animal_mnist_pickles_may_hold_only_arrays(tmp_path, capsys):
    """A pickle can run code: one naming anything but numpy's array classes is refused, in one line."""
    import gzip
    import pickle
    mini = make(tmp_path, "animal_mnist")
    site = tmp_path / "site"
    with zipfile.ZipFile(mini.srcs[0]) as zf:
        zf.extractall(site)
    (site / AM_DIR / "animal_label_version_3.gz").write_bytes(gzip.compress(pickle.dumps(print)))
    rc, text = run(capsys, "animal_mnist", "--src", site, "--out", tmp_path / "out")
    assert rc != 0 and "Traceback" not in text
    assert "cannot read animal_label_version_3.gz: UnpicklingError: refused builtins.print" in text
    assert not (tmp_path / "out").exists()


def test_animal_mnist_options_are_checked(tmp_path, capsys):
    mini = make(tmp_path, "animal_mnist")
    for option, value, message in (("--animal-mnist-test-fraction", "1.0", "must lie strictly between 0 and 1"),
                                   ("--animal-mnist-size", "20", "must lie between 28 and 1024 px")):
        rc, text = convert(capsys, "animal_mnist", mini, tmp_path / "out", option, value)
        assert rc != 0 and message in text


def test_animal_mnist_per_class_keeps_the_first_in_the_seeded_order(tmp_path, capsys):
    mini = make(tmp_path, "animal_mnist")
    out = tmp_path / "out"
    rc, text = convert(capsys, "animal_mnist", mini, out, "--animal-mnist-per-class", "3")
    assert rc == 0, text
    key = lambda cls, f: hashlib.sha256(f"0/{cls}/{f}".encode()).hexdigest()  # noqa: E731
    want = {"train": {}, "test": {}}
    for cls in ("bear", "bird", "cat"):
        files = set(mini.train[cls]) | set(mini.test[cls])
        kept = sorted(files, key=lambda f: key(cls, f))[:3]
        want["test"][cls], want["train"][cls] = set(kept[:1]), set(kept[1:])  # round(3 * 0.3) = 1 to test
    assert tree_listing(out) == want
    man = json.loads((out / "manifest.json").read_text())
    assert man["options"]["animal_mnist_per_class"] == 3 and "the first 3 in the order below" in man["split_recipe"]
