"""Checkpoints: a state_dict plus everything needed to rebuild the model, written atomically.

A checkpoint is a dict of plain types and tensors, so `torch.load(path, weights_only=True)` reads it:
    state_dict    the model's parameters and buffers (CPU tensors, no DataParallel prefix)
    settings      the resolved settings of the run (JSON types)
    class_names   the training classes in label order
    versions      python / torch / torchvision / numpy
    + any extra entries (epoch, accuracy, kind, ...)
"""
import os
import pickle
import pickletools
import re
import warnings
import zipfile

import torch

from run.config import UserError, atomic_write, default_settings, finish_settings, to_jsonable, versions


def unwrap(model):
    return model.module if hasattr(model, 'module') else model


def save_checkpoint(model, path, settings, class_names, **extra):
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    payload = {'state_dict': state, 'settings': to_jsonable(settings), 'class_names': list(class_names),
               'versions': versions(), **extra}
    atomic_write(path, lambda f: torch.save(payload, f), mode='wb')
    return path


# the first bytes torch.save writes in its legacy (non-zip) format: the pickled magic number
LEGACY_HEAD = b'\x80\x02\x8a\x0a' + (0x1950a86a20f9469cfc6c).to_bytes(10, 'little')


def refused_global(err):
    """The class a weights_only load refused ('__main__.Net'), or None when torch refused the
    file for another reason (a damaged pickle stream gives 'Unsupported operand' and the like)."""
    found = re.search(r'Unsupported global: GLOBAL (\S+)', str(err))
    return found.group(1) if isinstance(err, pickle.UnpicklingError) and found else None


def pickle_is_whole(data):
    """True when `data` is one complete pickle stream (it parses up to its STOP), so a refusal
    is about what it holds, not about damage."""
    try:
        return any(op.name == 'STOP' for op, _, _ in pickletools.genops(data))
    except Exception:  # noqa: BLE001 - any damage in the stream
        return False


def unreadable_reason(path, err):
    """Why torch.load failed on `path`, in words a user can act on (one line). It never suggests
    loading with weights_only=False: that runs whatever code the file holds."""
    size = os.path.getsize(path)
    if size == 0:
        return 'the file is empty (0 bytes)'
    with open(path, 'rb') as f:
        head = f.read(len(LEGACY_HEAD))
    damaged = 'it is truncated or damaged (a write interrupted?); copy or save it again'
    if head.startswith(b'\x93NUMPY'):
        return 'it is a NumPy .npy array, not a PyTorch file'
    if head.startswith(b'PK'):
        if not zipfile.is_zipfile(path):
            return 'it is truncated or corrupt (an incomplete zip archive of %d bytes; copy or save it again)' % size
        try:
            with zipfile.ZipFile(path) as z:
                pickles = [n for n in z.namelist() if n.endswith('/data.pkl')]
                if not pickles:
                    return 'it is a zip archive (an .npz?), not a PyTorch file'
                intact = pickle_is_whole(z.read(pickles[0]))
        except Exception:  # noqa: BLE001 - a member that does not decompress or fails its CRC
            return damaged
        if intact and refused_global(err):
            return whole_model(refused_global(err))
        return damaged
    if head == LEGACY_HEAD:  # torch.save(..., _use_new_zipfile_serialization=False)
        return whole_model(refused_global(err)) if refused_global(err) else damaged
    if head[:1] == b'\x80':
        return 'it is not a PyTorch checkpoint (a Python pickle, written by pickle.dump rather than torch.save)'
    return 'it is not a PyTorch checkpoint (neither a zip archive nor a pickle: %d bytes of another format)' % size


def whole_model(name):
    """The reason for a file that weights_only refuses for the class `name` it pickles."""
    return ('it holds pickled Python objects (%s), not plain tensors (a whole model saved by other code?); '
            'only files of plain tensors and types, such as a state_dict, are read' % name)


def safe_load(path, map_location='cpu'):
    """torch.load(weights_only=True), without the warning torch prints about a pickle's protocol
    before refusing it (an error is reported as one line, see unreadable_reason)."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='Detected pickle protocol')
        return torch.load(path, map_location=map_location, weights_only=True)


def torch_load(path, what='checkpoint'):
    """torch.load(weights_only=True) of `path` on the CPU; a missing or unreadable file is one
    UserError line naming it."""
    if not os.path.isfile(path):
        raise UserError('%s not found: %s' % (what, path))
    try:
        return safe_load(path)
    except Exception as err:  # noqa: BLE001 - empty, truncated, .npy/.npz, pickled objects, ...
        raise UserError('cannot read %s %s: %s' % (what, path, unreadable_reason(path, err))) from None


def load_checkpoint(path):
    """A checkpoint written by this project's scripts (any kind: see checkpoint_kind)."""
    ckpt = torch_load(path, 'checkpoint')
    if isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        raise UserError('%s is a bare state_dict (e.g. ImageNet weights), not a checkpoint written by this '
                        "project's scripts" % path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('state_dict'), dict) \
            or not isinstance(ckpt.get('settings'), dict) or not isinstance(ckpt.get('class_names'), (list, tuple)):
        raise UserError('%s is not a checkpoint of this project (no state_dict, settings and class_names)' % path)
    return ckpt


# kind -> (what it is, the script that writes it)
KINDS = {'base': ('a base-model checkpoint', 'finetune_backbone.py'),
         'peer': ('a peer-method checkpoint', 'train_peer.py'),
         'words': ('an LVW checkpoint', 'main.py')}


def checkpoint_kind(ckpt):
    """'base' (finetune_backbone.py: has 'arch'), 'peer' (train_peer.py: has 'method') or
    'words' (main.py: LVW or ProtoPNet mode)."""
    if 'arch' in ckpt:
        return 'base'
    if 'method' in ckpt:
        return 'peer'
    return 'words'


def describe_kind(ckpt):
    """'a base-model checkpoint (finetune_backbone.py)' and the like, for messages."""
    kind = checkpoint_kind(ckpt)
    what, script = KINDS[kind]
    if kind == 'peer':
        what = 'a %s checkpoint' % ckpt['method']
    elif kind == 'words' and ckpt['settings'].get('class_specific'):
        what = 'a ProtoPNet-mode checkpoint'
    return '%s (%s)' % (what, script)


def require_kind(ckpt, path, wanted, script):
    """Refuse a checkpoint of another kind than `wanted` (a kind or a tuple of kinds) with one line:
    '<path> is a base-model checkpoint (finetune_backbone.py); eval_iou.py needs an LVW checkpoint (main.py)'."""
    wanted = (wanted,) if isinstance(wanted, str) else tuple(wanted)
    if checkpoint_kind(ckpt) not in wanted:
        needs = ' or '.join('%s (%s)' % KINDS[k] for k in wanted)
        raise UserError('%s is %s; %s needs %s' % (path, describe_kind(ckpt), script, needs))
    return ckpt


def state_mismatch(own, state):
    """The first difference between two state_dicts as words, or None when they fit."""
    for key, value in state.items():
        if key not in own:
            return 'unexpected key %r' % key
        if tuple(value.shape) != tuple(own[key].shape):
            return 'key %r has shape %s, expected %s' % (key, tuple(value.shape), tuple(own[key].shape))
    missing = next((key for key in own if key not in state), None)
    return None if missing is None else 'missing key %r' % missing


def load_weights(model, ckpt, path):
    """model.load_state_dict(ckpt['state_dict']); a mismatch is one line naming the file."""
    problem = state_mismatch(model.state_dict(), ckpt['state_dict'])
    if problem:
        raise UserError('%s does not fit the model its settings describe: %s' % (path, problem))
    model.load_state_dict(ckpt['state_dict'])
    return model


def checkpoint_settings(ckpt, overrides=None):
    """The run's settings from a checkpoint; names added to settings.py since then take their defaults."""
    base = default_settings()
    merged = {**base, **ckpt['settings'], **(overrides or {})}
    return finish_settings(merged)


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

    def state(self):
        """The files kept and the best, by file name (for last.pth)."""
        name = os.path.basename
        return {'saved': [[name(p), a] for p, a in self.saved],
                'best': [name(self.best[0]), self.best[1]] if self.best else None}

    def load_state(self, state):
        join = lambda n: os.path.join(self.folder, n)
        self.saved = [(join(n), a) for n, a in state['saved']]
        self.best = (join(state['best'][0]), state['best'][1]) if state['best'] else None
