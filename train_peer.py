"""Train a peer method (SCOUTER+/-, Grad-CAM consistency, LFI-CAM) on the same footing as LVW.

    python train_peer.py -method scouter+ -dataset toy -weights saved_models/base/toy_resnet18.pth

Same images, loaders, settings (settings.py + presets + -set), trunk start (-weights, as main.py),
device choice and run layout as main.py: saved_models/<arch>/<peer_run>/ with settings.json,
train.log, metrics.csv (one row per pass) and a checkpoint per epoch above save_threshold
(<epoch>epoch<acc>.pth: state_dict, resolved settings, class names and the method, readable with
weights_only=True). Each method's recipe (optimiser, lr, schedule, epochs, batch size, loss
weights) is its <prefix>_* settings; see peers/ and ../shared/PEERS_SPEC.md. The final epoch's
checkpoint is the result (no selection on the test set). Inputs are checked before the run folder
is touched; last.pth after every epoch lets the same command with -resume continue the run, and
-overwrite moves an old run aside (as main.py).
"""
import argparse
import os
import time
import types

import torch
from tqdm import tqdm

import peers
from data.image_data import ImageDataset, check_images, check_same_classes, make_loader, normalize
from finetune_backbone import evaluate
from peers import common
from run import config, distributed, run_state
from run.checkpoint import CheckpointKeeper, checkpoint_name

CSV_FIELDS = ('epoch', 'split', 'time', 'total', 'cross_entropy', 'area', 'consistency', 'accuracy', 'lr')


def peer_run_dir(s, method):
    """saved_models/<arch>/<peer_run>, peer_run defaulting to <dataset>_<method's run name>."""
    name = s['peer_run'] or '%s_%s' % (s['dataset'], peers.RUN_NAMES[method])
    return os.path.join('saved_models', s['base_architecture'], name)


def to_device(batch, device):
    """A loader batch (images, labels, *extra) on `device`; images and image-shaped extras normalised."""
    images, labels, *extra = batch
    images = normalize(images.to(device, non_blocking=True))
    extra = tuple(normalize(e.to(device)) if e.dim() == 4 and e.shape[1] == 3 else e.to(device) for e in extra)
    return images, labels.to(device, non_blocking=True), extra


def train_one_epoch(model, method, loader, optimizer, device, s, desc=''):
    """One training pass; returns the per-batch means of the loss terms, accuracy and time."""
    module = peers.method_module(method)
    model.train()
    sums, n_batches, correct, seen = {}, 0, 0, 0
    start = time.time()
    for batch in tqdm(loader, desc=desc, leave=False, disable=None):
        images, labels, extra = to_device(batch, device)
        terms, logits = module.batch_loss(model, images, labels, extra, s, method)
        optimizer.zero_grad(set_to_none=True)
        terms['total'].backward()
        optimizer.step()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.detach()
        correct = correct + (logits.argmax(1) == labels).sum()
        n_batches += 1
        seen += labels.numel()
    metrics = {name: total.item() / max(n_batches, 1) for name, total in sums.items()}
    metrics.update(accuracy=float(correct) / max(seen, 1), time=time.time() - start)
    return metrics


def format_metrics(m):
    keys = ('total', 'cross_entropy', 'area', 'consistency')
    parts = ['time %.1fs' % m['time']] + ['%s %.4f' % (k, m[k]) for k in keys if k in m]
    return ' | '.join(parts + ['acc %.2f%%' % (100 * m['accuracy'])])


def training_images(s, prefix, log=print):
    """The training split augmented as <prefix>_augment says: 'none', 'flip' (p = 0.5) or
    'crop_flip' (RandomResizedCrop of the decoded original, then the flip)."""
    augment = s[prefix + '_augment']
    return ImageDataset(s['train_dir'], s['img_size'], flip='none' if augment == 'none' else 'joint', log=log,
                        random_crop=augment == 'crop_flip')


def prepare(s, method, device, weights=None, log=print):
    """Loaders (images opened), model (trunk started from `weights`), optimizer and scheduler,
    built before anything is written."""
    module = peers.method_module(method)
    prefix = module.PREFIX
    run_state.seed_everything(s['seed'])
    train_set = training_images(s, prefix, log)
    test_set = ImageDataset(s['test_dir'], s['img_size'], log=log)
    check_same_classes(train_set.classes, test_set.classes, s['train_dir'], s['test_dir'])
    classes = train_set.classes
    if len(classes) != s['num_classes']:
        raise config.UserError('%s has %d classes but num_classes is %d' % (s['train_dir'], len(classes), s['num_classes']))
    check_images(sorted({path for data in (train_set, test_set) for path, _ in data.samples}), s['image_check'],
                 'train and test images')
    train_loader = make_loader(module.train_dataset(train_set, s), s[prefix + '_batch_size'], True,
                               s['num_workers'], device, drop_last=s[prefix + '_drop_last'])
    test_loader = make_loader(test_set, s['test_batch_size'], False, s['num_workers'], device)
    model = peers.build_peer(method, s, len(classes))
    common.start_trunk(model, s, weights, log)
    model.to(device)
    params = list(module.trainable_parameters(model, s))
    optimizer, scheduler = common.make_optimizer(params, s, prefix)
    return types.SimpleNamespace(train_loader=train_loader, test_loader=test_loader, classes=classes, model=model,
                                 optimizer=optimizer, scheduler=scheduler,
                                 n_train=sum(p.numel() for p in params if p.requires_grad),
                                 modules={'model': model, 'optimizer': optimizer, 'scheduler': scheduler})


def train_peer(run, s, method, folder, device, log=print, state=None):
    """Train `method` as its <prefix>_* settings say, after the epochs the resume `state` holds;
    returns a summary dict."""
    prefix = peers.method_module(method).PREFIX
    run_log = getattr(log, 'row', lambda **_: None)
    model, optimizer = run.model, run.optimizer
    keep = CheckpointKeeper(folder, s['save_threshold'], s['keep_checkpoints'], log)
    epochs, done, elapsed, final = s[prefix + '_epochs'], 0, 0.0, None
    if state is not None:
        done = run_state.restore_state(state, run.modules, keep)
        elapsed, final = state['elapsed'], state.get('final')
        log('resumed from %s: %d of %d epochs done' % (run_state.state_path(folder), done, epochs))
    else:
        log('%s: %d train / %d test images, %d classes, %.2fM trainable parameters, %d epochs'
            % (peers.LABELS[method], len(run.train_loader.dataset), len(run.test_loader.dataset), len(run.classes),
               run.n_train / 1e6, epochs))
    start = time.time()
    for epoch in range(done, epochs):
        lr = optimizer.param_groups[0]['lr']
        metrics = train_one_epoch(model, method, run.train_loader, optimizer, device, s, desc='epoch %d train' % epoch)
        run.scheduler.step()
        log('epoch %d | train | %s' % (epoch, format_metrics(metrics)))
        run_log(epoch=epoch, split='train', lr=lr, **{k: metrics.get(k) for k in CSV_FIELDS[2:-1]})
        test = evaluate(model, run.test_loader, device)
        log('epoch %d | test | %s' % (epoch, format_metrics(test)))
        run_log(epoch=epoch, split='test', lr=lr, **test)
        path = keep(model, checkpoint_name(epoch, test['accuracy'], 'epoch'), test['accuracy'], s, run.classes,
                    epoch=epoch, method=method)
        final = [os.path.basename(path) if path else None, test['accuracy']]
        run_state.save_state(run_state.state_path(folder), epoch + 1, run.modules, keep, log,
                             elapsed + time.time() - start, final=final)
    summary = {'method': method, 'final_accuracy': final[1] if final else None,
               'final_checkpoint': final[0] if final else None,
               'best_checkpoint': os.path.basename(keep.best[0]) if keep.best else None,
               'best_accuracy': keep.best[1] if keep.best else None, 'run_dir': folder,
               'train_seconds': round(elapsed + time.time() - start, 1)}
    run_state.finish_run(folder, summary)
    log('done in %.0fs: final test accuracy %.4f, final checkpoint %s'
        % (summary['train_seconds'], summary['final_accuracy'] or float('nan'), summary['final_checkpoint']))
    return summary


def main(argv=None):
    distributed.refuse_torchrun(os.path.basename(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-method', required=True, choices=tuple(peers.METHODS), help='the peer to train')
    parser.add_argument('-weights', default=None,
                        help='starting weights of the trunk (torchvision format or a base model from finetune_backbone.py)')
    parser.add_argument('-overwrite', action='store_true', help='move an existing run folder aside and start anew')
    parser.add_argument('-resume', action='store_true',
                        help='continue the run in its folder after its last finished epoch (or start it)')
    config.add_settings_args(parser)
    config.add_device_args(parser)
    args = parser.parse_args(argv)
    s = config.resolve_settings(args.dataset, args.set)
    if args.weights and not os.path.isfile(args.weights):
        raise config.UserError('weights file not found: %s' % args.weights)
    device = config.pick_device(args.device, args.gpuid)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    folder = peer_run_dir(s, args.method)
    early = run_state.EarlyLog()
    # one process per run folder, from before anything is decided until the end
    with run_state.lock_run_folder(folder, 'peer_run', log=early) as lock:
        record = {'settings': s, 'method': args.method}
        action = run_state.start_action(folder, args.overwrite, args.resume, 'peer_run', record)
        if action == 'finished':
            return dict(run_state.finished_summary(folder), run_dir=folder)
        resume = action == 'resume'
        # a resumed run's weights come from last.pth: no -weights file is read, and the log says so
        run = prepare(dict(s, pretrained=False) if resume else s, args.method, device, None if resume else args.weights,
                      log=run_state.ResumeStartLog(early, run_state.state_path(folder)) if resume else early)
        log, state = run_state.open_run(folder, action, dict(record, weights=args.weights, device=str(device),
                                                             versions=config.versions()), CSV_FIELDS, early, lock=lock)
        log('run folder %s, device %s, dataset %s, method %s' % (folder, device, s['dataset'], args.method))
        return train_peer(run, s, args.method, folder, device, log=log, state=state)


if __name__ == '__main__':
    config.run_cli(main)
