"""Grad-CAM of the fine-tuned base model, the attention targets of LVW (spec section 6).

    python gradcam_extract.py [-model saved_models/base/toy_resnet18.pth] [-dataset toy]

For each image (Resize(S, S) + ImageNet normalisation, ImageFolder order), on the output A of
layer4[-1] (K channels, h x w):
    alpha_k = mean over (i, j) of d y_t / d A_k(i, j)     y_t: logit of the target class
    cam = ReLU(sum_k alpha_k A_k)
    cam = (cam - min) / (max(cam - min) + 1e-7), bilinear resize to (S, S) (= cv2.resize), and the
    same min-max once more (as pytorch-grad-cam does when it aggregates layers).
Target: the predicted class (default), or the true class with -target label.

Writes <out_dir>/grad_<split>_<dataset>.npy (float32, (N, S, S)) and the sidecar
grad_<split>_<dataset>.txt: a checksum line of the array ('# maps crc32 <hex> shape N,S,S dtype
float32', checked whenever the maps are opened), then each row's image path relative to the split folder.
"""
import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data.image_data import (ImageDataset, MapChecksum, check_same_classes, checksum_line, make_loader, normalize,
                        sidecar_path)
from finetune_backbone import default_base_model_path, load_base_model
from run import config, distributed


def layer4_and_logits(model, x):
    """A torchvision classifier's forward, returning its last feature map too: a ResNet's
    layer4[-1] output, a MobileNetV2's `features` output (the maps the word layer reads)."""
    if hasattr(model, 'features'):  # MobileNetV2: features -> global average -> classifier
        activation = model.features(x)
        return activation, model.classifier(torch.flatten(F.adaptive_avg_pool2d(activation, 1), 1))
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    activation = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return activation, model.fc(torch.flatten(model.avgpool(activation), 1))


def minmax_per_image(x):
    """(x - min) / (max(x - min) + 1e-7) per image; x: (B, H, W)."""
    flat = x.flatten(1)
    flat = flat - flat.amin(dim=1, keepdim=True)
    flat = flat / (flat.amax(dim=1, keepdim=True) + 1e-7)
    return flat.view_as(x)


def gradcam(model, images, targets=None, out_size=None):
    """Grad-CAM maps of a batch. images: normalised (B, 3, S, S); targets: (B,) class indices or
    None for the predicted classes. Returns (maps (B, out_size, out_size) in [0, 1], logits (B, C)).

    The model must be in eval mode, so that every image's gradient is its own."""
    out_size = out_size or images.shape[-1]
    with torch.enable_grad():
        activation, logits = layer4_and_logits(model, images)
        if targets is None:
            targets = logits.argmax(dim=1)
        score = logits.gather(1, targets.view(-1, 1)).sum()
        grads, = torch.autograd.grad(score, activation)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1)).detach()
    cam = minmax_per_image(cam)
    cam = F.interpolate(cam[:, None], size=(out_size, out_size), mode='bilinear', align_corners=False)[:, 0]
    return minmax_per_image(cam.clamp_min(0)), logits.detach()


def extract_split(model, folder, img_size, out_path, device, target='pred', batch_size=64, num_workers=0,
                  class_names=None):
    """Grad-CAM of every image of `folder`; writes the .npy and its sidecar atomically.
    Returns the fraction of images whose target was predicted correctly (the base accuracy)."""
    dataset = ImageDataset(folder, img_size)
    if class_names is not None:
        check_same_classes(class_names, dataset.classes, 'the base model', folder)
    loader = make_loader(dataset, batch_size, False, num_workers, device)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + '.tmp-%d.npy' % os.getpid()
    maps = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.float32, shape=(len(dataset), img_size, img_size))
    correct, row, checksum = 0, 0, MapChecksum()
    try:
        for images, labels in tqdm(loader, desc='grad-cam %s' % os.path.basename(out_path), leave=False, disable=None):
            images, labels = normalize(images.to(device)), labels.to(device)
            cams, logits = gradcam(model, images, labels if target == 'label' else None, img_size)
            correct += (logits.argmax(1) == labels).sum().item()
            batch = np.ascontiguousarray(cams.cpu().numpy(), dtype=np.float32)
            maps[row:row + len(images)] = batch
            checksum.update(batch)  # rows arrive in order, so this is the checksum of the whole array
            row += len(images)
        maps.flush()
        header = checksum_line(checksum, maps.shape, maps.dtype)
        del maps
        config.atomic_write(sidecar_path(out_path),
                            lambda f: f.write(header + '\n' + ''.join(p + '\n' for p in dataset.paths)))
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return correct / max(len(dataset), 1)


def main(argv=None):
    distributed.refuse_torchrun(os.path.basename(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-model', default=None, help='base model (default saved_models/base/<dataset>_<arch>.pth)')
    parser.add_argument('-splits', nargs='+', default=['train', 'test'], choices=('train', 'test'))
    parser.add_argument('-out_dir', default='./data', help='where grad_<split>_<dataset>.npy go (default ./data)')
    parser.add_argument('-target', default=None, choices=('pred', 'label'),
                        help='explain the predicted (default: settings.gradcam_target) or the true class')
    parser.add_argument('-batch_size', type=config.positive_int, default=None, help='default: test_batch_size')
    config.add_settings_args(parser)
    config.add_device_args(parser)
    args = parser.parse_args(argv)
    s = config.resolve_settings(args.dataset, args.set)
    device = config.pick_device(args.device, args.gpuid)
    model, ckpt = load_base_model(args.model or default_base_model_path(s), device, 'gradcam_extract.py')
    config.check_output_folder(args.out_dir, '-out_dir')  # before the work, not after it
    outs = {split: os.path.join(args.out_dir, 'grad_%s_%s.npy' % (split, s['dataset'])) for split in args.splits}
    for out in outs.values():  # neither the maps nor their sidecar may be a folder
        for path in (out, sidecar_path(out)):
            config.check_output_file(path, 'the output file')
    config.remove_stale_tmp(args.out_dir, log=print)  # what a killed extraction left
    target = args.target or s['gradcam_target']
    outputs = {}
    for split in args.splits:
        folder = s['train_dir'] if split == 'train' else s['test_dir']
        out = outs[split]
        accuracy = extract_split(model, folder, s['img_size'], out, device, target,
                                 args.batch_size or s['test_batch_size'], s['num_workers'], ckpt['class_names'])
        print('%s: Grad-CAM (%s class) of %s -> %s (base model accuracy %.4f)' % (split, target, folder, out, accuracy))
        outputs[split] = {'path': out, 'accuracy': accuracy}
    return outputs


if __name__ == '__main__':
    config.run_cli(main)
