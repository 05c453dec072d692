"""LFI-CAM (Lee et al., ICCV 2021; ../shared/PEERS_SPEC.md section 3.2), the ImageNet / Cat&Dog /
STL10 variant, on the project's ResNet trunk.

A feature importance network (FIN) learns per-image, class-agnostic channel weights w, and the
weighted sum of the layer4 channels is an attention map that re-weights the same features, as in
ABN. With E = layer4 output (B, C, h, w) of a trunk whose conv1 has stride `lfi_conv1_stride`
(1 in the reference, so the grid is 2x larger per side than a standard ResNet's):

    F_hat_c = (E_c - min E_c) / (max E_c - min E_c)   min / max over the h*w positions;
              a constant channel -> 1, then positions where E == 0 -> 0
    g       = bilinear resize to (h, w) of the RGB mean of the normalised input  (may be negative)
    M       = F_hat * g                                (score-CAM-like masking, in feature space)
    w       = softmax_c(avgpool(FIN(M)))               FIN = lfi_fin_convs x [3x3 conv, BN, ReLU]
    A       = minmax(ReLU(sum_c w_c E_c))              per image; a constant map keeps its value
    logits  = fc(avgpool(A * E + E))

The loss is a single cross entropy on the logits: the FIN learns only through classification.
The explanation is A itself (class-agnostic), min-max normalised and resized to the image.

Deliberate differences from the reference code:
- sum_c w_c E_c is an einsum, not a Python loop over channels.
- Both min-max steps divide by a safe denominator where the range is 0 and then substitute the
  reference's NaN replacement (1 for F_hat, the unnormalised value for A). The forward values are
  identical. The reference's 0 / 0 does make the gradient wrt layer4's output NaN for a constant
  channel, but a dead channel (0 everywhere) is masked by layer4's final ReLU, whose backward keeps
  0 where its output is 0, so the trunk's gradient stays finite (tests/test_peers_lfi_cam.py); a
  constant non-zero channel (every channel of a 1 x 1 grid) is not masked, and the safe division
  keeps that one finite too. The reference code's actual failure on current torch is elsewhere:
  its NaN replacement writes in place into a tensor its backward needs.
- The FIN's convs start from kaiming_normal_(fan_out, relu), the reference's initialisation
  (lfi_fin_init='torch' gives torch's default, about 1/2.45 of its std).
- Training images as the reference draws them (lfi_augment='crop_flip'): RandomResizedCrop of the
  decoded image, then a horizontal flip; the test images are resized, not centre-cropped.
- Pooling is adaptive (the reference's AvgPool14 assumes 224 px input).
- explain() returns float maps post-processed like the base model's Grad-CAM (common.to_unit_maps);
  there is no PNG round trip, 3-channel read-back or uint8(256 x) wrap of the maximum (spec 3.4).
- Only this variant is implemented; the CIFAR variant (layer3, FIN with ReLU after every 2nd conv)
  is not.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from peers import common

PREFIX = 'lfi'


def normalise_features(features):
    """Per-channel min-max of E (B, C, h, w) over its h*w positions -> F_hat (B, C, h, w).

    F_hat_c = (E_c - min E_c) / (max E_c - min E_c); a constant channel (the reference's NaN) -> 1;
    then F_hat = 0 wherever E == 0. Differentiable; the gradient is finite for constant channels."""
    flat = features.flatten(2)
    shifted = flat - flat.amin(dim=2, keepdim=True)
    value_range = shifted.amax(dim=2, keepdim=True)
    constant = value_range == 0
    # divide by 1 where the range is 0, so that neither the value nor its gradient is 0 / 0
    scaled = shifted / torch.where(constant, torch.ones_like(value_range), value_range)
    scaled = torch.where(constant, torch.ones_like(scaled), scaled)
    scaled = torch.where(flat == 0, torch.zeros_like(scaled), scaled)
    return scaled.view_as(features)


def image_mask(images, size):
    """g = mean over RGB of the normalised images (B, 3, H, W), bilinearly resized
    (align_corners=False) to `size` (h, w) -> (B, 1, h, w), ready to broadcast over channels."""
    gray = images.mean(dim=1, keepdim=True)
    return F.interpolate(gray, size=tuple(size), mode='bilinear', align_corners=False)


def importance_weighted_attention(features, weights):
    """ReLU(sum_c w_c E_c): features E (B, C, h, w), weights w (B, C) -> (B, h, w), before min-max."""
    return F.relu(torch.einsum('bc,bchw->bhw', weights, features))


def minmax_attention(attention):
    """Per-image (A - min A) / (max A - min A) of A (B, h, w) -> (B, h, w) in [0, 1].

    A constant map keeps its unnormalised value (the reference replaces its NaN by it)."""
    flat = attention.flatten(1)
    shifted = flat - flat.amin(dim=1, keepdim=True)
    value_range = shifted.amax(dim=1, keepdim=True)
    constant = value_range == 0
    scaled = shifted / torch.where(constant, torch.ones_like(value_range), value_range)
    return torch.where(constant, flat, scaled).view_as(attention)


def fin_block(channels):
    """One FIN stage: 3x3 conv C -> C without bias (the BN has one), BatchNorm, ReLU."""
    return [nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]


def init_fin(layers):
    """The reference's initialisation of the FIN: every conv kaiming_normal_(mode='fan_out',
    nonlinearity='relu'), i.e. std sqrt(2 / (9 C)) for a 3x3 C -> C conv (about 2.45x torch's
    default std sqrt(1 / (27 C))); BatchNorm weight 1, bias 0 (torch's default too)."""
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


class LFICAMNet(nn.Module):
    """Trunk (conv1 stride lfi_conv1_stride) -> E; FIN on the masked normalised E -> w;
    attention A from w and E; fc on the pooled A * E + E."""

    def __init__(self, s, num_classes):
        super().__init__()
        self.trunk = common.make_trunk(s)
        # only the stride changes, not the weights, so standard ResNet checkpoints still load
        stride = int(s['lfi_conv1_stride'])
        self.trunk.conv1.stride = (stride, stride)
        channels = self.trunk.out_channels
        blocks = [layer for _ in range(s['lfi_fin_convs']) for layer in fin_block(channels)]
        if s['lfi_fin_init'] == 'kaiming':
            init_fin(blocks)
        # FIN up to the logits z (B, C); the softmax is applied in forward_with_attention
        self.fin = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(channels, num_classes)

    def forward_with_attention(self, images):
        """images: normalised (B, 3, S, S) -> (logits (B, K), A (B, h, w) in [0, 1] unless constant,
        w (B, C) summing to 1 per image)."""
        features = self.trunk(images)
        masked = normalise_features(features) * image_mask(images, features.shape[-2:])
        weights = F.softmax(self.fin(masked), dim=1)
        attention = minmax_attention(importance_weighted_attention(features, weights))
        attended = attention[:, None] * features + features
        logits = self.fc(attended.mean(dim=(2, 3)))
        return logits, attention, weights

    def forward(self, images):
        return self.forward_with_attention(images)[0]


def build(s, num_classes, method):
    return LFICAMNet(s, num_classes)


def trainable_parameters(model, s):
    """Everything is trained: trunk, FIN and fc."""
    return list(model.parameters())


def train_dataset(dataset, s):
    """LFI-CAM needs nothing beyond the image and its label."""
    return dataset


def batch_loss(model, images, labels, extra, s, method):
    """A single cross entropy on the logits (no attention-branch loss, unlike ABN); extra is ()."""
    logits = model(images)
    cross_entropy = F.cross_entropy(logits, labels)
    return {'cross_entropy': cross_entropy, 'total': cross_entropy}, logits


def explain(model, images, target=None):
    """The attention map A of each image -> (B, S, S) in [0, 1], S = images.shape[-1].

    A is class-agnostic, so `target` is accepted for the common interface and ignored. The model
    runs in eval mode for the call and returns to its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, attention, _ = model.forward_with_attention(images)
    finally:
        model.train(was_training)
    return common.to_unit_maps(attention, images.shape[-1])
