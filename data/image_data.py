"""Images and their Grad-CAM maps: ImageFolder datasets, the .npy + sidecar pairing, loaders.

Every dataset here yields images as float tensors in [0, 1] of shape (3, S, S); the ImageNet
normalisation happens on the device (`normalize`), once per batch, for training, test and push alike.

A Grad-CAM array is a float32 .npy of shape (N, S, S) whose row n belongs to image n in ImageFolder
order (classes sorted, files sorted). Its sidecar, the same path with .txt for .npy, lists each row's
image path relative to the split folder; pairing checks it against the folder and refuses any
difference in count or order. Its first line, written by gradcam_extract.py, is a checksum of the
array ('# maps crc32 <hex> shape N,S,S dtype float32'): opening the maps refuses an array changed
since (edited, rows re-ordered); a sidecar without it (older extractions) is accepted with a warning.
"""
import functools
import hashlib
import os
import zipfile
import zlib

import numpy as np
import torch
import torchvision
from PIL import Image

from run import distributed
from run.config import UserError, one_line

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def normalize(x):
    """(x - mean) / std per channel, x: (B, 3, H, W) in [0, 1]."""
    mean = x.new_tensor(MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def undo_normalize(x):
    mean = x.new_tensor(MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(STD).view(1, 3, 1, 1)
    return x * std + mean


# Pillow's 16-bit greyscale modes; convert('RGB') clips their values to 255 (a white image)
SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')
# torchvision's RandomResizedCrop defaults (the ImageNet recipe): area fraction and aspect ratio
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def to_rgb(img, path):
    """A PIL image as 8-bit RGB. 16-bit greyscale (modes I;16*, and a PNG opened as 'I') is
    scaled v -> round(v * 255 / 65535), not clipped; other 32-bit integer and float images have no
    known range and are a UserError naming `path`."""
    if img.mode in SIXTEEN_BIT_MODES or (img.mode == 'I' and img.format == 'PNG'):
        values = np.asarray(img).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(values * (255 / 65535)), 0, 255).astype(np.uint8), 'L').convert('RGB')
    if img.mode in ('I', 'F'):
        raise UserError('image %s is %s (mode %s, no known value range); save it as 8- or 16-bit'
                        % (path, '32-bit integer' if img.mode == 'I' else 'floating point', img.mode))
    return img.convert('RGB')


def random_crop_box(img):
    """A RandomResizedCrop box (left, top, right, bottom) of PIL image `img`: area in CROP_SCALE
    of the image's, aspect ratio in CROP_RATIO, drawn from torch's global generator as torchvision
    draws it (the whole image's central crop when 10 tries fail)."""
    top, left, height, width = torchvision.transforms.RandomResizedCrop.get_params(img, CROP_SCALE, CROP_RATIO)
    return left, top, left + width, top + height


def load_image(path, img_size, random_crop=False):
    """Decode once, RGB (to_rgb), resized to (S, S) (bilinear with antialias, aspect not kept) ->
    (3, S, S) in [0, 1]; with `random_crop`, a random_crop_box of the decoded image is what is
    resized (torchvision's RandomResizedCrop on the original image). A file that does not decode
    is a UserError naming it (a run stopped by it can be resumed)."""
    try:
        with Image.open(path) as img:
            img = to_rgb(img, path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # PIL's errors
        raise UserError('cannot decode image %s: %s' % (path, one_line(str(err)))) from None
    if random_crop:
        img = img.crop(random_crop_box(img))
    img = img.resize((img_size, img_size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)


def image_problem(path, full=False):
    """None if `path` opens as an image (header only, or a full decode with `full`), else the reason."""
    try:
        with Image.open(path) as img:
            if img.width < 1 or img.height < 1:
                return 'empty image'
            if full:
                img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return one_line(str(err)) or type(err).__name__
    return None


def check_images(paths, mode='header', what='images', workers=8):
    """Pre-flight: open every image before any training ('header': read the header, fast; 'full':
    decode; 'off': nothing). Unreadable files are one UserError naming them (the first five)."""
    if mode == 'off' or not paths:
        return
    from concurrent.futures import ThreadPoolExecutor
    from tqdm import tqdm
    full = mode == 'full'
    with ThreadPoolExecutor(workers) as pool:  # file opening waits on the disk, not the CPU
        problems = list(tqdm(pool.map(lambda p: image_problem(p, full), paths), total=len(paths),
                             desc='check %s' % what, leave=False, disable=None))
    bad = [(p, why) for p, why in zip(paths, problems) if why]
    if bad:
        shown = '; '.join('%s (%s)' % item for item in bad[:5])
        raise UserError('%d unreadable image(s) among the %s (image_check=%s): %s%s; fix or remove them'
                        % (len(bad), what, mode, shown, '; and %d more' % (len(bad) - 5) if len(bad) > 5 else ''))


def image_folder(root):
    """torchvision's ImageFolder listing of `root` (its samples and classes), with a clear error."""
    if not os.path.isdir(root):
        raise UserError('image folder not found: %s' % root)
    try:
        return torchvision.datasets.ImageFolder(root)
    except (FileNotFoundError, RuntimeError) as err:
        raise UserError('%s: %s' % (root, err)) from None


def relative_paths(folder):
    """Each sample's path relative to the split folder, '/'-separated, in ImageFolder order."""
    return [os.path.relpath(path, folder.root).replace(os.sep, '/') for path, _ in folder.samples]


def sidecar_path(npy_path):
    return os.path.splitext(npy_path)[0] + '.txt'


# ---- reading .npy / .npz files --------------------------------------------------------------------

def npy_problem(path, err, wanted='.npy'):
    """Why numpy could not read `path` as a `wanted` ('.npy' or '.npz') file, in one line."""
    size = os.path.getsize(path)
    if size == 0:
        return 'the file is empty (0 bytes)'
    with open(path, 'rb') as f:
        head = f.read(6)
    if head.startswith(b'PK'):
        if wanted == '.npy':
            return 'it is an .npz archive (or another zip file), not a .npy array'
        if not zipfile.is_zipfile(path):
            return 'it is truncated or corrupt (an incomplete zip archive of %d bytes)' % size
    elif head == b'\x93NUMPY':
        if wanted == '.npz':
            return 'it is a single .npy array, not an .npz archive'
    else:
        return 'it is not a NumPy %s file' % wanted
    text = str(err)
    if isinstance(err, EOFError) or 'EOF' in text or 'mmap length is greater than file size' in text:
        return 'it is truncated (%d bytes, shorter than its header says)' % size
    if 'Python objects' in text or 'allow_pickle' in text:
        return 'it holds Python objects (an object array), not numbers'
    first = one_line(text).split('. ')[0].strip()
    return '%s%s' % (type(err).__name__, ': ' + first[:200] if first else '')


def open_npy(path, what):
    """np.load(path, mmap_mode='r') of a .npy array; a missing or unreadable file (empty,
    truncated, an .npz, an object array) is one UserError line naming it."""
    if not os.path.isfile(path):
        raise UserError('%s not found: %s' % (what, path))
    try:
        array = np.load(path, mmap_mode='r')
    except Exception as err:  # noqa: BLE001 - numpy raises many kinds here
        raise UserError('cannot read %s %s: %s' % (what, path, npy_problem(path, err))) from None
    if not isinstance(array, np.ndarray):  # np.load opens an .npz whatever its name
        array.close()
        raise UserError('cannot read %s %s: %s' % (what, path, npy_problem(path, None)))
    return array


def open_npz(path, what):
    """np.load of an .npz archive (use it in a `with`); a missing or unreadable file is one UserError
    line naming it."""
    if not os.path.isfile(path):
        raise UserError('%s not found: %s' % (what, path))
    try:
        archive = np.load(path)
    except Exception as err:  # noqa: BLE001 - numpy raises many kinds here
        raise UserError('cannot read %s %s: %s' % (what, path, npy_problem(path, err, '.npz'))) from None
    if isinstance(archive, np.ndarray):
        raise UserError('cannot read %s %s: it is a single .npy array, not an .npz archive' % (what, path))
    return archive


def load_npy(path, what, ndim=None, columns=None):
    """A small .npy array read into memory, its number of dimensions (and of columns) checked."""
    array = open_npy(path, what)
    if (ndim is not None and array.ndim != ndim) or (columns is not None and array.shape[-1:] != (columns,)):
        expected = '(N, %d)' % columns if columns else '%d dimensions' % ndim
        raise UserError('%s %s has shape %s; expected %s' % (what, path, array.shape, expected))
    return np.array(array)


# ---- the sidecar and its checksum -----------------------------------------------------------------

# An order-sensitive checksum of the map array's bytes. crc32 keeps the single pass over the array
# that checks its range cheap (15 GB arrays): measured at 2.7 GB/s alone, 2.3 GB/s with the range
# check, against sha256 1.4 / 1.2 and blake2b 0.6 / 0.7 GB/s. It guards against accidental changes
# (an edited, re-sorted or half-copied array), not against deliberate forgery.
CHECKSUM_ALGO = 'crc32'
CHECKSUM_TAG = '# maps'
CHUNK_ROWS = 1024


class MapChecksum:
    """Running checksum of array bytes in C order: update(chunk) row block by row block."""

    def __init__(self, algo=CHECKSUM_ALGO):
        self.algo = algo
        self.crc = 0
        self.hash = None if algo == 'crc32' else hashlib.new(algo)

    def update(self, chunk):
        data = memoryview(np.ascontiguousarray(chunk)).cast('B')
        if self.hash is None:
            self.crc = zlib.crc32(data, self.crc)
        else:
            self.hash.update(data)

    def hexdigest(self):
        return '%08x' % self.crc if self.hash is None else self.hash.hexdigest()


def checksum_line(checksum, shape, dtype):
    """The sidecar's first line, e.g. '# maps crc32 1a2b3c4d shape 9,64,64 dtype float32'."""
    return '%s %s %s shape %s dtype %s' % (CHECKSUM_TAG, checksum.algo, checksum.hexdigest(),
                                           ','.join(str(int(n)) for n in shape), np.dtype(dtype).name)


def parse_checksum_line(line, path):
    """{'algo', 'hex', 'shape', 'dtype'} of a sidecar's checksum line."""
    words = line.split()
    if len(words) == 8 and words[4] == 'shape' and words[6] == 'dtype':
        try:
            shape = tuple(int(n) for n in words[5].split(','))
            MapChecksum(words[2])  # an algorithm this Python knows
            return {'algo': words[2], 'hex': words[3].lower(), 'shape': shape, 'dtype': words[7]}
        except ValueError:
            pass
    raise UserError('%s: its first line is not a checksum line of gradcam_extract.py (%r); '
                    'run gradcam_extract.py again' % (path, line[:80]))


def read_sidecar_file(npy_path):
    """(checksum header or None, listed image paths) of the sidecar, or None when there is none."""
    path = sidecar_path(npy_path)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            lines = [line.rstrip('\n') for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError('cannot read the sidecar %s: %s' % (path, err)) from None
    if lines and lines[0].startswith(CHECKSUM_TAG + ' '):
        return parse_checksum_line(lines[0], path), lines[1:]
    return None, lines


def read_sidecar(npy_path):
    """The image paths a sidecar lists (its checksum line skipped), or None when there is none."""
    sidecar = read_sidecar_file(npy_path)
    return None if sidecar is None else sidecar[1]


def check_pairing(npy_path, rows, listed, expected):
    """Refuse maps that do not pair with the images row for row.

    rows: number of maps in the array; listed: the sidecar's paths (or None if there is none);
    expected: the dataset's paths in ImageFolder order.
    """
    if listed is not None:
        if len(listed) != rows:
            raise UserError('%s has %d maps but its sidecar %s lists %d images'
                            % (npy_path, rows, sidecar_path(npy_path), len(listed)))
        for i, (a, b) in enumerate(zip(listed, expected)):
            if a != b:
                raise UserError('%s does not match the images: row %d is %s in its sidecar but %s in the folder'
                                % (npy_path, i, a, b))
    if rows != len(expected):
        n = min(rows, len(expected))
        first = expected[n] if rows < len(expected) else listed[n] if listed else 'row %d' % n
        raise UserError('%s has %d maps for %d images (first unmatched: %s)' % (npy_path, rows, len(expected), first))


def check_map_values(npy_path, maps, algo=None):
    """One chunked pass over the array (it may be larger than memory): values in [0, 1], and the
    checksum of its bytes when `algo` is given (returned as hex, else None)."""
    checksum = MapChecksum(algo) if algo else None
    for start in range(0, maps.shape[0], CHUNK_ROWS):
        chunk = np.asarray(maps[start:start + CHUNK_ROWS])
        lo, hi = float(chunk.min()), float(chunk.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-6 or hi > 1 + 1e-6:
            raise UserError('%s: maps must lie in [0, 1], rows %d-%d hold values in [%g, %g]'
                            % (npy_path, start, start + len(chunk) - 1, lo, hi))
        if checksum:
            checksum.update(chunk)
    return checksum.hexdigest() if checksum else None


def changed_maps(npy_path):
    return UserError('%s does not match the checksum in its sidecar %s: the maps changed after extraction; '
                     'run gradcam_extract.py again' % (npy_path, os.path.basename(sidecar_path(npy_path))))


def open_attention_maps(npy_path, expected_paths, img_size, log=print):
    """Memory-map a Grad-CAM array and check it against the images and its sidecar's checksum;
    returns the (N, S, S) array."""
    maps = open_npy(npy_path, 'attention maps')
    if maps.ndim != 3 or maps.shape[1:] != (img_size, img_size):
        raise UserError('%s has shape %s; expected (N, %d, %d) for img_size %d'
                        % (npy_path, maps.shape, img_size, img_size, img_size))
    if not np.issubdtype(maps.dtype, np.floating):
        raise UserError('%s holds %s values; expected float maps in [0, 1]' % (npy_path, maps.dtype))
    header, listed = read_sidecar_file(npy_path) or (None, None)
    name = os.path.basename(sidecar_path(npy_path))
    if listed is None:
        log('warning: %s has no sidecar %s; pairing maps with images by order only' % (npy_path, name))
    elif header is None:
        log('warning: the sidecar %s of %s has no checksum line (an older extraction?); the maps are not '
            'checked for changes since extraction' % (name, npy_path))
    check_pairing(npy_path, maps.shape[0], listed, expected_paths)
    if header and (header['shape'] != maps.shape or header['dtype'] != maps.dtype.name):
        raise changed_maps(npy_path)
    digest = check_map_values(npy_path, maps, header and header['algo'])
    if header and digest != header['hex']:
        raise changed_maps(npy_path)
    return maps


class ImageDataset(torch.utils.data.Dataset):
    """An ImageFolder split as (image, label), or (image, attention map, label) when `attention`
    is given. flip: 'none', 'joint' (image and map flipped together with p = 0.5), or 'double'
    (the reference: the image alone with p = 0.5, then both with p = 0.5, so half of the
    samples have a mirrored target). Without a map, 'joint' and 'double' are one p = 0.5 flip.
    random_crop (images without maps only): each image is a RandomResizedCrop of its decoded
    original (load_image), drawn before the flip, as torchvision's ImageNet recipe."""

    def __init__(self, root, img_size, attention=None, flip='none', log=print, random_crop=False):
        folder = image_folder(root)
        self.root = folder.root
        self.samples = folder.samples
        self.classes = folder.classes
        self.paths = relative_paths(folder)
        self.img_size = img_size
        self.flip = flip
        self.random_crop = random_crop
        self.attention = None
        if attention is not None and random_crop:
            raise ValueError('random_crop would move the images off their attention maps')
        if attention is not None:
            self.attention = open_attention_maps(attention, self.paths, img_size, log)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        """Sample `index` with flips drawn now, or, for a key (index, image flipped, map flipped)
        from distributed.GlobalBatchSlices, with the flips it drew."""
        if isinstance(index, tuple):
            if self.random_crop:
                raise ValueError('random_crop is drawn per sample, not by GlobalBatchSlices')
            index, image_flip, map_flip = index
            path, label = self.samples[index]
            image = load_image(path, self.img_size)
        else:
            path, label = self.samples[index]
            image = load_image(path, self.img_size, self.random_crop)
            image_flip, map_flip = draw_flips(self.flip, self.attention is not None)
        image = image.flip(-1) if image_flip else image
        if self.attention is None:
            return image, label
        att = torch.from_numpy(np.array(self.attention[index], dtype=np.float32))
        return image, att.flip(-1) if map_flip else att, label


def draw_flips(flip, with_map):
    """One sample's random flips, (image flipped, map flipped), drawn from torch's global generator
    in a fixed order. Without a map: one p = 0.5 draw unless flip is 'none'. With a map: 'double'
    draws an image-only flip first; 'joint' and 'double' then draw the flip of both."""
    if not with_map:
        return flip != 'none' and bool(torch.rand(()) < 0.5), False
    image_only = flip == 'double' and bool(torch.rand(()) < 0.5)
    both = flip in ('joint', 'double') and bool(torch.rand(()) < 0.5)
    return image_only != both, both


class FlipDraws(torch.utils.data.Dataset):
    """A dataset's samples as (index, image flipped, map flipped, label), without loading anything:
    a loader over it with the same batch size, shuffling and workers draws the same batches and
    the same flips as a loader over the dataset itself (train_and_test.cached_last_layer_pass)."""

    def __init__(self, dataset):
        self.labels = [label for _, label in dataset.samples]
        self.flip, self.with_map = dataset.flip, dataset.attention is not None

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image_flip, map_flip = draw_flips(self.flip, self.with_map)
        return index, image_flip, map_flip, self.labels[index]


def make_loader(dataset, batch_size, shuffle, num_workers, device, drop_last=False, persistent=False, sharded=False):
    """By default workers are started anew for each pass: they are then seeded from the global
    generator at the pass's start, which last.pth restores, so a resumed run sees the same
    augmentations (`persistent` keeps them: faster, but a resume then draws other flips).
    `sharded` under torchrun (several ranks): each rank loads its slice of the global batches
    (distributed.GlobalBatchSlices); `batch_size` stays the global batch."""
    persistent = persistent and num_workers > 0
    if sharded and distributed.world_size() > 1:
        with_map = getattr(dataset, 'attention', None) is not None
        slices = distributed.GlobalBatchSlices(dataset, batch_size, shuffle,
                                               functools.partial(draw_flips, getattr(dataset, 'flip', 'none'), with_map),
                                               distributed.rank(), distributed.world_size())
        return torch.utils.data.DataLoader(dataset, batch_sampler=slices, num_workers=num_workers,
                                           pin_memory=device.type == 'cuda', persistent_workers=persistent)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
        pin_memory=device.type == 'cuda', persistent_workers=persistent, drop_last=drop_last)


def check_same_classes(a, b, what_a, what_b):
    if list(a) != list(b):
        diff = next((f'{x!r} vs {y!r}' for x, y in zip(a, b) if x != y), '%d vs %d classes' % (len(a), len(b)))
        raise UserError('%s and %s have different classes (%s)' % (what_a, what_b, diff))
