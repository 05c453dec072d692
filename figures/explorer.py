"""What the explorer shows, computed from a word-model checkpoint (figures.site writes the pages).

One pass over the training images (unflipped, the push's folder) keeps each word's top-k images by
similarity (its max over the cells) with the word's H x W similarity map on each; one pass over
the test images keeps, per image, the prediction and the `per_image` words with the largest
contribution W[pred, p] * s_p to the predicted logit, with their maps. Where the images have
masks (<stem>.masks.npz), each word's top cells are checked against them: on the object or not,
and which part (word_metrics.cells_on_mask, cell_parts).
"""
import os

import numpy as np
import torch

from data.image_data import ImageDataset, check_same_classes, make_loader, normalize
from figures.gallery import word_source_folder, word_users
from figures.run_report import checkpoint_info
from metrics import word_metrics as wm
from metrics.scoring import load_masks, mask_path

DEFAULT_TOPK = 5        # training images per word
DEFAULT_PER_IMAGE = 3   # words shown per test image


@torch.no_grad()
def top_images_per_word(model, loader, k, device):
    """Each word's k most similar images of `loader`: (scores (P, k), indices (P, k) into the
    dataset, cell maps (P, k, H, W)); ties keep the earlier image."""
    best_s = best_i = best_m = None
    offset = 0
    for images, _ in loader:
        out = model(normalize(images.to(device)))
        sim = out.similarity_maps.float().cpu()                          # (B, P, H, W)
        score = sim.flatten(2).amax(dim=2).t()                           # (P, B)
        idx = torch.arange(offset, offset + sim.shape[0]).expand_as(score)
        maps = sim.permute(1, 0, 2, 3)                                   # (P, B, H, W)
        if best_s is not None:
            score, idx, maps = torch.cat([best_s, score], 1), torch.cat([best_i, idx], 1), torch.cat([best_m, maps], 1)
        keep = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
        best_s, best_i = score.gather(1, keep), idx.gather(1, keep)
        best_m = maps.gather(1, keep[:, :, None, None].expand(-1, -1, *maps.shape[2:]))
        offset += sim.shape[0]
    return best_s, best_i, best_m


@torch.no_grad()
def decisions(model, loader, per_image, device):
    """Per test image: label, prediction, its probability and the `per_image` words of largest
    contribution W[pred, p] * s_p, each (p, s_p, W[pred, p], contribution, map (H, W))."""
    weight = model.last_layer.weight.detach().float().cpu()
    out_list, offset = [], 0
    for images, labels in loader:
        out = model(normalize(images.to(device)))
        probs = torch.softmax(out.logits.float(), dim=1).cpu()
        sims, maps = out.similarities.float().cpu(), out.similarity_maps.float().cpu()
        for b in range(images.shape[0]):
            pred = int(probs[b].argmax())
            contribution = weight[pred] * sims[b]
            order = torch.sort(contribution, descending=True, stable=True).indices[:per_image].tolist()
            out_list.append({'image': offset + b, 'label': int(labels[b]), 'pred': pred,
                             'probability': float(probs[b, pred]),
                             'words': [(p, float(sims[b, p]), float(weight[pred, p]), float(contribution[p]),
                                        maps[b, p].numpy()) for p in order]})
        offset += images.shape[0]
    return out_list


def top_cell_hits(paths, indices, maps, size):
    """Per word, a sentence on where its top cells fall (object / background, parts), or None
    when the images have no masks. indices (P, k), maps (P, k, H, W)."""
    used = sorted(set(indices.flatten().tolist()))
    if not used or not all(os.path.isfile(mask_path(paths[i])) for i in used):
        return None
    gt = load_masks([paths[i] for i in used], size)
    row = {i: r for r, i in enumerate(used)}
    P, k, H, W = maps.shape
    flat = maps.reshape(P, k, -1)
    cell = flat.argmax(dim=2)                                            # first maximum
    rows = torch.tensor([[row[int(i)] for i in r] for r in indices.tolist()])
    cells = torch.stack([rows, cell // W, cell % W], dim=2)              # (P, k, 3) (row of gt, h, w)
    on = wm.cells_on_mask(cells, gt['object'], (H, W))                   # (P, k)
    parts = wm.cell_parts(cells, gt['parts'], (H, W)) if gt['parts'] is not None else None
    out = []
    for p in range(P):
        text = '%d of its top %d cells on the object' % (int(on[p].sum()), k)
        if parts is not None:
            names = list(gt['part_names']) + ['background']
            counts = np.bincount(parts[p].numpy(), minlength=len(names))
            text += '; parts: ' + ', '.join('%s %d' % (names[j], int(n)) for j, n in enumerate(counts) if n)
        out.append(text)
    return out


def compute_bundle(model, s, ckpt, ckpt_path, run_dir, device='cpu', topk=DEFAULT_TOPK, per_image=DEFAULT_PER_IMAGE,
                   max_test=None, log=print):
    """The explorer's data for a loaded word model (eval mode) and its settings `s`."""
    train = ImageDataset(s['train_push_dir'], s['img_size'])
    test = ImageDataset(s['test_dir'], s['img_size'])
    check_same_classes(ckpt['class_names'], train.classes, ckpt_path, s['train_push_dir'])
    check_same_classes(ckpt['class_names'], test.classes, ckpt_path, s['test_dir'])
    if max_test is not None and max_test < len(test):
        test.samples, test.paths = test.samples[:max_test], test.paths[:max_test]
    batch = s['test_batch_size']
    log('explorer: top %d training images of each word (%d images)' % (topk, len(train)))
    scores, indices, maps = top_images_per_word(model, make_loader(train, batch, False, 0, device), topk, device)
    log('explorer: the words behind each of %d test images' % len(test))
    tests = decisions(model, make_loader(test, batch, False, 0, device), per_image, device)
    epoch, kind = checkpoint_info(ckpt, ckpt_path)
    folder, note = word_source_folder(run_dir, epoch, kind)
    bb = np.load(os.path.join(folder, 'bb%d.npy' % epoch)) if folder else None
    train_paths = [path for path, _ in train.samples]
    hits = top_cell_hits(train_paths, indices, maps, s['img_size'])
    weight = model.last_layer.weight.detach().float().cpu()
    words = []
    for p in range(weight.shape[1]):
        source = None
        if bb is not None and bb[p, 0] >= 0:
            source = {'patch_png': os.path.join(folder, 'prototype-img%d.png' % p),
                      'overlay_png': os.path.join(folder, 'prototype-img-original_with_self_act%d.png' % p),
                      'class': ckpt['class_names'][int(bb[p, 5])]}
        words.append({'source': source, 'hits': hits[p] if hits else None,
                      'top': [(int(i), float(v), m.numpy()) for i, v, m in zip(indices[p], scores[p], maps[p])]})
    metrics_md = os.path.join(run_dir, 'metrics', 'metrics.md')
    accuracy = ckpt.get('accuracy')
    return {'title': 'Explorer of %s' % os.path.basename(os.path.normpath(run_dir)),
            'description': '%s, checkpoint %s (%s), test accuracy %s; %d words, %d classes, %s'
                           % (run_dir, os.path.basename(ckpt_path), kind, 'n/a' if accuracy is None else '%.4f' % accuracy,
                              weight.shape[1], weight.shape[0], note),
            'source_note': note, 'class_names': list(ckpt['class_names']), 'weight': weight.numpy(),
            'users': word_users(weight), 'words': words, 'tests': tests,
            'train_paths': train_paths, 'train_labels': [label for _, label in train.samples],
            'test_paths': [path for path, _ in test.samples],
            'metrics_md': open(metrics_md).read() if os.path.isfile(metrics_md) else None,
            'curves_png': os.path.join(run_dir, 'report', 'curves.png')}


def build_site(run_dir, checkpoint, out_dir=None, device='cpu', log=print, **options):
    """Load `checkpoint` of `run_dir`, compute its bundle and write the site (default
    <run_dir>/explorer/); returns the index path."""
    from figures import site
    from figures.run_report import load_word_checkpoint
    from model import model_from_checkpoint
    path = os.path.join(run_dir, checkpoint)
    device = torch.device(device)
    ckpt = load_word_checkpoint(path)
    model, s = model_from_checkpoint(ckpt, device, path=path)
    bundle = compute_bundle(model, s, ckpt, path, run_dir, device, log=log, **options)
    return site.write_site(out_dir or os.path.join(run_dir, 'explorer'), bundle, log)


def build_site_quietly(run_dir, checkpoint, device='cpu', log=print):
    """build_site for the end of a training run (on its device): a failure is logged, not raised."""
    try:
        return build_site(run_dir, checkpoint, device=device, log=log)
    except Exception as err:  # noqa: BLE001 - a UserError too: training must not stop for a page
        log('warning: could not write the explorer of %s: %s: %s' % (run_dir, type(err).__name__, err))
        return None
