"""What every dataset converter of prepare_datasets.py shares: the listing types (Item, Listing,
Context, Spec), messages, finding files below the source folders, reading and extracting the
official archives (tar, zip), recognising which dataset an archive holds, and small readers
(.mat files, class ids) for the converters.
"""
from __future__ import annotations

import hashlib
import lzma
import os
import re
import shutil
import sys
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from tqdm import tqdm


TOOL = "prepare_datasets"
FORMAT_VERSION = 1
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
MASK_SUFFIX = ".masks.npz"
SAMPLE_MEMBERS = 40          # archive members read to recognise which dataset it holds
SEARCH_DEPTH = 3             # how deep below a source folder the dataset layout is searched


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
    """'zip' (also .whl), 'tar' or None, judged by the file name."""
    name = path.name.lower()
    if name.endswith((".zip", ".whl")):  # a wheel is a zip archive (Animal-MNIST ships as one)
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


# --------------------------------------------------------------------------- helpers for the converters


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


def seeded_test_count(n: int, fraction: float) -> int:
    """Test images for a class of n: round(n * fraction), at least 1 and at most n - 1."""
    if n < 2:
        return 0
    return min(max(int(n * fraction + 0.5), 1), n - 1)


def seeded_split_key(seed: int, cls: str, fname: str) -> str:
    """Sort key of the seeded split: sha256 of '<seed>/<class>/<file name>'."""
    return hashlib.sha256(f"{seed}/{cls}/{fname}".encode()).hexdigest()


def seeded_test_files(cls: str, files: Sequence[str], fraction: float, seed: int) -> List[str]:
    """The files of one class that go to test (stable across platforms and library versions);
    the split of the datasets without an official one (AWA2, Animal-MNIST)."""
    ordered = sorted(files, key=lambda f: seeded_split_key(seed, cls, f))
    return ordered[:seeded_test_count(len(files), fraction)]
