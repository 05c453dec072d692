"""The one-seed ablation behind the README's "The words" section: word-model variants trained and
scored exactly as benchmark.py trains and scores its word methods (its schedule, seed 0's base
model and Grad-CAM), one row per variant in results/shared_words/ablation_seed0.md.

    python results/probes/shared_words_ablation.py                 # every variant, ~8 min each on 2 cores
    python results/probes/shared_words_ablation.py xb xf           # some; finished ones are skipped
    python results/probes/shared_words_ablation.py -seed 2 xk xl   # on another seed's base model
    python results/probes/shared_words_ablation.py -report         # only the table

Run from the repository root. Needs `python benchmark.py -seeds 0 -methods base` first (or any
benchmark run of seed 0); lvw_double and lvw_shared rows are read from that run when present.
"""
import argparse
import os
import sys

sys.path.insert(0, os.getcwd())
import benchmark  # noqa: E402
import config  # noqa: E402

FLIP = 'attention_flip="double"'
# spelled out, not lvw_variant="shared": that variant is xi, chosen from this table
SHARED = ['last_layer_init="zero"', 'last_layer_joint_lr=0.01', 'push_unique=True', 'push_exclude_border=True']
# name -> (what changes from the reference, the settings over the benchmark's)
VARIANTS = {
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('variants', nargs='*', help='default: all (%s)' % ' '.join(VARIANTS))
    parser.add_argument('-seed', type=int, default=0)
    parser.add_argument('-report', action='store_true', help='only the table')
    args = parser.parse_args(argv)
    unknown = [n for n in args.variants if n not in VARIANTS]
    if unknown:
        raise config.UserError('unknown variant(s) %s (choose from %s)' % (', '.join(unknown), ', '.join(VARIANTS)))
    plan = benchmark.Plan(False, [args.seed])
    if not args.report:
        run(plan, args.variants or list(VARIANTS), args.seed)
    report(plan, args.seed)


if __name__ == '__main__':
    config.run_cli(main)
