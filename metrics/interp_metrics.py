"""Metrics that compare explanation maps with ground-truth masks.

Pure functions, no global state, nothing happens at import time. Every
function takes torch tensors and works on CPU or CUDA, batched over images.

Conventions used throughout
---------------------------
* ``maps``: ``(N, H, W)`` floating tensor, a non-negative saliency map per
  image (any scale; only the order / relative mass matters). Maps must be
  finite: every function that takes maps raises ``ValueError`` on NaN or inf
  (:func:`check_finite_maps`).
* ``masks``: ``(N, H, W)`` bool tensor (other dtypes are converted with
  ``!= 0``), same ``H, W`` as the maps.
* Per-image functions return a float tensor of shape ``(N,)``. Images a
  metric skips get ``NaN`` (e.g. a map summing to 0 in the stochastic
  pointing game; an empty mask is *not* skipped by either pointing game, it
  is a miss); :func:`image_mean` (and the pointing-game summary) aggregates
  while ignoring the NaNs.
* Pixel coordinates are ``(y, x)`` = (row, column), row-major flat index
  ``y * W + x``.
* Anything random takes a ``seed`` or a ``torch.Generator`` (CPU).

Contents
--------
Checks
    :func:`check_finite_maps`, :func:`first_nonfinite_map`
Pointing game (TorchRay semantics)
    :func:`pointing_tolerance`, :func:`map_argmax_points`,
    :func:`points_hit_mask`, :func:`dilate_mask`, :func:`pointing_game_hits`,
    :func:`pointing_game_summary`
Stochastic pointing game
    :func:`sample_map_points`, :func:`stochastic_pointing_game`
Content heatmap; SCOUTER's area size and box precision
    :func:`content_heatmap`, :func:`area_size`, :func:`mask_boxes`, :func:`box_precision`
Stability between two models' maps
    :func:`stability_iou`
(Insertion / deletion AUCs, RISE style, are in perturbation_metrics.py; the
metrics of a word model's words, part purity and classes per word, are in
word_metrics.py.)
Aggregation / reporting
    :func:`image_mean`, :func:`results_to_markdown`
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "check_finite_maps",
    "first_nonfinite_map",
    "pointing_tolerance",
    "map_argmax_points",
    "points_hit_mask",
    "dilate_mask",
    "pointing_game_hits",
    "pointing_game_summary",
    "sample_map_points",
    "stochastic_pointing_game",
    "content_heatmap",
    "area_size",
    "mask_boxes",
    "box_precision",
    "stability_iou",
    "image_mean",
    "results_to_markdown",
]


# ---------------------------------------------------------------------------
# small internal helpers
# ---------------------------------------------------------------------------

def first_nonfinite_map(maps: torch.Tensor) -> Optional[int]:
    """Index of the first map (along dim 0) holding a NaN or inf value, or None."""
    if not maps.is_floating_point() or maps.dim() == 0 or maps.numel() == 0:
        return None  # integer maps cannot hold NaN / inf; nothing to check in an empty batch
    bad = ~torch.isfinite(maps.detach().reshape(maps.shape[0], -1)).all(dim=1)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


def check_finite_maps(maps: torch.Tensor, what: str = "maps") -> torch.Tensor:
    """Raise ``ValueError`` if any map holds NaN or inf; return ``maps`` unchanged.

    Refused rather than scored: NaN compares false with everything, so the
    argmax of such a map is undefined (the row-major search then returns a
    point one row below the image, which can still land within tau of the
    mask and score a hit), and its pixel order and sampling CDF are
    meaningless too.
    """
    i = first_nonfinite_map(maps)
    if i is not None:
        raise ValueError(f"{what}: map {i} holds NaN or inf values")
    return maps


def _check_maps_masks(maps: torch.Tensor, masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if maps.dim() != 3:
        raise ValueError(f"maps must be (N, H, W), got shape {tuple(maps.shape)}")
    check_finite_maps(maps)
    if masks.shape != maps.shape:
        raise ValueError(
            f"masks shape {tuple(masks.shape)} differs from maps shape {tuple(maps.shape)}")
    if masks.dtype != torch.bool:
        masks = masks != 0
    masks = masks.to(maps.device)
    return maps, masks


def _first_argmax_flat(values: torch.Tensor) -> torch.Tensor:
    """Flat index of the maximum along the last dim; ties -> smallest index.

    ``values``: ``(..., L)``. Implemented without relying on the tie rule of
    ``torch.argmax`` so that it is the same on every device.
    """
    L = values.shape[-1]
    vmax = values.max(dim=-1, keepdim=True).values
    idx = torch.arange(L, device=values.device).expand_as(values)
    big = torch.full_like(idx, L)
    return torch.where(values == vmax, idx, big).min(dim=-1).values


def _disk_offsets(tau: float, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Integer offsets ``(dy, dx)`` with ``dy**2 + dx**2 < tau**2`` (strict)."""
    tau = float(tau)
    if tau <= 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    r = int(math.ceil(tau))
    rng = torch.arange(-r, r + 1, dtype=torch.long, device=device)
    dy, dx = torch.meshgrid(rng, rng, indexing="ij")
    keep = (dy * dy + dx * dx).double() < tau * tau
    return dy[keep], dx[keep]


def _make_generator(seed: Optional[int], generator: Optional[torch.Generator]) -> torch.Generator:
    if generator is not None:
        return generator
    g = torch.Generator(device="cpu")
    g.manual_seed(0 if seed is None else int(seed))
    return g


# ---------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------

def image_mean(values: torch.Tensor) -> Tuple[float, int]:
    """Image-averaged value ignoring skipped (NaN) images.

    ``mean = sum_{i valid} v_i / n_valid`` over the entries of ``values``
    (any shape, usually ``(N,)``) that are not NaN.

    Returns ``(mean, n_valid)``; ``mean`` is NaN when no entry is valid.
    """
    v = values.detach().reshape(-1).double()
    valid = ~torch.isnan(v)
    n = int(valid.sum().item())
    if n == 0:
        return float("nan"), 0
    return float(v[valid].sum().item() / n), n


# ---------------------------------------------------------------------------
# 1. pointing game
# ---------------------------------------------------------------------------

def pointing_tolerance(image_size: int, base: float = 15.0, base_size: int = 224) -> float:
    """Pointing-game tolerance scaled with the image side length.

    ``tau = base * image_size / base_size`` (TorchRay uses 15 px at 224 px,
    so e.g. 64 px -> 4.2857 px). ``image_size`` is the side length S of a
    square image (for non-square images pass the side you want to scale by).
    """
    return float(base) * float(image_size) / float(base_size)


def map_argmax_points(maps: torch.Tensor) -> torch.Tensor:
    """The pointing-game point of each map: the location of its maximum.

    Ties are broken by taking the *first* maximum in row-major order
    (smallest ``y * W + x``), on every device.

    Args:
        maps: ``(N, H, W)`` float.
    Returns:
        ``(N, 2)`` long tensor of ``(y, x)``.
    Raises:
        ValueError: a map holds NaN or inf (:func:`check_finite_maps`).
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must be (N, H, W), got shape {tuple(maps.shape)}")
    check_finite_maps(maps)
    N, H, W = maps.shape
    flat = _first_argmax_flat(maps.reshape(N, H * W))
    return torch.stack([flat // W, flat % W], dim=1)


def points_hit_mask(masks: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, tau: float,
                    max_elements: int = 1 << 22) -> torch.Tensor:
    """Whether each point lies within ``tau`` of its image's mask (TorchRay rule).

    A point ``(y, x)`` of image ``i`` is a hit iff some pixel ``(v, u)`` with
    ``masks[i, v, u]`` satisfies ``(v - y)**2 + (u - x)**2 < tau**2``
    (strict ``<``, as in TorchRay's ``PointingGame.evaluate``). No loop over
    pixels: the mask is gathered at the precomputed integer offsets of the
    open disk of radius ``tau`` around each point (out-of-image offsets do
    not count). ``tau <= 0`` never hits.

    Args:
        masks: ``(N, H, W)`` bool.
        ys, xs: ``(N, M)`` long, M points per image (``(N,)`` is taken as M=1).
        tau: tolerance in pixels.
        max_elements: bound on ``images * M * disk size`` processed at once.
    Returns:
        ``(N, M)`` bool (``(N,)`` if the points were given as ``(N,)``).
    """
    if masks.dtype != torch.bool:
        masks = masks != 0
    squeeze = ys.dim() == 1
    if squeeze:
        ys, xs = ys[:, None], xs[:, None]
    N, H, W = masks.shape
    M = ys.shape[1]
    device = masks.device
    ys = ys.to(device=device, dtype=torch.long)
    xs = xs.to(device=device, dtype=torch.long)
    dy, dx = _disk_offsets(tau, device)
    D = dy.numel()
    out = torch.zeros(N, M, dtype=torch.bool, device=device)
    if D == 0 or N == 0 or M == 0:
        return out[:, 0] if squeeze else out
    flat_masks = masks.reshape(N, H * W)
    chunk = max(1, max_elements // max(1, M * D))
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        yy = ys[s:e, :, None] + dy  # (n, M, D)
        xx = xs[s:e, :, None] + dx
        inside = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        idx = yy.clamp(0, H - 1) * W + xx.clamp(0, W - 1)
        vals = flat_masks[s:e].gather(1, idx.reshape(e - s, -1)).reshape(e - s, M, D)
        out[s:e] = (vals & inside).any(dim=-1)
    return out[:, 0] if squeeze else out


def dilate_mask(masks: torch.Tensor, tau: float) -> torch.Tensor:
    """Pixels within ``tau`` of the mask: the set of points that would be hits.

    ``out[i, y, x] = exists (v, u) in mask_i with (v-y)**2 + (u-x)**2 < tau**2``
    (same strict rule as :func:`points_hit_mask`), computed as a convolution
    with the open-disk structuring element. Handy for pictures.

    Args:
        masks: ``(N, H, W)`` bool.
        tau: tolerance in pixels.
    Returns:
        ``(N, H, W)`` bool.
    """
    if masks.dtype != torch.bool:
        masks = masks != 0
    device = masks.device
    dy, dx = _disk_offsets(tau, device)
    if dy.numel() == 0:
        return torch.zeros_like(masks)
    r = int(dy.abs().max().item()) if dy.numel() else 0
    k = torch.zeros(2 * r + 1, 2 * r + 1, dtype=torch.float32, device=device)
    k[dy + r, dx + r] = 1.0  # the disk is symmetric, so correlation == convolution
    x = masks[:, None].float()
    y = F.conv2d(x, k[None, None], padding=r)
    return y[:, 0] > 0.5


def pointing_game_hits(maps: torch.Tensor, masks: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-image pointing-game outcome (TorchRay semantics).

    The point is the argmax of the map (ties: first in row-major order, see
    :func:`map_argmax_points`). The image is a hit iff some mask pixel lies at
    squared Euclidean distance strictly ``< tau**2`` from the point:
    ``hit_i = 1[exists (v, u) in mask_i: (v - y_i)**2 + (u - x_i)**2 < tau**2]``.

    An empty mask has no pixel to be near, so it is a miss (0.0), not skipped:
    TorchRay's ``PointingGame.evaluate`` returns -1 (miss) for it; only its
    "difficult" filter skips (0), and that filter is the caller's business.

    Args:
        maps: ``(N, H, W)`` float saliency, finite.
        masks: ``(N, H, W)`` bool ground truth.
        tau: tolerance in pixels, e.g. ``pointing_tolerance(H)``.
    Returns:
        ``(N,)`` float: 1.0 hit, 0.0 miss (never NaN). Aggregate with
        :func:`pointing_game_summary` (class-averaged) or :func:`image_mean`.
    Raises:
        ValueError: a map holds NaN or inf (:func:`check_finite_maps`).
    """
    maps, masks = _check_maps_masks(maps, masks)
    pts = map_argmax_points(maps)
    out_dtype = maps.dtype if maps.is_floating_point() else torch.float32
    return points_hit_mask(masks, pts[:, 0], pts[:, 1], tau).to(out_dtype)


def pointing_game_summary(hits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Dict[str, object]:
    """Aggregate per-image pointing-game outcomes, class-averaged as TorchRay.

    Per class ``c``: ``acc_c = hits_c / max(1, hits_c + misses_c)`` where the
    counts run over the images with label ``c`` that are not NaN (pointing_game_hits
    never gives NaN; a caller may set NaN to leave an image out). Class ``c`` is
    *present* when ``hits_c + misses_c > 0``. All values are fractions in [0, 1].

    Returned dict:
        * ``"class_mean_present"``: the headline PG, ``mean_{c present} acc_c``
          (NaN if no class is present). A subset of the test set (e.g. a few
          evenly spaced images) may miss whole classes; averaging over the
          classes present keeps them from counting as 0.
        * ``"n_classes_present"``: how many classes that mean is over.
        * ``"class_mean_all"``: TorchRay's ``PointingGameBenchmark`` number,
          ``mean_{c=0..num_classes-1} acc_c`` with absent classes counting as
          0; equal to the above when every class is present.
        * ``"image_mean"``: plain hit rate ``sum hits / n_valid`` over images.
        * ``"per_class"``: ``(num_classes,)`` float64 tensor of ``acc_c``
          (0 for absent classes; see ``"present"``).
        * ``"present"``: ``(num_classes,)`` bool.
        * ``"hits_per_class"``, ``"misses_per_class"``: ``(num_classes,)`` long.
        * ``"n_valid"``, ``"n_skipped"``: image counts (non-NaN / NaN entries).

    Args:
        hits: ``(N,)`` from :func:`pointing_game_hits` (1 / 0, or NaN to skip).
        labels: ``(N,)`` integer class labels in ``[0, num_classes)``.
        num_classes: number of classes C.
    """
    hits = hits.detach().reshape(-1).double().cpu()
    labels = labels.detach().reshape(-1).long().cpu()
    if hits.numel() != labels.numel():
        raise ValueError("hits and labels must have the same length")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError("labels must lie in [0, num_classes)")
    valid = ~torch.isnan(hits)
    is_hit = valid & (hits > 0.5)
    is_miss = valid & ~(hits > 0.5)
    h = torch.bincount(labels[is_hit], minlength=num_classes)
    m = torch.bincount(labels[is_miss], minlength=num_classes)
    acc = h.double() / (h + m).clamp(min=1).double()
    present = (h + m) > 0
    n_valid = int(valid.sum().item())
    return {
        "class_mean_present": float(acc[present].mean().item()) if bool(present.any()) else float("nan"),
        "n_classes_present": int(present.sum().item()),
        "class_mean_all": float(acc.mean().item()) if num_classes > 0 else float("nan"),
        "image_mean": float(is_hit.sum().item() / n_valid) if n_valid else float("nan"),
        "per_class": acc,
        "present": present,
        "hits_per_class": h,
        "misses_per_class": m,
        "n_valid": n_valid,
        "n_skipped": int(hits.numel() - n_valid),
    }


# ---------------------------------------------------------------------------
# 2. stochastic pointing game
# ---------------------------------------------------------------------------

def sample_map_points(maps: torch.Tensor, num_samples: int, seed: Optional[int] = 0,
                      generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw pixels i.i.d. (with replacement) from each sum-normalised map.

    ``P_i(y, x) = max(map_i(y, x), 0) / sum max(map_i, 0)``. Sampling is by
    inverse CDF: ``U`` of shape ``(N, num_samples)`` is drawn in float64 on
    the CPU from ``generator`` (or a fresh one seeded with ``seed``), then
    moved to the maps' device, so results do not depend on the device; row
    ``i`` of ``U`` serves image ``i`` (a row is drawn even for maps that sum
    to 0; their samples are meaningless, ``(0, 0)``). Pixels with zero mass
    are never drawn.

    Returns:
        ``(ys, xs)``, each ``(N, num_samples)`` long.
    Raises:
        ValueError: a map holds NaN or inf (:func:`check_finite_maps`).
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must be (N, H, W), got shape {tuple(maps.shape)}")
    check_finite_maps(maps)
    N, H, W = maps.shape
    g = _make_generator(seed, generator)
    u = torch.rand(N, num_samples, generator=g, dtype=torch.float64).to(maps.device)
    p = maps.detach().reshape(N, H * W).double().clamp(min=0)
    cdf = torch.cumsum(p, dim=1)
    total = cdf[:, -1:]
    idx = torch.searchsorted(cdf, u * total, right=True)
    # guard against u * total rounding up to total: clip to the last pixel with mass
    pos = p > 0
    last_pos = (H * W - 1) - _first_argmax_flat(pos.flip(1).to(torch.int8))
    idx = torch.minimum(idx, last_pos[:, None])
    idx = torch.where(total > 0, idx, torch.zeros_like(idx))
    return idx // W, idx % W


def stochastic_pointing_game(maps: torch.Tensor, masks: torch.Tensor, tau: float,
                             num_samples: int = 100, seed: Optional[int] = 0,
                             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-image stochastic pointing game score, a percentage.

    The map (negatives clipped to 0) is normalised to sum 1 and treated as a
    distribution over the H*W pixels; ``num_samples`` pixels are drawn with
    replacement (:func:`sample_map_points`, seeded). Each sample is a hit by
    the pointing-game rule (a mask pixel at squared distance ``< tau**2``).

    ``score_i = 100 * (#hits_i) / num_samples``; SPG = mean over images
    (:func:`image_mean`). An empty mask scores 0 (every sample is a miss, the
    same rule as :func:`pointing_game_hits`); a map with no positive mass is
    skipped (NaN) since there is nothing to sample (the GC paper's skip).

    Args:
        maps: ``(N, H, W)`` float.
        masks: ``(N, H, W)`` bool.
        tau: tolerance in pixels.
        num_samples: draws per image (100 by default).
        seed: seed of a fresh CPU generator (ignored if ``generator`` given).
        generator: a CPU ``torch.Generator`` to draw from.
    Returns:
        ``(N,)`` float in [0, 100]; NaN only where the map sums to <= 0 after
        clipping.
    Raises:
        ValueError: a map holds NaN or inf (:func:`check_finite_maps`).
    """
    maps, masks = _check_maps_masks(maps, masks)
    ys, xs = sample_map_points(maps, num_samples, seed=seed, generator=generator)
    hit = points_hit_mask(masks, ys, xs, tau)
    score = 100.0 * hit.double().sum(dim=1) / float(num_samples)
    skip = maps.detach().flatten(1).double().clamp(min=0).sum(dim=1) <= 0
    score = torch.where(skip, torch.full_like(score, float("nan")), score)
    return score.to(maps.dtype) if maps.is_floating_point() else score.float()


# ---------------------------------------------------------------------------
# 3. content heatmap
# ---------------------------------------------------------------------------

def content_heatmap(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of the map's mass inside the mask, in percent.

    ``score_i = 100 * sum_{mask_i} m_i / sum m_i`` with ``m_i = max(map_i, 0)``;
    the reported metric is the image mean (:func:`image_mean`).

    Returns:
        ``(N,)`` float in [0, 100]; NaN for images whose map sums to <= 0
        (skipped). An empty mask is *not* skipped and scores 0.
    """
    maps, masks = _check_maps_masks(maps, masks)
    m = maps.detach().double().clamp(min=0).flatten(1)
    total = m.sum(dim=1)
    inside = (m * masks.flatten(1).double()).sum(dim=1)
    score = 100.0 * inside / total.clamp(min=torch.finfo(torch.float64).tiny)
    score = torch.where(total > 0, score, torch.full_like(score, float("nan")))
    return score.to(maps.dtype) if maps.is_floating_point() else score.float()


def area_size(maps: torch.Tensor) -> torch.Tensor:
    """SCOUTER's area size: the mean value of each map, ``sum m_i / (H * W)``.

    Maps are expected in [0, 1] (SCOUTER: the uint8 map / 255, its classes
    min-max normalised jointly); a smaller value is a more compact explanation.
    Returns ``(N,)`` float64; ``ValueError`` on NaN / inf (:func:`check_finite_maps`).
    """
    if maps.dim() != 3:
        raise ValueError("maps must be (N, H, W)")
    return check_finite_maps(maps).detach().double().flatten(1).mean(dim=1)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Bounding box of each mask as inclusive ``(y0, y1, x0, x1)``: ``(N, 4)`` long;
    ``-1`` everywhere for an empty mask."""
    if masks.dim() != 3:
        raise ValueError("masks must be (N, H, W)")
    m = masks != 0
    rows, cols = m.any(dim=2), m.any(dim=1)  # (N, H), (N, W)
    H, W = m.shape[1:]
    y = torch.arange(H, device=m.device)
    x = torch.arange(W, device=m.device)
    big = max(H, W)
    y0 = torch.where(rows, y, big).amin(dim=1)
    y1 = torch.where(rows, y, -1).amax(dim=1)
    x0 = torch.where(cols, x, big).amin(dim=1)
    x1 = torch.where(cols, x, -1).amax(dim=1)
    boxes = torch.stack([y0, y1, x0, x1], dim=1)
    return torch.where(rows.any(dim=1, keepdim=True), boxes, torch.full_like(boxes, -1))


def box_precision(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """SCOUTER's precision: the share of the map's mass inside the ground-truth box,
    ``sum_{box_i} m_i / sum m_i`` with ``m_i = max(map_i, 0)``, the box being the bounding box
    of mask i (one box per image, so the reproduction's "best of several boxes" rule is moot).

    Unlike :func:`content_heatmap` (mass inside the mask itself) the box also counts the
    background between the object's parts. Returns ``(N,)`` float64 in [0, 1]; NaN where the
    map sums to <= 0 or the mask is empty.
    """
    maps, masks = _check_maps_masks(maps, masks)
    boxes = mask_boxes(masks)
    H, W = maps.shape[1:]
    y = torch.arange(H, device=maps.device).view(1, H, 1)
    x = torch.arange(W, device=maps.device).view(1, 1, W)
    y0, y1, x0, x1 = (boxes[:, k].view(-1, 1, 1) for k in range(4))
    inside_box = (y >= y0) & (y <= y1) & (x >= x0) & (x <= x1)
    m = maps.detach().double().clamp(min=0)
    total = m.flatten(1).sum(dim=1)
    inside = (m * inside_box).flatten(1).sum(dim=1)
    score = inside / total.clamp(min=torch.finfo(torch.float64).tiny)
    valid = (total > 0) & (boxes[:, 0] >= 0)
    return torch.where(valid, score, torch.full_like(score, float("nan")))


# ---------------------------------------------------------------------------
# 4. stability IoU
# ---------------------------------------------------------------------------

def stability_iou(maps_a: torch.Tensor, maps_b: torch.Tensor, threshold: float = 100.0 / 255.0,
                  eps: float = 1e-6) -> torch.Tensor:
    """Per-image IoU of the binarised maps of two models (LFI-CAM style).

    Each map is min-max scaled per image, ``s = (m - min m) / (max m - min m)``
    (a constant map becomes all zeros, no NaN), binarised as
    ``B = s > threshold`` (strict; default 100/255), and
    ``IoU = (|A & B| + eps) / (|A | B| + eps)`` over the whole 2-D image.
    Two empty binary maps therefore give IoU 1. The reported metric is the
    image mean.

    Note: the original LFI-CAM code computed the IoU per image *row* (over the
    width and three identical channels) and averaged those rows; that quirk
    is deliberately not reproduced, this is the intended 2-D IoU.

    Args:
        maps_a, maps_b: ``(N, H, W)`` float maps of the same images.
    Returns:
        ``(N,)`` float64 IoUs in (0, 1]; ``ValueError`` on NaN / inf maps.
    """
    if maps_a.shape != maps_b.shape or maps_a.dim() != 3:
        raise ValueError("maps_a and maps_b must both be (N, H, W)")
    check_finite_maps(maps_a, "maps_a")
    check_finite_maps(maps_b, "maps_b")
    maps_b = maps_b.to(maps_a.device)

    def binarise(m: torch.Tensor) -> torch.Tensor:
        f = m.detach().flatten(1).double()
        lo = f.min(dim=1, keepdim=True).values
        hi = f.max(dim=1, keepdim=True).values
        rng = hi - lo
        s = torch.where(rng > 0, (f - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)),
                        torch.zeros_like(f))
        return s > threshold

    a, b = binarise(maps_a), binarise(maps_b)
    inter = (a & b).sum(dim=1).double()
    union = (a | b).sum(dim=1).double()
    return (inter + eps) / (union + eps)


# ---------------------------------------------------------------------------
# 5. reporting
# ---------------------------------------------------------------------------

def _fmt_value(v) -> str:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def _cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def results_to_markdown(results: Dict[str, object]) -> str:
    """Render metric results as a Markdown table.

    ``results`` maps a metric name to either a plain number, or a dict with
    keys ``"value"`` (required), ``"averaging"`` (str, e.g. "image mean" or
    "class mean (TorchRay)"), ``"params"`` (dict, rendered ``k=v`` joined by
    ", ") and optionally ``"n"`` (number of images / words averaged). Rows
    keep the dict's order; floats print with 4 decimals, NaN as ``nan``.

    Returns:
        The table as a string (header, separator, one row per metric,
        trailing newline).
    """
    lines = ["| Metric | Value | Averaging | N | Parameters |",
             "|---|---|---|---|---|"]
    for name, entry in results.items():
        if isinstance(entry, dict):
            value = entry.get("value")
            avg = entry.get("averaging", "")
            n = entry.get("n", "")
            params = entry.get("params", {}) or {}
        else:
            value, avg, n, params = entry, "", "", {}
        if isinstance(params, dict):
            ptxt = ", ".join(f"{k}={_fmt_value(v)}" for k, v in params.items())
        else:
            ptxt = str(params)
        lines.append("| " + " | ".join(_cell(c) for c in (
            name, _fmt_value(value), avg, _fmt_value(n) if n != "" else "", ptxt)) + " |")
    return "\n".join(lines) + "\n"
