"""The one-seed ablation behind docs/shared_words.md: word-model variants trained and
scored exactly as benchmark.py trains and scores its word methods (its schedule, seed 0's base
model and Grad-CAM), one row per variant in results/shared_words/ablation_seed0.md.

    python results/probes/shared_words_ablation.py                 # every variant, ~8 min each on 2 cores
    python results/probes/shared_words_ablation.py xb xf           # some; finished ones are skipped
    python results/probes/shared_words_ablation.py -seed 2 xk xl   # on another seed's base model
    python results/probes/shared_words_ablation.py -report         # the table, from the runs on this machine
    python results/probes/shared_words_ablation.py lvw_shared xm -first_push -seeds 0 1 2
                                                                   # results/shared_words/first_push.md

Run from the repository root. Needs `python benchmark.py -seeds 0 -methods base` first (or any
benchmark run of seed 0); lvw_double and lvw_shared rows are read from that run when present.
"""
import argparse
import os
import re
import sys

sys.path.insert(0, os.getcwd())
import benchmark  # noqa: E402
from run import config  # noqa: E402

FLIP = 'attention_flip="double"'
# spelled out, not lvw_variant="shared": that variant is xi, chosen from this table
SHARED = ['last_layer_init="zero"', 'last_layer_joint_lr=0.01', 'push_unique=True', 'push_exclude_border=True']
# name -> (what changes from the reference, the settings over the benchmark's)
VARIANTS = {
    # faithful LVW again, with this code: its weights against the benchmark's lvw_double run
    'xr': ('faithful LVW (reference flip), trained again', [FLIP]),
    'xe': ('push_exclude_border only', [FLIP, 'push_exclude_border=True']),
    'xb': ('classwise W, W trained at 0.01 with the words, unique push, border cells excluded',
           [FLIP, *SHARED, 'last_layer_init="classwise"', 'last_layer_joint_lr=0.01']),
    'xh': ('W +1 own class / 0 others, W at 0.05, unique push, border cells excluded',
           [FLIP, *SHARED, 'last_layer_init="classwise"', 'incorrect_class_connection=0', 'last_layer_joint_lr=0.05']),
    'xc': ('zero W, W at 0.05, unique push, border cells excluded', [FLIP, *SHARED, 'last_layer_joint_lr=0.05']),
    'xf': ('zero W, W at 0.05, last-layer lr 0.01, unique push, border cells excluded',
           [FLIP, *SHARED, 'last_layer_joint_lr=0.05', 'last_layer_optimizer_lr=0.01']),
    'xg': ('zero W, W at 0.05, unique push (border cells allowed)',
           [FLIP, *SHARED, 'last_layer_joint_lr=0.05', 'push_exclude_border=False']),
    'xi': ('zero W, W at 0.05, last-layer lr 0.01, unique push, border cells excluded, diversity 1 (margin 0.8)',
           [FLIP, *SHARED, 'last_layer_joint_lr=0.05', 'last_layer_optimizer_lr=0.01', 'diversity_coef=1',
            'diversity_margin=0.8']),
    'xk': ('as xi, diversity 10', [FLIP, *SHARED, 'last_layer_joint_lr=0.05', 'last_layer_optimizer_lr=0.01',
                                   'diversity_coef=10', 'diversity_margin=0.8']),
    'xl': ('as xi, diversity 100', [FLIP, *SHARED, 'last_layer_joint_lr=0.05', 'last_layer_optimizer_lr=0.01',
                                    'diversity_coef=100', 'diversity_margin=0.8']),
    # the words anchored to the patches they can be pushed onto (word_anchor_coef)
    'xm': ('as xi, word anchor 0.8', [FLIP, *SHARED, 'last_layer_joint_lr=0.05', 'last_layer_optimizer_lr=0.01',
                                       'diversity_coef=1', 'diversity_margin=0.8', 'word_anchor_coef=0.8']),
    'xo': ('as xi, word anchor 0.1', [FLIP, *SHARED, 'last_layer_joint_lr=0.05', 'last_layer_optimizer_lr=0.01',
                                       'diversity_coef=1', 'diversity_margin=0.8', 'word_anchor_coef=0.1']),
    'xj': ('zero W, W at 0.05, last-layer lr 0.01, unique push (border cells allowed)',
           [FLIP, *SHARED, 'last_layer_joint_lr=0.05', 'last_layer_optimizer_lr=0.01', 'push_exclude_border=False']),
}
ROWS = ('accuracy', 'iou_gradcam', 'classes_per_word', 'distinct_words', 'top_cells_on_object',
        'top_cells_near_object', 'top_cells_on_parts', 'class_part_coverage')
OUT = os.path.join('results', 'shared_words', 'ablation_seed%d')


def run(plan, names, seed):
    steps = benchmark.Steps(os.path.join(plan.root, 'steps_ablation_%s.json' % '_'.join(names)), print)
    for name in names:
        benchmark.WORD_METHODS[name] = (name, VARIANTS[name][1])
        steps.run('seed %d: train %s' % (seed, name), lambda: benchmark.train_method(plan, seed, name))
        steps.run('seed %d: metrics of %s' % (seed, name), lambda: benchmark.evaluate_method(plan, seed, name))


def report(plan, seed):
    rows = [('base', 'base Grad-CAM'), ('lvw_double', 'faithful LVW (reference flip)')]
    rows += [(n, '%s: %s' % (n, label)) for n, (label, _) in VARIANTS.items()]
    rows.append(('lvw_shared', 'lvw_shared: settings.variants["shared"] (benchmark method)'))
    lines = ['| variant | %s |' % ' | '.join(ROWS), '|---|%s' % ('---|' * len(ROWS))]
    table = {}
    for name, label in rows:
        values = benchmark.read_values(plan, seed, name)
        if not values or all(v is None for v in values.values()):
            continue
        table[name] = {'label': label, **values}
        lines.append('| %s | %s |' % (label, ' | '.join('n/a' if values.get(k) is None else
                                                         ('%d' % values[k] if k == 'distinct_words' else
                                                          '%.3f' % values[k]) for k in ROWS)))
    md = ['# Shared words: one-seed ablation (seed %d)' % seed, '',
          'Made by `python results/probes/shared_words_ablation.py` (each variant: benchmark.py\'s schedule and '
          'metrics, from seed %d\'s base model).' % seed, '', *lines, '',
          'Settings of each variant over the benchmark\'s: %s.' % '; '.join(
              '%s `%s`' % (n, ' '.join(v[1])) for n, v in VARIANTS.items()), '',
          'The x variants ran two at a time with OMP_NUM_THREADS=1; the benchmark\'s runs (base, faithful LVW, '
          'lvw_shared) ran alone with 2 threads. lvw_shared has exactly the settings of xi (their settings.json '
          'differ only in experiment_run): the two rows differ by the thread count alone, through float '
          'reductions, and show the spread of one seed.', '']
    out = OUT % seed
    os.makedirs(os.path.dirname(out), exist_ok=True)
    config.save_json(table, out + '.json')
    config.atomic_write(out + '.md', lambda f: f.write('\n'.join(md)))
    print('\n'.join(md))


PUSH_LINE = re.compile(r'push: \d+ words projected onto (\d+) distinct patches .*moved mean ([\d.]+) max ([\d.]+), '
                       r'mean pairwise word distance ([\d.]+) -> ([\d.]+)')
TEST_LINE = re.compile(r'epoch (\d+) \| (joint|push|last) \| test(?: (\d+))? \|.* acc ([\d.]+)%')


def first_push(log_path, epoch):
    """From a run's train.log: the push at `epoch` (squared distance the words moved, mean and max;
    mean pairwise word distance before and after) and the test accuracy just before it, just after
    it and after the last-layer passes that follow; None where the log lacks them (a run made
    before push.py logged the distances)."""
    if not os.path.isfile(log_path):
        return None
    acc, push_stats = {}, None
    with open(log_path) as f:
        for line in f:
            m = TEST_LINE.search(line)
            if m and int(m.group(1)) == epoch:
                acc[m.group(2)] = float(m.group(4)) / 100  # 'last': the latest pass wins
            m = PUSH_LINE.search(line)
            if m and push_stats is None:
                push_stats = [float(g) for g in m.groups()]
    if push_stats is None:
        return None
    return {'distinct_patches': int(push_stats[0]), 'moved_mean': push_stats[1], 'moved_max': push_stats[2],
            'pairwise_before': push_stats[3], 'pairwise_after': push_stats[4],
            'accuracy_before': acc.get('joint'), 'accuracy_after': acc.get('push'),
            'accuracy_after_last_layer': acc.get('last')}


def first_push_report(seeds, names):
    """results/shared_words/first_push.{md,json}: per seed and word model, the first push and the
    final figures, from the runs under saved_models/ (all made with the same thread count)."""
    import settings
    epoch = benchmark.FULL['push_epochs'][0]
    rows, table = [], {}

    def fmt(value, form='%.3f'):
        return 'n/a' if value is None else form % value

    header = ['seed', 'model', 'moved (mean / max)', 'pairwise before -> after', 'acc before / after push / after last layer',
              'final acc', 'base acc', 'classes/word', 'distinct', 'top cells on object', 'IoU']
    for seed in seeds:
        plan = benchmark.Plan(False, [seed])
        base = benchmark.read_values(plan, seed, 'base') or {}
        for name in names:
            values = benchmark.read_values(plan, seed, name)
            if not values:
                continue
            folder = config.run_dir(dict(plan.s, experiment_run=plan.run_name(seed, name)))
            push_stats = first_push(os.path.join(folder, 'train.log'), epoch)
            table['%d/%s' % (seed, name)] = {**values, 'first_push': push_stats, 'base_accuracy': base.get('accuracy')}
            p = push_stats or {}
            rows.append('| %d | %s | %s / %s | %s -> %s | %s / %s / %s | %s | %s | %s | %s | %s | %s |' % (
                seed, name, fmt(p.get('moved_mean'), '%.2f'), fmt(p.get('moved_max'), '%.2f'),
                fmt(p.get('pairwise_before'), '%.2f'), fmt(p.get('pairwise_after'), '%.2f'),
                fmt(p.get('accuracy_before')), fmt(p.get('accuracy_after')), fmt(p.get('accuracy_after_last_layer')),
                fmt(values['accuracy']), fmt(base.get('accuracy')), fmt(values['classes_per_word']),
                fmt(values['distinct_words'], '%d'), fmt(values['top_cells_on_object']), fmt(values['iou_gradcam'])))
    labels = {n: VARIANTS[n][0] for n in names if n in VARIANTS}
    labels.update({'lvw_double': 'faithful LVW (reference flip)',
                   'lvw_shared': 'settings.variants["shared"] = %s' % settings.variants['shared']})
    md = ['# The first push (epoch %d), per seed' % epoch, '',
          'Made by `python results/probes/shared_words_ablation.py %s -first_push -seeds %s` from the runs of '
          '`benchmark.py` and of this script, all with OMP_NUM_THREADS=1. "moved": the squared distance from each '
          'word to the patch the push puts it on; "pairwise": the mean pairwise squared word distance '
          '(train_and_test.mean_pairwise_word_distance) before and after the push; accuracies on the test set.'
          % (' '.join(names), ' '.join(map(str, seeds))), '',
          '| %s |' % ' | '.join(header), '|%s' % ('---|' * len(header)), *rows, '',
          *['* %s: %s' % (n, label) for n, label in labels.items()], '']
    out = os.path.join('results', 'shared_words', 'first_push')
    config.save_json(table, out + '.json')
    config.atomic_write(out + '.md', lambda f: f.write('\n'.join(md)))
    print('\n'.join(md))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('variants', nargs='*', help='default: all (%s)' % ' '.join(VARIANTS))
    parser.add_argument('-seed', type=int, default=0)
    parser.add_argument('-report', action='store_true', help='only the table')
    parser.add_argument('-first_push', action='store_true',
                        help='only results/shared_words/first_push.md: the first push of each variant over -seeds')
    parser.add_argument('-seeds', type=int, nargs='+', default=[0, 1, 2], help='with -first_push (default 0 1 2)')
    args = parser.parse_args(argv)
    known = {**VARIANTS, **benchmark.WORD_METHODS} if args.first_push else VARIANTS
    unknown = [n for n in args.variants if n not in known]
    if unknown:
        raise config.UserError('unknown variant(s) %s (choose from %s)' % (', '.join(unknown), ', '.join(known)))
    if args.first_push:
        first_push_report(args.seeds, args.variants or ['lvw_double', 'lvw_shared', 'xm', 'xo'])
        return
    plan = benchmark.Plan(False, [args.seed])
    if args.report:
        report(plan, args.seed)
    else:  # the table is rebuilt only on request: it holds the rows of the runs on this machine alone
        run(plan, args.variants or list(VARIANTS), args.seed)
        print('trained; `-report -seed %d` writes %s.md from the runs on this machine' % (args.seed, OUT % args.seed))


if __name__ == '__main__':
    config.run_cli(main)
