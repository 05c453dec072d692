"""Pictures of a trained LVW / ProtoPNet run and its one-page report.

    python visualize.py saved_models/resnet18/toy_lvw [-checkpoint 6_2push0.9296.pth] [-by_class]

Writes, for the run's final checkpoint (or -checkpoint):
    img/epoch-E/gallery-<page>.png   every visual word of the push of epoch E: its nearest training
                                     patch (the 95th-percentile crop) beside its activation on the
                                     source image (box = the crop), the word index, the class of the
                                     source image and the classes that use the word (50 words a page;
                                     -by_class: gallery-class<k>.png, one page per class, and
                                     gallery-unused.png)
    report/weights.png               the class x word last-layer matrix and the classes per word
    report/curves.png                accuracy and every loss term per pass, from metrics.csv
    report.md                        the key numbers, linking all of the above (and metrics/,
                                     local_analysis/ when they exist)

A word is *used* by class c when W[c, p] > 0 and W[c, p] >= 0.5 max_c' W[c', p]
(word_metrics.classes_per_word). Nothing happens at import time; matplotlib is imported inside
the functions that need it, with its object-oriented API (no pyplot, no global backend change).
"""
import argparse
import os

from figures.gallery import draw_gallery, word_source_folder
from figures.run_report import build_run_report, checkpoint_info, list_checkpoints, load_word_checkpoint
from run import config


# ---- command line ------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('run_dir', help='run folder, saved_models/<arch>/<experiment_run>')
    parser.add_argument('-checkpoint', default=None, help='checkpoint file name in run_dir (default: the final one)')
    parser.add_argument('-by_class', action='store_true', help='gallery as one page per class instead of pages of 50')
    parser.add_argument('-redraw', action='store_true', help='redraw the gallery even if it exists')
    args = parser.parse_args(argv)
    if not os.path.isdir(args.run_dir):
        raise config.UserError('run folder not found: %s' % args.run_dir)
    if args.checkpoint and not os.path.isfile(os.path.join(args.run_dir, args.checkpoint)):
        raise config.UserError('checkpoint not found: %s' % os.path.join(args.run_dir, args.checkpoint))
    summary = config.read_json(os.path.join(args.run_dir, 'run_summary.json'), required=False) or {}
    name = args.checkpoint or summary.get('final_checkpoint') or (list_checkpoints(args.run_dir) or [None])[-1]
    ckpt = None
    if name and os.path.isfile(os.path.join(args.run_dir, name)):  # checked here, before any picture is drawn
        ckpt = load_word_checkpoint(os.path.join(args.run_dir, name))
    if args.redraw:
        if name is None:
            raise config.UserError('%s holds no checkpoint' % args.run_dir)
        ckpt = ckpt or load_word_checkpoint(os.path.join(args.run_dir, name))
        epoch, kind = checkpoint_info(ckpt, name)
        folder, note = word_source_folder(args.run_dir, epoch, kind)
        if folder is None:
            print(note)
        else:
            draw_gallery(folder, ckpt['state_dict']['last_layer.weight'], ckpt['class_names'], by_class=args.by_class,
                         title='Visual words of %s' % os.path.basename(os.path.normpath(args.run_dir)),
                         weights_note='weights of %s' % name)
    path = build_run_report(args.run_dir, args.checkpoint, args.by_class, print)
    return path


if __name__ == '__main__':
    config.run_cli(main)
