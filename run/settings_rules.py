"""One rule per name of settings.py, checked by config.finish_settings (so settings.py, presets,
-set overrides and the settings stored in checkpoints are all checked alike).

A rule is a function rule(name, value, s) that raises run.errors.UserError
'setting NAME must be WHAT, got VALUE' when `value` is wrong; `s` is the whole settings dict. The
rules are made by the helpers below: _int(lo, hi), _number(lo, hi, above) (above=True: > lo),
_bool, _choice(...), _text(), _folder(), _list(item), _dict(keys, item), _shape, _epochs_before(name),
_increasing(item) (none=True also accepts None). A scalar rule also carries `expected` (its text)
and `ok(value)`, from which run.config makes the command lines' flag types (the same ranges). They are checked in this table's order, so a rule may rely on the
names above it (push_epochs on num_train_epochs).
Cross-name checks (words per class, topk) follow in config.finish_settings.
"""
import os
import unicodedata

from run.errors import UserError


# ---- rule helpers ------------------------------------------------------------------------------
# Each helper makes a rule(name, value, s) that raises UserError('setting NAME must be WHAT, got
# VALUE'). Whole numbers are ints (not floats, not bools); numbers are finite ints or floats.

def _bad(name, expected, value):
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + '...'
    raise UserError('setting %s must be %s, got %s' % (name, expected, shown))


_is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)

def _scalar(expected, ok, none=False):
    """The rule 'ok(value)' (or value is None, with none=True), described as `expected`."""
    expected = 'None or ' + expected if none else expected

    def rule(name, value, s):
        if not ((none and value is None) or ok(value)):
            _bad(name, expected, value)
    rule.expected, rule.ok = expected, (lambda v: (none and v is None) or ok(v))
    return rule


def _range(kind, test, lo, hi, above, none=False):
    """`kind` values v with test(v) in [lo, hi] (either end None: open; above=True excludes lo)."""
    text = (' in %s%s, %s]' % ('(' if above else '[', lo, hi) if lo is not None and hi is not None else
            ' %s %s' % ('>' if above else '>=', lo) if lo is not None else ' <= %s' % hi if hi is not None else '')
    ok = lambda v: test(v) and (lo is None or v > lo or (v == lo and not above)) and (hi is None or v <= hi)
    return _scalar(kind + text, ok, none)


def _int(lo=None, hi=None, none=False):
    return _range('a whole number', _is_int, lo, hi, False, none)


def _number(lo=None, hi=None, above=False, none=False):
    return _range('a number', lambda v: isinstance(v, float) and abs(v) < float('inf') or _is_int(v), lo, hi, above,
                  none)


def _choice(*options):
    return _scalar('one of ' + ', '.join(map(repr, options)),
                   lambda v: any(type(v) is type(o) and v == o for o in options))  # 1.0 and True are not 1


_bool = _scalar('True or False', lambda v: isinstance(v, bool))


def _text(none=False):
    return _scalar('a non-empty string', lambda v: isinstance(v, str) and v != '', none)


def plain_folder_name(v):
    """True for one plain folder name: joined to saved_models/<arch>/, it stays inside that folder
    (no path separator, not '.' or '..'), and it holds no control or line-breaking character (a
    newline would split every log line that names the folder)."""
    return (isinstance(v, str) and v not in ('', '.', '..') and not v[0].isspace() and v[0] != '-'
            and not any(c in v for c in ('/', '\\', os.sep, os.altsep or '/'))
            and not any(unicodedata.category(c) in ('Cc', 'Cf', 'Zl', 'Zp') for c in v))


FOLDER_TEXT = ("a plain folder name (no '/' or control character, not '.' or '..', not empty or starting with "
               "'-' or a space)")


def _folder(none=False):
    return _scalar(FOLDER_TEXT, plain_folder_name, none)


def _list(item, none=False):
    """A list or tuple whose entries NAME[i] pass `item`."""
    def rule(name, value, s):
        if not (none and value is None or isinstance(value, (list, tuple))):
            _bad(name, 'None or a list' if none else 'a list', value)
        for i, v in enumerate(value or ()):
            item('%s[%d]' % (name, i), v, s)
    return rule


def _dict(keys, item):
    """A dict with exactly `keys`, whose values NAME[key] pass `item`."""
    expected = 'a dict with exactly the keys ' + ', '.join(map(repr, keys))

    def rule(name, value, s):
        found = value if isinstance(value, dict) else {}
        wrong = ['%s %s' % (what, ', '.join(map(repr, ks))) for what, ks in (
            ('missing', [k for k in keys if k not in found]), ('unknown', [k for k in found if k not in keys])) if ks]
        if not isinstance(value, dict) or wrong:
            _bad(name, expected + (' (%s)' % '; '.join(wrong) if wrong else ''), value)
        for k in keys:
            item('%s[%r]' % (name, k), value[k], s)
    return rule


def _increasing(item):
    """A list whose entries pass `item` and increase strictly (no entry twice): a schedule's
    milestones, where a repeat would apply the decay twice and an unsorted list reads as a mistake."""
    entries = _list(item)

    def rule(name, value, s):
        entries(name, value, s)
        if any(b <= a for a, b in zip(value, value[1:])):
            _bad(name, 'a list in increasing order, each entry once', value)
    return rule


def _epochs_before(limit):  # None, or a list of epochs in [0, s[limit])
    def rule(name, value, s):
        epoch = _scalar('an epoch in [0, %d) as %s is %d' % (s[limit], limit, s[limit]),
                        lambda v: _is_int(v) and 0 <= v < s[limit])
        _list(epoch, none=True)(name, value, s)
    return rule


_shape = _scalar('(P, D, 1, 1) with whole numbers P, D >= 1', lambda v: isinstance(v, (list, tuple)) and len(v) == 4
                 and all(_is_int(x) and x >= 1 for x in v) and tuple(v[2:]) == (1, 1))


# ---- the rules of settings.py's names ----------------------------------------------------------

_lr = _number(0, above=True)
_decay = _number(0)
_optimizer = _choice('adamw', 'sgd')
_augment = _choice('none', 'flip', 'crop_flip')  # a peer's training images (train_peer.training_images)
_milestones = _increasing(_int(0))
_method_epochs = _int(1)  # a peer trained for no epoch has no checkpoint (train_peer.py)
_interpolation = _choice('bilinear', 'bicubic')
_normalisation = _choice('max', 'minmax')
_signs = ('+', '-')  # SCOUTER+ and SCOUTER- values


RULES = {
    'dataset': _folder(),
    # model
    'base_architecture': _choice('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'mobilenet_v2'),  # model.BACKBONES
    'pretrained': _bool,
    'img_size': _int(32),
    'prototype_shape': _shape,
    'num_classes': _int(1),
    'prototype_activation_function': _choice('log', 'linear'),
    'add_on_layers_type': _choice('regular', 'bottleneck'),
    'incorrect_class_connection': _number(),
    'epsilon': _number(0, above=True),
    # data
    'experiment_run': _folder(),
    'data_path': _text(),
    'train_dir': _text(none=True),
    'test_dir': _text(none=True),
    'train_push_dir': _text(none=True),
    'train_batch_size': _int(1),
    'test_batch_size': _int(1),
    'train_push_batch_size': _int(1),
    'num_workers': _int(0),
    'image_check': _choice('header', 'full', 'off'),
    # optimisation
    'joint_optimizer_lrs': _dict(('features', 'add_on_layers', 'prototype_vectors'), _lr),
    'joint_lr_step_size': _int(1),
    'warm_optimizer_lrs': _dict(('add_on_layers', 'prototype_vectors'), _lr),
    'last_layer_optimizer_lr': _lr,
    'weight_decay': _decay,
    'coefs': _dict(('crs_ent', 'clst', 'sep', 'l1'), _number()),
    'attention_weight': _number(0),
    'topk': _int(1),  # at most the number of words: finish_settings
    'class_specific': _bool,
    # words shared across classes
    'lvw_variant': _text(),  # a key of settings.variants: config.resolve_settings checks it
    'last_layer_init': _choice('classwise', 'zero'),
    'backbone_padding': _choice('zeros', 'reflect', 'replicate'),
    'last_layer_joint_lr': _number(0, above=True, none=True),
    'push_unique': _bool,
    'push_exclude_border': _bool,
    'diversity_coef': _number(0),
    'diversity_margin': _number(-1, 1),
    'word_anchor_coef': _number(0),
    # schedule
    'num_train_epochs': _int(1),
    'num_warm_epochs': _int(0),
    'push_start': _int(0),
    'push_interval': _int(1),
    'push_epochs': _epochs_before('num_train_epochs'),
    'last_layer_iterations': _int(0),
    'save_threshold': _number(-1, 1),  # saved when accuracy > it: a negative one saves every checkpoint
    'keep_checkpoints': _int(1, none=True),
    'frozen_bn_eval': _bool,
    'last_layer_cache': _bool,
    'amp': _choice(None, 'bf16', 'fp16'),
    'channels_last': _bool,
    'persistent_workers': _bool,
    'sync_batchnorm': _bool,
    'seed': _int(),
    # attention maps
    'attention_flip': _choice('joint', 'double'),
    'train_map_interpolation': _interpolation,
    'train_map_normalisation': _normalisation,
    'eval_map_interpolation': _interpolation,
    'eval_map_normalisation': _normalisation,
    'push_save_images': _bool,
    # base model
    'finetune_epochs': _int(0),  # 0: the start weights saved as the base model, with their accuracy
    'finetune_lr': _lr,
    'finetune_batch_size': _int(1),
    'gradcam_target': _choice('pred', 'label'),
    # peers
    'peer_run': _folder(none=True),
    'scouter_hidden_dim': _int(4),  # a multiple of 4: peers/scouter.py
    'scouter_to_k_layers': _int(1),
    'scouter_iterations': _int(1),
    'scouter_slots_per_class': _dict(_signs, _int(1)),
    'scouter_lambda': _dict(_signs, _number(0)),
    'scouter_power': _number(0, above=True),
    'scouter_freeze_layers': _int(0, 4),
    'scouter_optimizer': _optimizer,
    'scouter_lr': _lr,
    'scouter_weight_decay': _decay,
    'scouter_milestones': _milestones,
    'scouter_gamma': _number(0, above=True),
    'scouter_epochs': _method_epochs,
    'scouter_batch_size': _int(1),
    'scouter_augment': _augment,
    'scouter_drop_last': _bool,
    'gc_lambda': _number(0),
    'gc_maxpool': _bool,
    'gc_optimizer': _optimizer,
    'gc_lr': _lr,
    'gc_weight_decay': _decay,
    'gc_milestones': _milestones,
    'gc_gamma': _number(0, above=True),
    'gc_epochs': _method_epochs,
    'gc_batch_size': _int(1),
    'gc_augment': _augment,
    'gc_drop_last': _bool,
    'lfi_conv1_stride': _choice(1, 2),
    'lfi_fin_convs': _int(0),
    'lfi_fin_init': _choice('kaiming', 'torch'),
    'lfi_optimizer': _optimizer,
    'lfi_lr': _lr,
    'lfi_weight_decay': _decay,
    'lfi_milestones': _milestones,
    'lfi_gamma': _number(0, above=True),
    'lfi_epochs': _method_epochs,
    'lfi_batch_size': _int(1),
    'lfi_augment': _augment,
    'lfi_drop_last': _bool,
}
