"""A static HTML site of a trained word model (LVW or ProtoPNet mode), to open in a browser.

    python explore.py -modeldir saved_models/resnet18/toy_lvw -model 6_2push0.9778.pth [-out DIR]

Writes <modeldir>/explorer/ (or -out): index.html (the run, the metrics table when eval_metrics.py
has written <modeldir>/metrics/, the training curves, links), a page per word (its source patch,
its map on its source image, the classes that use it and their weights, its top -topk training
images with its map on each, where masks exist the part or background its top cells hit), a page
per class (its words by weight) and a page per test image (the -per_image words that decided it,
with their maps). No server, no network: open index.html from disk. main.py writes the same site
for its final checkpoint at the end of every run that draws pictures (push_save_images).
"""
import argparse
import os

from figures.explorer import DEFAULT_PER_IMAGE, DEFAULT_TOPK, build_site
from run import config, distributed


def main(argv=None):
    distributed.refuse_torchrun(os.path.basename(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-modeldir', required=True, help='run folder, saved_models/<arch>/<experiment_run>')
    parser.add_argument('-model', required=True, help='checkpoint file name inside -modeldir')
    parser.add_argument('-out', default=None, help='site folder (default <modeldir>/explorer)')
    parser.add_argument('-topk', type=int, default=DEFAULT_TOPK, help='training images per word (default %d)' % DEFAULT_TOPK)
    parser.add_argument('-per_image', type=int, default=DEFAULT_PER_IMAGE,
                        help='words shown per test image (default %d)' % DEFAULT_PER_IMAGE)
    parser.add_argument('-max_test', type=int, default=None, help='pages for the first N test images only (default all)')
    config.add_device_args(parser)
    args = parser.parse_args(argv)
    for flag in ('topk', 'per_image', 'max_test'):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise config.UserError('-%s must be at least 1, got %d' % (flag, value))
    path = os.path.join(args.modeldir, args.model)
    if not os.path.isfile(path):
        raise config.UserError('checkpoint not found: %s' % path)
    if args.out:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise config.UserError('-out %s is a file, not a folder' % args.out)
        config.check_output_folder(os.path.dirname(os.path.abspath(args.out)), '-out', args.out)
    return build_site(args.modeldir, args.model, args.out, config.pick_device(args.device, args.gpuid),
                      topk=args.topk, per_image=args.per_image, max_test=args.max_test)


if __name__ == '__main__':
    config.run_cli(main)
