"""Interpretability metrics of word models and Grad-CAM on a test set with ground-truth masks.

    python eval_metrics.py -dataset toy \
        -lvw saved_models/resnet18/toy_lvw/6_2push0.9296.pth \
        -protopnet saved_models/resnet18/toy_protopnet/6_2push0.9963.pth \
        -base saved_models/base/toy_resnet18.pth -test_atts data/grad_test_toy.npy [-out DIR]

    python eval_metrics.py -dataset toy -test_atts data/grad_test_toy.npy \
        -source base=saved_models/base/toy_resnet18.pth -source lvw=... -source scouter+=... [...]

Map sources (each an (S, S) map per test image, S = the dataset's img_size); -source NAME=CHECKPOINT
(repeatable) reads the kind from the checkpoint: a peer (its `method`), a base model (`arch`) or a
word model; -lvw / -protopnet / -base name theirs lvw, protopnet, gradcam:
    lvw, protopnet  the word map of a checkpoint exactly as eval_iou.py builds it: the top-k words by
                    similarity, their maps resized (eval_map_interpolation), pixelwise max,
                    eval_map_normalisation; k = the checkpoint's topk
    gradcam         the base model's Grad-CAM: the -test_atts array when given (the maps LVW was
                    trained to match), else computed from -base (gradcam_extract.gradcam, target as
                    settings.gradcam_target)
    peers           peers.<method>.explain of a train_peer.py checkpoint (SCOUTER+/-, GC, LFI-CAM)

Metrics (interp_metrics.py, perturbation_metrics.py, word_metrics.py; each entry of metrics.json
states its averaging and parameters):
    test accuracy     of the source's model (the base model for Grad-CAM)
    IoU with Grad-CAM eval_iou.py's IoU at thr 50 against the Grad-CAM source, image mean
    area size, precision   SCOUTER's: mean map value; map mass inside the object mask's bounding box
    pointing game     argmax of the map within tau of the `object` mask (strict <), tau = 15 px at 224
                      scaled with S; an empty mask is a miss (TorchRay); class mean over the classes
                      present among the images evaluated (all of them unless -max_images leaves some
                      out; TorchRay's mean over all classes, absent = 0, is kept beside it); image mean
    stochastic PG     100 pixels drawn from the sum-normalised map, hit % per image (0 for an empty
                      mask), image mean; image i draws from a generator seeded with seed + i (its
                      test-set index)
    content heatmap   % of the map's mass inside the mask, image mean
    per part (toy)    pointing game and content heatmap against each part mask (pointing game: over
                      the images that have the part)
    insertion / deletion AUC   RISE style (blurred start 11/5 | zero in normalised space, step
                      pixels per step in decreasing map order), scored with the source's own model
                      softmax for the class it predicts on the clean image (word maps: their word
                      model; Grad-CAM: the base model); image mean over -auc_images evenly spaced
                      test images
    stability IoU     between each pair of sources: min-max scaled maps > 100/255, IoU, image mean
    word models       classes per word from the last layer (W > 0 and >= 0.5 max); part purity of
                      each word's -purity_n top-activating test locations (toy parts); distinct
                      true classes among those locations' images
    top cells (all)   the fair top-location rules (metrics.json 'cells'): words: each word's -purity_n
                      most similar test images and the cell where its similarity is attained; maps
                      without words: per image the cell of the largest footprint mean (the grid of
                      the settings' backbone); the share whose cell footprint holds object pixels and
                      whose centre pixel is within tau of the object; word models: distinct words
A map holding NaN or inf stops the run with an error naming the source and the test image.
Writes <out>/metrics.json and <out>/metrics.md (default out: <run of the first word or peer model>/metrics/,
or analysis/<dataset>_metrics/).
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch

import peers
from data.image_data import ImageDataset, check_same_classes, open_attention_maps
from figures import word_parts
from metrics import interp_metrics as im
from metrics.scoring import evaluate, evenly_spaced, load_masks, to_markdown
from model import model_from_checkpoint
from run import config, distributed
from run.checkpoint import checkpoint_kind, load_checkpoint, require_kind
from train_and_test import word_attention_map

WORD_SOURCES = ('lvw', 'protopnet')


# ---- sources ---------------------------------------------------------------------------------------

class WordSource:
    """A word model (LVW or ProtoPNet mode) and its eval_iou map."""
    role = 'words'  # what metrics.scoring.evaluate reads a source as: 'words' | 'gradcam' | 'map'

    def __init__(self, name, path, device, classes, img_size):
        self.name, self.path = name, path
        ckpt = require_kind(load_checkpoint(path), path, 'words', 'eval_metrics.py -%s' % name)
        check_same_classes(ckpt['class_names'], classes, path, 'the test set')
        self.model, self.s = model_from_checkpoint(ckpt, device, path=path)
        if self.s['img_size'] != img_size:
            raise config.UserError('%s was trained at %d px but the test set is read at %d px (-set img_size=%d)'
                                   % (path, self.s['img_size'], img_size, self.s['img_size']))
        self.weight = self.model.last_layer.weight.detach().cpu()
        self.description = ('word map of %s: top-%d words by similarity, %s resize, pixelwise max, %s normalisation '
                            '(as eval_iou.py)' % (path, self.s['topk'], self.s['eval_map_interpolation'],
                                                   self.s['eval_map_normalisation']))

    @torch.no_grad()
    def batch(self, images_n, labels):
        out = self.model(images_n)
        maps = word_attention_map(out.similarity_maps, out.min_distances, self.s['topk'], images_n.shape[-1],
                                  self.s['eval_map_interpolation'], self.s['eval_map_normalisation'])
        return maps, out.logits.argmax(1), out.similarity_maps

    def predict_proba(self, x):
        return torch.softmax(self.model(x.contiguous(memory_format=torch.channels_last)).logits, dim=1)


class GradCamSource:
    """Grad-CAM of the base model: from an .npy array (rows in test-set order) or computed."""
    role = 'gradcam'

    def __init__(self, base_path, atts_path, device, dataset, img_size, target):
        self.name, self.model, self.atts, self.target = 'gradcam', None, None, target
        self.path = base_path
        if base_path:
            from finetune_backbone import load_base_model
            self.model, ckpt = load_base_model(base_path, device, 'eval_metrics.py -base')
            check_same_classes(ckpt['class_names'], dataset.classes, base_path, 'the test set')
            if ckpt.get('img_size') not in (None, img_size):
                raise config.UserError('%s was trained at %s px but the test set is read at %d px'
                                       % (base_path, ckpt.get('img_size'), img_size))
        if atts_path:
            self.atts = open_attention_maps(atts_path, dataset.paths, img_size, log=lambda *_: None)
            self.description = 'Grad-CAM maps of %s (rows paired with the test images by its sidecar)' % atts_path
        else:
            self.description = 'Grad-CAM of %s (layer4, %s class), computed here' % (base_path, target)

    def batch(self, images_n, labels, indices):
        preds = None
        if self.model is not None:
            with torch.no_grad():
                preds = self.model(images_n).argmax(1)
        if self.atts is not None:
            maps = torch.from_numpy(np.stack([np.asarray(self.atts[i], dtype=np.float32) for i in indices]))
            return maps.to(images_n.device), preds
        from gradcam_extract import gradcam
        maps, logits = gradcam(self.model, images_n, labels if self.target == 'label' else None, images_n.shape[-1])
        return maps, logits.argmax(1)

    def predict_proba(self, x):
        return torch.softmax(self.model(x.contiguous(memory_format=torch.channels_last)), dim=1)


class PeerSource:
    """A peer model from train_peer.py and its explanation map (peers.<method>.explain)."""
    role = 'map'

    def __init__(self, name, path, ckpt, device, classes, img_size):
        self.name, self.path = name, path
        check_same_classes(ckpt['class_names'], classes, path, 'the test set')
        self.model, self.s, self.method = peers.peer_from_checkpoint(ckpt, device, path, 'eval_metrics.py -source')
        if self.s['img_size'] != img_size:
            raise config.UserError('%s was trained at %d px but the test set is read at %d px (-set img_size=%d)'
                                   % (path, self.s['img_size'], img_size, self.s['img_size']))
        self.module = peers.method_module(self.method)
        self.description = '%s map of %s: %s' % (peers.LABELS[self.method], path, peers.MAP_DESCRIPTIONS[self.method])

    def batch(self, images_n, labels, indices):
        maps = self.module.explain(self.model, images_n)
        with torch.no_grad():
            preds = self.model(images_n).argmax(1)
        return maps, preds

    def predict_proba(self, x):
        return torch.softmax(self.model(x.contiguous(memory_format=torch.channels_last)), dim=1)


def open_source(name, path, device, dataset, img_size, test_atts=None, target='pred'):
    """The map source a checkpoint holds, by what the checkpoint says it is: a peer (its `method`),
    a base model (`arch`, from finetune_backbone.py: its Grad-CAM, from test_atts when given) or
    a word model (LVW or ProtoPNet mode)."""
    ckpt = load_checkpoint(path)
    if checkpoint_kind(ckpt) == 'peer':
        return PeerSource(name, path, ckpt, device, dataset.classes, img_size)
    if checkpoint_kind(ckpt) == 'base':
        source = GradCamSource(path, test_atts, device, dataset, img_size, target)
        source.name = name
        return source
    return WordSource(name, path, device, dataset.classes, img_size)


# ---- command line ----------------------------------------------------------------------------------

def _auc_count(text):
    """-auc_images: a whole number >= 0 (0 skips insertion/deletion), or 'all' (None)."""
    if text == 'all':
        return None
    try:
        return config.nonnegative_int(text)
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError('%s (0 skips insertion/deletion; or "all")' % err) from None


def parse_sources(items):
    """-source NAME=CHECKPOINT items -> {name: path} in the order given, each file checked."""
    named = {}
    for item in items:
        name, sep, path = item.partition('=')
        name = name.strip()
        if not sep or not name or not path:
            raise config.UserError('-source expects NAME=CHECKPOINT, got %r' % item)
        if name in named:
            raise config.UserError('-source: the name %r is given twice' % name)
        if not os.path.isfile(path):
            raise config.UserError('-source %s: file not found: %s' % (name, path))
        named[name] = path
    return named


def main(argv=None):
    distributed.refuse_torchrun(os.path.basename(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-lvw', default=None, help='LVW checkpoint (.pth in its run folder)')
    parser.add_argument('-protopnet', default=None, help='ProtoPNet-mode checkpoint')
    parser.add_argument('-base', default=None, help='base model (finetune_backbone.py) for Grad-CAM and its AUCs')
    parser.add_argument('-source', action='append', default=[], metavar='NAME=CHECKPOINT',
                        help='a map source named NAME (repeatable): an LVW / ProtoPNet-mode checkpoint, a peer '
                             'from train_peer.py or a base model; the kind is read from the checkpoint')
    parser.add_argument('-test_atts', default=None, help='Grad-CAM maps of the test images (.npy); default: computed from -base')
    parser.add_argument('-out', default=None, help='output folder (default <first word model run>/metrics)')
    parser.add_argument('-max_images', type=config.positive_int, default=None, help='evaluate this many evenly spaced test images (default all)')
    parser.add_argument('-auc_images', type=_auc_count, default=90,
                        help='images for insertion/deletion, evenly spaced (default 90; "all"; 0 skips)')
    parser.add_argument('-step', type=config.positive_int, default=None,
                        help='pixels changed per insertion/deletion step (default ceil(S*S/28): 28 steps; '
                             'SCOUTER used S, one row per step)')
    parser.add_argument('-auc_batch', type=config.positive_int, default=128, help='perturbed images per forward pass (default 128)')
    parser.add_argument('-spg_samples', type=config.positive_int, default=100)
    parser.add_argument('-seed', type=int, default=0)
    parser.add_argument('-tau', type=config.nonnegative_number, default=None, help='pointing-game tolerance in px (default 15 * S / 224)')
    parser.add_argument('-purity_n', type=config.positive_int, default=10, help='top locations per word for part purity (default 10)')
    parser.add_argument('-no_parts', action='store_true', help='skip the per-part metrics and part purity')
    parser.add_argument('-batch_size', type=config.positive_int, default=50)
    config.add_settings_args(parser)
    config.add_device_args(parser)
    args = parser.parse_args(argv)
    start = time.time()
    named = parse_sources(args.source)
    if not (args.lvw or args.protopnet or args.base or args.test_atts or named):
        raise config.UserError('give at least one map source: -source NAME=CHECKPOINT, -lvw, -protopnet, -base '
                               'or -test_atts')
    for flag in ('lvw', 'protopnet', 'base', 'test_atts'):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise config.UserError('-%s: file not found: %s' % (flag, path))
    s = config.resolve_settings(args.dataset, args.set)
    device = config.pick_device(args.device, args.gpuid)
    S = s['img_size']
    dataset = ImageDataset(s['test_dir'], S)
    indices = evenly_spaced(len(dataset), args.max_images or len(dataset))
    gt = load_masks([dataset.samples[i][0] for i in indices], S, s['test_dir'])
    sources = []
    for name in WORD_SOURCES:
        if getattr(args, name):
            sources.append(WordSource(name, getattr(args, name), device, dataset.classes, S))
    named_sources = [open_source(name, path, device, dataset, S, args.test_atts, s['gradcam_target'])
                     for name, path in named.items()]
    # -test_atts alone is a Grad-CAM source of its own unless a -source base model already uses it
    if args.base or (args.test_atts and not any(isinstance(src, GradCamSource) for src in named_sources)):
        sources.append(GradCamSource(args.base, args.test_atts, device, dataset, S, s['gradcam_target']))
    for src in named_sources:
        if src.name in [other.name for other in sources]:
            raise config.UserError('-source %s: the name %r is already taken' % (src.name, src.name))
        sources.append(src)
    first_word = next((src for src in sources if isinstance(src, (WordSource, PeerSource))), None)
    out = args.out or (os.path.join(os.path.dirname(first_word.path), 'metrics') if first_word
                       else os.path.join('analysis', '%s_metrics' % s['dataset']))
    config.check_output_folder(out)  # before the work, not after it
    for name in ('metrics.json', 'metrics.md'):
        config.check_output_file(os.path.join(out, name), 'the output file')
    tau = args.tau if args.tau is not None else im.pointing_tolerance(S)
    n_auc = len(indices) if args.auc_images is None else min(args.auc_images, len(indices))
    auc_indices = [indices[k] for k in evenly_spaced(len(indices), n_auc)] if n_auc else []
    step = args.step or math.ceil(S * S / 28)
    res = evaluate(sources, dataset, gt, indices, s, tau, args.spg_samples, args.seed, auc_indices, step,
                   args.auc_batch, args.purity_n, args.batch_size, not args.no_parts, device)
    res['command'] = 'python eval_metrics.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
    res['seconds']['wall'] = round(time.time() - start, 1)
    config.save_json(res, os.path.join(out, 'metrics.json'))
    md = to_markdown(res)
    config.atomic_write(os.path.join(out, 'metrics.md'), lambda f: f.write(md))
    print(md.split('\n\n')[1])
    print('wrote %s and %s (%.0fs)' % (os.path.join(out, 'metrics.json'), os.path.join(out, 'metrics.md'),
                                       res['seconds']['wall']))
    for src in sources:
        parts = res['sources'][src.name].get('cells', {}).get('top_cells_on_parts')
        if isinstance(src, WordSource) and parts:
            to_uint8 = lambda i: np.uint8(np.round(255 * dataset[indices[i]][0].permute(1, 2, 0).numpy()))
            picture = word_parts.draw_class_words(
                os.path.join(out, 'parts_%s.png' % src.name), to_uint8, torch.tensor(parts['top_cells']),
                torch.tensor(parts['cell_categories']), src.weight, dataset.classes, res['part_names'],
                tuple(res['sources'][src.name]['cells']['top_cells_on_object']['params']['grid']))
            print('wrote %s' % picture)
    run_dir = os.path.dirname(os.path.abspath(out))
    if args.out is None and first_word and os.path.isfile(os.path.join(run_dir, 'report.md')):
        from figures import run_report
        run_report.write_run_report(run_dir, log=lambda *_: None)
        print('updated %s' % os.path.join(run_dir, 'report.md'))
    return res


if __name__ == '__main__':
    config.run_cli(main)
