"""The geometry runs behind the answer of docs/shared_words.md on the words (issue 17, item 3): the benchmark's
base model and word methods, trained and scored exactly as benchmark.py does, on one seed, with
one thing of the geometry changed:

  px224     the toy data drawn at 224 px (data/toy224/) and img_size=224: a 7 x 7 word grid, 49 %
            of it border cells (4 x 4 and 75 % at 112 px)
  reflect   backbone_padding='reflect': every padded convolution of the ResNet pads by reflection,
            in the base model and the word model alike, so no cell sees zeros at the image edge

    python results/probes/geometry_runs.py                        # both, seed 0, lvw_double
    python results/probes/geometry_runs.py px224 -methods lvw_double lvw_shared
    python results/probes/geometry_runs.py -report                # only the table

Each variant has its own folder, saved_models/benchmark_<variant>/ (base model, Grad-CAM, metrics)
and its runs under saved_models/resnet18/benchmark_<variant>_s<seed>_<method>; every step is
resumable. Writes results/shared_words/geometry_seed<seed>.{md,json}, with the 112 px zero-padded
rows read from the benchmark's own run (saved_models/benchmark/) where it has them.
Run from the repository root; px224 takes about 4 x a 112 px run.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
import benchmark  # noqa: E402
from run import config  # noqa: E402
import eval_metrics as em  # noqa: E402
from data import make_toy  # noqa: E402
from data.image_data import ImageDataset  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from words_probe import word_geometry  # noqa: E402

# name -> (what changes, the settings over the benchmark's)
VARIANTS = {
    'px224': ('224 px images (7 x 7 grid)', ['img_size=224', "data_path='./data/toy224/'"]),
    'reflect': ('reflection padding in the backbone', ["backbone_padding='reflect'"]),
}
ROWS = ('accuracy', 'iou_gradcam', 'classes_per_word', 'distinct_words', 'top_cells_on_object',
        'top_cells_near_object', 'class_part_coverage')
OUT = os.path.join('results', 'shared_words', 'geometry_seed%d')


class VariantPlan(benchmark.Plan):
    """benchmark.Plan with the variant's settings added to every step and its own folders."""

    def __init__(self, name, seed):
        super().__init__(False, [seed])
        if name is not None:
            self.tag = 'benchmark_%s' % name
            self.shared = self.shared + VARIANTS[name][1]
            self.s = config.resolve_settings('toy', self.shared)
            self.root = os.path.join('saved_models', self.tag)


def run(name, seed, methods):
    plan = VariantPlan(name, seed)
    s = plan.s
    make_toy.generate(s['data_path'].rstrip('/'), size=s['img_size'], progress=False)
    steps = benchmark.Steps(os.path.join(plan.root, 'steps.json'), print)
    steps.run('seed %d: base model and its Grad-CAM' % seed, lambda: benchmark.train_base(plan, seed))
    steps.run('seed %d: metrics of base' % seed, lambda: benchmark.evaluate_method(plan, seed, 'base'))
    for method in methods:
        steps.run('seed %d: train %s' % (seed, method), lambda: benchmark.train_method(plan, seed, method))
        steps.run('seed %d: metrics of %s' % (seed, method), lambda: benchmark.evaluate_method(plan, seed, method))


def geometry(plan, seed, method):
    """words_probe.word_geometry of a finished word model: where its words' nearest patches sit."""
    try:
        path = benchmark.model_path(plan, seed, method)
    except config.UserError:
        return None
    s = plan.s
    test = ImageDataset(s['test_dir'], s['img_size'])
    source = em.open_source(method, path, torch.device('cpu'), test, s['img_size'])
    geo = word_geometry(source.model, ImageDataset(s['train_dir'], s['img_size']), s)
    cells = torch.tensor(geo['words_per_cell'])
    geo['words_in_two_fullest_cells'] = int(cells.flatten().sort(descending=True).values[:2].sum())
    return geo


def report(seed, methods):
    table, lines = {}, []
    header = ['variant', 'method', 'grid', *ROWS, 'words on border cells', 'words in 2 fullest cells']
    lines += ['| %s |' % ' | '.join(header), '|%s' % ('---|' * len(header))]
    for name in (None, *VARIANTS):
        plan = VariantPlan(name, seed)
        label = '112 px, zero padding (the benchmark)' if name is None else VARIANTS[name][0]
        for method in ('base', *methods):
            values = benchmark.read_values(plan, seed, method)
            if not values or all(v is None for v in values.values()):
                continue
            geo = None if method == 'base' else geometry(plan, seed, method)
            table['%s/%s' % (name or 'benchmark', method)] = {'label': label, **values, 'geometry': geo}
            cells = [('n/a' if values.get(k) is None else
                      ('%d' % values[k] if k == 'distinct_words' else '%.3f' % values[k])) for k in ROWS]
            grid = '%d x %d' % tuple(geo['grid']) if geo else ''
            border = '%.2f (grid %.2f)' % (geo['words_nearest_patch_on_border'], geo['border_share_of_grid']) \
                if geo else ''
            fullest = '%d of %d' % (geo['words_in_two_fullest_cells'], geo['words']) if geo else ''
            lines.append('| %s | %s | %s | %s | %s | %s |' % (label, method, grid, ' | '.join(cells), border, fullest))
    md = ['# The words\' geometry: one seed (seed %d)' % seed, '',
          'Made by `python results/probes/geometry_runs.py` (benchmark.py\'s schedule and metrics; each variant '
          'its own base model). "Words on border cells": the share of words whose nearest training patch (what '
          'a push picks) is on the grid\'s outer ring, beside that ring\'s share of the grid.', '', *lines, '']
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    config.save_json(table, OUT % seed + '.json')
    config.atomic_write(OUT % seed + '.md', lambda f: f.write('\n'.join(md)))
    print('\n'.join(md))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('variants', nargs='*', default=list(VARIANTS), metavar='VARIANT',
                        help='default all: %s' % ' '.join(VARIANTS))
    parser.add_argument('-seed', type=int, default=0)
    parser.add_argument('-methods', nargs='+', default=['lvw_double'], choices=list(benchmark.WORD_METHODS))
    parser.add_argument('-report', action='store_true', help='only the table')
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error('unknown variant %s (choose from %s)' % (', '.join(unknown), ', '.join(VARIANTS)))
    if not args.report:
        for name in args.variants:
            run(name, args.seed, args.methods)
    report(args.seed, args.methods)


if __name__ == '__main__':
    config.run_cli(main)
