"""What the peer methods share: the ResNet trunk LVW uses, how it starts, the optimiser recipe,
and map post-processing. Nothing here knows about a particular method.

A peer method is a module of this package with:
    PREFIX                       its settings prefix ('scouter', 'gc', 'lfi'): <PREFIX>_lr, _epochs, ...
    build(s, num_classes, method)  -> nn.Module; forward(x normalised (B, 3, S, S)) -> logits (B, K);
                                    the trunk is `model.trunk` (model.make_backbone: a ResNet or MobileNetV2)
    trainable_parameters(model, s)  -> the parameters its optimiser updates (after any freezing)
    train_dataset(dataset, s)    -> the training dataset (the plain ImageDataset, or a wrapper)
    batch_loss(model, images, labels, extra, s, method) -> (terms: {name: scalar, 'total': ...}, logits)
                                    images normalised; extra: the dataset's additional tensors
    explain(model, images, target=None) -> (B, S, S) maps in [0, 1] at the image size
"""
import torch
import torch.nn.functional as F

from gradcam_extract import minmax_per_image
from model import load_start_weights, make_backbone
from run.config import UserError


def make_trunk(s):
    """The same torchvision ResNet trunk as LVW's backbone (conv1 ... layer4, no pool, no fc)."""
    return make_backbone(s['base_architecture'], s.get('backbone_padding', 'zeros'))


def start_trunk(model, s, weights=None, log=print):
    """Start `model.trunk` as LVW's backbone starts: from `weights` (e.g. the fine-tuned base model,
    whose fc is skipped), else ImageNet weights if s['pretrained'] and a local file has them."""
    return load_start_weights(model.trunk, s['base_architecture'], s['pretrained'], weights, 'trunk', log)


def make_optimizer(params, s, prefix):
    """The method's optimiser and its MultiStepLR (stepped once per epoch).

    <prefix>_optimizer: 'adamw' (torch defaults otherwise) or 'sgd' (momentum 0.9);
    <prefix>_lr, <prefix>_weight_decay; lr x <prefix>_gamma at each epoch in <prefix>_milestones."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise UserError('%s: no trainable parameters' % prefix)
    kind, lr, wd = s[prefix + '_optimizer'], s[prefix + '_lr'], s[prefix + '_weight_decay']
    if kind == 'adamw':
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    elif kind == 'sgd':
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    else:
        raise UserError('%s_optimizer must be adamw or sgd, got %r' % (prefix, kind))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(s[prefix + '_milestones']),
                                                     gamma=s[prefix + '_gamma'])
    return optimizer, scheduler


def resize_maps(maps, size):
    """Bilinear resize (align_corners=False, as cv2.resize) of (B, h, w) maps to (B, size, size)."""
    if maps.shape[-2:] == (size, size):
        return maps
    return F.interpolate(maps[:, None], size=(size, size), mode='bilinear', align_corners=False)[:, 0]


def to_unit_maps(maps, size):
    """Per-image min-max to [0, 1], resized to (size, size), min-max again: (B, h, w) -> (B, size, size).
    The same post-processing as the base model's Grad-CAM (gradcam_extract.gradcam)."""
    return minmax_per_image(resize_maps(minmax_per_image(maps.float()), size).clamp_min(0))
