"""Two work folders of tiny_pipeline.sh, old code against new: every checkpoint (each tensor and
entry), the Grad-CAM arrays and sidecars, the IoU output and CSV, metrics.csv (without its time
column), metrics.json (without timings and the command), every PNG and report.md (without its
training time). A checkpoint's stored settings may hold names the old code did not have (settings
added since, each with a default): those are listed, not counted as differences.

    python results/probes/compare_runs.py OLD_WS NEW_WS     (exit status 1 when anything differs)
"""
import argparse
import glob
import hashlib
import json
import os
import sys

import torch

TIMING_KEYS = ('seconds', 'timing', 'command', 'versions')


def same_value(a, b):
    """Exact equality through dicts, lists and tuples; tensors by dtype, shape and every element."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return a == b


ADDED_SETTINGS = {}  # setting name -> value, for the names only the new checkpoints store


def same_checkpoint(a, b):
    """Two checkpoints alike in every entry and tensor; of the stored settings, those the old one
    holds must be equal, and the names only the new one holds go to ADDED_SETTINGS."""
    old, new = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    old_settings, new_settings = old.pop('settings', None), new.pop('settings', None)
    if isinstance(old_settings, dict) and isinstance(new_settings, dict):
        added = {k: new_settings.pop(k) for k in set(new_settings) - set(old_settings)}
        ADDED_SETTINGS.update(added)
    return same_value(old, new) and same_value(old_settings, new_settings)


def same_bytes(a, b):
    digest = lambda p: hashlib.sha256(open(p, 'rb').read()).hexdigest()
    return digest(a) == digest(b)


def same_metrics_csv(a, b):
    rows = lambda p: [line.split(',') for line in open(p).read().splitlines()]
    ra, rb = rows(a), rows(b)
    t = ra[0].index('time') if ra and 'time' in ra[0] else None
    strip = lambda rs: [[c for i, c in enumerate(r) if i != t] for r in rs]
    return strip(ra) == strip(rb)


def same_metrics_json(a, b):
    scrub = lambda p: {k: v for k, v in json.load(open(p)).items() if k not in TIMING_KEYS}
    return scrub(a) == scrub(b)


def same_report(a, b):
    """report.md without its wall-clock line (training time)."""
    lines = lambda p: [line for line in open(p).read().splitlines() if not line.startswith('| training time |')]
    return lines(a) == lines(b)


def compare(old, new):
    """[(relative path, 'identical' | 'DIFFERENT' | 'missing')] over everything the old folder holds."""
    rules = [('**/*.pth', same_checkpoint),
             ('data/*.npy', same_bytes), ('data/*.txt', same_bytes), ('eval_iou.out', same_bytes),
             ('saved_models/**/*_iou_thr*.csv', same_bytes), ('saved_models/**/metrics.csv', same_metrics_csv),
             ('metrics_out/metrics.json', same_metrics_json), ('**/*.png', same_bytes), ('**/report.md', same_report)]
    out = []
    for pattern, rule in rules:
        for a in sorted(glob.glob(os.path.join(old, pattern), recursive=True)):
            rel = os.path.relpath(a, old)
            b = os.path.join(new, rel)
            out.append((rel, 'missing' if not os.path.exists(b) else 'identical' if rule(a, b) else 'DIFFERENT'))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('old')
    parser.add_argument('new')
    args = parser.parse_args(argv)
    results = compare(args.old, args.new)
    for rel, verdict in results:
        print('%-72s %s' % (rel, verdict))
    kinds = {}
    for rel, verdict in results:
        kinds.setdefault(os.path.splitext(rel)[1] or rel, []).append(verdict == 'identical')
    print('compared: %s; different or missing: %d'
          % (', '.join('%d %s' % (len(v), k) for k, v in sorted(kinds.items())),
             sum(v != 'identical' for _, v in results)))
    if ADDED_SETTINGS:
        print('settings only the new checkpoints store (added since, with these defaults): %s'
              % ', '.join('%s=%r' % kv for kv in sorted(ADDED_SETTINGS.items())))
    return 1 if any(v != 'identical' for _, v in results) else 0


if __name__ == '__main__':
    sys.exit(main())
