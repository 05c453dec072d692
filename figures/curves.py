"""Training curves of a run from its metrics.csv: accuracy and every loss term per pass."""
import csv
import math
import os

from figures.drawing import new_figure


PHASE_COLOURS = {'warm': '#8c8c8c', 'joint': '#1f77b4', 'push': '#d62728', 'last': '#2ca02c'}
CURVE_PANELS = (('accuracy', 'accuracy (%)'), ('cross_entropy', 'cross entropy'), ('cluster', 'cluster cost'),
                ('separation', 'separation cost'), ('attention', 'attention MSE'), ('l1', '|W|_1'),
                ('p_dist_pair', 'mean pairwise word distance'), ('lr_features', 'backbone lr'))


def read_metrics_csv(path):
    """metrics.csv -> list of dicts with floats (None where empty); epoch and iteration as int."""
    rows = []
    with open(path, newline='') as f:
        for raw in csv.DictReader(f):
            row = {}
            for key, value in raw.items():
                if key in ('phase', 'split'):
                    row[key] = value
                elif value in ('', None):
                    row[key] = None
                elif key in ('epoch', 'iteration'):
                    row[key] = int(float(value))
                else:
                    row[key] = float(value)
            rows.append(row)
    return rows


def pass_positions(rows):
    """x position of each row: the epoch for warm/joint passes; a push at epoch + 0.3; last-layer
    pass i of n at epoch + 0.3 + 0.6 (i + 1) / (n + 1)."""
    n_last = {}
    for r in rows:
        if r['phase'] == 'last' and r.get('iteration') is not None:
            n_last[r['epoch']] = max(n_last.get(r['epoch'], 0), r['iteration'] + 1)
    xs = []
    for r in rows:
        e = r['epoch']
        if r['phase'] == 'push':
            xs.append(e + 0.3)
        elif r['phase'] == 'last':
            xs.append(e + 0.3 + 0.6 * ((r.get('iteration') or 0) + 1) / (n_last.get(e, 1) + 1))
        else:
            xs.append(float(e))
    return xs


def plot_training_curves(metrics_csv, out_path, title=None):
    """One panel per logged quantity (accuracy, each loss term, |W|_1, word distance, lr): test
    (solid, markers coloured by phase) and train (dashed) per pass; dotted lines at the pushes.
    Returns {'path', 'panels': [names drawn]}."""
    rows = read_metrics_csv(metrics_csv)
    if not rows:
        raise ValueError('%s holds no rows' % metrics_csv)
    xs = pass_positions(rows)
    panels = [(k, label) for k, label in CURVE_PANELS
              if any(r.get(k) is not None and math.isfinite(r[k]) for r in rows)]
    pushes = sorted({r['epoch'] for r in rows if r['phase'] == 'push'})
    cols = 2
    nrows = math.ceil(len(panels) / cols)
    fig = new_figure(12, 2.6 * nrows + 0.6)
    fig.suptitle(title or 'training curves', fontsize=12)
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(nrows, cols, i + 1)
        scale = 100.0 if key == 'accuracy' else 1.0
        for split, style in (('train', '--'), ('test', '-')):
            pts = [(x, r[key] * scale, r['phase']) for x, r in zip(xs, rows)
                   if r['split'] == split and r.get(key) is not None and math.isfinite(r[key])]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color='#333333' if split == 'test' else '#999999',
                    linewidth=1.2, label=split, zorder=1)
            if split == 'test':
                for phase, colour in PHASE_COLOURS.items():
                    sel = [p for p in pts if p[2] == phase]
                    if sel:
                        ax.scatter([p[0] for p in sel], [p[1] for p in sel], s=16, color=colour, zorder=2,
                                   label='%s (test)' % phase)
        for e in pushes:
            ax.axvline(e + 0.3, color=PHASE_COLOURS['push'], linestyle=':', linewidth=1, zorder=0)
        if key == 'lr_features':
            ax.set_yscale('log')
        ax.set_title(label, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if i >= len(panels) - cols:
            ax.set_xlabel('epoch (push and last-layer passes after the epoch\'s joint pass)', fontsize=8)
        if i == 0:
            ax.legend(fontsize=7, loc='best')
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path)
    return {'path': out_path, 'panels': [k for k, _ in panels]}
