"""Receptive field of the word layer (spec section 2.7).

Each layer maps [n, j, r, start] (grid size, jump, receptive field, centre of the first cell):

    n_out = floor((n_in - k + 2 pad) / s) + 1    j_out = j_in * s
    r_out = r_in + (k - 1) j_in                  start_out = start_in + ((k - 1) / 2 - pad) j_in

starting from [img_size, 1, 1, 0.5], through every conv and pool of the backbone's main path
(the downsample shortcuts are parallel and skipped), then the 1x1 word layer.
ResNet-34 at 224 px gives [7, 32, 899, 0.5]; ResNet-50 gives [7, 32, 427, 0.5].

Run as a script to print them: `python receptive_field.py -arch resnet34 -img_size 224`.
"""
import argparse
import math

import torch
import torch.nn as nn


def _pair(v):
    return v[0] if isinstance(v, (tuple, list)) else v


def layer_specs(features):
    """(kernel, stride, padding) of each conv/pool layer of `features`, in forward order."""
    specs = []
    for name, m in features.named_modules():
        if 'downsample' in name.split('.'):
            continue
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            specs.append((_pair(m.kernel_size), _pair(m.stride), _pair(m.padding)))
    return specs


def next_rf_info(kernel, stride, padding, info):
    n_in, j_in, r_in, start_in = info
    n_out = math.floor((n_in - kernel + 2 * padding) / stride) + 1
    return [n_out, j_in * stride, r_in + (kernel - 1) * j_in, start_in + ((kernel - 1) / 2 - padding) * j_in]


def word_layer_rf_info(img_size, specs):
    """[n, jump, rf, start] at the word layer for the given backbone layer specs."""
    info = [img_size, 1, 1, 0.5]
    for kernel, stride, padding in specs:
        info = next_rf_info(kernel, stride, padding, info)
    return next_rf_info(1, 1, 0, info)  # the 1x1 word layer, VALID


def rf_box(info, h, w, img_size):
    """Pixel box [h0, h1, w0, w1] seen by grid cell (h, w): centre c = start + jump * idx,
    extent [max(int(c - r/2), 0), min(int(c + r/2), img_size)] on each axis."""
    _, jump, rf, start = info

    def span(idx):
        c = start + idx * jump
        return max(int(c - rf / 2), 0), min(int(c + rf / 2), img_size)

    return [*span(h), *span(w)]


def border_cells(H, W, device=None):
    """(H, W) bool, True on the cells of the grid's outer ring: h in {0, H-1} or w in {0, W-1}."""
    ring = torch.ones(H, W, dtype=torch.bool, device=device)
    ring[1:H - 1, 1:W - 1] = False
    return ring


def has_inner_cells(H, W):
    """Whether an H x W grid has cells off its border (at least 3 x 3): push_exclude_border
    excludes nothing on a smaller grid (push_prototypes says so)."""
    return H >= 3 and W >= 3


def push_cells(H, W, exclude_border, device=None):
    """(H, W) bool, True on the cells the push may pick a word's patch from: all of them, or
    with `exclude_border` (setting push_exclude_border) the cells off the outer ring, on a grid
    that has such cells (has_inner_cells)."""
    if exclude_border and has_inner_cells(H, W):
        return ~border_cells(H, W, device)
    return torch.ones(H, W, dtype=torch.bool, device=device)


def main(argv=None):
    from model import BACKBONES, make_backbone
    from run.config import flag_type
    from run.settings_rules import RULES
    parser = argparse.ArgumentParser(description='Receptive field of the LVW word layer.')
    parser.add_argument('-arch', default='resnet34', choices=BACKBONES)
    parser.add_argument('-img_size', type=flag_type(RULES['img_size']), default=224,
                        help='as the setting img_size: %s' % RULES['img_size'].expected)
    args = parser.parse_args(argv)
    info = word_layer_rf_info(args.img_size, layer_specs(make_backbone(args.arch)))
    print('%s at %d px: [n, jump, rf, start] = %s' % (args.arch, args.img_size, info))


if __name__ == '__main__':
    from run.config import run_cli
    run_cli(main)
