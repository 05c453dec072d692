"""Metrics of the visual words of a word model (LVW or ProtoPNet mode): where each word fires
(its top-activating test locations), how pure those locations are in parts of the synthetic
data, and how many classes use each word in the last layer.

Same conventions as interp_metrics.py: torch tensors, batched, pixel coordinates (y, x), nothing
happens at import time.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple, Union

import torch

from interp_metrics import _first_argmax_flat, image_mean

__all__ = ["word_argmax_locations", "top_locations_from_maxima", "top_locations", "part_purity",
           "classes_per_word"]


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
    w = weight.detach().double()
    wmax = w.max(dim=0, keepdim=True).values
    use = (w > 0) & (w >= rel * wmax)
    counts = use.sum(dim=0).long()
    mean = float(counts.double().mean().item()) if counts.numel() else float("nan")
    return counts, mean
