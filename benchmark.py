"""The paper's claims, tested: every method on the toy data over several seeds, scored by eval_metrics.py.

    python benchmark.py [-seeds 0 1 2] [-methods ...] [-out results]     (make benchmark)
    python benchmark.py -dataset animal_mnist   # real silhouettes and an ImageNet MobileNetV2 (see below)
    python benchmark.py -quick        # one seed, 64 px, 3 classes, a few epochs: the same steps in minutes
    python benchmark.py -report       # rebuild the report from the finished steps, train nothing

For each seed S, on the toy data (data/make_toy.py, ground-truth masks of the object and its parts):
  1. finetune_backbone.py   the base ResNet-18 (seed S) and gradcam_extract.py its Grad-CAM
  2. main.py                from that base model: LVW as the reference runs it (attention_flip='double'),
                            LVW with the joint flip (our default), LVW with attention_weight=0, ProtoPNet mode
  3. train_peer.py          every peer (SCOUTER+, SCOUTER-, GC, LFI-CAM), from the same base model
  4. eval_metrics.py        each model alone against the seed's Grad-CAM, on all test images
Every step is resumable: a finished step is reused, an interrupted one continues (-resume), so the
same command serves the first try and every retry. The steps run seed by seed, the base model and
the four word models first, so the claims are decided before the peers are trained.

Writes <out>/toy_benchmark.md, .json and .png: per method the mean and sd over seeds of each metric;
for each claim of the paper the paired differences across seeds and a verdict (see `verdict`).

-dataset animal_mnist: the same steps on the Animal-MNIST subset of make demo-real (the installed
animal-mnist package, SUBSET_PER_CLASS images a class, masks x > 0) with the animal_mnist preset's
MobileNetV2 from ImageNet weights (seed S fine-tunes its own base model from them); the peers that
name ResNet layers (SCOUTER, LFI-CAM) do not run on it, so the default methods are the base model,
LVW (reference flip), ProtoPNet mode, "LVW, shared" and GC. Writes <out>/animal_mnist_benchmark.*.
"""
import argparse
import math
import os
import sys
import time

import numpy as np

import eval_metrics
import finetune_backbone
import gradcam_extract
import main as lvw_main
import peers
import train_peer
from data import make_toy, prepare_datasets
from data.sources.animal_mnist import SUBSET_PATH, SUBSET_PER_CLASS
from run import config, distributed

# The LVW schedule: the toy preset's 2 warm epochs and StepLR(5), 11 epochs with pushes at 5 and 10,
# each followed by 20 last-layer passes (the reference's count) on the cached similarities. Under
# StepLR(5, 0.1) the joint rates are 1/100 of their start after 10 joint epochs, so longer runs
# move the words little (the reference's 201 epochs are alike after their first 20 or so).
FULL = {'num_train_epochs': 11, 'num_warm_epochs': 2, 'push_start': 5, 'push_epochs': [5, 10],
        'last_layer_iterations': 20, 'last_layer_cache': True, 'keep_checkpoints': 1, 'push_save_images': False}
FULL_AUC_IMAGES = 90  # eval_metrics.py's default
# -quick: its own tiny toy data; every recipe cut to one or two epochs
QUICK_DATA = {'size': 64, 'train_per_class': 8, 'test_per_class': 4, 'num_classes': 3}
QUICK = {'data_path': './data/toy_quick/', 'img_size': 64, 'num_classes': 3, 'prototype_shape': (15, 128, 1, 1),
         'topk': 5, 'train_batch_size': 8, 'test_batch_size': 16, 'train_push_batch_size': 16,
         'finetune_epochs': 2, 'num_train_epochs': 3, 'num_warm_epochs': 1, 'push_start': 1, 'push_epochs': [1, 2],
         'last_layer_iterations': 2, 'last_layer_cache': True, 'keep_checkpoints': 1, 'push_save_images': False,
         'scouter_epochs': 1, 'scouter_milestones': [1], 'gc_epochs': 1, 'gc_milestones': [1], 'gc_batch_size': 8,
         'lfi_epochs': 1, 'lfi_milestones': [1], 'lfi_batch_size': 8}
QUICK_AUC_IMAGES = 6
# the datasets: toy (drawn here) and animal_mnist (converted from its installed package), with the
# settings they add to the schedule and their default methods
DATASETS = {'toy': {}, 'animal_mnist': {'data_path': SUBSET_PATH}}
NON_RESNET_METHODS = ('base', 'lvw_double', 'protopnet', 'lvw_shared', 'gc')

# method -> (label, main.py settings); None: the base model (its Grad-CAM); the peers follow
WORD_METHODS = {
    'lvw_double': ('LVW, reference flip', ['attention_flip="double"']),
    'lvw_joint': ('LVW, joint flip', ['attention_flip="joint"']),
    'lvw_no_attention': ('LVW, attention_weight=0', ['attention_weight=0']),
    'protopnet': ('ProtoPNet mode', ['class_specific=True', 'attention_weight=0']),
    # settings.variants['shared'] over the reference flip: it differs from lvw_double by the variant only
    'lvw_shared': ('LVW, shared', ['attention_flip="double"', 'lvw_variant="shared"']),
}
LABELS = {'base': 'base Grad-CAM', **{m: label for m, (label, _) in WORD_METHODS.items()},
          **{m: peers.LABELS[m] for m in peers.METHODS}}
METHODS = tuple(LABELS)

# metric key -> (label, better, where in eval_metrics' source entry: 'accuracy' | 'metrics' | 'words')
METRICS = {
    'accuracy': ('test accuracy', 'higher', 'accuracy'),
    'iou_gradcam': ('IoU with the base Grad-CAM, thr 50', 'higher', 'metrics'),
    'pointing_game': ('pointing game (object), class mean', 'higher', 'metrics'),
    'stochastic_pointing_game': ('stochastic pointing game (object), %', 'higher', 'metrics'),
    'content_heatmap': ('content heatmap (object), %', 'higher', 'metrics'),
    'insertion_auc': ('insertion AUC', 'higher', 'metrics'),
    'deletion_auc': ('deletion AUC', 'lower', 'metrics'),
    'classes_per_word': ('classes per word (last layer)', '', 'words'),
    'image_classes_per_word': ("true classes among a word's top images", '', 'words'),
    'top_locations_on_object': ("share of words' top locations on the object", 'higher', 'words'),
    'part_purity': ('part purity of words (background is a category)', '', 'words'),
    # the fair rules (docs/shared_words.md): the latent cell a word (or a map's argmax) points at
    'top_cells_on_object': ("top cells on the object (words: top locations; maps: argmax cell)", 'higher', 'cells'),
    'top_cells_near_object': ('top cells within the pointing tolerance of the object', 'higher', 'cells'),
    'distinct_words': ('distinct word vectors (of P)', '', 'cells'),
    'top_cells_on_parts': ("share of words' top cells on a part", 'higher', 'cells'),
    'class_part_coverage': ("share of a class's parts its words cover", 'higher', 'cells'),
}
FIGURE_METRICS = ('accuracy', 'iou_gradcam', 'pointing_game', 'content_heatmap', 'insertion_auc',
                  'deletion_auc', 'image_classes_per_word', 'top_locations_on_object')

# The paper's claims, each a list of paired comparisons a - b; the first is the one the verdict of
# the claim rests on. 'greater': the claim is a > b; 'noninferior': a > b - margin.
ACCURACY_MARGIN = 0.02
CLAIMS = (
    ('words are shared across classes', [
        ('image_classes_per_word', 'lvw_double', 'protopnet', 'greater'),
        ('classes_per_word', 'lvw_double', 'protopnet', 'greater'),
        ('image_classes_per_word', 'lvw_joint', 'protopnet', 'greater')]),
    ("words align with the base model's attention better than ProtoPNet's prototypes", [
        ('iou_gradcam', 'lvw_double', 'protopnet', 'greater'),
        ('iou_gradcam', 'lvw_double', 'lvw_no_attention', 'greater'),
        ('iou_gradcam', 'lvw_joint', 'protopnet', 'greater')]),
    ('at little cost in accuracy (at most %d points below the base model)' % round(100 * ACCURACY_MARGIN), [
        ('accuracy', 'lvw_double', 'base', 'noninferior'),
        ('accuracy', 'lvw_double', 'protopnet', 'noninferior'),
        ('accuracy', 'lvw_joint', 'base', 'noninferior')]),
    # not the paper's: the variant of settings.variants['shared'] against faithful LVW (docs/shared_words.md)
    ('"LVW, shared" makes the words shared and puts them on the object, at little cost in accuracy', [
        ('classes_per_word', 'lvw_shared', 'lvw_double', 'greater'),
        ('top_cells_on_object', 'lvw_shared', 'lvw_double', 'greater'),
        ('distinct_words', 'lvw_shared', 'lvw_double', 'greater'),
        ('iou_gradcam', 'lvw_shared', 'lvw_double', 'greater'),
        ('accuracy', 'lvw_shared', 'base', 'noninferior'),
        ('accuracy', 'lvw_shared', 'lvw_double', 'noninferior')]),
)


# ---- statistics -----------------------------------------------------------------------------------

def mean_sd(values):
    """(mean, sample sd with n - 1) of a list of floats; sd is None for fewer than 2 values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return None, None
    return float(x.mean()), (float(x.std(ddof=1)) if x.size > 1 else None)


def t_quantile_95(dof):
    """One-sided 95 % quantile of Student's t with `dof` degrees of freedom (2.920 for 2)."""
    from scipy.stats import t
    return float(t.ppf(0.95, dof))


def verdict(diffs, test='greater', margin=0.0):
    """The verdict on a claim from its paired differences d_s = a_s - b_s, one per seed.

    With n seeds, mean m, sample sd s and q = t_{0.95, n-1}, the one-sided 95 % bounds of the mean
    difference are L = m - q s / sqrt(n) and U = m + q s / sqrt(n). The claim is a > b - tau, with
    tau = 0 ('greater') or tau = margin ('noninferior'):
      'supported'       L > -tau  (a paired one-sided t-test at 5 % favours the claim)
      'not supported'   U <= -tau (it rejects the claim: a is at or below b - tau)
      'not decided by n seeds' otherwise, and always for a single seed.
    When all differences are equal (s = 0) the bounds are m itself.
    """
    n = len(diffs)
    if test not in ('greater', 'noninferior'):
        raise ValueError('test must be greater or noninferior, got %r' % test)
    tau = margin if test == 'noninferior' else 0.0
    if n < 2:
        return 'not decided by %d seed' % n
    m, s = mean_sd(diffs)
    half = t_quantile_95(n - 1) * s / math.sqrt(n)
    if m - half > -tau:
        return 'supported'
    if m + half <= -tau:
        return 'not supported'
    return 'not decided by %d seeds' % n


# ---- the steps ------------------------------------------------------------------------------------

class Plan:
    """Where a benchmark's runs and files go, and the settings every step shares."""

    def __init__(self, quick, seeds, dataset='toy'):
        if quick and dataset != 'toy':
            raise config.UserError('-quick runs on its own tiny toy data; it takes no -dataset')
        self.quick, self.seeds, self.dataset = quick, list(seeds), dataset
        self.tag = 'benchmark_quick' if quick else 'benchmark' if dataset == 'toy' else 'benchmark_' + dataset
        self.shared = ['%s=%r' % (k, v) for k, v in {**(QUICK if quick else FULL), **DATASETS[dataset]}.items()]
        self.s = config.resolve_settings(dataset, self.shared)
        self.root = os.path.join('saved_models', self.tag)  # base models, Grad-CAM, metrics, steps.json
        self.auc_images = QUICK_AUC_IMAGES if quick else FULL_AUC_IMAGES

    def seed_dir(self, seed):
        return os.path.join(self.root, 'seed%d' % seed)

    def base_path(self, seed):
        return os.path.join(self.seed_dir(seed), '%s_%s.pth' % (self.dataset, self.s['base_architecture']))

    def atts(self, seed, split):
        return os.path.join(self.seed_dir(seed), 'grad_%s_%s.npy' % (split, self.dataset))

    def run_name(self, seed, method):
        """The run folder's name under saved_models/<arch>/ (experiment_run or peer_run)."""
        return '%s_s%d_%s' % (self.tag, seed, peers.RUN_NAMES.get(method, method))

    def metrics_path(self, seed, method):
        return os.path.join(self.seed_dir(seed), 'metrics', method, 'metrics.json')

    def settings(self, seed, *extra):
        return ['-dataset', self.dataset, '-set', *self.shared, 'seed=%d' % seed, *extra]


class Steps:
    """Runs steps once: steps.json under the plan's root keeps each finished step's seconds, so a
    repeated command skips what is done and the total wall time adds up across interruptions
    (a step stopped half-way counts only its resumed part)."""

    def __init__(self, path, log):
        self.path, self.log = path, log
        self.done = config.read_json(path, required=False) or {}

    def run(self, key, fn):
        if key in self.done:
            return False
        self.log('%s ...' % key)
        start = time.time()
        fn()
        self.done[key] = round(time.time() - start, 1)
        config.save_json(self.done, self.path)
        self.log('%s done in %.0f s' % (key, self.done[key]))
        return True


def train_base(plan, seed):
    """finetune_backbone.py (seed) and gradcam_extract.py of its model, into the seed's folder."""
    finetune_backbone.main([*plan.settings(seed), '-out', plan.base_path(seed), '-resume'])
    gradcam_extract.main([*plan.settings(seed), '-model', plan.base_path(seed), '-out_dir', plan.seed_dir(seed)])


def checkpoint_of(folder):
    """The final checkpoint recorded in a finished run's run_summary.json."""
    summary = config.read_json(os.path.join(folder, 'run_summary.json'))
    if not summary.get('final_checkpoint'):
        raise config.UserError('%s: the run finished without a checkpoint (run_summary.json)' % folder)
    return os.path.join(folder, summary['final_checkpoint'])


def train_method(plan, seed, method):
    """main.py (word models) or train_peer.py (peers) from the seed's base model, with -resume."""
    name = plan.run_name(seed, method)
    if method in WORD_METHODS:
        lvw_main.main([*plan.settings(seed, 'experiment_run=%s' % name, *WORD_METHODS[method][1]),
                       '-train_atts', plan.atts(seed, 'train'), '-test_atts', plan.atts(seed, 'test'),
                       '-weights', plan.base_path(seed), '-resume'])
    else:
        train_peer.main(['-method', method, *plan.settings(seed, 'peer_run=%s' % name),
                         '-weights', plan.base_path(seed), '-resume'])


def model_path(plan, seed, method):
    if method == 'base':
        return plan.base_path(seed)
    name = plan.run_name(seed, method)
    if method in WORD_METHODS:
        return checkpoint_of(config.run_dir(dict(plan.s, experiment_run=name)))
    return checkpoint_of(train_peer.peer_run_dir(dict(plan.s, peer_run=name), method))


def evaluate_method(plan, seed, method):
    """eval_metrics.py of one model against the seed's Grad-CAM of the test images."""
    eval_metrics.main([*plan.settings(seed), '-test_atts', plan.atts(seed, 'test'),
                       '-source', '%s=%s' % (method, model_path(plan, seed, method)),
                       '-out', os.path.dirname(plan.metrics_path(seed, method)),
                       '-auc_images', str(plan.auc_images)])


def run_benchmark(plan, methods, log):
    """Every step of every seed, in the order: base, word models, their metrics, then the peers."""
    s = plan.s
    if plan.dataset == 'animal_mnist':
        prepare_datasets.prepare_installed_animal_mnist(s['data_path'], SUBSET_PER_CLASS)
    else:
        try:
            make_toy.generate(s['data_path'].rstrip('/'), **(QUICK_DATA if plan.quick else {'size': s['img_size']}),
                              progress=False)
        except (ValueError, FileExistsError) as err:
            raise config.UserError(str(err)) from None
    steps = Steps(os.path.join(plan.root, 'steps.json'), log)
    first = [m for m in methods if m == 'base' or m in WORD_METHODS]
    later = [m for m in methods if m not in first]
    for group in (first, later):
        for seed in plan.seeds:
            steps.run('seed %d: base model and its Grad-CAM' % seed, lambda: train_base(plan, seed))
            for method in group:
                if method != 'base':
                    steps.run('seed %d: train %s' % (seed, method), lambda: train_method(plan, seed, method))
                steps.run('seed %d: metrics of %s' % (seed, method), lambda: evaluate_method(plan, seed, method))
    return steps.done


# ---- the report -----------------------------------------------------------------------------------

def read_values(plan, seed, method):
    """{metric: value or None} of one finished evaluation, None when it has not run."""
    path = plan.metrics_path(seed, method)
    res = config.read_json(path, required=False)
    if res is None:
        return None
    entry = res['sources'].get(method)
    if not isinstance(entry, dict):
        raise config.UserError('cannot use %s: expected its sources to hold an object %r (eval_metrics.py -source '
                               '%s=...), found %s' % (path, method, method, ', '.join(map(repr, res['sources'])) or
                                                      'none'))
    values = {}
    for key, (_, _, where) in METRICS.items():
        if where == 'accuracy':
            values[key] = entry.get('accuracy')
        else:
            group = entry.get(where) or {}
            item = group.get(key) if isinstance(group, dict) else None
            values[key] = item.get('value') if isinstance(item, dict) else None
        if values[key] is not None and not config.of_types(values[key], config.NUMBER):
            raise config.UserError('cannot use %s: expected a number or null as the value of %s of %r, got %r'
                                   % (path, key, method, values[key]))
    return values


def summarise(per_seed):
    """{seed: {metric: value}} -> {metric: {'mean', 'sd', 'n'}} over the seeds that have a value."""
    out = {}
    for key in METRICS:
        vals = [v[key] for v in per_seed.values() if v.get(key) is not None]
        m, sd = mean_sd(vals)
        out[key] = {'mean': m, 'sd': sd, 'n': len(vals)}
    return out


def compare(per_method, metric, a, b, test):
    """The paired differences a - b over the seeds where both have a value, and their verdict."""
    pa, pb = per_method.get(a, {}), per_method.get(b, {})
    seeds = sorted(set(pa) & set(pb))
    seeds = [sd for sd in seeds if pa[sd].get(metric) is not None and pb[sd].get(metric) is not None]
    diffs = [pa[sd][metric] - pb[sd][metric] for sd in seeds]
    margin = ACCURACY_MARGIN if test == 'noninferior' else 0.0
    m, sd = mean_sd(diffs)
    return {'metric': metric, 'a': a, 'b': b, 'test': test, 'margin': margin, 'seeds': seeds, 'diffs': diffs,
            'mean': m, 'sd': sd, 'verdict': verdict(diffs, test, margin) if diffs else 'not run yet'}


def build_report(plan, methods, steps_done, argv=()):
    per_method = {}
    for method in methods:
        vals = {seed: read_values(plan, seed, method) for seed in plan.seeds}
        per_method[method] = {seed: v for seed, v in vals.items() if v is not None}
    missing = ['seed %d: %s' % (seed, m) for m in methods for seed in plan.seeds if seed not in per_method[m]]
    claims = [{'claim': text, 'comparisons': [compare(per_method, *c) for c in comps
                                              if c[1] in methods and c[2] in methods]}
              for text, comps in CLAIMS]
    return {'quick': plan.quick, 'dataset': plan.dataset, 'seeds': plan.seeds, 'methods': methods, 'labels': {m: LABELS[m] for m in methods},
            'schedule': {k: v for k, v in plan.s.items() if k in QUICK or k in FULL}, 'auc_images': plan.auc_images,
            'per_seed': per_method, 'summary': {m: summarise(per_method[m]) for m in methods},
            'claims': claims, 'missing': missing, 'steps_seconds': steps_done,
            'wall_seconds': round(sum(steps_done.values()), 1), 'versions': config.versions(),
            # -report rebuilds the same report: the command that makes the runs is the one to give
            'command': ' '.join(['python benchmark.py'] + [a for a in argv if a != '-report'])}


def _fmt(mean, sd, digits=3):
    if mean is None:
        return 'n/a'
    if sd is None:
        return '%.*f' % (digits, mean)
    return '%.*f ± %.*f' % (digits, mean, digits, sd)


def _digits(metric):
    return 1 if metric in ('stochastic_pointing_game', 'content_heatmap') else 3


def to_markdown(report):
    methods, summary = report['methods'], report['summary']
    n = len(report['seeds'])
    title = {'toy': 'Toy benchmark', 'animal_mnist': 'Animal-MNIST benchmark (MobileNetV2 from ImageNet weights)'}
    lines = ['# %s: %d seed%s (%s)' % (title[report.get('dataset', 'toy')], n, '' if n == 1 else 's',
                                       ', '.join(map(str, report['seeds']))),
             '',
             'Made by `%s`; wall time %.0f s (%.1f h) on this machine, summed over its steps. '
             'Each cell: mean ± sd over the seeds (sample sd, n - 1).' % (
                 report['command'].strip(), report['wall_seconds'], report['wall_seconds'] / 3600),
             '']
    lines.append('| metric | ' + ' | '.join(report['labels'][m] for m in methods) + ' | better |')
    lines.append('|---' * (len(methods) + 2) + '|')
    for key, (label, better, _) in METRICS.items():
        cells = [_fmt(summary[m][key]['mean'], summary[m][key]['sd'], _digits(key)) for m in methods]
        lines.append('| %s | %s | %s |' % (label, ' | '.join(cells), better))
    lines += ['', 'Base Grad-CAM: its IoU with itself is 1 by definition. Insertion/deletion AUC over %d evenly '
              'spaced test images.' % report['auc_images'], '', '## The claims', '',
              'Paired differences a - b over the seeds (each seed: one base model, every method started '
              'from it). Verdict: a one-sided paired t-test at 5 %% (t quantile %s); accuracy claims test '
              'a > b - %.2f.' % ('%.3f for %d seeds' % (t_quantile_95(n - 1), n) if n > 1 else 'n/a for 1 seed',
                                 ACCURACY_MARGIN), '',
              '| claim | metric | a - b | per seed | mean ± sd | verdict |', '|---|---|---|---|---|---|']
    for claim in report['claims']:
        for k, c in enumerate(claim['comparisons']):
            lines.append('| %s | %s | %s - %s | %s | %s | %s |' % (
                claim['claim'] if k == 0 else '', METRICS[c['metric']][0], report['labels'][c['a']],
                report['labels'][c['b']], ', '.join('%+.3f' % d for d in c['diffs']) or 'n/a',
                _fmt(c['mean'], c['sd'], 3), '**%s**' % c['verdict'] if k == 0 else c['verdict']))
    if report['missing']:
        lines += ['', 'Not run yet: %s.' % '; '.join(report['missing'])]
    return '\n'.join(lines) + '\n'


def draw_figure(report, path):
    """One panel per metric of FIGURE_METRICS: each method's mean over seeds as a bar, its sd as an
    error bar and each seed as a dot."""
    from matplotlib.figure import Figure
    methods, summary = report['methods'], report['summary']
    cols = 4
    rows = math.ceil(len(FIGURE_METRICS) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), dpi=100)
    colours = ['#444444', '#1f77b4', '#6baed6', '#9ecae1', '#d62728', '#2ca02c', '#98df8a', '#ff7f0e', '#9467bd']
    for k, key in enumerate(FIGURE_METRICS):
        ax = fig.add_subplot(rows, cols, k + 1)
        for i, m in enumerate(methods):
            st = summary[m][key]
            if st['mean'] is None:
                continue
            ax.bar(i, st['mean'], color=colours[i % len(colours)], width=0.7,
                   yerr=st['sd'] or 0, capsize=3, error_kw={'linewidth': 1})
            seeds = [v[key] for v in report['per_seed'][m].values() if v.get(key) is not None]
            ax.scatter([i] * len(seeds), seeds, s=8, color='k', zorder=3)
        label, better, _ = METRICS[key]
        ax.set_title(label + (' (%s is better)' % better if better else ''), fontsize=9)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels([report['labels'][m] for m in methods], rotation=60, ha='right', fontsize=7)
        ax.tick_params(axis='y', labelsize=7)
    n = len(report['seeds'])
    fig.suptitle('Toy benchmark: mean ± sd over %d seed%s (dots: seeds)' % (n, '' if n == 1 else 's'), fontsize=11)
    fig.tight_layout()
    config.atomic_write(path, lambda f: fig.savefig(f, format='png'), mode='wb')


# ---- a report never replaces a fuller one ---------------------------------------------------------

def report_paths(out_dir, dataset):
    """The report's three files in `out_dir`: .json, .md and .png."""
    base = os.path.join(out_dir, '%s_benchmark' % dataset)
    return [base + ext for ext in ('.json', '.md', '.png')]


def finished_values(report):
    """{(method, seed, metric)} of the values a report holds (seeds as text, as in its JSON)."""
    return {(m, str(seed), key) for m, seeds in report['per_seed'].items() for seed, values in seeds.items()
            for key, v in values.items() if v is not None}


def read_old_report(path):
    """The report already in `path` (None when there is none), its shape checked: one line
    naming it when it cannot be compared with a new one."""
    shape = config.json_shape('a benchmark report (an object with per_seed and steps_seconds objects)',
                              {'per_seed': (dict,), 'steps_seconds': (dict,)})
    old = config.read_json(path, required=False, shape=shape)
    if old is None:
        return None
    missing = [k for k in ('per_seed', 'steps_seconds') if k not in old]
    bad = [m for m, seeds in old.get('per_seed', {}).items()
           if not isinstance(seeds, dict) or not all(isinstance(v, dict) for v in seeds.values())]
    problem = ('it has no %s' % ' or '.join(missing) if missing else
               'per_seed[%r] is not an object of seeds and their values' % bad[0] if bad else None)
    if problem:
        raise config.UserError('cannot use %s: expected %s, but %s' % (path, shape['expected'], problem))
    return old


def _lost(old, new):
    """What `new` lacks of `old`: (values, steps, (seed, method) pairs that lose a value)."""
    values = finished_values(old) - finished_values(new)
    steps = set(old['steps_seconds']) - set(new['steps_seconds'])
    pairs = sorted({(int(seed) if seed.isdigit() else seed, m) for m, seed, _ in values}, key=str)
    return values, steps, pairs


def check_report_replaces(report, out_dir):
    """Refuse (one line, nothing written) a report with nothing finished, or one that would
    replace a fuller report in `out_dir`: of another plan (-quick or not, another dataset), or
    lacking any of its finished steps or values. -out DIR writes it elsewhere."""
    path = report_paths(out_dir, report['dataset'])[0]
    elsewhere = 'pass -out DIR to write this report elsewhere'
    if not finished_values(report):
        raise config.UserError('no step of this benchmark has finished yet (%d steps in its steps.json): no report '
                               'written%s' % (len(report['steps_seconds']),
                                              ', %s left as it is' % path if os.path.exists(path) else ''))
    old = read_old_report(path)
    if old is None:
        return
    if bool(old.get('quick')) != bool(report['quick']) or old.get('dataset', 'toy') != report['dataset']:
        plan = lambda r: '%s%s' % (r.get('dataset', 'toy'), ' -quick' if r.get('quick') else '')
        raise config.UserError('%s holds the report of another benchmark (%s, not %s); nothing written; %s'
                               % (path, plan(old), plan(report), elsewhere))
    values, steps, pairs = _lost(old, report)
    if values or steps:
        lacks = [text for count, text in (
            (steps, '%d of its %d finished steps' % (len(steps), len(old['steps_seconds']))),
            (values, '%d of its %d values' % (len(values), len(finished_values(old))))) if count]
        shown = '; '.join('seed %s: %s' % p for p in pairs[:3]) + ('; ...' if len(pairs) > 3 else '')
        raise config.UserError('%s holds a fuller report: this one lacks %s%s; nothing written; %s'
                               % (path, ' and '.join(lacks), ' (%s)' % shown if shown else '', elsewhere))


def check_plan_keeps_report(plan, methods, out_dir):
    """Before any training: refuse a command whose report could not replace the one in `out_dir`,
    as it runs fewer seeds or methods than that report holds values of, or another plan."""
    old = read_old_report(report_paths(out_dir, plan.dataset)[0])
    if old is None:
        return
    will = {m: {str(seed): {k: 0 for k in METRICS} for seed in plan.seeds} for m in methods}
    report = {'quick': plan.quick, 'dataset': plan.dataset, 'per_seed': will, 'steps_seconds': old['steps_seconds']}
    check_report_replaces(report, out_dir)


def write_report(report, out_dir):
    """The report's .json, .md and .png in `out_dir`, each written whole (atomically)."""
    base = os.path.join(out_dir, '%s_benchmark' % report.get('dataset', 'toy'))
    config.save_json(report, base + '.json')
    md = to_markdown(report)
    config.atomic_write(base + '.md', lambda f: f.write(md))
    draw_figure(report, base + '.png')
    return md


def parse_methods(names):
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise config.UserError('-methods: unknown %s (choose from %s)' % (', '.join(unknown), ', '.join(METHODS)))
    return [m for m in METHODS if m in names]  # the table's order


def main(argv=None):
    distributed.refuse_torchrun(os.path.basename(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-seeds', type=config.nonnegative_int, nargs='+', default=None, help='default 0 1 2 (-quick: 0)')
    parser.add_argument('-methods', nargs='+', default=None, metavar='METHOD',
                        help='default all: %s (-dataset animal_mnist: %s)' % (' '.join(METHODS), ' '.join(NON_RESNET_METHODS)))
    parser.add_argument('-dataset', default='toy', choices=sorted(DATASETS),
                        help='toy (default) or animal_mnist (needs its package: make demo-real installs it)')
    parser.add_argument('-quick', action='store_true', help='one seed, tiny data and recipes: minutes, not hours')
    parser.add_argument('-report', action='store_true', help='only rebuild the report from the finished steps')
    parser.add_argument('-out', default=None,
                        help='folder of toy_benchmark.{md,json,png} (default results/; -quick: saved_models/benchmark_quick/); '
                             'a report that lacks steps or values of the one already there is refused')
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    if len(set(seeds)) != len(seeds) or any(sd < 0 for sd in seeds):
        raise config.UserError('-seeds: give distinct seeds >= 0, got %s' % ' '.join(map(str, seeds)))
    methods = parse_methods(args.methods or (METHODS if args.dataset == 'toy' else NON_RESNET_METHODS))
    plan = Plan(args.quick, seeds, args.dataset)
    out = args.out or (plan.root if args.quick else 'results')
    config.check_output_folder(out)
    for path in report_paths(out, plan.dataset):
        config.check_output_file(path, 'the output file')
    if not args.report:
        check_plan_keeps_report(plan, methods, out)  # refused now, not after hours of training
    start = time.time()

    def log(message):
        print('[benchmark %5.0fs] %s' % (time.time() - start, message), flush=True)

    if args.report:
        done = config.read_json(os.path.join(plan.root, 'steps.json'), required=False) or {}
    else:
        done = run_benchmark(plan, methods, log)
    report = build_report(plan, methods, done, sys.argv[1:] if argv is None else argv)
    check_report_replaces(report, out)
    md = write_report(report, out)
    print()
    print(md)
    log('wrote %s/%s_benchmark.{md,json,png}' % (out, plan.dataset))
    return report


if __name__ == '__main__':
    config.run_cli(main)
