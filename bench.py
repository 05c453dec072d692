"""Speed figures: this implementation against the reference code's habits, on synthetic batches.

    python bench.py [-arch resnet34] [-img_size 224] [-batch 16] [-words 185] [-classes 37] [-device auto]

Prints images per second for
  train step      ours | with torch.autograd.set_detect_anomaly(True), left on by the reference
  IoU evaluation  ours (no_grad, one backbone pass, batched maps on the device)
                  | reference habits (autograd on, backbone run twice, per-image cv2 resizes in numpy)
  push search     ours (vectorised over batch x positions x words)
                  | a per-word loop over numpy arrays, as the reference does it
  joint step      ours against a plain torchvision ResNet step (cross entropy only): the overhead ratio
Nothing is written; the numbers are for the machine it runs on.

    python bench.py -amp bf16 -channels_last    # also the joint step under autocast (for GPUs)
    python bench.py -schedule [-epochs 21] [-push_epochs 10 20] [-last 20]

The reference-shaped schedule on the toy data (make demo's data, Grad-CAM maps and base model),
run twice in a temporary folder: last_layer_cache False (the reference), then True. Prints each
phase's wall time, both final accuracies, the Pets schedule's ratio projected from the measured
per-image costs, and last `schedule ratio cached/faithful: R`.

    python bench.py -site [-site_words 2000] [-site_classes 200] [-test_images 5000]

The explorer's pages (figures/site.py) for a synthetic run of that size (5 training images a word,
3 words a test image, 7 x 7 maps, 112 px images) in a temporary folder: prints the seconds to build
them, the files written and the images copied (each once).
"""
import argparse
import copy
import csv
import os
import tempfile
import time

import cv2
import numpy as np
import torch
import torchvision

import main as lvw_main
from data.image_data import image_folder, normalize
from metrics.iou import map_iou
from model import LVWNet, ResNetFeatures, squared_distances
from push import nearest_patches
from run import config
from train_and_test import amp_context, batch_losses, word_attention_map


def timed(fn, repeats, device):
    fn()  # warm-up
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def reference_style_iou(model, images, gradcam, k, thr):
    """The reference's evaluation habits: autograd on, the backbone run a second time for the
    maps, and the top-k maps resized one by one with cv2 in numpy."""
    out = model(images)
    z = model.conv_features(images)  # second backbone pass
    maps = model.similarity(squared_distances(z, model.prototype_vectors)).detach().cpu().numpy()
    order = torch.sort(out.similarities, dim=1, descending=True).indices[:, :k].cpu().numpy()
    size = gradcam.shape[-1]
    ious = []
    for i in range(len(images)):
        up = np.stack([cv2.resize(maps[i, p], (size, size), interpolation=cv2.INTER_CUBIC) for p in order[i]])
        a = up.max(0)
        a = (a - a.min()) / max(a.max() - a.min(), 1e-12)
        g = gradcam[i].cpu().numpy()
        ba = np.where(a > np.percentile(a, thr), 0, 1)
        bg = np.where(g > np.percentile(g, thr), 0, 1)
        ious.append(((ba & bg).sum() + 1e-6) / ((ba | bg).sum() + 1e-6))
    return ious


def reference_style_push(model, images):
    """Per-word loop over numpy distance arrays (one batch), as the reference's push."""
    with torch.no_grad():
        z = model.conv_features(images)
        d = squared_distances(z, model.prototype_vectors).cpu().numpy()
    best = []
    for p in range(d.shape[1]):
        dist_p = d[:, p]
        idx = np.unravel_index(np.argmin(dist_p), dist_p.shape)
        best.append((float(dist_p[idx]), z[idx[0], :, idx[1], idx[2]].cpu().numpy()))
    return best


# ---- the schedule benchmark (-schedule) ----------------------------------------------------------

TOY_INPUTS = ('data/toy', 'data/grad_train_toy.npy', 'data/grad_test_toy.npy', 'saved_models/base/toy_resnet18.pth')
PHASES = ('warm', 'joint', 'push', 'cache', 'last')


def pass_times(metrics_csv):
    """Mean seconds of one train pass per phase ('warm', 'joint', 'last') and of one test pass,
    from a run's metrics.csv."""
    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    means = {}
    for key, pick in (('warm', ('warm', 'train')), ('joint', ('joint', 'train')), ('last', ('last', 'train')),
                      ('test', (None, 'test'))):
        times = [float(r['time']) for r in rows if r['split'] == pick[1] and pick[0] in (None, r['phase'])]
        means[key] = sum(times) / len(times) if times else 0.0
    return means


def schedule_counts(s):
    """How many passes of each kind a schedule runs: warm, joint, push, last epochs and tests."""
    kinds = [kind for kind, _, _ in lvw_main.passes(s)]
    counts = {kind: kinds.count(kind) for kind in ('warm', 'joint', 'push', 'last')}
    counts['test'] = len(kinds)
    return counts


def projected_seconds(per_image, counts, n_train, n_test, cached):
    """Seconds of a schedule from per-image costs: each training-set pass of a kind costs
    n_train * per_image[kind], each test n_test * per_image['test']. The cached schedule has no
    last-layer forward passes and no tests after them; it builds the cache once per push."""
    train = counts['warm'] * per_image['warm'] + counts['joint'] * per_image['joint'] + counts['push'] * per_image['push']
    tests = counts['test']
    if cached:
        train += counts['push'] * per_image['cache']
        tests -= counts['last']
    else:
        train += counts['last'] * per_image['last']
    return n_train * train + n_test * tests * per_image['test']


def run_schedule(args, cached, root):
    """One run of the benchmark schedule; returns (run summary, mean seconds of one pass per phase)."""
    name = 'cached' if cached else 'faithful'
    settings = ['data_path=%r' % os.path.join(root, 'data/toy/'), 'experiment_run=%r' % name,
                'num_train_epochs=%d' % args.epochs, 'push_start=%d' % min(args.push_epochs),
                'push_epochs=%r' % list(args.push_epochs), 'last_layer_iterations=%d' % args.last,
                'keep_checkpoints=1', 'last_layer_cache=%r' % cached, 'seed=%d' % args.seed]
    summary = lvw_main.main(['-dataset', 'toy', '-set', *args.set, *settings, '-device', args.device,
                             '-train_atts', os.path.join(root, TOY_INPUTS[1]),
                             '-test_atts', os.path.join(root, TOY_INPUTS[2]), '-weights', os.path.join(root, TOY_INPUTS[3])])
    folder = config.run_dir(config.resolve_settings('toy', args.set + settings))
    return summary, pass_times(os.path.join(folder, 'metrics.csv'))


def schedule_bench(args):
    root = os.getcwd()
    missing = [p for p in TOY_INPUTS if not os.path.exists(p)]
    if missing:
        raise config.UserError('bench.py -schedule needs the toy demo\'s data, maps and base model (missing %s); '
                               'run `make demo` first' % missing[0])
    results = {}
    with tempfile.TemporaryDirectory(prefix='lvw_bench_') as work:
        os.chdir(work)
        try:
            for cached in (False, True):
                results[cached] = run_schedule(args, cached, root)
        finally:
            os.chdir(root)
    s = config.resolve_settings('toy', args.set)
    n_train, n_test = (len(image_folder(os.path.join('data/toy', split)).samples) for split in ('train', 'test'))
    print()
    print('schedule: toy data (%d train / %d test images, resnet18, %d px), %d epochs (%d warm), pushes at %s, '
          '%d last-layer passes each' % (n_train, n_test, s['img_size'], args.epochs, s['num_warm_epochs'],
                                         list(args.push_epochs), args.last))
    print('%-28s %12s %12s' % ('phase (with its tests)', 'faithful s', 'cached s'))
    for phase in PHASES:
        print('%-28s %12.1f %12.1f' % (phase, *(results[c][0]['phase_seconds'].get(phase, 0.0) for c in (False, True))))
    totals = [sum(results[c][0]['phase_seconds'].values()) for c in (False, True)]
    print('%-28s %12.1f %12.1f' % ('total', *totals))
    print('%-28s %12.4f %12.4f' % ('final test accuracy', *(results[c][0]['final_accuracy'] for c in (False, True))))

    # per-image costs: train passes and tests from metrics.csv; a push and a cache build per push
    faithful, cached = results[False], results[True]
    per_image = {k: faithful[1][k] / n_train for k in ('warm', 'joint', 'last')}
    per_image['test'] = faithful[1]['test'] / n_test
    pushes = len(args.push_epochs)
    per_image['push'] = (faithful[0]['phase_seconds']['push'] / pushes - faithful[1]['test']) / n_train
    per_image['cache'] = cached[0]['phase_seconds'].get('cache', 0.0) / pushes / n_train
    pets = config.resolve_settings('pets')
    pets_counts = schedule_counts(pets)
    pets_ratio = (projected_seconds(per_image, pets_counts, 3680, 3669, True)
                  / projected_seconds(per_image, pets_counts, 3680, 3669, False))
    print('per-image ms: %s' % ', '.join('%s %.2f' % (k, 1000 * v) for k, v in per_image.items()))
    print('projected Pets schedule (%d warm, %d joint, %d pushes, %d last-layer passes, %d tests; 3680 / 3669 '
          'images) ratio cached/faithful: %.3f' % (pets_counts['warm'], pets_counts['joint'], pets_counts['push'],
                                                   pets_counts['last'], pets_counts['test'], pets_ratio))
    # warm, joint and push do the same work in both runs: how much they differ is the machine's drift
    shared = [sum(results[c][0]['phase_seconds'].get(p, 0.0) for p in ('warm', 'joint', 'push')) for c in (False, True)]
    equal_speed = (shared[0] + totals[1] - shared[1]) / totals[0]
    print('shared phases (warm, joint, push: the same work in both runs) %.1f s and %.1f s: the second run took '
          '%+.0f %% (the machine\'s drift)' % (shared[0], shared[1], 100 * (shared[1] / shared[0] - 1)))
    print('schedule ratio at equal speed (the shared phases timed by the first run): %.3f' % equal_speed)
    ratio = totals[1] / totals[0]
    print('schedule ratio cached/faithful: %.3f' % ratio)
    runs = (('faithful', False), ('cached', True))
    return {'phase_seconds': {name: results[c][0]['phase_seconds'] for name, c in runs},
            'final_accuracy': {name: results[c][0]['final_accuracy'] for name, c in runs},
            'per_image': per_image, 'pets_ratio': pets_ratio, 'ratio': ratio, 'equal_speed_ratio': equal_speed}


def site_bench(args):
    """-site: the explorer's write_site on a synthetic bundle of -site_words words and -test_images images."""
    from PIL import Image

    from figures import site
    P, N, C, k = args.site_words, args.test_images, args.site_classes, 5
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        n_train = min(4 * P, 20000)
        paths = []
        for name, n in (('train', n_train), ('test', N)):
            os.makedirs(os.path.join(root, name))
            for i in range(n):
                paths.append(os.path.join(root, name, '%d.png' % i))
                Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(paths[-1])
        train_paths, test_paths = paths[:n_train], paths[n_train:]
        bundle = {'title': 'synthetic', 'description': '%d words, %d test images' % (P, N),
                  'class_names': ['class %d' % c for c in range(C)], 'weight': rng.normal(size=(C, P)),
                  'users': [[int(c)] for c in rng.integers(0, C, P)],
                  'words': [{'source': None, 'top': [(int(i), 1.0, rng.random((7, 7))) for i in rng.integers(0, n_train, k)]}
                            for _ in range(P)],
                  'tests': [{'image': n, 'label': n % C, 'pred': n % C, 'probability': 0.9,
                             'words': [(int(p), 1.0, 0.5, 0.5, rng.random((7, 7))) for p in rng.integers(0, P, 3)]}
                            for n in range(N)],
                  'train_paths': train_paths, 'train_labels': [i % C for i in range(n_train)], 'test_paths': test_paths}
        start = time.time()
        site.write_site(os.path.join(root, 'site'), bundle, log=lambda *_: None)
        seconds = time.time() - start
        files = sum(len(f) for _, _, f in os.walk(os.path.join(root, 'site')))
        copied = sum(len(os.listdir(os.path.join(root, 'site', 'assets', s))) for s in ('train', 'test'))
        distinct = len({i for w in bundle['words'] for i, _, _ in w['top']}) + N
    print('explorer site: %d words, %d classes, %d test images: %.1f s, %d files, %d images copied (%d distinct)'
          % (P, C, N, seconds, files, copied, distinct))
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-arch', default='resnet34')
    parser.add_argument('-img_size', type=config.positive_int, default=224)
    parser.add_argument('-batch', type=config.positive_int, default=16)
    parser.add_argument('-words', type=config.positive_int, default=185)
    parser.add_argument('-classes', type=config.positive_int, default=37)
    parser.add_argument('-repeats', type=config.positive_int, default=3)
    parser.add_argument('-amp', default=None, choices=('bf16', 'fp16'), help='also time the joint step under autocast')
    parser.add_argument('-channels_last', action='store_true', help='... and/or with a channels-last backbone')
    parser.add_argument('-schedule', action='store_true', help='the schedule benchmark on the toy data (above)')
    parser.add_argument('-site', action='store_true', help="the explorer's pages for a synthetic run (above)")
    parser.add_argument('-site_words', type=config.positive_int, default=2000, help='-site: words')
    parser.add_argument('-site_classes', type=config.positive_int, default=200, help='-site: classes')
    parser.add_argument('-test_images', type=config.positive_int, default=5000, help='-site: test images')
    parser.add_argument('-epochs', type=config.positive_int, default=21, help='-schedule: training epochs')
    parser.add_argument('-push_epochs', type=config.positive_int, nargs='+', default=[10, 20], help='-schedule: push epochs')
    parser.add_argument('-last', type=config.positive_int, default=20, help='-schedule: last-layer passes after each push')
    parser.add_argument('-seed', type=config.nonnegative_int, default=0, help='-schedule: the runs\' seed')
    parser.add_argument('-set', nargs='+', default=[], metavar='NAME=VALUE',
                        help='-schedule: other settings of both runs (the toy preset otherwise)')
    config.add_device_args(parser)
    args = parser.parse_args(argv)
    if args.schedule:
        return schedule_bench(args)
    if args.site:
        return site_bench(args)
    device = config.pick_device(args.device, args.gpuid)
    s = config.resolve_settings('pets', ['base_architecture=%r' % args.arch, 'img_size=%d' % args.img_size,
                                         'num_classes=%d' % args.classes,
                                         'prototype_shape=(%d, 128, 1, 1)' % args.words])
    torch.manual_seed(0)
    model = LVWNet(ResNetFeatures(args.arch), s['prototype_shape'], args.classes).to(device)
    B, S = args.batch, args.img_size
    images = normalize(torch.rand(B, 3, S, S, device=device))
    gradcam = torch.rand(B, S, S, device=device)
    labels = torch.randint(0, args.classes, (B,), device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)

    def train_step():
        model.train()
        terms = batch_losses(model(images), labels, gradcam, model, s, use_attention=True)
        optimizer.zero_grad()
        terms['total'].backward()
        optimizer.step()

    def train_step_anomaly():
        with torch.autograd.set_detect_anomaly(True):
            train_step()

    def our_iou():
        model.eval()
        with torch.no_grad():
            out = model(images)
            word_map = word_attention_map(out.similarity_maps, out.min_distances, s['topk'], S, 'bicubic', 'minmax')
            map_iou(word_map, gradcam, 50).cpu()

    def ref_iou():
        model.eval()
        reference_style_iou(model, images, gradcam, s['topk'], 50)

    raw = torch.rand(B, 3, S, S)  # push reads [0, 1] images and normalises them itself
    loader = torch.utils.data.DataLoader(list(zip(raw, labels.cpu())), batch_size=B)

    def our_push():
        nearest_patches(model, loader, device, False)

    def ref_push():
        model.eval()
        reference_style_push(model, normalize(raw.to(device)))

    plain = getattr(torchvision.models, args.arch)(weights=None, num_classes=args.classes).to(device)
    plain_optimizer = torch.optim.Adam(plain.parameters(), lr=1e-5)

    def plain_step():  # the same architecture, batch and image size, cross entropy only
        plain.train()
        loss = torch.nn.functional.cross_entropy(plain(images), labels)
        plain_optimizer.zero_grad()
        loss.backward()
        plain_optimizer.step()

    rows = [('train step', train_step, train_step_anomaly),
            ('IoU evaluation', our_iou, ref_iou),
            ('push search', our_push, ref_push)]
    print('%s, %d px, batch %d, %d words, %s' % (args.arch, S, B, args.words, device))
    print('%-16s %14s %18s %8s' % ('', 'ours img/s', 'reference img/s', 'speed-up'))
    for name, ours, reference in rows:
        t_ours, t_ref = timed(ours, args.repeats, device), timed(reference, args.repeats, device)
        print('%-16s %14.1f %18.1f %7.1fx' % (name, B / t_ours, B / t_ref, t_ref / t_ours))
    if args.amp or args.channels_last:  # the GPU path: autocast and channels-last against float32
        fast = copy.deepcopy(model).to(memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
        fast_optimizer = torch.optim.Adam(fast.parameters(), lr=1e-5)
        scaler = torch.amp.GradScaler(device.type) if args.amp == 'fp16' else None
        fast_images = images.contiguous(memory_format=torch.channels_last) if args.channels_last else images

        def fast_step():
            fast.train()
            with amp_context(device, args.amp):
                out = fast(fast_images)
            total = batch_losses(out, labels, gradcam, fast, s, use_attention=True)['total']
            fast_optimizer.zero_grad()
            if scaler is None:
                total.backward()
                fast_optimizer.step()
            else:
                scaler.scale(total).backward()
                scaler.step(fast_optimizer)
                scaler.update()

        t_fast, t_float = timed(fast_step, args.repeats, device), timed(train_step, args.repeats, device)
        print('joint step float32 %.1f img/s, amp %s%s %.1f img/s: %.2fx'
              % (B / t_float, args.amp, ' + channels_last' if args.channels_last else '', B / t_fast, t_float / t_fast))
    # interleaved, so that a drift of the machine's speed touches both alike
    t_joint, t_plain = [sum(x) for x in zip(*[(timed(train_step, 1, device), timed(plain_step, 1, device))
                                               for _ in range(args.repeats)])]
    print('joint step %.1f img/s, plain torchvision %s step (cross entropy only) %.1f img/s: overhead %.3fx'
          % (B * args.repeats / t_joint, args.arch, B * args.repeats / t_plain, t_joint / t_plain))


if __name__ == '__main__':
    config.run_cli(main)
