"""Push (prototype projection, spec section 7): every word jumps onto its nearest training patch.

One pass over the un-augmented training images, vectorised over batch x positions x words:
for word p, the candidate is argmin over (image, h, w) of d[image, p, h, w] (LVW: any image;
ProtoPNet: images of p's class only). A batch's best replaces the running best only if strictly
smaller, so ties keep the first patch in loader order. All words are replaced at once at the end.
Two settings change the search (defaults off, the reference): push_unique gives every word its
own patch (greedy by distance), push_exclude_border leaves out the grid's outer ring of cells.

The pictures and box arrays are written once after the pass (under <run>/img/epoch-E/):
    prototype-img-original{p}.png            the source image
    prototype-img-original_with_self_act{p}.png  0.5 image + 0.3 JET(min-max of the upsampled map)
    prototype-img{p}.png                     crop to the box where the upsampled map >= its 95th percentile
    prototype-self-act{p}.npy                the raw H x W similarity map of the source image
    bb-receptive_field{E}.npy, bb{E}.npy     (P, 6) int: [image index, h0, h1, w0, w1, class], -1 if unset
"""
import os
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from data.image_data import normalize
from model import squared_distances
from receptive_field import border_cells, has_inner_cells, push_cells, rf_box  # noqa: F401 (push.border_cells)
from run import distributed
from train_and_test import amp_context, mean_pairwise_word_distance


def nearest_patches(model, loader, device, class_specific, keep_features=False, amp=None, unique=False,
                    exclude_border=False):
    """The push search. Returns a dict of per-word tensors (CPU):
    distance (P,), patch (P, D), image (P,) global index or -1, h, w (P,), label (P,),
    similarity_map (P, H, W) of the source image; with `keep_features` also 'features', the
    add-on output z of every image scanned (N, D, H, W), and 'feature_indices', their dataset
    indices (all images in order; under torchrun this rank's): z does not depend on the words, so
    the last-layer cache computes the pushed words' distances from it without another pass.

    Candidates are ranked per word by (distance, image index, h * W + w). `unique` (setting
    push_unique): each word keeps its P best candidates, then unique_assignment gives every word
    its own patch. `exclude_border` (setting push_exclude_border): the cells on the grid's border
    are no candidates, on a grid that has inner cells (has_inner_cells)."""
    net = model.module if hasattr(model, 'module') else model
    net.eval()
    P = net.prototype_vectors.shape[0]
    keep = P if unique else 1  # with P candidates each word finds one that the other P - 1 left free
    word_class = net.prototype_class_identity.argmax(dim=1)
    best = None
    offset = 0
    features, feature_indices = [], []
    # under torchrun: this rank's slice of each batch, whose dataset indices the sampler knows
    slices = loader.batch_sampler if isinstance(loader.batch_sampler, distributed.GlobalBatchSlices) else None
    with torch.no_grad():
        for number, (images, labels) in enumerate(tqdm(loader, desc='push', leave=False, disable=None)):
            indices = torch.arange(offset, offset + len(images)) if slices is None else \
                torch.tensor(slices.global_indices(number), dtype=torch.long)
            if len(indices) == 0:  # this rank's slice of a small last batch is empty (a stand-in sample came)
                continue
            images = normalize(images.to(device, non_blocking=True))
            labels = labels.to(device)
            with amp_context(device, amp):
                z = net.conv_features(images).float()          # (B, D, H, W)
            d = squared_distances(z, net.prototype_vectors)    # (B, P, H, W)
            if keep_features:
                features.append(z.cpu())
                feature_indices.append(indices)
            B, _, H, W = d.shape
            if best is None:
                off_limits = ~push_cells(H, W, exclude_border, device)  # (H, W), all False unless excluded
                best = empty_candidates(P, keep, z.shape[1], H, W, device)
            search = d
            if class_specific:
                own = labels[:, None] == word_class[None, :]   # (B, P)
                search = search.masked_fill(~own[:, :, None, None], float('inf'))
            if off_limits.any():
                search = search.masked_fill(off_limits, float('inf'))
            # stable: equal distances keep (b, h, w) order, the loader's order
            values, flat = search.transpose(0, 1).reshape(P, -1).sort(dim=1, stable=True)
            values, flat = values[:, :keep], flat[:, :keep]     # (P, k), index into (B, H, W)
            b, hw = flat // (H * W), flat % (H * W)
            words = torch.arange(P, device=device)[:, None].expand_as(b)
            batch = {'distance': values, 'patch': z[b, :, hw // W, hw % W],
                     'image': indices.to(device)[b], 'h': hw // W, 'w': hw % W, 'label': labels[b],
                     'similarity_map': net.similarity(d[b, words])}
            best = best_candidates(best, batch, keep)
            offset += B
    if slices is not None:
        best = nearest_across_ranks(best)
    chosen = unique_assignment(best) if unique else torch.zeros(P, dtype=torch.long, device=device)
    rows = torch.arange(P, device=chosen.device)
    found = {k: v[rows, chosen].cpu() for k, v in best.items()}
    if keep_features:
        found['features'], found['feature_indices'] = torch.cat(features), torch.cat(feature_indices).tolist()
    return found


def empty_candidates(P, k, D, H, W, device):
    """No candidate yet for any of the P words: k slots each, at distance inf, image -1."""
    return {'distance': torch.full((P, k), float('inf'), device=device),
            'patch': torch.zeros(P, k, D, device=device),
            'image': torch.full((P, k), -1, dtype=torch.long, device=device),
            'h': torch.zeros(P, k, dtype=torch.long, device=device),
            'w': torch.zeros(P, k, dtype=torch.long, device=device),
            'label': torch.full((P, k), -1, dtype=torch.long, device=device),
            'similarity_map': torch.zeros(P, k, H, W, device=device)}


def best_candidates(kept, new, k):
    """The k best of two candidate sets (dicts of (P, k, ...) tensors, each word's row sorted),
    `kept` from earlier images, `new` from later ones: per word ascending distance, a tie going to
    `kept` (the stable sort), i.e. to the earlier image, as a strict '<' replacement would."""
    both = {name: torch.cat([kept[name], new[name]], dim=1) for name in kept}
    order = both['distance'].sort(dim=1, stable=True).indices[:, :k]
    return {name: take_rows(value, order) for name, value in both.items()}


def take_rows(value, order):
    """value (P, n, ...) reordered per row by order (P, k): out[p, j] = value[p, order[p, j]]."""
    return value[torch.arange(value.shape[0], device=value.device)[:, None], order]


def unique_assignment(candidates):
    """Every word its own patch, greedily by distance: over all (word, candidate) pairs in order
    of (distance, word, candidate rank), a word takes the candidate if it has none yet and no
    other word took that patch (image, h, w). candidates: dict of (P, k) tensors, each row sorted
    (best_candidates). Returns (P,) long, the chosen candidate rank of each word; a word left
    without a free real candidate (only possible with fewer than P patches) keeps rank 0.
    Without duplicates among the candidates, the result is each word's best candidate."""
    distance = candidates['distance'].cpu()
    P, k = distance.shape
    patch_ids = [tuple(v) for v in torch.stack([candidates['image'], candidates['h'], candidates['w']],
                                                dim=2).cpu().reshape(-1, 3).tolist()]
    order = torch.from_numpy(np.lexsort((np.tile(np.arange(k), P), np.repeat(np.arange(P), k),
                                         distance.reshape(-1).numpy())))
    chosen = torch.full((P,), -1, dtype=torch.long)
    taken = set()
    for flat in order.tolist():
        word, rank = divmod(flat, k)
        if chosen[word] >= 0 or patch_ids[flat] in taken or patch_ids[flat][0] < 0:
            continue
        chosen[word] = rank
        taken.add(patch_ids[flat])
    return chosen.clamp(min=0).to(candidates['distance'].device)


def nearest_across_ranks(best):
    """Each rank's candidates (nearest_patches, (P, k, ...)) -> the global k best on every rank:
    per word ascending distance, ties to the smaller image index, then the earlier cell, as the
    order of a single process."""
    stacked = {k: distributed.all_gather_stack(v) for k, v in best.items()}  # (ranks, P, k, ...)
    ranks, P, k = stacked['distance'].shape
    merged = {name: v.transpose(0, 1).reshape(P, ranks * k, *v.shape[3:]) for name, v in stacked.items()}
    no_image = torch.iinfo(torch.long).max
    image = torch.where(merged['image'] >= 0, merged['image'], no_image)
    cell = merged['h'] * merged['similarity_map'].shape[-1] + merged['w']
    order = cell.sort(dim=1, stable=True).indices                     # last key first, then stable sorts
    order = take_rows(order, take_rows(image, order).sort(dim=1, stable=True).indices)
    order = take_rows(order, take_rows(merged['distance'], order).sort(dim=1, stable=True).indices)
    return {name: take_rows(value, order[:, :k]) for name, value in merged.items()}


def high_activation_boxes(maps, img_size, percentile=95, chunk=64):
    """For each (H, W) map: bicubic upsampling to (S, S) (= cv2.INTER_CUBIC), then the tight box
    [h0, h1, w0, w1] (end exclusive) of the pixels >= the map's own 95th percentile (linear
    interpolation, as numpy). maps: (P, H, W) -> (P, 4) long, and the upsampled maps (P, S, S)."""
    up = F.interpolate(maps[:, None].float(), size=(img_size, img_size), mode='bicubic', align_corners=False)[:, 0]
    # torch.quantile takes at most 2**24 elements at a time
    q = torch.cat([torch.quantile(part.flatten(1), percentile / 100.0, dim=1) for part in up.split(chunk)])
    mask = up >= q[:, None, None]
    rows, cols = mask.any(dim=2), mask.any(dim=1)
    ar = torch.arange(img_size, device=maps.device)
    h0 = torch.where(rows, ar, img_size).amin(dim=1)
    h1 = torch.where(rows, ar, -1).amax(dim=1) + 1
    w0 = torch.where(cols, ar, img_size).amin(dim=1)
    w1 = torch.where(cols, ar, -1).amax(dim=1) + 1
    return torch.stack([h0, h1, w0, w1], dim=1), up


def jet_overlay(image, heat):
    """0.5 * image + 0.3 * JET(heat), image (S, S, 3) in [0, 1], heat (S, S) min-max rescaled inside."""
    heat = heat - heat.min()
    heat = heat / max(float(heat.max()), 1e-12)
    jet = cv2.applyColorMap(np.uint8(255 * heat), cv2.COLORMAP_JET)[..., ::-1] / 255.0
    return np.clip(0.5 * image + 0.3 * jet, 0, 1)


def _save_png(path, array01):
    Image.fromarray(np.uint8(np.round(255 * np.clip(array01, 0, 1)))).save(path)


def write_push_artefacts(found, dataset, folder, epoch, rf_info, img_size):
    """The per-word pictures and the two box arrays; images are read once each."""
    os.makedirs(folder, exist_ok=True)
    P = found['image'].shape[0]
    boxes, up = high_activation_boxes(found['similarity_map'], img_size)
    bb = np.full((P, 6), -1, dtype=np.int64)
    bb_rf = np.full((P, 6), -1, dtype=np.int64)
    cache = {}
    for p in range(P):
        idx = int(found['image'][p])
        if idx < 0:
            continue
        label = int(found['label'][p])
        bb[p] = [idx, *boxes[p].tolist(), label]
        bb_rf[p] = [idx, *rf_box(rf_info, int(found['h'][p]), int(found['w'][p]), img_size), label]
        if idx not in cache:
            cache[idx] = dataset[idx][0].permute(1, 2, 0).numpy()
        image = cache[idx]
        h0, h1, w0, w1 = boxes[p].tolist()
        _save_png(os.path.join(folder, 'prototype-img-original%d.png' % p), image)
        _save_png(os.path.join(folder, 'prototype-img-original_with_self_act%d.png' % p),
                  jet_overlay(image, up[p].numpy()))
        _save_png(os.path.join(folder, 'prototype-img%d.png' % p), image[h0:h1, w0:w1])
        np.save(os.path.join(folder, 'prototype-self-act%d.npy' % p), found['similarity_map'][p].numpy())
    np.save(os.path.join(folder, 'bb%d.npy' % epoch), bb)
    np.save(os.path.join(folder, 'bb-receptive_field%d.npy' % epoch), bb_rf)
    return bb


def push_prototypes(model, loader, device, class_specific, epoch=None, folder=None, rf_info=None,
                    img_size=None, log=print, keep_features=False, amp=None, unique=False, exclude_border=False):
    """Project every word onto its nearest training patch (`unique`, `exclude_border`: see
    nearest_patches); write the artefacts if `folder` is given. Returns the search result."""
    start = time.time()
    net = model.module if hasattr(model, 'module') else model
    found = nearest_patches(net, loader, device, class_specific, keep_features, amp, unique, exclude_border)
    H, W = found['similarity_map'].shape[1:]
    if exclude_border and not has_inner_cells(H, W):
        log('warning: push_exclude_border: the %d x %d word grid has no inner cell; the push searches every cell'
            % (H, W))
    ok = found['image'] >= 0
    spread_before = mean_pairwise_word_distance(net.prototype_vectors).item()
    with torch.no_grad():
        vectors = net.prototype_vectors.data.view(net.prototype_vectors.shape[0], -1)
        vectors[ok] = found['patch'][ok].to(vectors.device, vectors.dtype)
    if (~ok).any():
        log('warning: push found no patch for %d words (no training image of their class); they keep their vectors'
            % int((~ok).sum()))
    if folder is not None:
        write_push_artefacts(found, loader.dataset, folder, epoch, rf_info, img_size)
    patches = {(int(i), int(h), int(w)) for i, h, w in zip(found['image'][ok], found['h'][ok], found['w'][ok])}
    # how far the words jumped, and how far apart they land (a collapse shows as a small spread)
    moved = found['distance'][ok]
    spread = mean_pairwise_word_distance(net.prototype_vectors).item()
    log('push: %d words projected onto %d distinct patches of %d images, squared distance moved mean %.3f '
        'max %.3f, mean pairwise word distance %.3f -> %.3f (%.1fs)'
        % (int(ok.sum()), len(patches), len(set(found['image'][ok].tolist())),
           moved.mean().item() if len(moved) else float('nan'), moved.max().item() if len(moved) else float('nan'),
           spread_before, spread, time.time() - start))
    return found
