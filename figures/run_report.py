"""A run's one-page report.md: settings, key numbers, accuracy per epoch, curves, gallery, weights,
links to metrics/ and local_analysis/. Checkpoint names are parsed here.
"""
import glob
import os
import re

import numpy as np

from figures.curves import plot_training_curves, read_metrics_csv
from figures.gallery import (USE_REL, draw_gallery, draw_weight_heatmap, push_folder, read_push_folder,
                             word_source_folder)
from run import config


CHECKPOINT_RE = re.compile(r'^(\d+)(?:_(\d+))?(nopush|push)(\d+(?:\.\d+)?)\.pth$')


def parse_checkpoint_name(name):
    """'<E>nopush<acc>.pth' | '<E>push<acc>.pth' | '<E>_<i>push<acc>.pth' ->
    dict(epoch, kind ('nopush' | 'push' | 'last'), iteration, accuracy), or None for other names."""
    m = CHECKPOINT_RE.match(os.path.basename(name))
    if not m:
        return None
    epoch, iteration, word, acc = m.groups()
    kind = 'nopush' if word == 'nopush' else ('last' if iteration is not None else 'push')
    return {'epoch': int(epoch), 'kind': kind, 'iteration': None if iteration is None else int(iteration),
            'accuracy': float(acc)}


def checkpoint_info(ckpt, path):
    """epoch and kind of a loaded checkpoint: its own entries, else its file name."""
    parsed = parse_checkpoint_name(path) or {}
    epoch = ckpt.get('epoch', parsed.get('epoch'))
    kind = ckpt.get('kind', parsed.get('kind'))
    return (None if epoch is None else int(epoch)), kind


def load_word_checkpoint(path):
    """An LVW / ProtoPNet-mode checkpoint; any other file is one UserError line naming it."""
    from run.checkpoint import load_checkpoint, require_kind
    return require_kind(load_checkpoint(path), path, 'words', 'visualize.py')


def list_checkpoints(run_dir):
    from run.config import LAST_STATE  # the resumable state of a run, not a checkpoint of its words
    names = [n for n in os.listdir(run_dir) if n.endswith('.pth') and n != LAST_STATE]
    parsed = [(n, parse_checkpoint_name(n)) for n in names]
    order = {'nopush': 0, 'push': 1, 'last': 2}
    known = sorted([(n, p) for n, p in parsed if p],
                   key=lambda t: (t[1]['epoch'], order[t[1]['kind']], t[1]['iteration'] or 0))
    return [n for n, _ in known] + sorted(n for n, p in parsed if not p)


def _pct(x):
    return 'n/a' if x is None else '%.2f%%' % (100 * x)


def _accuracy_table(rows):
    """Markdown rows: per epoch the test accuracy after its warm/joint pass, after the push and
    after the last last-layer pass."""
    per = {}
    for r in rows:
        if r['split'] != 'test' or r.get('accuracy') is None:
            continue
        entry = per.setdefault(r['epoch'], {})
        key = 'last' if r['phase'] == 'last' else ('push' if r['phase'] == 'push' else 'epoch')
        entry[key] = r['accuracy']
        entry['phase'] = entry.get('phase') or (r['phase'] if key == 'epoch' else None)
    lines = ['| epoch | phase | test acc. | after push | after last-layer passes |', '|---|---|---|---|---|']
    for e in sorted(per):
        v = per[e]
        lines.append('| %d | %s | %s | %s | %s |' % (e, v.get('phase') or '', _pct(v.get('epoch')),
                                                     _pct(v['push']) if 'push' in v else '',
                                                     _pct(v['last']) if 'last' in v else ''))
    return lines


def write_run_report(run_dir, checkpoint=None, by_class=False, log=print):
    """report.md in `run_dir`: mode and settings, key numbers, test accuracy per epoch, training
    curves, the gallery of the words of the final (or given) checkpoint, the weight matrix and
    the classes per word, and links to metrics/ and local_analysis/ when present. Draws what is
    missing (curves, weights; the gallery when the push folder has none). A failure is logged and
    None returned (training must not stop for a report)."""
    try:
        return build_run_report(run_dir, checkpoint, by_class, log)
    except Exception as err:  # noqa: BLE001
        log('warning: could not write the report of %s: %s: %s' % (run_dir, type(err).__name__, err))
        return None


def build_run_report(run_dir, checkpoint, by_class, log):
    if not os.path.isdir(run_dir):
        raise FileNotFoundError('run folder not found: %s' % run_dir)
    run_name = os.path.basename(os.path.normpath(run_dir))
    settings_file = config.read_json(os.path.join(run_dir, 'settings.json'), required=False) or {}
    s = settings_file.get('settings', {})
    summary = config.read_json(os.path.join(run_dir, 'run_summary.json'), required=False) or {}
    ckpts = list_checkpoints(run_dir)
    final = checkpoint or summary.get('final_checkpoint') or (ckpts[-1] if ckpts else None)
    report_dir = os.path.join(run_dir, 'report')
    os.makedirs(report_dir, exist_ok=True)
    md = ['# Run report: %s' % run_name, '']
    mode = 'ProtoPNet mode (class-specific words)' if s.get('class_specific') else 'LVW (words shared across classes)'
    if s:
        md.append('%s; dataset `%s`, %s, %d px, %d words, %d classes; %d epochs (%d warm), pushes at %s, '
                  '%d last-layer passes after each; attention weight %s, top-k %s.'
                  % (mode, s.get('dataset'), s.get('base_architecture'), s.get('img_size', 0),
                     (s.get('prototype_shape') or [0])[0], s.get('num_classes', 0), s.get('num_train_epochs', 0),
                     s.get('num_warm_epochs', 0), s.get('push_epochs'), s.get('last_layer_iterations', 0),
                     s.get('attention_weight'), s.get('topk')))
        md.append('')
    md += ['## Key numbers', '', '| | |', '|---|---|']
    if final:
        md.append('| final checkpoint | `%s` |' % final)
    md.append('| final test accuracy | %s |' % _pct(summary.get('final_accuracy')))
    if summary.get('best_checkpoint'):
        md.append('| best checkpoint | `%s` (%s) |' % (summary['best_checkpoint'], _pct(summary.get('best_accuracy'))))
    if summary.get('train_seconds') is not None:
        md.append('| training time | %.0f s |' % summary['train_seconds'])

    ckpt = None
    if final and os.path.isfile(os.path.join(run_dir, final)):
        ckpt = load_word_checkpoint(os.path.join(run_dir, final))
    heat = None
    if ckpt is not None:
        weight = ckpt['state_dict']['last_layer.weight']
        heat = draw_weight_heatmap(weight, ckpt['class_names'], os.path.join(report_dir, 'weights.png'),
                                   title='%s, %s' % (run_name, final))
        hist = np.bincount(np.asarray(heat['classes_per_word']), minlength=1)
        md.append('| classes per word | mean %.2f; %s |' % (
            heat['mean_classes_per_word'],
            ', '.join('%d word%s serve%s %d' % (n, '' if n == 1 else 's', 's' if n == 1 else '', k)
                      for k, n in enumerate(hist) if n)))
    metrics = config.read_json(os.path.join(run_dir, 'metrics', 'metrics.json'), required=False)
    if metrics:
        for name, src in metrics.get('sources', {}).items():
            if src.get('checkpoint') and os.path.dirname(os.path.abspath(src['checkpoint'])) == os.path.abspath(run_dir):
                m = src.get('metrics', {})
                vals = ', '.join('%s %.4g' % (k, m[k]['value']) for k in
                                 ('pointing_game', 'stochastic_pointing_game', 'content_heatmap',
                                  'insertion_auc', 'deletion_auc')
                                 if k in m and m[k].get('value') is not None)
                md.append('| interpretability (%s, [metrics](metrics/metrics.md)) | %s |' % (name, vals))
    md.append('')

    csv_path = os.path.join(run_dir, 'metrics.csv')
    rows = read_metrics_csv(csv_path) if os.path.isfile(csv_path) else []
    if rows:
        plot_training_curves(csv_path, os.path.join(report_dir, 'curves.png'), title='%s: training curves' % run_name)
        md += ['## Training curves', '',
               'Test (solid; markers by phase: grey warm, blue joint, red push, green last layer) and train '
               '(dashed) per pass; dotted red lines mark the pushes. From `metrics.csv`.', '',
               '![training curves](report/curves.png)', '', '### Test accuracy per epoch', '']
        md += _accuracy_table(rows) + ['']

    if ckpt is not None:
        epoch, kind = checkpoint_info(ckpt, final)
        folder, note = word_source_folder(run_dir, epoch, kind)
        if folder is None and kind == 'nopush':
            earlier = [e for e in (s.get('push_epochs') or []) if epoch is not None and e < epoch
                       and os.path.isdir(push_folder(run_dir, e))]
            if earlier:
                folder = push_folder(run_dir, earlier[-1])
                note += '; the gallery below is the push of epoch %d, before the words moved' % earlier[-1]
        md += ['## Visual words', '']
        if folder is not None:
            info = read_push_folder(folder)
            pattern = 'gallery-class*.png' if by_class else 'gallery-[0-9]*.png'
            pages = sorted(glob.glob(os.path.join(folder, pattern)),
                           key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', p)])
            if not pages:
                written = draw_gallery(folder, ckpt['state_dict']['last_layer.weight'], ckpt['class_names'],
                                       by_class=by_class, title='Visual words of %s' % run_name,
                                       weights_note='weights of %s' % final)
                pages = [p for p, _ in written]
            md.append('%s. Each word: its nearest training patch, its activation on the source image, '
                      'the class of that image (src) and the classes that use it.' % (note[0].upper() + note[1:]))
            md.append('')
            rel = [os.path.relpath(p, run_dir).replace(os.sep, '/') for p in pages]
            md.append('![visual words](%s)' % rel[0])
            if len(rel) > 1:
                md.append('')
                md.append('All pages: ' + ', '.join('[%d](%s)' % (i + 1, r) for i, r in enumerate(rel)))
            others = sorted(int(m.group(1)) for m in (re.search(r'epoch-(\d+)$', d) for d in
                                                      glob.glob(os.path.join(run_dir, 'img', 'epoch-*'))) if m)
            others = [e for e in others if e != info['epoch']]
            if others:
                md.append('')
                md.append('Other pushes: ' + ', '.join('[epoch %d](img/epoch-%d/)' % (e, e) for e in others))
        else:
            md.append(note[0].upper() + note[1:] + '.')
        md.append('')
    if heat is not None:
        md += ['## Word sharing', '',
               'Last layer of `%s`: rows are classes, columns words; a dot marks a class that uses the word '
               '(W > 0 and W >= %.1f of the word\'s largest weight). The bars count the classes per word: '
               '1 everywhere means no sharing (ProtoPNet), more means words shared across classes (LVW).'
               % (final, USE_REL), '', '![weights](report/weights.png)', '']
    if metrics:
        md += ['## Interpretability metrics', '', 'From `eval_metrics.py`: [metrics/metrics.md](metrics/metrics.md).', '']
        summary_md = os.path.join(run_dir, 'metrics', 'metrics.md')
        if os.path.isfile(summary_md):
            with open(summary_md) as f:
                text = f.read()
            table = text.split('\n\n')[1] if '\n\n' in text else ''
            if table.startswith('|'):
                md += [table.strip(), '']
    analyses = sorted(glob.glob(os.path.join(run_dir, 'local_analysis', '*.png')))
    if analyses:
        md += ['## Local analyses', '', 'Why single images got their label (`local_analysis.py`):', '']
        md += ['- [%s](%s)' % (os.path.basename(p), os.path.relpath(p, run_dir).replace(os.sep, '/')) for p in analyses]
        md.append('')
    files = [(label, name) for label, name in (('settings', 'settings.json'), ('log', 'train.log'),
                                                ('per-pass numbers', 'metrics.csv'), ('summary', 'run_summary.json'))
             if os.path.isfile(os.path.join(run_dir, name))]
    md += ['## Files', '']
    if files:
        md.append('- ' + ', '.join('%s: [%s](%s)' % (label, name, name) for label, name in files))
    md += ['- checkpoints: ' + (', '.join('`%s`' % c for c in ckpts) if ckpts else 'none'), '']
    path = os.path.join(run_dir, 'report.md')
    text = '\n'.join(md)
    config.atomic_write(path, lambda f: f.write(text))
    log('report: %s' % path)
    return path
