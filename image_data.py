"""Images and their Grad-CAM maps: ImageFolder datasets, the .npy + sidecar pairing, loaders.

Every dataset here yields images as float tensors in [0, 1] of shape (3, S, S); the ImageNet
normalisation happens on the device (`normalize`), once per batch, for training, test and push alike.

A Grad-CAM array is a float32 .npy of shape (N, S, S) whose row n belongs to image n in ImageFolder
order (classes sorted, files sorted). Its sidecar, the same path with .txt for .npy, lists each row's
image path relative to the split folder; pairing checks it against the folder and refuses any
difference in count or order.
"""
import os

import numpy as np
import torch
import torchvision
from PIL import Image

from config import UserError

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


def load_image(path, img_size):
    """Decode once, RGB, resized to (S, S) (bilinear with antialias, aspect not kept) -> (3, S, S) in [0, 1]."""
    with Image.open(path) as img:
        img = img.convert('RGB').resize((img_size, img_size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)


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


def read_sidecar(npy_path):
    path = sidecar_path(npy_path)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return [line.rstrip('\n') for line in f if line.strip()]


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


def open_attention_maps(npy_path, expected_paths, img_size, log=print):
    """Memory-map a Grad-CAM array and check it against the images; returns the (N, S, S) array."""
    if not os.path.isfile(npy_path):
        raise UserError('attention maps not found: %s' % npy_path)
    try:
        maps = np.load(npy_path, mmap_mode='r')
    except (ValueError, OSError) as err:
        raise UserError('cannot read %s as a .npy array: %s' % (npy_path, err)) from None
    if maps.ndim != 3 or maps.shape[1:] != (img_size, img_size):
        raise UserError('%s has shape %s; expected (N, %d, %d) for img_size %d'
                        % (npy_path, maps.shape, img_size, img_size, img_size))
    if not np.issubdtype(maps.dtype, np.floating):
        raise UserError('%s holds %s values; expected float maps in [0, 1]' % (npy_path, maps.dtype))
    listed = read_sidecar(npy_path)
    if listed is None:
        log('warning: %s has no sidecar %s; pairing maps with images by order only'
            % (npy_path, os.path.basename(sidecar_path(npy_path))))
    check_pairing(npy_path, maps.shape[0], listed, expected_paths)
    for start in range(0, maps.shape[0], 1024):  # chunked: the array may be larger than memory
        chunk = np.asarray(maps[start:start + 1024])
        lo, hi = float(chunk.min()), float(chunk.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-6 or hi > 1 + 1e-6:
            raise UserError('%s: maps must lie in [0, 1], rows %d-%d hold values in [%g, %g]'
                            % (npy_path, start, start + len(chunk) - 1, lo, hi))
    return maps


class ImageDataset(torch.utils.data.Dataset):
    """An ImageFolder split as (image, label), or (image, attention map, label) when `attention`
    is given. flip: 'none', 'joint' (image and map flipped together with p = 0.5), or 'double'
    (the reference: the image alone with p = 0.5, then both with p = 0.5, so half of the
    samples have a mirrored target). Without a map, 'joint' and 'double' are one p = 0.5 flip."""

    def __init__(self, root, img_size, attention=None, flip='none', log=print):
        folder = image_folder(root)
        self.root = folder.root
        self.samples = folder.samples
        self.classes = folder.classes
        self.paths = relative_paths(folder)
        self.img_size = img_size
        self.flip = flip
        self.attention = None
        if attention is not None:
            self.attention = open_attention_maps(attention, self.paths, img_size, log)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        image = load_image(path, self.img_size)
        if self.attention is None:
            if self.flip != 'none' and torch.rand(()) < 0.5:
                image = image.flip(-1)
            return image, label
        att = torch.from_numpy(np.array(self.attention[index], dtype=np.float32))
        if self.flip == 'double' and torch.rand(()) < 0.5:
            image = image.flip(-1)
        if self.flip in ('joint', 'double') and torch.rand(()) < 0.5:
            image, att = image.flip(-1), att.flip(-1)
        return image, att, label


def make_loader(dataset, batch_size, shuffle, num_workers, device, drop_last=False):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
        pin_memory=device.type == 'cuda', persistent_workers=num_workers > 0, drop_last=drop_last)


def check_same_classes(a, b, what_a, what_b):
    if list(a) != list(b):
        diff = next((f'{x!r} vs {y!r}' for x, y in zip(a, b) if x != y), '%d vs %d classes' % (len(a), len(b)))
        raise UserError('%s and %s have different classes (%s)' % (what_a, what_b, diff))
