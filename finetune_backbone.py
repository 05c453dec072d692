"""Fine-tune the base model: a torchvision ResNet (settings' base_architecture) with a new C-way head.

    python finetune_backbone.py [-dataset toy] [-weights resnet34-b627a593.pth] [-out PATH]

Starts from ImageNet weights when a local file is given with -weights, or is already in
./pretrained_models or torchvision's cache; otherwise trains from scratch and says so.
Recipe (the reference does not publish one): Resize(S, S), random horizontal flip, ImageNet
normalisation; Adam, lr finetune_lr for the backbone and 10x for the new head, cosine decay over
finetune_epochs, batch finetune_batch_size. The final model is kept (no selection on the test set).
Output: saved_models/base/<dataset>_<arch>.pth, a checkpoint with the state_dict, arch, classes,
img_size and test accuracy, which gradcam_extract.py reads. An existing output is kept unless
-overwrite (which moves it aside); <out stem>.last.pth, written after every epoch, lets the same
command with -resume continue an interrupted fine-tuning.
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

from data.image_data import ImageDataset, check_images, check_same_classes, make_loader, normalize
from model import BACKBONES, load_start_weights, set_padding_mode
from run import config, distributed, run_state
from run.checkpoint import load_checkpoint, load_weights, require_kind, save_checkpoint


def default_base_model_path(s):
    return os.path.join('saved_models', 'base', '%s_%s.pth' % (s['dataset'], s['base_architecture']))


def make_base_model(arch, num_classes, padding='zeros'):
    """The torchvision classifier (a ResNet or MobileNetV2) with a `num_classes` head, its
    convolutions padding with `padding` (set_padding_mode)."""
    if arch not in BACKBONES:
        raise config.UserError('unsupported base_architecture %r (choose from %s)' % (arch, ', '.join(BACKBONES)))
    return set_padding_mode(getattr(torchvision.models, arch)(weights=None, num_classes=num_classes), padding)


def classifier_head(model):
    """The new C-way layer of a base model (trained at 10x the lr): a ResNet's fc, a MobileNetV2's
    classifier (dropout, then the linear layer)."""
    return model.classifier if hasattr(model, 'classifier') else model.fc


def load_base_model(path, device='cpu', script='gradcam_extract.py'):
    """The fine-tuned classifier and its checkpoint dict (from finetune_backbone.py); any other
    file is one UserError line naming it, and `script`, the one that needs the base model."""
    ckpt = require_kind(load_checkpoint(path), path, 'base', script)
    padding = ckpt['settings'].get('backbone_padding', 'zeros')  # files made before the setting: zeros
    model = load_weights(make_base_model(ckpt['arch'], len(ckpt['class_names']), padding), ckpt, path)
    return model.to(device).eval(), ckpt


@torch.no_grad()
def evaluate(model, loader, device, desc='test'):
    """Test accuracy, mean cross entropy and time of a classifier returning logits (eval mode)."""
    model.eval()
    loss, correct, seen = 0.0, 0, 0
    start = time.time()
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=None):
        logits = model(normalize(images.to(device)))
        labels = labels.to(device)
        loss += F.cross_entropy(logits, labels, reduction='sum').item()
        correct += (logits.argmax(1) == labels).sum().item()
        seen += labels.numel()
    return {'accuracy': correct / max(seen, 1), 'cross_entropy': loss / max(seen, 1), 'time': time.time() - start}


def finetune(s, device, weights=None, log=print, state_file=None, state=None):
    """Train the base model; returns (model, test accuracy, classes, weights file used or None).
    With `state_file`, the resume state is written there after every epoch; a `state` read from it
    continues after its epochs (its model, optimizer, scheduler and generators replace the new ones)."""
    torch.manual_seed(s['seed'])
    train_set = ImageDataset(s['train_dir'], s['img_size'], flip='joint')
    test_set = ImageDataset(s['test_dir'], s['img_size'])
    check_same_classes(train_set.classes, test_set.classes, s['train_dir'], s['test_dir'])
    check_images(sorted({path for data in (train_set, test_set) for path, _ in data.samples}), s['image_check'],
                 'train and test images')
    model = make_base_model(s['base_architecture'], len(train_set.classes), s['backbone_padding'])
    source = None
    if state is None:
        source = load_start_weights(model, s['base_architecture'], s['pretrained'], weights, 'base model', log)
    model.to(device)
    head = list(classifier_head(model).parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    optimizer = torch.optim.Adam([{'params': body, 'lr': s['finetune_lr']},
                                  {'params': head, 'lr': 10 * s['finetune_lr']}])
    epochs = s['finetune_epochs']
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    train_loader = make_loader(train_set, s['finetune_batch_size'], True, s['num_workers'], device)
    test_loader = make_loader(test_set, s['test_batch_size'], False, s['num_workers'], device)
    modules = {'model': model, 'optimizer': optimizer, 'scheduler': scheduler}
    accuracy, done = 0.0, 0
    if state is not None:
        done = run_state.restore_state(state, modules)
        accuracy, source = state['accuracy'], state['weights_source']
        log('resumed from %s: %d of %d epochs done' % (state_file, done, epochs))
    for epoch in range(done, epochs):
        model.train()
        start, total_loss, correct, seen = time.time(), 0.0, 0, 0
        for images, labels in tqdm(train_loader, desc='finetune epoch %d' % epoch, leave=False, disable=None):
            images, labels = normalize(images.to(device)), labels.to(device)
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * labels.numel()
            correct += (logits.argmax(1) == labels).sum().item()
            seen += labels.numel()
        scheduler.step()
        accuracy = evaluate(model, test_loader, device)['accuracy']
        log('finetune epoch %d | time %.1fs | loss %.4f | train acc %.2f%% | test acc %.2f%%'
            % (epoch, time.time() - start, total_loss / max(seen, 1), 100 * correct / max(seen, 1), 100 * accuracy))
        if state_file:
            run_state.save_state(state_file, epoch + 1, modules, accuracy=accuracy, weights_source=source,
                                 settings=config.to_jsonable(s))
    if epochs == 0:
        accuracy = evaluate(model, test_loader, device)['accuracy']
    return model, accuracy, train_set.classes, source


def main(argv=None):
    distributed.refuse_torchrun(os.path.basename(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-weights', default=None, help='ImageNet state_dict (torchvision format) to start from')
    parser.add_argument('-out', default=None, help='output file (default saved_models/base/<dataset>_<arch>.pth)')
    parser.add_argument('-overwrite', action='store_true', help='move an existing output file aside and train anew')
    parser.add_argument('-resume', action='store_true',
                        help='continue from <out>.last.pth after its last finished epoch (or start)')
    config.add_settings_args(parser)
    config.add_device_args(parser)
    args = parser.parse_args(argv)
    s = config.resolve_settings(args.dataset, args.set)
    device = config.pick_device(args.device, args.gpuid)
    out = args.out or default_base_model_path(s)
    config.check_output_file(out)  # a folder, or a path under a file: refused before anything is moved or trained
    state_file = os.path.splitext(out)[0] + '.' + config.LAST_STATE
    config.check_output_file(state_file, 'the resume state')
    if args.overwrite and args.resume:
        raise config.UserError('-overwrite and -resume exclude each other')
    # one process per output, from before the output or its state is looked at until the end
    with run_state.RunLock(os.path.splitext(out)[0] + '.lock', out).acquire():
        return finetune_locked(args, s, device, out, state_file)


def finetune_locked(args, s, device, out, state_file):
    """main's steps once the output is locked: resume or start, train, save (an earlier output is
    moved aside first, and put back if the new one cannot be written)."""
    state = None
    if args.resume and os.path.isfile(state_file):
        state = run_state.load_state(state_file, remedy='run the command without -resume to start the fine-tuning '
                                                        'again')
        run_state.check_same_run(state['settings'], s, state_file)
    elif os.path.exists(out) and not args.overwrite:
        if args.resume:
            print('-resume: %s exists, the fine-tuning has finished; nothing to do' % out)
            return {'test_accuracy': load_checkpoint(out).get('test_accuracy'), 'path': out}
        raise config.UserError('%s exists; pass -overwrite to move it aside and train anew, or choose -out' % out)
    folder = os.path.dirname(os.path.abspath(out))
    config.check_writable(folder)
    config.remove_stale_tmp(folder)
    model, accuracy, classes, source = finetune(s, device, args.weights, state_file=state_file, state=state)
    # an output beside a resume state is that of a start with -overwrite: it is moved aside too
    moved = config.move_aside(out) if os.path.exists(out) and (args.overwrite or state is not None) else None
    try:
        save_checkpoint(model, out, s, classes, arch=s['base_architecture'], img_size=s['img_size'],
                        test_accuracy=accuracy, imagenet_weights=source)
    except BaseException:
        if moved and not os.path.exists(out):  # a full disk: the earlier base model back in its place
            os.replace(moved, out)
            print('kept the earlier %s: the new one could not be written (its state %s is kept for -resume)'
                  % (out, state_file))
        raise
    if os.path.isfile(state_file):
        os.remove(state_file)  # finished: the checkpoint is the result
    print('base model test accuracy: %.4f' % accuracy)
    print('saved %s' % out)
    return {'test_accuracy': accuracy, 'path': out}


if __name__ == '__main__':
    config.run_cli(main)
