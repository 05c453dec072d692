"""The IoU of eval_iou.py (spec section 8): each map binarised at its own thr-th percentile, then
IoU = (|B_G & B_A| + 1e-6) / (|B_G | B_A| + 1e-6) per image.
"""
import torch


def percentile_masks(maps, thr, region='low', chunk=256):
    """Binarise each map at its own thr-th percentile q (linear interpolation, as np.percentile).
    maps: (B, H, W) -> bool (B, H, W); low: value <= q, top: value > q (its complement)."""
    flat = maps.flatten(1).float()
    # torch.quantile takes at most 2**24 elements at a time
    q = torch.cat([torch.quantile(part, thr / 100.0, dim=1) for part in flat.split(chunk)])
    low = flat <= q[:, None]
    return (low if region == 'low' else ~low).view(maps.shape)


def mask_iou(a, b, eps=1e-6):
    """(|a & b| + eps) / (|a | b| + eps) per image; a, b: bool (B, H, W) -> (B,)."""
    inter = (a & b).flatten(1).sum(1).double()
    union = (a | b).flatten(1).sum(1).double()
    return (inter + eps) / (union + eps)


def map_iou(model_maps, gradcam_maps, thr, region='low'):
    """IoU of the binarised maps, per image."""
    return mask_iou(percentile_masks(model_maps, thr, region), percentile_masks(gradcam_maps, thr, region))
