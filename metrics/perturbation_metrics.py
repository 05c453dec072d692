"""Insertion / deletion AUCs (RISE style) of explanation maps, scored by a model.

Pure functions over torch tensors, batched over images and perturbation steps;
same conventions as interp_metrics.py: ``maps`` is ``(N, H, W)`` and finite
(``ValueError`` otherwise, :func:`interp_metrics.check_finite_maps`), images
are ``(N, C, H, W)`` normalised. Moved out of interp_metrics.py to keep each
module short.

Contents
    :func:`gaussian_blur`, :func:`perturbation_curves`, :func:`curve_auc`,
    :func:`insertion_auc`, :func:`deletion_auc`
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from metrics.interp_metrics import check_finite_maps

__all__ = ["gaussian_blur", "perturbation_curves", "curve_auc", "insertion_auc", "deletion_auc"]


def gaussian_blur(images: torch.Tensor, kernel_size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Per-channel Gaussian blur, as RISE does for the insertion baseline.

    Kernel ``k(a, b) proportional to exp(-(a**2 + b**2) / (2 sigma**2))`` for
    ``a, b in [-(ks//2), ks//2]``, normalised to sum 1, applied to each
    channel separately with *zero* padding (as RISE's ``conv2d(...,
    padding=klen//2)``; on normalised images zero is the mean colour). RISE
    derives its kernel from ``scipy.ndimage.gaussian_filter`` of a delta,
    which differs slightly from this sampled Gaussian.

    Args:
        images: ``(N, C, H, W)`` float.
    Returns:
        ``(N, C, H, W)`` blurred images.
    """
    if kernel_size % 2 != 1:
        raise ValueError("kernel_size must be odd")
    C = images.shape[1]
    r = kernel_size // 2
    a = torch.arange(-r, r + 1, dtype=torch.float64, device=images.device)
    g1 = torch.exp(-(a * a) / (2.0 * float(sigma) ** 2))
    k = g1[:, None] * g1[None, :]
    k = (k / k.sum()).to(images.dtype)
    weight = k[None, None].expand(C, 1, kernel_size, kernel_size).contiguous()
    return F.conv2d(images, weight, padding=r, groups=C)


def _pixel_ranks(maps: torch.Tensor) -> torch.Tensor:
    """Rank of every pixel in descending map order, stable (ties: lower index first)."""
    N, H, W = maps.shape
    flat = maps.reshape(N, H * W)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ar = torch.arange(H * W, device=maps.device).expand(N, -1)
    ranks.scatter_(1, order, ar)
    return ranks


@torch.no_grad()
def _predict_batched(predict_proba: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                     batch_size: int) -> torch.Tensor:
    outs = [predict_proba(images[s:s + batch_size]) for s in range(0, images.shape[0], batch_size)]
    return torch.cat(outs, dim=0)


@torch.no_grad()
def perturbation_curves(predict_proba: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                        maps: torch.Tensor, mode: str = "insertion", step: Optional[int] = None,
                        batch_size: int = 128, baseline: Optional[torch.Tensor] = None,
                        targets: Optional[torch.Tensor] = None, blur_kernel_size: int = 11,
                        blur_sigma: float = 5.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """RISE-style insertion or deletion curves, batched over images and steps.

    Pixel order: descending map value, ties broken by ascending flat index
    (stable sort). With ``L = H * W`` and ``n = ceil(L / step) + 1``, step
    ``k = 0 .. n-1`` has the first ``c_k = min(k * step, L)`` pixels of that
    order changed (so ``c_0 = 0`` and ``c_{n-1} = L``):

    * insertion: start from ``baseline`` (default
      ``gaussian_blur(images, 11, 5)`` on the normalised image) and copy the
      original pixels (all channels) in;
    * deletion: start from the image and set the pixels to 0 in normalised
      space (i.e. the dataset mean colour).

    ``curve[i, k] = predict_proba(x_{i,k})[target_i]`` where ``target_i`` is
    the class the model predicts on the clean image (argmax of
    ``predict_proba(images)``) unless ``targets`` is given.

    The ``N * n`` perturbed images are built on the fly and fed
    ``batch_size`` at a time (mixing images and steps), under
    ``torch.no_grad``.

    Args:
        predict_proba: maps ``(B, 3, H, W)`` -> ``(B, K)`` probabilities
            (softmax). Called in eval mode as given; set ``model.eval()``.
        images: ``(N, C, H, W)`` normalised images.
        maps: ``(N, H, W)`` saliency at image resolution.
        mode: ``"insertion"`` or ``"deletion"``.
        step: pixels per step; default ``W`` (one image row, as in the
            SCOUTER reproduction's RISE evaluation).
        batch_size: images per forward pass.
        baseline: ``(N, C, H, W)`` insertion start (overrides the blur).
        targets: ``(N,)`` classes to score instead of the clean prediction.
    Returns:
        ``(curves, targets)``: ``(N, n)`` float curves and ``(N,)`` long targets.
    Raises:
        ValueError: a map holds NaN or inf (:func:`check_finite_maps`).
    """
    if mode not in ("insertion", "deletion"):
        raise ValueError("mode must be 'insertion' or 'deletion'")
    if images.dim() != 4 or maps.dim() != 3 or images.shape[0] != maps.shape[0] \
            or images.shape[2:] != maps.shape[1:]:
        raise ValueError("images must be (N, C, H, W) and maps (N, H, W) with matching N, H, W")
    check_finite_maps(maps)  # NaN would sort anywhere and make the pixel order arbitrary
    N, C, H, W = images.shape
    L = H * W
    step = W if step is None else int(step)
    if step <= 0:
        raise ValueError("step must be positive")
    n = int(math.ceil(L / step)) + 1
    device = images.device
    maps = maps.to(device)

    if targets is None:
        clean = _predict_batched(predict_proba, images, batch_size)
        targets = clean.argmax(dim=1)
    targets = targets.to(device=device, dtype=torch.long)

    if mode == "insertion":
        start = gaussian_blur(images, blur_kernel_size, blur_sigma) if baseline is None else baseline.to(device)
        end = images
    else:
        start = images
        end = torch.zeros_like(images)

    ranks = _pixel_ranks(maps).reshape(N, 1, H, W)
    counts = torch.clamp(torch.arange(n, device=device) * step, max=L)  # (n,)
    curves = torch.empty(N, n, dtype=torch.float32, device=device)
    total = N * n
    for s in range(0, total, batch_size):
        e = min(total, s + batch_size)
        j = torch.arange(s, e, device=device)
        ii, kk = j // n, j % n
        changed = (ranks[ii] < counts[kk].view(-1, 1, 1, 1)).to(images.dtype)  # (B,1,H,W)
        x = start[ii] + changed * (end[ii] - start[ii])
        prob = predict_proba(x)
        curves[ii, kk] = prob.gather(1, targets[ii][:, None])[:, 0].float()
    return curves, targets


def curve_auc(curves: torch.Tensor) -> torch.Tensor:
    """Normalised trapezoid area under curves sampled at equally spaced points.

    For a curve ``s_0 .. s_{n-1}`` (x-axis = fraction of pixels, 0..1):
    ``AUC = (sum_k s_k - s_0 / 2 - s_{n-1} / 2) / (n - 1)``.
    Linear in the curve, so the mean of per-image AUCs equals the AUC of the
    mean curve.

    Args:
        curves: ``(..., n)`` with ``n >= 2``.
    Returns:
        ``(...)`` AUCs.
    """
    n = curves.shape[-1]
    if n < 2:
        raise ValueError("a curve needs at least 2 points")
    return (curves.sum(dim=-1) - curves[..., 0] / 2 - curves[..., -1] / 2) / (n - 1)


def insertion_auc(predict_proba: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                  maps: torch.Tensor, step: Optional[int] = None, batch_size: int = 128,
                  return_curves: bool = False, baseline: Optional[torch.Tensor] = None,
                  targets: Optional[torch.Tensor] = None, blur_kernel_size: int = 11,
                  blur_sigma: float = 5.0):
    """Per-image insertion AUC (higher is better).

    ``auc_i = curve_auc(curve_i)`` with the insertion curve of
    :func:`perturbation_curves` (blurred start, original pixels inserted in
    descending map order, ``step`` = W pixels per step by default). The
    reported metric is the image mean.

    Returns:
        ``(N,)`` AUCs, or ``(aucs, curves (N, n), targets (N,))`` if
        ``return_curves``.
    """
    curves, tg = perturbation_curves(predict_proba, images, maps, "insertion", step, batch_size,
                                     baseline, targets, blur_kernel_size, blur_sigma)
    aucs = curve_auc(curves)
    return (aucs, curves, tg) if return_curves else aucs


def deletion_auc(predict_proba: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                 maps: torch.Tensor, step: Optional[int] = None, batch_size: int = 128,
                 return_curves: bool = False, targets: Optional[torch.Tensor] = None):
    """Per-image deletion AUC (lower is better).

    ``auc_i = curve_auc(curve_i)`` with the deletion curve of
    :func:`perturbation_curves` (pixels set to 0 in normalised space in
    descending map order, ``step`` = W pixels per step by default). The
    reported metric is the image mean.

    Returns:
        ``(N,)`` AUCs, or ``(aucs, curves (N, n), targets (N,))`` if
        ``return_curves``.
    """
    curves, tg = perturbation_curves(predict_proba, images, maps, "deletion", step, batch_size,
                                     None, targets)
    aucs = curve_auc(curves)
    return (aucs, curves, tg) if return_curves else aucs
