"""Checkpoints: a state_dict plus everything needed to rebuild the model, written atomically.

A checkpoint is a dict of plain types and tensors, so `torch.load(path, weights_only=True)` reads it:
    state_dict    the model's parameters and buffers (CPU tensors, no DataParallel prefix)
    settings      the resolved settings of the run (JSON types)
    class_names   the training classes in label order
    versions      python / torch / torchvision / numpy
    + any extra entries (epoch, accuracy, kind, ...)
"""
import os

import torch

from config import UserError, atomic_write, default_settings, finish_settings, to_jsonable, versions


def unwrap(model):
    return model.module if hasattr(model, 'module') else model


def save_checkpoint(model, path, settings, class_names, **extra):
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    payload = {'state_dict': state, 'settings': to_jsonable(settings), 'class_names': list(class_names),
               'versions': versions(), **extra}
    atomic_write(path, lambda f: torch.save(payload, f), mode='wb')
    return path


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError('checkpoint not found: %s' % path)
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # truncated file, pickled model from the reference code, ...
        raise UserError('cannot read checkpoint %s: %s' % (path, str(err).splitlines()[0])) from None
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt or 'settings' not in ckpt:
        raise UserError('%s is not a checkpoint of this project (no state_dict and settings)' % path)
    return ckpt


def checkpoint_settings(ckpt, overrides=None):
    """The run's settings from a checkpoint; names added to settings.py since then take their defaults."""
    base = default_settings()
    base.pop('presets')
    merged = {**base, **ckpt['settings'], **(overrides or {})}
    return finish_settings(merged)


def model_from_checkpoint(ckpt, device='cpu', overrides=None):
    """Rebuild the LVW network from what the checkpoint stores (not from the current settings.py)."""
    from model import build_model
    s = checkpoint_settings(ckpt, overrides)
    model = build_model(dict(s, pretrained=False), log=lambda *_: None)
    model.load_state_dict(ckpt['state_dict'])
    return model.to(device).eval(), s


def checkpoint_name(epoch, accuracy, kind, iteration=None):
    """<epoch>nopush<acc>.pth, <epoch>push<acc>.pth, <epoch>_<i>push<acc>.pth (acc: 4 decimals)."""
    if kind == 'last':
        return '%d_%dpush%.4f.pth' % (epoch, iteration, accuracy)
    return '%d%s%.4f.pth' % (epoch, kind, accuracy)


class CheckpointKeeper:
    """Saves a checkpoint when test accuracy > threshold; with `keep` set, deletes all but the
    `keep` newest saved files and the most accurate one."""

    def __init__(self, folder, threshold, keep=None, log=print):
        self.folder, self.threshold, self.keep, self.log = folder, threshold, keep, log
        self.saved = []  # (path, accuracy), oldest first
        self.best = None

    def __call__(self, model, name, accuracy, settings, class_names, **extra):
        if accuracy <= self.threshold:
            return None
        path = save_checkpoint(model, os.path.join(self.folder, name), settings, class_names,
                               accuracy=accuracy, **extra)
        self.saved.append((path, accuracy))
        if self.best is None or accuracy > self.best[1]:
            self.best = (path, accuracy)
        if self.keep:
            newest = {p for p, _ in self.saved[-self.keep:]} | {self.best[0]}
            for old, _ in [item for item in self.saved if item[0] not in newest]:
                if os.path.exists(old):
                    os.remove(old)
            self.saved = [item for item in self.saved if item[0] in newest]
        return path
