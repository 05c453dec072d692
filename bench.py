"""Speed figures: this implementation against the reference code's habits, on synthetic batches.

    python bench.py [-arch resnet34] [-img_size 224] [-batch 16] [-words 185] [-classes 37] [-device auto]

Prints images per second for
  train step      ours | with torch.autograd.set_detect_anomaly(True), left on by the reference
  IoU evaluation  ours (no_grad, one backbone pass, batched maps on the device)
                  | reference habits (autograd on, backbone run twice, per-image cv2 resizes in numpy)
  push search     ours (vectorised over batch x positions x words)
                  | a per-word loop over numpy arrays, as the reference does it
Nothing is written; the numbers are for the machine it runs on.
"""
import argparse
import time

import cv2
import numpy as np
import torch

import config
from eval_iou import map_iou
from image_data import normalize
from model import LVWNet, ResNetFeatures, squared_distances
from push import nearest_patches
from train_and_test import batch_losses, word_attention_map


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-arch', default='resnet34')
    parser.add_argument('-img_size', type=int, default=224)
    parser.add_argument('-batch', type=int, default=16)
    parser.add_argument('-words', type=int, default=185)
    parser.add_argument('-classes', type=int, default=37)
    parser.add_argument('-repeats', type=int, default=3)
    config.add_device_args(parser)
    args = parser.parse_args(argv)
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

    rows = [('train step', train_step, train_step_anomaly),
            ('IoU evaluation', our_iou, ref_iou),
            ('push search', our_push, ref_push)]
    print('%s, %d px, batch %d, %d words, %s' % (args.arch, S, B, args.words, device))
    print('%-16s %14s %18s %8s' % ('', 'ours img/s', 'reference img/s', 'speed-up'))
    for name, ours, reference in rows:
        t_ours, t_ref = timed(ours, args.repeats, device), timed(reference, args.repeats, device)
        print('%-16s %14.1f %18.1f %7.1fx' % (name, B / t_ours, B / t_ref, t_ref / t_ours))


if __name__ == '__main__':
    config.run_cli(main)
