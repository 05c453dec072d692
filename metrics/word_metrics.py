"""Metrics of the visual words of a word model (LVW or ProtoPNet mode): where each word fires
(its top-activating test locations), how pure those locations are in parts of the synthetic
data, and how many classes use each word in the last layer.

Same conventions as interp_metrics.py: torch tensors, batched, pixel coordinates (y, x), nothing
happens at import time.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from metrics.interp_metrics import _first_argmax_flat, image_mean, points_hit_mask

__all__ = ["word_argmax_locations", "top_locations_from_maxima", "top_locations", "part_purity",
           "classes_per_word", "cell_box", "cell_centre", "cells_on_mask", "cells_near_mask",
           "map_top_cells", "distinct_words", "word_use", "cell_parts", "word_part_counts", "class_part_coverage"]


# ---------------------------------------------------------------------------
# 1. per-word part purity
# ---------------------------------------------------------------------------

def word_argmax_locations(sim_maps: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image and word, the maximum of the word's map and where it is.

    Ties: first maximum in row-major order. Use this batch by batch (and
    concatenate along N) when all maps at image resolution do not fit.

    Args:
        sim_maps: ``(N, P, H, W)`` word similarity maps at image resolution.
    Returns:
        ``(values, ys, xs)``, each ``(N, P)`` (values float, coordinates long).
    """
    if sim_maps.dim() != 4:
        raise ValueError("sim_maps must be (N, P, H, W)")
    N, P, H, W = sim_maps.shape
    flat = sim_maps.detach().reshape(N, P, H * W)
    idx = _first_argmax_flat(flat)
    values = flat.gather(2, idx[..., None])[..., 0]
    return values, idx // W, idx % W


def top_locations_from_maxima(values: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor,
                              n: int) -> torch.Tensor:
    """Each word's ``n`` highest-activating locations, one per image.

    Given the per-image maxima of every word (``values[i, p]`` at
    ``(ys[i, p], xs[i, p])``), word ``p`` gets the ``n`` images with the
    largest ``values[:, p]`` (ties: lower image index first), in descending
    order of value. ``n`` is capped at N.

    Args:
        values, ys, xs: ``(N, P)``.
        n: locations per word.
    Returns:
        ``(P, min(n, N), 3)`` long tensor of ``(image index, y, x)``.
    """
    N, P = values.shape
    n = min(int(n), N)
    order = torch.argsort(values.t(), dim=1, descending=True, stable=True)[:, :n]  # (P, n)
    pidx = torch.arange(P, device=values.device)[:, None].expand(P, n)
    yy = ys.t().to(values.device)[pidx, order]
    xx = xs.t().to(values.device)[pidx, order]
    return torch.stack([order, yy.long(), xx.long()], dim=-1).long()


def top_locations(sim_maps: torch.Tensor, n: int) -> torch.Tensor:
    """Each word's ``n`` top-activating ``(image, y, x)``, at most one per image.

    For every word: take the argmax pixel of its map in each image
    (:func:`word_argmax_locations`, first in row-major order on ties), then
    keep the ``n`` images where that maximum is highest
    (:func:`top_locations_from_maxima`).

    Args:
        sim_maps: ``(N, P, H, W)`` similarity maps upsampled to image size.
        n: locations per word (capped at N).
    Returns:
        ``(P, min(n, N), 3)`` long tensor of ``(image index, y, x)``.
    """
    v, ys, xs = word_argmax_locations(sim_maps)
    return top_locations_from_maxima(v, ys, xs, n)


def part_purity(locations: Union[torch.Tensor, Sequence[Sequence[Sequence[int]]]],
                part_masks: torch.Tensor, part_names: Sequence[str]) -> Dict[str, object]:
    """How pure each word's top locations are with respect to object parts.

    Each location ``(i, y, x)`` is assigned to the first part ``k`` (in the
    order of ``part_masks`` / ``part_names``) with ``part_masks[i, k, y, x]``;
    a location in no part goes to ``"background"``, a category of its own.
    For word ``p`` with counts ``c_{p,j}`` over the K+1 categories:
    ``purity_p = max_j c_{p,j} / sum_j c_{p,j}`` and the dominant category is
    the argmax (ties: the earlier category, parts before background).

    Args:
        locations: ``(P, n, 3)`` long tensor of ``(image, y, x)``, or a list
            (per word) of lists of ``(image, y, x)`` (ragged allowed).
        part_masks: ``(N, K, H, W)`` bool.
        part_names: K names.
    Returns:
        dict with
        * ``"categories"``: ``list(part_names) + ["background"]``;
        * ``"counts"``: ``(P, K+1)`` long tensor;
        * ``"purity"``: ``(P,)`` float64 (NaN for a word without locations);
        * ``"dominant"``: list of P names (None for a word without locations);
        * ``"mean_purity"``: mean over words with locations.
    """
    if part_masks.dim() != 4:
        raise ValueError("part_masks must be (N, K, H, W)")
    if part_masks.dtype != torch.bool:
        part_masks = part_masks != 0
    N, K, H, W = part_masks.shape
    if len(part_names) != K:
        raise ValueError("need one name per part mask")
    categories = list(part_names) + ["background"]
    pm = part_masks.cpu()
    if isinstance(locations, torch.Tensor):
        per_word = [locations[p].reshape(-1, 3).long().cpu() for p in range(locations.shape[0])]
    else:
        per_word = [torch.as_tensor(list(w), dtype=torch.long).reshape(-1, 3) for w in locations]
    P = len(per_word)
    counts = torch.zeros(P, K + 1, dtype=torch.long)
    for p, loc in enumerate(per_word):
        if loc.numel() == 0:
            continue
        i, y, x = loc[:, 0], loc[:, 1], loc[:, 2]
        inside = pm[i, :, y, x]  # (n, K)
        has = inside.any(dim=1)
        first = torch.where(has, _first_argmax_flat(inside.to(torch.int8)), torch.full_like(i, K))
        counts[p] = torch.bincount(first, minlength=K + 1)
    tot = counts.sum(dim=1)
    best = _first_argmax_flat(counts)
    purity = torch.where(tot > 0, counts.max(dim=1).values.double() / tot.clamp(min=1).double(),
                         torch.full((P,), float("nan"), dtype=torch.float64))
    dominant = [categories[int(best[p])] if int(tot[p]) > 0 else None for p in range(P)]
    mean_purity, _ = image_mean(purity)
    return {"categories": categories, "counts": counts, "purity": purity,
            "dominant": dominant, "mean_purity": mean_purity}


# ---------------------------------------------------------------------------
# 2. classes per word
# ---------------------------------------------------------------------------

def word_use(weight: torch.Tensor, rel: float = 0.5) -> torch.Tensor:
    """Which classes use which words: ``use[c, p] = W[c, p] > 0 and W[c, p] >= rel * max_c' W[c', p]``.
    weight ``(C, P)`` -> ``(C, P)`` bool."""
    w = weight.detach().double()
    wmax = w.max(dim=0, keepdim=True).values
    return (w > 0) & (w >= rel * wmax)


def classes_per_word(weight: torch.Tensor, rel: float = 0.5) -> Tuple[torch.Tensor, float]:
    """Number of classes that use each word, from the last-layer weights.

    ``count_p = #{c : W[c, p] > 0 and W[c, p] >= rel * max_c W[c, p]}``;
    a word whose largest weight is <= 0 serves 0 classes. With ProtoPNet's
    initialisation (+1 own class, -0.5 elsewhere) every word serves 1 class.

    Args:
        weight: ``(C, P)`` last-layer weight (classes x words).
        rel: relative threshold (0.5 by default).
    Returns:
        ``(counts, mean)``: ``(P,)`` long tensor and its mean over words.
    """
    counts = word_use(weight, rel).sum(dim=0).long()
    mean = float(counts.double().mean().item()) if counts.numel() else float("nan")
    return counts, mean


# ---- 3. fair top locations: at the latent cell, within the pointing tolerance -------------------
# The exact-pixel rule above scores the argmax of a bicubic-upsampled H x W map: bicubic overshoots,
# and at a 4 x 4 grid most single-cell peaks land on pixels that no object can cover. These rules
# score the cell the model itself reads (the argmax of the raw map, i.e. where d_min is attained).

def cell_box(h: int, w: int, grid: Tuple[int, int], size: int) -> Tuple[int, int, int, int]:
    """Pixel footprint ``[y0, y1) x [x0, x1)`` of latent cell ``(h, w)`` of an ``Hg x Wg`` grid laid
    over a ``size x size`` image: ``y0 = floor(h S / Hg)``, ``y1 = floor((h + 1) S / Hg)`` (x alike);
    the footprints tile the image."""
    Hg, Wg = grid
    return (h * size // Hg, (h + 1) * size // Hg, w * size // Wg, (w + 1) * size // Wg)


def cell_centre(h: torch.Tensor, w: torch.Tensor, grid: Tuple[int, int],
                size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The pixel that holds the centre of the cells' footprints: ``y = floor((h + 1/2) S / Hg)``
    (pixel y spans [y, y + 1); x alike). h, w: long tensors of any shape."""
    Hg, Wg = grid
    ys = torch.div((2 * h.long() + 1) * size, 2 * Hg, rounding_mode='floor').clamp(0, size - 1)
    xs = torch.div((2 * w.long() + 1) * size, 2 * Wg, rounding_mode='floor').clamp(0, size - 1)
    return ys, xs


def cells_on_mask(cells: torch.Tensor, masks: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Whether each cell's footprint (:func:`cell_box`) holds a pixel of its image's mask.

    Args:
        cells: ``(..., 3)`` long ``(image, h, w)``.
        masks: ``(N, S, S)`` bool.
        grid: ``(Hg, Wg)``.
    Returns:
        bool tensor of shape ``cells.shape[:-1]``.
    """
    S = masks.shape[-1]
    flat = cells.reshape(-1, 3).long().cpu()
    m = masks.cpu() != 0
    out = torch.tensor([bool(m[i, y0:y1, x0:x1].any()) for i, y0, y1, x0, x1 in
                        ((int(i), *cell_box(int(h), int(w), grid, S)) for i, h, w in flat)], dtype=torch.bool)
    return out.reshape(cells.shape[:-1])


def cells_near_mask(cells: torch.Tensor, masks: torch.Tensor, grid: Tuple[int, int], tau: float) -> torch.Tensor:
    """Whether each cell's centre pixel (:func:`cell_centre`) lies within ``tau`` of its image's mask
    (the pointing game's rule, interp_metrics.points_hit_mask: some mask pixel at distance < tau).
    cells ``(..., 3)`` long ``(image, h, w)``; masks ``(N, S, S)``. Returns bool of ``cells.shape[:-1]``."""
    flat = cells.reshape(-1, 3).long().cpu()
    ys, xs = cell_centre(flat[:, 1], flat[:, 2], grid, masks.shape[-1])
    hits = points_hit_mask(masks.cpu()[flat[:, 0]], ys[:, None], xs[:, None], tau)[:, 0]
    return hits.reshape(cells.shape[:-1])


def map_top_cells(maps: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """The latent cell a full-resolution map points at: the argmax (first in row-major order) of
    the map averaged per cell by adaptive average pooling to the grid (its windows are the
    :func:`cell_box` footprints when Hg divides S; otherwise they overlap by a pixel), so that a
    map at image resolution (Grad-CAM, a peer's) is scored by the same cell rule as a word.
    maps ``(N, S, S)`` -> ``(N, 3)`` long ``(image, h, w)`` with image = 0..N-1."""
    pooled = F.adaptive_avg_pool2d(maps.detach().float()[:, None], grid)[:, 0]  # (N, Hg, Wg)
    N = maps.shape[0]
    idx = _first_argmax_flat(pooled.reshape(N, -1))
    return torch.stack([torch.arange(N), idx.cpu() // grid[1], idx.cpu() % grid[1]], dim=1).long()


def cell_parts(cells: torch.Tensor, part_masks: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """The part each cell points at: the part with the most pixels in the cell's footprint
    (:func:`cell_box`; ties to the earlier part), ``K`` (background) when the footprint holds no
    part pixel; the cell rule of :func:`cells_on_mask`, one category per cell.

    Args:
        cells: ``(..., 3)`` long ``(image, h, w)``.
        part_masks: ``(N, K, S, S)`` bool.
        grid: ``(Hg, Wg)``.
    Returns:
        long tensor of shape ``cells.shape[:-1]`` with values in ``0..K``.
    """
    K, S = part_masks.shape[1], part_masks.shape[-1]
    flat = cells.reshape(-1, 3).long().cpu()
    pm = part_masks.cpu() != 0
    out = []
    for i, h, w in flat.tolist():
        y0, y1, x0, x1 = cell_box(h, w, grid, S)
        pixels = pm[i, :, y0:y1, x0:x1].flatten(1).sum(dim=1)  # (K,)
        out.append(int(_first_argmax_flat(pixels[None])[0]) if int(pixels.max()) > 0 else K)
    return torch.tensor(out, dtype=torch.long).reshape(cells.shape[:-1])


def word_part_counts(categories: torch.Tensor, K: int) -> torch.Tensor:
    """Per word, how many of its top cells point at each part and at the background:
    categories ``(P, n)`` in ``0..K`` (:func:`cell_parts`) -> ``(P, K+1)`` long."""
    return torch.stack([torch.bincount(row, minlength=K + 1) for row in categories.long().cpu()])


def class_part_coverage(use: torch.Tensor, dominant: torch.Tensor, K: int) -> torch.Tensor:
    """Whether each class's words cover each part: ``covered[c, k] = any_p use[c, p] and
    dominant[p] = k``, with ``use`` ``(C, P)`` bool (:func:`word_use`) and ``dominant`` ``(P,)`` the
    category (``0..K``, ``K`` background) most of word p's top cells point at. -> ``(C, K)`` bool."""
    one_hot = F.one_hot(dominant.long().cpu(), K + 1)[:, :K].bool()   # (P, K)
    return (use.cpu()[:, :, None] & one_hot[None]).any(dim=1)


def distinct_words(prototype_vectors: torch.Tensor) -> int:
    """Number of distinct word vectors (exact equality of the P rows of ``(P, D[, 1, 1])``): after a
    push, words on the same patch are equal, so ``P - distinct`` words are duplicates, which a
    classes-per-word count would otherwise read as sharing."""
    return int(torch.unique(prototype_vectors.detach().reshape(prototype_vectors.shape[0], -1).cpu(), dim=0).shape[0])
