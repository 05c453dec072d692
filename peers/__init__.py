"""Peer methods trained and scored beside LVW (../shared/PEERS_SPEC.md): SCOUTER+/-, Grad-CAM
consistency (GC) and LFI-CAM, each on the same ResNet trunk as LVW. `train_peer.py` trains them,
`eval_metrics.py` scores them; a checkpoint names its method, so the kind of model is read from it.
"""
import importlib

# method name -> module of this package that implements it
METHODS = {'scouter+': 'scouter', 'scouter-': 'scouter', 'gc': 'gc_consistency', 'lfi_cam': 'lfi_cam'}
# method name -> run-folder suffix and a label for tables
RUN_NAMES = {'scouter+': 'scouter_plus', 'scouter-': 'scouter_minus', 'gc': 'gc', 'lfi_cam': 'lfi_cam'}
LABELS = {'scouter+': 'SCOUTER+', 'scouter-': 'SCOUTER-', 'gc': 'GC', 'lfi_cam': 'LFI-CAM'}
# what explain() returns, for reports
MAP_DESCRIPTIONS = {
    'scouter+': "the predicted class's slot attention (classes min-max normalised jointly), bilinear to S",
    'scouter-': "the slot attention of the class with the lowest logit (classes min-max normalised jointly), "
                "bilinear to S",
    'gc': 'element-wise Grad-CAM (grad x activation, layer4) of the predicted class, min-max, bilinear to S',
    'lfi_cam': 'the attention map of the feature importance network (class-agnostic), min-max, bilinear to S',
}


def method_module(method):
    """The module implementing `method` (one of METHODS)."""
    from run.config import UserError
    if method not in METHODS:
        raise UserError('unknown peer method %r (choose from %s)' % (method, ', '.join(METHODS)))
    return importlib.import_module('peers.' + METHODS[method])


# the peers whose recipes name ResNet layers (SCOUTER freezes layer1..4, LFI-CAM sets conv1's stride);
# GC needs only a trunk and its last feature map, so it also runs on MobileNetV2
RESNET_ONLY = ('scouter+', 'scouter-', 'lfi_cam')


def build_peer(method, s, num_classes):
    """The untrained model of `method` for resolved settings `s` (no weights loaded)."""
    module = method_module(method)
    if method in RESNET_ONLY and not s['base_architecture'].startswith('resnet'):
        from run.errors import UserError
        raise UserError('%s needs a ResNet trunk (its recipe names ResNet layers); base_architecture is %r'
                        % (LABELS[method], s['base_architecture']))
    return module.build(s, num_classes, method)


def is_peer_checkpoint(ckpt):
    return isinstance(ckpt, dict) and ckpt.get('method') in METHODS


def peer_from_checkpoint(ckpt, device='cpu', path='the checkpoint', script='this script'):
    """(model in eval mode, its settings, its method) from a checkpoint written by train_peer.py;
    a checkpoint of another kind, or one whose weights do not fit, is one UserError line naming `path`."""
    from run.checkpoint import checkpoint_settings, load_weights, require_kind
    require_kind(ckpt, path, 'peer', script)
    method = ckpt['method']
    s = checkpoint_settings(ckpt)
    model = build_peer(method, dict(s, pretrained=False), len(ckpt['class_names']))
    load_weights(model, ckpt, path)
    return model.to(device).eval(), s, method
