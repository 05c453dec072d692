"""Train LVW (or ProtoPNet with class_specific=True) as settings.py says (spec section 4).

    python main.py -train_atts data/grad_train_toy.npy -test_atts data/grad_test_toy.npy

Schedule: warm epochs (backbone frozen, no attention term), then joint epochs (StepLR stepped
after each); at every push epoch: joint epoch -> test -> save nopush -> push -> test -> save push
-> last_layer_iterations last-layer passes, each followed by a test and a save. Checkpoints go to
saved_models/<arch>/<experiment_run>/ as <epoch>nopush<acc>.pth, <epoch>push<acc>.pth and
<epoch>_<i>push<acc>.pth, only when test accuracy > save_threshold.

Every input (settings, maps, images, weights) is checked before the run folder is touched.
After each pass, <run>/last.pth holds everything needed to continue: the same command with
-resume picks up after the last finished pass (run/run_state.py). -overwrite moves an old run aside.
`torchrun --nproc_per_node N main.py ...` trains on N processes (run/distributed.py); rank 0 writes.
At the end: report.md (visualize.py) and, with push_save_images, the explorer site of the final
checkpoint in <run>/explorer/ (explore.py).
"""
import argparse
import functools
import os
import time
import types

import torch

import push
import train_and_test as tnt
from data.image_data import FlipDraws, ImageDataset, check_images, check_same_classes, make_loader, read_sidecar_file
from figures import explorer, gallery, run_report
from model import build_model
from receptive_field import layer_specs, word_layer_rf_info
from run import config, distributed, run_state
from run.checkpoint import CheckpointKeeper, checkpoint_name

CSV_FIELDS = ('epoch', 'phase', 'split', 'iteration', 'time', 'cross_entropy', 'cluster', 'separation',
              'attention', 'accuracy', 'l1', 'p_dist_pair', 'lr_features')


def build_loaders(s, train_atts, test_atts, device, log):
    train_set = ImageDataset(s['train_dir'], s['img_size'], attention=train_atts, flip=s['attention_flip'], log=log)
    test_set = ImageDataset(s['test_dir'], s['img_size'], attention=test_atts, log=log)
    push_set = ImageDataset(s['train_push_dir'], s['img_size'], log=log)
    check_same_classes(train_set.classes, test_set.classes, s['train_dir'], s['test_dir'])
    check_same_classes(train_set.classes, push_set.classes, s['train_dir'], s['train_push_dir'])
    if len(train_set.classes) != s['num_classes']:
        raise config.UserError('%s has %d classes but num_classes is %d'
                               % (s['train_dir'], len(train_set.classes), s['num_classes']))
    check_images(sorted({path for data in (train_set, test_set, push_set) for path, _ in data.samples}),
                 s['image_check'], 'train, test and push images')
    loader = functools.partial(make_loader, num_workers=s['num_workers'], device=device,
                               persistent=s['persistent_workers'], sharded=True)
    return (loader(train_set, s['train_batch_size'], True), loader(test_set, s['test_batch_size'], False),
            loader(push_set, s['train_push_batch_size'], False), train_set.classes)




def passes(s):
    """The schedule as the list of its passes, the unit of resumption: (kind, epoch, iteration)
    with kind 'warm' | 'joint' (one epoch, then a test), 'push' (push, then a test) or 'last'
    (a last-layer pass, then a test)."""
    out = []
    for epoch in range(s['num_train_epochs']):
        out.append(('warm' if epoch < s['num_warm_epochs'] else 'joint', epoch, None))
        if epoch >= s['push_start'] and epoch in s['push_epochs']:
            out.append(('push', epoch, None))
            if s['prototype_activation_function'] != 'linear':
                out += [('last', epoch, i) for i in range(s['last_layer_iterations'])]
    return out


def prepare(s, train_atts, test_atts, device, weights=None, log=print):
    """Everything a run needs, built before anything is written, so that an input mistake stops
    it with the run folder untouched: loaders (maps paired, images opened), model, optimizers.
    Under torchrun, run.trainer(kind) wraps the network in DistributedDataParallel per phase."""
    run_state.seed_everything(s['seed'])
    train_loader, test_loader, push_loader, classes = build_loaders(s, train_atts, test_atts, device, log)
    net = build_model(s, weights=weights, log=log).to(device)
    if s['channels_last']:
        net = net.to(memory_format=torch.channels_last)
    if s['sync_batchnorm'] and distributed.world_size() > 1:
        if device.type != 'cuda':
            raise config.UserError('setting sync_batchnorm needs GPUs (torch\'s SyncBatchNorm runs on CUDA only); '
                                   'on CPU leave it False')
        net.features = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net.features)
    warm_opt, joint_opt, joint_scheduler, last_opt = tnt.make_optimizers(net, s)
    # the cached last-layer passes draw their batches and flips through a loader built like the training one
    draws_loader = make_loader(FlipDraws(train_loader.dataset), s['train_batch_size'], True, s['num_workers'],
                               device) if s['last_layer_cache'] else None
    # the push pass reads the training images unflipped, as the cache needs them: it keeps its features
    push_is_train = push_loader.dataset.samples == train_loader.dataset.samples
    modules = {'model': net, 'warm_optimizer': warm_opt, 'joint_optimizer': joint_opt,
               'joint_scheduler': joint_scheduler, 'last_optimizer': last_opt}
    scaler = None
    if s['amp'] == 'fp16':  # bf16 keeps float32's range and needs no loss scaling
        scaler = modules['grad_scaler'] = torch.amp.GradScaler(device.type)
    wrappers = {}

    def trainer(kind):
        """The network to train phase `kind` with (call it after setting what trains): itself in
        one process; under torchrun a DDP wrapper, one per phase, since DDP registers the
        parameters that require gradients when it is built."""
        if distributed.world_size() == 1:
            return net
        if kind not in wrappers:
            wrappers[kind] = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[device.index] if device.type == 'cuda' else None)
        return wrappers[kind]

    return types.SimpleNamespace(draws_loader=draws_loader, push_is_train=push_is_train,
        train_loader=train_loader, test_loader=test_loader, push_loader=push_loader, classes=classes,
        net=net, trainer=trainer, scaler=scaler, modules=modules,
        opt={'warm': warm_opt, 'joint': joint_opt, 'last': last_opt},
        rf_info=word_layer_rf_info(s['img_size'], layer_specs(net.features)))


def train(run, s, folder, device, log=print, state=None):
    """The schedule from `prepare`'s run, continuing after the passes that the resume `state`
    (last.pth) holds. Writes last.pth after every pass and run_summary.json at the end; under
    torchrun every rank trains and only rank 0 writes."""
    run_log = getattr(log, 'row', lambda **_: None)
    net, writes = run.net, distributed.is_main()
    keep = CheckpointKeeper(folder, s['save_threshold'], s['keep_checkpoints'], log) if writes else None
    schedule = passes(s)
    done, elapsed, final = 0, 0.0, None
    if state is not None:
        done = run_state.restore_state(state, run.modules, keep)
        elapsed, final = state['elapsed'], state.get('final')
        log('resumed from %s: %d of %d passes done, continuing at %s'
            % (run_state.state_path(folder), done, len(schedule), describe(schedule, done)))
    else:
        log('%d train / %d test images, %d classes, %d words, feature grid %dx%d, receptive field %s'
            % (len(run.train_loader.dataset), len(run.test_loader.dataset), len(run.classes),
               s['prototype_shape'][0], run.rf_info[0], run.rf_info[0], run.rf_info))

    def record(epoch, phase, split, metrics, iteration=None):
        log('epoch %d | %s | %s%s | %s' % (epoch, phase, split, '' if iteration is None else ' %d' % iteration,
                                             tnt.format_metrics(metrics)))
        run_log(epoch=epoch, phase=phase, split=split, iteration=iteration,
                lr_features=run.opt['joint'].param_groups[0]['lr'], **{k: metrics.get(k) for k in CSV_FIELDS[4:-1]})

    def test(epoch, phase, iteration=None, collect=None):
        metrics = tnt.train_or_test(net, run.test_loader, device, s, desc='test', collect=collect)
        record(epoch, phase, 'test', metrics, iteration)
        return metrics['accuracy']

    def save(kind, epoch, accuracy, iteration=None):
        if not writes:
            return [None, accuracy]
        path = keep(net, checkpoint_name(epoch, accuracy, kind, iteration), accuracy, s, run.classes,
                    epoch=epoch, kind=kind, iteration=iteration)
        return [os.path.basename(path) if path else None, accuracy]

    frozen_bn = s['frozen_bn_eval'] or s['last_layer_cache']
    cache = None  # (epoch, the cached similarities of the frozen network after that epoch's push)
    phase_seconds = dict(state.get('phase_seconds', {})) if state is not None else {}
    start = time.time()
    for index in range(done, len(schedule)):
        kind, epoch, iteration = schedule[index]
        pass_start = time.time()
        next_is_last = index + 1 < len(schedule) and schedule[index + 1][0] == 'last'
        img_dir = os.path.join(folder, 'img', 'epoch-%d' % epoch) if s['push_save_images'] and writes else None
        if kind in ('warm', 'joint'):
            (tnt.warm_only if kind == 'warm' else tnt.joint)(net)
            metrics = tnt.train_or_test(run.trainer(kind), run.train_loader, device, s, run.opt[kind],
                                        use_attention=kind == 'joint', desc='epoch %d %s' % (epoch, kind),
                                        frozen_bn=frozen_bn and kind == 'warm', scaler=run.scaler)
            if kind == 'joint':
                run.modules['joint_scheduler'].step()
            record(epoch, kind, 'train', metrics)
            final = save('nopush', epoch, test(epoch, kind))
        elif kind == 'push':
            # with the cache, the push pass keeps the training features and the test after it its outputs
            reuse = s['last_layer_cache'] and next_is_last
            found = push.push_prototypes(net, run.push_loader, device, s['class_specific'], epoch=epoch,
                                         folder=img_dir, rf_info=run.rf_info, img_size=s['img_size'], log=log,
                                         keep_features=reuse and run.push_is_train, amp=s['amp'],
                                         unique=s['push_unique'], exclude_border=s['push_exclude_border'])
            collected = {} if reuse else None
            final = save('push', epoch, test(epoch, 'push', collect=collected))
            if reuse:
                cache_start = time.time()
                cache = (epoch, tnt.build_last_layer_cache(net, run.train_loader.dataset, run.test_loader.dataset,
                                                           device, s, found if 'features' in found else None,
                                                           collected))
                if writes:
                    run_state.save_cache(folder, epoch, cache[1])
                cache_seconds = time.time() - cache_start
                phase_seconds['cache'] = round(phase_seconds.get('cache', 0.0) + cache_seconds, 3)
                pass_start += cache_seconds  # the push's own time leaves the cache out
                log('epoch %d | last-layer cache of %d training images (%s) and %d test images (%.1fs)'
                    % (epoch, cache[1]['train_min'].shape[1], 'both orientations' if cache[1]['train_min'].shape[0] == 2
                       else 'unflipped', cache[1]['test_min'].shape[0], cache_seconds))
        elif s['last_layer_cache']:
            tnt.last_only(net)
            if cache is None or cache[0] != epoch:  # resumed inside the last-layer passes
                saved = distributed.broadcast_object(run_state.load_cache(folder, epoch, 'cpu')
                                                     if distributed.is_main() else None)
                saved = {k: v.to(device) for k, v in saved.items()} if saved is not None else None
                cache = (epoch, saved if saved is not None else tnt.build_last_layer_cache(
                    net, run.train_loader.dataset, run.test_loader.dataset, device, s))
            metrics = tnt.cached_last_layer_pass(net, cache[1], run.draws_loader, device, s, run.opt['last'],
                                                 desc='epoch %d last layer %d (cached)' % (epoch, iteration))
            record(epoch, 'last', 'train', metrics, iteration)
            test_metrics = tnt.cached_test(net, cache[1], run.test_loader, s)
            record(epoch, 'last', 'test', test_metrics, iteration)
            final = save('last', epoch, test_metrics['accuracy'], iteration)
        else:
            tnt.last_only(net)
            metrics = tnt.train_or_test(run.trainer('last'), run.train_loader, device, s, run.opt['last'],
                                        use_attention=True, desc='epoch %d last layer %d' % (epoch, iteration),
                                        frozen_bn=frozen_bn, scaler=run.scaler)
            record(epoch, 'last', 'train', metrics, iteration)
            final = save('last', epoch, test(epoch, 'last', iteration), iteration)
        if kind != 'warm' and kind != 'joint' and not next_is_last and writes:
            gallery.write_push_pictures(img_dir, net.last_layer.weight, run.classes, epoch, log=log)
        phase_seconds[kind] = round(phase_seconds.get(kind, 0.0) + time.time() - pass_start, 3)
        if writes:
            run_state.save_state(run_state.state_path(folder), index + 1, run.modules, keep, log,
                                 elapsed + time.time() - start, final=final, phase_seconds=phase_seconds)

    best = keep.best if writes else None
    summary = {'final_accuracy': final[1] if final else None,
               'final_checkpoint': final[0] if final else None,
               'best_checkpoint': os.path.basename(best[0]) if best else None,
               'best_accuracy': best[1] if best else None,
               'train_seconds': round(elapsed + time.time() - start, 1),
               'phase_seconds': phase_seconds}
    if distributed.world_size() > 1:
        summary['processes'] = distributed.world_size()
    if not writes:
        return summary
    run_state.finish_run(folder, summary)
    run_report.write_run_report(folder, log=log)
    if s['push_save_images'] and summary['final_checkpoint']:
        explorer.build_site_quietly(folder, summary['final_checkpoint'], device, log)
    log('done in %.0fs: final test accuracy %.4f, final checkpoint %s'
        % (summary['train_seconds'], summary['final_accuracy'] or float('nan'), summary['final_checkpoint']))
    return summary


def describe(schedule, index):
    """'epoch 3 push' for the pass at `index` of the schedule, 'the end' past it."""
    if index >= len(schedule):
        return 'the end'
    kind, epoch, iteration = schedule[index]
    return 'epoch %d %s%s' % (epoch, kind, '' if iteration is None else ' %d' % iteration)


def map_checksum(npy_path):
    """The checksum its sidecar records for a map file ('crc32 1a2b3c4d'), or None."""
    header = (read_sidecar_file(npy_path) or (None, None))[0]
    return '%s %s' % (header['algo'], header['hex']) if header else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-train_atts', default=None, help='Grad-CAM maps of train/ (default ./data/grad_train_<dataset>.npy)')
    parser.add_argument('-test_atts', default=None, help='Grad-CAM maps of test/ (default ./data/grad_test_<dataset>.npy)')
    parser.add_argument('-weights', default=None, help='ImageNet state_dict for the backbone (torchvision format)')
    parser.add_argument('-overwrite', action='store_true', help='move an existing run folder aside and start anew')
    parser.add_argument('-resume', action='store_true',
                        help='continue the run in its folder after its last finished pass (or start it)')
    config.add_settings_args(parser)
    config.add_device_args(parser)
    args = parser.parse_args(argv)

    s = config.resolve_settings(args.dataset, args.set)
    train_atts = args.train_atts or './data/grad_train_%s.npy' % s['dataset']
    test_atts = args.test_atts or './data/grad_test_%s.npy' % s['dataset']
    for path in (train_atts, test_atts):
        if not os.path.isfile(path):
            raise config.UserError('attention maps not found: %s (make them with gradcam_extract.py)' % path)
    if ',' in str(args.gpuid):
        raise config.UserError('-gpuid %s: training on several GPUs is done with torchrun, one process per GPU '
                               '(torchrun --nproc_per_node N main.py ...); DataParallel is gone' % args.gpuid)
    # under torchrun: the process group, and this rank's device (cuda:LOCAL_RANK, or cpu with gloo)
    device = distributed.init_distributed(args.device) or config.pick_device(args.device, args.gpuid)
    try:
        return run_training(args, s, train_atts, test_atts, device)
    finally:
        distributed.close()


def run_training(args, s, train_atts, test_atts, device):
    """Check, prepare, open (rank 0) and train the run of `main`'s arguments on `device`, holding
    the run folder's lock from before anything is decided until the end."""
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    folder = config.run_dir(s)
    early = run_state.EarlyLog() if distributed.is_main() else run_state.EarlyLog(quiet=True)
    lock = run_state.lock_run_folder(folder, 'experiment_run', log=early)
    try:
        return open_and_train(args, s, train_atts, test_atts, device, folder, early, lock)
    finally:
        if lock is not None:
            lock.release()


def open_and_train(args, s, train_atts, test_atts, device, folder, early, lock):
    """run_training's steps once the folder is locked: decide, prepare, open the folder, train."""
    # the sidecars' checksums too: -resume refuses maps extracted again since the run started
    record = {'settings': s, 'train_atts': train_atts, 'test_atts': test_atts,
              'maps_checksums': [map_checksum(path) for path in (train_atts, test_atts)]}
    action = run_state.start_action(folder, args.overwrite, args.resume, 'experiment_run', record)
    if action == 'finished':
        return run_state.finished_summary(folder, log=print if distributed.is_main() else lambda *_: None)
    resume = action == 'resume'
    # a resumed run's weights come from last.pth: no -weights file is read, and the log says so
    prepared = prepare(dict(s, pretrained=False) if resume else s, train_atts, test_atts, device,
                       None if resume else args.weights,
                       log=run_state.ResumeStartLog(early, run_state.state_path(folder)) if resume else early)
    distributed.barrier()  # every rank has checked the folder before rank 0 changes it
    log, state = early, None
    if distributed.is_main():
        log, state = run_state.open_run(folder, action, dict(record, device=str(device), versions=config.versions(),
                                                             processes=distributed.world_size()), CSV_FIELDS, early,
                                        lock=lock)
    state = distributed.broadcast_object(state)
    log('run folder %s, device %s%s, dataset %s, mode %s'
        % (folder, device, ' (%d processes)' % distributed.world_size() if distributed.world_size() > 1 else '',
           s['dataset'], 'ProtoPNet' if s['class_specific'] else 'LVW'))
    return train(prepared, s, folder, device, log=log, state=state)


if __name__ == '__main__':
    config.run_cli(main)
