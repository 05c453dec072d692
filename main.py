"""Train LVW (or ProtoPNet with class_specific=True) as settings.py says (spec section 4).

    python main.py -train_atts data/grad_train_toy.npy -test_atts data/grad_test_toy.npy

Schedule: warm epochs (backbone frozen, no attention term), then joint epochs (StepLR stepped
after each); at every push epoch: joint epoch -> test -> save nopush -> push -> test -> save push
-> last_layer_iterations last-layer passes, each followed by a test and a save. Checkpoints go to
saved_models/<arch>/<experiment_run>/ as <epoch>nopush<acc>.pth, <epoch>push<acc>.pth and
<epoch>_<i>push<acc>.pth, only when test accuracy > save_threshold.
"""
import argparse
import os
import random
import time

import numpy as np
import torch

import config
import push
import train_and_test as tnt
import visualize
from checkpoint import CheckpointKeeper, checkpoint_name
from image_data import ImageDataset, check_same_classes, make_loader
from model import build_model
from receptive_field import layer_specs, word_layer_rf_info

CSV_FIELDS = ('epoch', 'phase', 'split', 'iteration', 'time', 'cross_entropy', 'cluster', 'separation',
              'attention', 'accuracy', 'l1', 'p_dist_pair', 'lr_features')


class RunLog:
    """Prints and appends to <run>/train.log; one CSV row per pass in <run>/metrics.csv."""

    def __init__(self, folder, fields=CSV_FIELDS):
        self.log_path = os.path.join(folder, 'train.log')
        self.csv_path = os.path.join(folder, 'metrics.csv')
        self.fields = tuple(fields)
        with open(self.csv_path, 'w') as f:
            f.write(','.join(self.fields) + '\n')

    def __call__(self, message):
        print(message, flush=True)
        with open(self.log_path, 'a') as f:
            f.write(message + '\n')

    def row(self, **values):
        with open(self.csv_path, 'a') as f:
            f.write(','.join('' if values.get(k) is None else str(values.get(k)) for k in self.fields) + '\n')


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_loaders(s, train_atts, test_atts, device, log):
    train_set = ImageDataset(s['train_dir'], s['img_size'], attention=train_atts, flip=s['attention_flip'], log=log)
    test_set = ImageDataset(s['test_dir'], s['img_size'], attention=test_atts, log=log)
    push_set = ImageDataset(s['train_push_dir'], s['img_size'], log=log)
    check_same_classes(train_set.classes, test_set.classes, s['train_dir'], s['test_dir'])
    check_same_classes(train_set.classes, push_set.classes, s['train_dir'], s['train_push_dir'])
    if len(train_set.classes) != s['num_classes']:
        raise config.UserError('%s has %d classes but num_classes is %d'
                               % (s['train_dir'], len(train_set.classes), s['num_classes']))
    workers = s['num_workers']
    return (make_loader(train_set, s['train_batch_size'], True, workers, device),
            make_loader(test_set, s['test_batch_size'], False, workers, device),
            make_loader(push_set, s['train_push_batch_size'], False, workers, device),
            train_set.classes)


def train(s, train_atts, test_atts, device, gpuids=(), weights=None, log=print, run_log=None):
    """The whole schedule. Returns a summary dict (final/best checkpoint and accuracies)."""
    folder = config.run_dir(s)
    run_log = run_log or (lambda **_: None)
    seed_everything(s['seed'])
    train_loader, test_loader, push_loader, classes = build_loaders(s, train_atts, test_atts, device, log)
    model = build_model(s, weights=weights, log=log).to(device)
    net = model
    if len(gpuids) > 1:
        model = torch.nn.DataParallel(model, device_ids=list(gpuids))
    rf_info = word_layer_rf_info(s['img_size'], layer_specs(net.features))
    warm_opt, joint_opt, joint_scheduler, last_opt = tnt.make_optimizers(net, s)
    keep = CheckpointKeeper(folder, s['save_threshold'], s['keep_checkpoints'], log)
    log('%d train / %d test images, %d classes, %d words, feature grid %dx%d, receptive field %s'
        % (len(train_loader.dataset), len(test_loader.dataset), len(classes), s['prototype_shape'][0],
           rf_info[0], rf_info[0], rf_info))

    def record(epoch, phase, split, metrics, iteration=None):
        log('epoch %d | %s | %s%s | %s' % (epoch, phase, split, '' if iteration is None else ' %d' % iteration,
                                             tnt.format_metrics(metrics)))
        run_log(epoch=epoch, phase=phase, split=split, iteration=iteration,
                lr_features=joint_opt.param_groups[0]['lr'], **{k: metrics.get(k) for k in CSV_FIELDS[4:-1]})

    def test(epoch, phase, iteration=None):
        metrics = tnt.train_or_test(model, test_loader, device, s, desc='test')
        record(epoch, phase, 'test', metrics, iteration)
        return metrics['accuracy']

    def save(name_kind, epoch, accuracy, iteration=None):
        return keep(net, checkpoint_name(epoch, accuracy, name_kind, iteration), accuracy, s, classes,
                    epoch=epoch, kind=name_kind, iteration=iteration)

    start = time.time()
    final = None
    for epoch in range(s['num_train_epochs']):
        if epoch < s['num_warm_epochs']:
            phase = 'warm'
            tnt.warm_only(net)
            metrics = tnt.train_or_test(model, train_loader, device, s, warm_opt, use_attention=False,
                                        desc='epoch %d warm' % epoch)
        else:
            phase = 'joint'
            tnt.joint(net)
            metrics = tnt.train_or_test(model, train_loader, device, s, joint_opt, use_attention=True,
                                        desc='epoch %d joint' % epoch)
            joint_scheduler.step()
        record(epoch, phase, 'train', metrics)
        accuracy = test(epoch, phase)
        final = (save('nopush', epoch, accuracy), accuracy)

        if epoch >= s['push_start'] and epoch in s['push_epochs']:
            img_dir = os.path.join(folder, 'img', 'epoch-%d' % epoch) if s['push_save_images'] else None
            push.push_prototypes(model, push_loader, device, s['class_specific'], epoch=epoch, folder=img_dir,
                                 rf_info=rf_info, img_size=s['img_size'], log=log)
            accuracy = test(epoch, 'push')
            final = (save('push', epoch, accuracy), accuracy)
            if s['prototype_activation_function'] != 'linear':
                tnt.last_only(net)
                for i in range(s['last_layer_iterations']):
                    metrics = tnt.train_or_test(model, train_loader, device, s, last_opt, use_attention=True,
                                                desc='epoch %d last layer %d' % (epoch, i))
                    record(epoch, 'last', 'train', metrics, i)
                    accuracy = test(epoch, 'last', i)
                    final = (save('last', epoch, accuracy, i), accuracy)
            visualize.write_push_pictures(img_dir, net.last_layer.weight, classes, epoch, log=log)

    summary = {'final_accuracy': final[1] if final else None,
               'final_checkpoint': os.path.basename(final[0]) if final and final[0] else None,
               'best_checkpoint': os.path.basename(keep.best[0]) if keep.best else None,
               'best_accuracy': keep.best[1] if keep.best else None,
               'train_seconds': round(time.time() - start, 1)}
    config.save_json(summary, os.path.join(folder, 'run_summary.json'))
    visualize.write_run_report(folder, log=log)
    log('done in %.0fs: final test accuracy %.4f, final checkpoint %s'
        % (summary['train_seconds'], summary['final_accuracy'] or float('nan'), summary['final_checkpoint']))
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-train_atts', default=None, help='Grad-CAM maps of train/ (default ./data/grad_train_<dataset>.npy)')
    parser.add_argument('-test_atts', default=None, help='Grad-CAM maps of test/ (default ./data/grad_test_<dataset>.npy)')
    parser.add_argument('-weights', default=None, help='ImageNet state_dict for the backbone (torchvision format)')
    parser.add_argument('-overwrite', action='store_true', help='replace an existing run folder')
    config.add_settings_args(parser)
    config.add_device_args(parser)
    args = parser.parse_args(argv)

    s = config.resolve_settings(args.dataset, args.set)
    train_atts = args.train_atts or './data/grad_train_%s.npy' % s['dataset']
    test_atts = args.test_atts or './data/grad_test_%s.npy' % s['dataset']
    for path in (train_atts, test_atts):
        if not os.path.isfile(path):
            raise config.UserError('attention maps not found: %s (make them with gradcam_extract.py)' % path)
    device = config.pick_device(args.device, args.gpuid)
    gpuids = config.gpu_ids(device, args.gpuid)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True

    folder = config.run_dir(s)
    config.prepare_run_dir(folder, args.overwrite, 'experiment_run')
    config.save_json({'settings': s, 'train_atts': train_atts, 'test_atts': test_atts, 'device': str(device),
                      'versions': config.versions()}, os.path.join(folder, 'settings.json'))
    log = RunLog(folder)
    log('run folder %s, device %s, dataset %s, mode %s' % (folder, device, s['dataset'],
                                                           'ProtoPNet' if s['class_specific'] else 'LVW'))
    return train(s, train_atts, test_atts, device, gpuids, args.weights, log=log, run_log=log.row)


if __name__ == '__main__':
    config.run_cli(main)
