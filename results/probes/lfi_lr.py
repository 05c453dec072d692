"""Does LFI-CAM's from-scratch learning rate work from a trained trunk? (issue 20)

    python results/probes/lfi_lr.py [-lrs 0.1 0.01 0.001] [-seed 0]

Trains LFI-CAM as the toy benchmark does (its seed's base model, the toy preset's recipe: 5 epochs,
batch 32, x0.1 at epoch 4, the official augmentation and FIN init) once per learning rate, and
writes results/probes/lfi_lr.md: the test accuracy after every epoch. Needs the benchmark's base
model of the seed (python benchmark.py -seeds S -methods base).
"""
import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import benchmark  # noqa: E402
import train_peer  # noqa: E402
from run import config  # noqa: E402


def test_accuracies(run_dir):
    """The test accuracy of every epoch, from the run's metrics.csv."""
    with open(os.path.join(run_dir, 'metrics.csv')) as f:
        return [float(row['accuracy']) for row in csv.DictReader(f) if row['split'] == 'test']


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-lrs', type=float, nargs='+', default=[0.1, 0.01, 0.001])
    parser.add_argument('-seed', type=config.nonnegative_int, default=0)
    parser.add_argument('-out', default=os.path.join('results', 'probes', 'lfi_lr.md'))
    args = parser.parse_args(argv)
    plan = benchmark.Plan(False, [args.seed])
    base = plan.base_path(args.seed)
    if not os.path.isfile(base):
        raise config.UserError('%s not found: run python benchmark.py -seeds %d -methods base first' % (base, args.seed))
    rows = []
    for lr in args.lrs:
        name = 'probe_lfi_lr%g_s%d' % (lr, args.seed)
        summary = train_peer.main(['-method', 'lfi_cam', '-weights', base, '-resume',
                                   *plan.settings(args.seed, 'lfi_lr=%r' % lr, 'peer_run=%r' % name)])
        accuracies = test_accuracies(summary['run_dir'])
        rows.append('| %g | %s | %.1f s |' % (lr, ' | '.join('%.3f' % a for a in accuracies), summary['train_seconds']))
        print(rows[-1])
    epochs = len(accuracies)
    text = ['# LFI-CAM from a trained trunk: test accuracy per epoch by learning rate', '',
            'Made by `python %s`; toy data, seed %d, from the benchmark\'s base model %s.' % (
                ' '.join(['results/probes/lfi_lr.py'] + (argv if argv is not None else sys.argv[1:])), args.seed, base),
            '', '| lfi_lr | %s | training time |' % ' | '.join('epoch %d' % e for e in range(epochs)),
            '|---|%s---|' % ('---|' * epochs), *rows, '']
    config.atomic_write(args.out, lambda f: f.write('\n'.join(text)))
    print('wrote', args.out)


if __name__ == '__main__':
    config.run_cli(main)
