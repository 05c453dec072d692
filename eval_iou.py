"""IoU between the model's word attention map and the base model's Grad-CAM (spec section 8).

    python eval_iou.py -modeldir saved_models/resnet18/toy_lvw -model 8_3push0.9000.pth \
        -test_atts data/grad_test_toy.npy -thr 50

Per test image: the k = topk words with the largest similarity; their H x W maps resized to S x S
(eval_map_interpolation, bicubic = cv2.INTER_CUBIC by default), pixelwise max, min-max normalised;
both maps binarised at their own thr-th percentile (numpy's linear interpolation); then
IoU = (|B_G & B_A| + 1e-6) / (|B_G | B_A| + 1e-6). Prints `test iou: <mean over images>`.

-region low (default, the reference's convention that the published numbers used): mask = value <= q.
-region top: mask = value > q, the region the map points at. At -thr 50 both give the same IoU
unless a map has ties at its median (Grad-CAM maps often have many exact zeros).
The model is rebuilt from the checkpoint, not from the current settings.py.
Writes the per-image IoUs beside the checkpoint, as <checkpoint stem>_<maps stem>_iou_thr<thr>_<region>.csv.
"""
import argparse
import os

import torch
from tqdm import tqdm

from data.image_data import ImageDataset, check_same_classes, make_loader, normalize
from metrics.iou import map_iou
from model import model_from_checkpoint
from run import config, distributed
from run.checkpoint import load_checkpoint, require_kind
from train_and_test import word_attention_map


def evaluate_iou(model, loader, device, s, thr, region='low'):
    """Per-image IoUs (N,) and predictions (N,) over `loader` (image, Grad-CAM, label batches)."""
    model.eval()
    ious, predictions = [], []
    with torch.no_grad():
        for images, gradcam, _ in tqdm(loader, desc='iou', leave=False, disable=None):
            out = model(normalize(images.to(device)))
            word_map = word_attention_map(out.similarity_maps, out.min_distances, s['topk'], gradcam.shape[-1],
                                          s['eval_map_interpolation'], s['eval_map_normalisation'])
            ious.append(map_iou(word_map, gradcam.to(device), thr, region).cpu())
            predictions.append(out.logits.argmax(1).cpu())
    return torch.cat(ious), torch.cat(predictions)


def check_thr(thr):
    """Refuse percentiles outside (0, 100): at 100 every map binarises to all-ones (IoU 1 for any model)."""
    if 0 < thr < 100:
        return
    why = {0: ' (at 0 a mask keeps only each map\'s minimum, or all but it)',
           100: ' (at 100 every map binarises to all-ones and the IoU is 1 for any model)'}.get(thr, '')
    raise config.UserError('-thr must be a percentile strictly between 0 and 100, got %g%s' % (thr, why))


def csv_name(model, maps, thr, region):
    """<checkpoint stem>_<maps stem>_iou_thr<thr>_<region>.csv: one file per checkpoint and map file."""
    stem = lambda path: os.path.splitext(os.path.basename(path))[0]
    return '%s_%s_iou_thr%g_%s.csv' % (stem(model), stem(maps), thr, region)


def write_csv(path, rows, header):
    config.atomic_write(path, lambda f: f.write(','.join(header) + '\n' + ''.join(','.join(map(str, r)) + '\n' for r in rows)))


def main(argv=None):
    distributed.refuse_torchrun(os.path.basename(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-modeldir', required=True, help='run folder, saved_models/<arch>/<experiment_run>')
    parser.add_argument('-model', required=True, help='checkpoint file name inside -modeldir')
    parser.add_argument('-test_atts', required=True, help='Grad-CAM maps of the test images (.npy)')
    parser.add_argument('-thr', type=float, default=50,
                        help='percentile threshold, strictly between 0 and 100 (default 50)')
    parser.add_argument('-region', default='low', choices=('low', 'top'))
    parser.add_argument('-batch_size', type=config.positive_int, default=None, help='default: the run\'s test_batch_size')
    parser.add_argument('-set', nargs='+', default=[], metavar='NAME=VALUE',
                        help='override the checkpoint\'s settings, e.g. test_dir=... eval_map_interpolation=bilinear')
    config.add_device_args(parser)
    args = parser.parse_args(argv)
    check_thr(args.thr)
    path = os.path.join(args.modeldir, args.model)
    ckpt = require_kind(load_checkpoint(path), path, 'words', 'eval_iou.py')
    overrides = config.parse_overrides(args.set, ckpt['settings'])
    device = config.pick_device(args.device, args.gpuid)
    model, s = model_from_checkpoint(ckpt, device, overrides, path)
    dataset = ImageDataset(s['test_dir'], s['img_size'], attention=args.test_atts)
    check_same_classes(ckpt['class_names'], dataset.classes, args.model, s['test_dir'])
    out_dir = os.path.dirname(path) or '.'  # the CSV goes beside the checkpoint
    out = os.path.join(out_dir, csv_name(args.model, args.test_atts, args.thr, args.region))
    config.check_output_file(out, 'the output file')  # refused now, not after the work
    loader = make_loader(dataset, args.batch_size or s['test_batch_size'], False, s['num_workers'], device)
    ious, predictions = evaluate_iou(model, loader, device, s, args.thr, args.region)
    labels = [label for _, label in dataset.samples]
    accuracy = float((predictions == torch.tensor(labels)).float().mean())
    mean = float(ious.mean())
    print('test accuracy: %.4f' % accuracy)
    print('test iou: %.4f' % mean)
    write_csv(out, [(p, l, int(pr), '%.6f' % v) for p, l, pr, v in zip(dataset.paths, labels, predictions, ious.tolist())],
              ('path', 'label', 'predicted', 'iou'))
    print('per-image IoUs: %s' % out)
    return {'iou': mean, 'accuracy': accuracy, 'csv': out, 'ious': ious.numpy()}


if __name__ == '__main__':
    config.run_cli(main)
