"""Push (prototype projection, spec section 7): every word jumps onto its nearest training patch.

One pass over the un-augmented training images, vectorised over batch x positions x words:
for word p, the candidate is argmin over (image, h, w) of d[image, p, h, w] (LVW: any image;
ProtoPNet: images of p's class only). A batch's best replaces the running best only if strictly
smaller, so ties keep the first patch in loader order. All words are replaced at once at the end.

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

import distributed
from image_data import normalize
from model import squared_distances
from receptive_field import rf_box
from train_and_test import amp_context


def nearest_patches(model, loader, device, class_specific, keep_features=False, amp=None):
    """The push search. Returns a dict of per-word tensors (CPU):
    distance (P,), patch (P, D), image (P,) global index or -1, h, w (P,), label (P,),
    similarity_map (P, H, W) of the source image; with `keep_features` also 'features', the
    add-on output z of every image scanned (N, D, H, W), and 'feature_indices', their dataset
    indices (all images in order; under torchrun this rank's): z does not depend on the words, so
    the last-layer cache computes the pushed words' distances from it without another pass."""
    net = model.module if hasattr(model, 'module') else model
    net.eval()
    P = net.prototype_vectors.shape[0]
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
                best = {'distance': torch.full((P,), float('inf'), device=device),
                        'patch': torch.zeros(P, z.shape[1], device=device),
                        'image': torch.full((P,), -1, dtype=torch.long, device=device),
                        'h': torch.zeros(P, dtype=torch.long, device=device),
                        'w': torch.zeros(P, dtype=torch.long, device=device),
                        'label': torch.full((P,), -1, dtype=torch.long, device=device),
                        'similarity_map': torch.zeros(P, H, W, device=device)}
            search = d
            if class_specific:
                own = labels[:, None] == word_class[None, :]   # (B, P)
                search = d.masked_fill(~own[:, :, None, None], float('inf'))
            values, flat = search.transpose(0, 1).reshape(P, -1).min(dim=1)  # (P,), index into (B, H, W)
            better = values < best['distance']
            if better.any():
                words = better.nonzero().squeeze(1)
                b, hw = flat[words] // (H * W), flat[words] % (H * W)
                h, w = hw // W, hw % W
                best['distance'][words] = values[words]
                best['patch'][words] = z[b, :, h, w]
                best['image'][words] = indices.to(device)[b]
                best['h'][words], best['w'][words] = h, w
                best['label'][words] = labels[b]
                best['similarity_map'][words] = net.similarity(d[b, words])
            offset += B
    if slices is not None:
        best = nearest_across_ranks(best)
    found = {k: v.cpu() for k, v in best.items()}
    if keep_features:
        found['features'], found['feature_indices'] = torch.cat(features), torch.cat(feature_indices).tolist()
    return found


def nearest_across_ranks(best):
    """Each rank's search result (nearest_patches) -> the global one on every rank: per word the
    smallest distance, ties to the smallest image index, as the first in a single process's order."""
    stacked = {k: distributed.all_gather_stack(v) for k, v in best.items()}  # (ranks, P, ...)
    distance, image = stacked['distance'], stacked['image']
    no_image = torch.iinfo(torch.long).max
    key = torch.where((distance == distance.min(dim=0).values) & (image >= 0), image, no_image)
    winner = key.argmin(dim=0)
    words = torch.arange(distance.shape[1], device=distance.device)
    return {k: v[winner, words] for k, v in stacked.items()}


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
                    img_size=None, log=print, keep_features=False, amp=None):
    """Project every word onto its nearest training patch; write the artefacts if `folder` is given.
    Returns the search result (see nearest_patches)."""
    start = time.time()
    net = model.module if hasattr(model, 'module') else model
    found = nearest_patches(net, loader, device, class_specific, keep_features, amp)
    ok = found['image'] >= 0
    with torch.no_grad():
        vectors = net.prototype_vectors.data.view(net.prototype_vectors.shape[0], -1)
        vectors[ok] = found['patch'][ok].to(vectors.device, vectors.dtype)
    if (~ok).any():
        log('warning: push found no patch for %d words (no training image of their class); they keep their vectors'
            % int((~ok).sum()))
    if folder is not None:
        write_push_artefacts(found, loader.dataset, folder, epoch, rf_info, img_size)
    patches = {(int(i), int(h), int(w)) for i, h, w in zip(found['image'][ok], found['h'][ok], found['w'][ok])}
    log('push: %d words projected onto %d distinct patches of %d images (%.1fs)'
        % (int(ok.sum()), len(patches), len(set(found['image'][ok].tolist())), time.time() - start))
    return found
