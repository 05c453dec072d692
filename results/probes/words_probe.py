"""The probes behind the answers of docs/shared_words.md on the words (issue 17, items 3 and 4), on the
benchmark's toy test set:

  shortcut   each model's test accuracy on the images as they are, with the object removed (its
             pixels, grown by 2 px, filled with the image's mean background colour) and with the
             background removed (every pixel off the object set to mid grey): if the background
             carried the class, the object-removed accuracy would stay above chance (1/C).
  geometry   per word model, the word grid, its border share, the receptive field, and where the
             words sit: the cell of each word's nearest training patch (what a push picks), the
             share of words there on a border cell, and how many words share a patch.

    python results/probes/words_probe.py -models base=saved_models/benchmark/seed0/toy_resnet18.pth \\
        lvw_double=saved_models/resnet18/benchmark_s0_lvw_double/<final>.pth -out results/shared_words/probe_seed0.json

Run from the repository root; minutes on 2 CPU cores.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.getcwd())
from run import config  # noqa: E402
import eval_metrics as em  # noqa: E402
from metrics import scoring  # noqa: E402
import push  # noqa: E402
from data.image_data import ImageDataset, normalize  # noqa: E402
from receptive_field import layer_specs, word_layer_rf_info  # noqa: E402


def remove_object(images, objects, grow=2):
    """Object pixels (grown by `grow` px with a max filter) set to the image's mean colour over the
    other pixels. images (N, 3, S, S) in [0, 1], objects (N, S, S) bool."""
    grown = F.max_pool2d(objects[:, None].float(), 2 * grow + 1, stride=1, padding=grow)[:, 0] > 0
    keep = (~grown)[:, None].float()
    mean = (images * keep).sum(dim=(2, 3), keepdim=True) / keep.sum(dim=(2, 3), keepdim=True).clamp(min=1)
    return torch.where(grown[:, None], mean.expand_as(images), images)


def remove_background(images, objects, grey=0.5):
    """Every pixel off the object set to `grey`."""
    return torch.where(objects[:, None], images, torch.full_like(images, grey))


def accuracy(predict, images, labels, batch=50):
    with torch.no_grad():
        preds = torch.cat([predict(normalize(chunk)).argmax(1) for chunk in images.split(batch)])
    return float((preds == labels).double().mean())


def word_geometry(model, push_set, s):
    """Where the words' nearest training patches sit on the grid."""
    loader = torch.utils.data.DataLoader(push_set, batch_size=100, shuffle=False)
    found = push.nearest_patches(model, loader, torch.device('cpu'), False)
    H, W = found['similarity_map'].shape[1:]
    border = push.border_cells(H, W)
    on_border = border[found['h'], found['w']].double()
    patches = set(zip(found['image'].tolist(), found['h'].tolist(), found['w'].tolist()))
    cells = torch.zeros(H, W, dtype=torch.long)
    for h, w in zip(found['h'].tolist(), found['w'].tolist()):
        cells[h, w] += 1
    return {'grid': [H, W], 'border_cells': int(border.sum()), 'border_share_of_grid': float(border.double().mean()),
            'words': int(len(on_border)), 'words_nearest_patch_on_border': float(on_border.mean()),
            'distinct_nearest_patches': len(patches), 'words_per_cell': cells.tolist()}


def grid_facts(arch, sizes=(112, 224)):
    """The word grid and receptive field of `arch` at each image size (receptive_field.py)."""
    from model import ResNetFeatures
    specs = layer_specs(ResNetFeatures(arch))
    out = {}
    for size in sizes:
        n, jump, rf, start = word_layer_rf_info(size, specs)
        n = int(n)
        out[size] = {'grid': n, 'border_share': float(push.border_cells(n, n).double().mean()), 'cell_px': jump,
                     'receptive_field_px': rf, 'receptive_field_over_image': rf / size}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-models', nargs='+', required=True, metavar='NAME=PATH')
    parser.add_argument('-out', required=True)
    args = parser.parse_args(argv)
    s = config.resolve_settings('toy', ['img_size=112'])
    test = ImageDataset(s['test_dir'], s['img_size'])
    push_set = ImageDataset(s['train_dir'], s['img_size'])
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = torch.tensor([label for _, label in test.samples])
    objects = scoring.load_masks([p for p, _ in test.samples], s['img_size'])['object']
    variants = {'as is': images, 'object removed': remove_object(images, objects),
                'background removed': remove_background(images, objects)}
    report = {'test_images': len(test), 'chance': 1 / len(test.classes), 'grids': grid_facts(s['base_architecture']),
              'models': {}}
    for item in args.models:
        name, _, path = item.partition('=')
        source = em.open_source(name, path, torch.device('cpu'), test, s['img_size'])
        predict = (lambda x, m=source.model: m(x).logits) if isinstance(source, em.WordSource) else source.model
        entry = {'path': path, 'accuracy': {k: accuracy(predict, v, labels) for k, v in variants.items()}}
        if isinstance(source, em.WordSource):
            entry['geometry'] = word_geometry(source.model, push_set, s)
        report['models'][name] = entry
        print(name, json.dumps(entry), flush=True)
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report['grids']))


if __name__ == '__main__':
    main()
