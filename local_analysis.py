"""Why did an image get its label? The words behind one prediction, as ProtoPNet's local analysis.

    python local_analysis.py saved_models/resnet18/toy_lvw/6_2push0.9296.pth data/toy/test/c0_*/c0_*_0000.png \
        [-out DIR] [-topk 10] [-device cpu]

For each image (resized to the run's img_size, as in training):
    the prediction and the top classes (softmax of the logits);
    the model's word map (the top-k word maps, max, as eval_iou.py builds it);
    the top-k words by similarity s_p = g(min distance), each with its map on the image
    (bicubic upsampling, box = pixels >= the 95th percentile, as the push crops), its source patch
    and source image from the run's push pictures, and its contribution W[pred, p] * s_p to the
    logit of the predicted class (logit = sum over all P words of these contributions, no bias).

Source patches come from <run>/img/epoch-<E>/ for '<E>push' and '<E>_<i>push' checkpoints. A
'<E>nopush' checkpoint's words have moved since the last push (or were never pushed): this is
said in the picture and the JSON, and no patch is shown.

Writes <out>/<image stem>.png and .json (default out: <run>/local_analysis/).
"""
import argparse
import os

import numpy as np
import torch

from data.image_data import image_folder, load_image, load_npy, normalize
from figures import drawing, gallery, run_report
from model import model_from_checkpoint
from push import high_activation_boxes, jet_overlay
from run import config
from run.checkpoint import load_checkpoint, require_kind
from train_and_test import word_attention_map


def source_of_words(run_dir, ckpt, ckpt_path, s):
    """Where each word comes from: {'folder', 'note', 'bb' (P, 6) or None, 'paths' (train image paths
    by index, or None)}."""
    epoch, kind = run_report.checkpoint_info(ckpt, ckpt_path)
    folder, note = gallery.word_source_folder(run_dir, epoch, kind)
    bb, paths = None, None
    if folder is not None:
        bb = load_npy(os.path.join(folder, 'bb%d.npy' % epoch), 'push boxes', ndim=2, columns=6)
        if len(bb) != s['prototype_shape'][0]:
            raise config.UserError('push boxes %s has %d rows for %d words (from another run?)'
                                   % (os.path.join(folder, 'bb%d.npy' % epoch), len(bb), s['prototype_shape'][0]))
        try:
            listing = image_folder(s['train_push_dir'])
            paths = [p for p, _ in listing.samples]
        except config.UserError:
            paths = None  # the training images are not here; the PNGs of the push folder suffice
    return {'folder': folder, 'note': note, 'bb': bb, 'paths': paths, 'epoch': epoch, 'kind': kind}


@torch.no_grad()
def analyse_image(model, s, image, topk):
    """The numbers of one image. image: (3, S, S) in [0, 1]. Returns a dict of tensors/arrays:
    logits, probs, pred, similarities, min_distances, words (top-k by similarity, ties: lower
    index), contributions (W[pred, words] * s[words]), maps_up (k, S, S), boxes (k, 4), word_map (S, S)."""
    S = image.shape[-1]
    out = model(normalize(image[None].to(next(model.parameters()).device)))
    logits = out.logits[0].cpu()
    probs = torch.softmax(logits, dim=0)
    pred = int(torch.argmax(logits))
    sims = out.similarities[0].cpu()
    words = torch.argsort(sims, descending=True, stable=True)[:topk]
    weight = model.last_layer.weight.detach().cpu()
    boxes, up = high_activation_boxes(out.similarity_maps[0, words].cpu(), S)
    word_map = word_attention_map(out.similarity_maps, out.min_distances, s['topk'], S,
                                  s['eval_map_interpolation'], s['eval_map_normalisation'])[0].cpu()
    return {'logits': logits, 'probs': probs, 'pred': pred, 'similarities': sims,
            'min_distances': out.min_distances[0].cpu(), 'words': words,
            'contributions': weight[pred, words] * sims[words], 'weight': weight,
            'maps_up': up, 'boxes': boxes, 'word_map': word_map}


def true_class(path, class_names):
    """The label when the image sits in a class folder named like a training class, else None."""
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return class_names.index(parent) if parent in class_names else None


def result_json(path, ckpt_path, r, class_names, source, topk, s):
    pred = r['pred']
    logit = float(r['logits'][pred])
    users = gallery.word_users(r['weight'])
    all_contributions = r['weight'][pred] * r['similarities']
    evidence = float(all_contributions.abs().sum())
    label = true_class(path, class_names)
    order = torch.argsort(r['probs'], descending=True)[:min(5, len(class_names))]
    words = []
    for rank, p in enumerate(r['words'].tolist()):
        entry = {'rank': rank + 1, 'word': p, 'similarity': float(r['similarities'][p]),
                 'min_distance': float(r['min_distances'][p]), 'weight': float(r['weight'][pred, p]),
                 'contribution': float(r['contributions'][rank]),
                 'share_of_evidence': float(r['contributions'][rank]) / evidence if evidence > 0 else None,
                 'activation_box': [int(v) for v in r['boxes'][rank].tolist()],
                 'classes_using_word': [class_names[c] for c in users[p]], 'source': None}
        if source['bb'] is not None and int(source['bb'][p, 0]) >= 0:
            row = source['bb'][p]
            folder = source['folder']
            entry['source'] = {
                'train_image_index': int(row[0]), 'box': [int(v) for v in row[1:5]],
                'class': class_names[int(row[5])],
                'train_image': source['paths'][int(row[0])] if source['paths'] and int(row[0]) < len(source['paths']) else None,
                'patch_png': os.path.join(folder, 'prototype-img%d.png' % p),
                'source_overlay_png': os.path.join(folder, 'prototype-img-original_with_self_act%d.png' % p)}
        words.append(entry)
    return {
        'image': path, 'checkpoint': ckpt_path, 'epoch': source['epoch'], 'kind': source['kind'],
        'words_are_patches': source['folder'] is not None, 'patch_note': source['note'],
        'push_folder': source['folder'], 'img_size': s['img_size'],
        'prediction': {'index': pred, 'name': class_names[pred], 'probability': float(r['probs'][pred]),
                       'logit': logit},
        'true_class': None if label is None else {'index': label, 'name': class_names[label]},
        'correct': None if label is None else label == pred,
        'top_classes': [{'index': int(c), 'name': class_names[int(c)], 'probability': float(r['probs'][c]),
                         'logit': float(r['logits'][c])} for c in order],
        'logit_predicted': logit,
        'contribution_definition': 'contribution_p = W[pred, p] * similarity_p; the logit of the predicted class is '
                                   'the sum over all %d words (no bias); share_of_evidence = contribution_p / '
                                   'sum over all words of |contribution|' % r['weight'].shape[1],
        'evidence_abs_sum': evidence,
        'topk': topk, 'topk_contribution_sum': float(r['contributions'].sum()),
        'words': words,
        'word_map': {'topk': s['topk'], 'interpolation': s['eval_map_interpolation'],
                     'normalisation': s['eval_map_normalisation']},
    }


def _wrap(text, font, width):
    lines, current = [], ''
    for word in text.split(' '):
        candidate = word if not current else current + ' ' + word
        if current and font.getlength(candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current:
        lines.append(current)
    return lines


def _to_image(array01):
    from PIL import Image
    return Image.fromarray(np.uint8(np.round(255 * np.clip(array01, 0, 1))))


def draw_analysis(image, r, info, class_names, out_path, tile=112):
    """The picture: a header (image, word map, prediction) and one row per top-k word
    (map on the image | source patch | source image | numbers). Returns its size (w, h)."""
    from PIL import Image, ImageDraw
    font, bold, big = drawing.get_font(12), drawing.get_font(13), drawing.get_font(17)
    short = gallery.short_class_names(class_names, 28)
    S = image.shape[-1]
    img = image.permute(1, 2, 0).numpy()
    pad, head_tile = 8, 2 * tile // 1
    text_w = 430
    width = 60 + 3 * (tile + pad) + text_w + 2 * pad
    row_h = tile + pad
    k = len(info['words'])
    header_h = head_tile + 2 * pad + 22
    canvas = Image.new('RGB', (width, header_h + 22 + k * row_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    # header
    canvas.paste(_to_image(img).resize((head_tile, head_tile), Image.BICUBIC), (pad, pad))
    canvas.paste(_to_image(jet_overlay(img, r['word_map'].numpy())).resize((head_tile, head_tile), Image.BICUBIC),
                 (2 * pad + head_tile, pad))
    draw.text((pad, pad + head_tile + 2), 'image', fill=(60, 60, 60), font=font)
    draw.text((2 * pad + head_tile, pad + head_tile + 2), 'word map (top-%d words, max)' % info['word_map']['topk'],
              fill=(60, 60, 60), font=font)
    x = 3 * pad + 2 * head_tile
    avail = width - x - pad
    pred = info['prediction']
    y = pad
    draw.text((x, y), drawing.fit_text(os.path.basename(info['image']), bold, avail), fill=(0, 0, 0), font=bold)
    y += 20
    for line in _wrap('prediction: %s' % class_names[pred['index']], big, avail)[:2]:
        draw.text((x, y), drawing.fit_text(line, big, avail), fill=(0, 0, 0), font=big)
        y += 22
    y += 2
    verdict = ''
    if info['true_class'] is not None:
        verdict = '; %s true class: %s' % ('correct,' if info['correct'] else 'WRONG,', info['true_class']['name'])
    colour = (0, 0, 0) if info['true_class'] is None else (0, 120, 0) if info['correct'] else (180, 0, 0)
    draw.text((x, y), drawing.fit_text('probability %.3f%s' % (pred['probability'], verdict), font, avail), fill=colour, font=font)
    y += 17
    others = ', '.join('%s %.3f' % (short[c['index']], c['probability']) for c in info['top_classes'][1:4])
    for line in _wrap('next: ' + others, font, avail)[:2]:
        draw.text((x, y), line, fill=(60, 60, 60), font=font)
        y += 17
    text = ('logit of the prediction %.3f = sum over all %d words of W[pred, p] * s_p; the %d words below give %.3f.'
            % (info['logit_predicted'], r['weight'].shape[1], k, info['topk_contribution_sum']))
    for line in _wrap(text, font, avail):
        draw.text((x, y), line, fill=(60, 60, 60), font=font)
        y += 17
    note = ('Source patches: ' + info['patch_note']) if info['words_are_patches'] else ('NO SOURCE PATCHES: ' + info['patch_note'])
    for line in _wrap(note, font, avail)[:4]:
        draw.text((x, y), line, fill=(0, 0, 120) if info['words_are_patches'] else (180, 0, 0), font=font)
        y += 17
    # column titles
    y0 = header_h
    titles = [(60 + pad, 'word on this image'), (60 + 2 * pad + tile, 'source patch'),
              (60 + 3 * pad + 2 * tile, 'source image'), (60 + 4 * pad + 3 * tile, 'similarity, weight, contribution')]
    for tx, t in titles:
        draw.text((tx, y0), t, fill=(0, 0, 0), font=bold)
    draw.line([(pad, y0 + 19), (width - pad, y0 + 19)], fill=(180, 180, 180))
    y0 += 22
    max_abs = max([abs(w['contribution']) for w in info['words']] + [1e-9])
    for i, w in enumerate(info['words']):
        top = y0 + i * row_h
        p = w['word']
        draw.text((pad, top + 4), '#%d' % w['rank'], fill=(0, 0, 0), font=big)
        draw.text((pad, top + 28), 'word %d' % p, fill=(40, 40, 40), font=font)
        heat = _to_image(jet_overlay(img, r['maps_up'][i].numpy())).resize((tile, tile), Image.BICUBIC)
        cx = 60 + pad
        canvas.paste(heat, (cx, top))
        drawing.draw_box(draw, w['activation_box'], tile / S, (cx, top))
        src = w['source']
        if src is not None:
            crop, _ = drawing.load_thumbnail(src['patch_png'], tile)
            over, scale = drawing.load_thumbnail(src['source_overlay_png'], tile)
        else:
            crop = over = None
        reason = 'not a patch:\nnopush\ncheckpoint' if info['kind'] == 'nopush' else 'no push\npicture'
        canvas.paste(crop or drawing.placeholder_tile(tile, reason, font), (cx + tile + pad, top))
        canvas.paste(over or drawing.placeholder_tile(tile, reason, font), (cx + 2 * (tile + pad), top))
        if over is not None:
            drawing.draw_box(draw, src['box'], scale, (cx + 2 * (tile + pad), top))
        tx = cx + 3 * (tile + pad)
        lines = ['similarity %.3f  (distance %.4f)' % (w['similarity'], w['min_distance']),
                 'weight W[pred, word] %+.3f' % w['weight'],
                 'contribution W*s %+.3f  (%s of all |W*s|)' % (
                     w['contribution'], 'n/a' if w['share_of_evidence'] is None else '%+.0f%%' % (100 * w['share_of_evidence'])),
                 None,
                 ('source: %s' % src['class']) if src else 'source: -',
                 drawing.wrap_names('used by %d: ' % len(w['classes_using_word']),
                                    gallery.short_class_names(w['classes_using_word'],
                                                              40 if len(w['classes_using_word']) == 1 else 16),
                                    font, text_w, 1)[0]
                 if w['classes_using_word'] else 'used by no class']
        ty = top + 2
        for line in lines:
            if line is None:  # the contribution bar
                bar = int((text_w - 20) * abs(w['contribution']) / max_abs)
                colour = (40, 150, 60) if w['contribution'] >= 0 else (200, 50, 50)
                draw.rectangle([tx, ty + 2, tx + max(bar, 1), ty + 10], fill=colour)
                ty += 14
                continue
            draw.text((tx, ty), drawing.fit_text(line, font, text_w), fill=(0, 0, 0), font=font)
            ty += 16
        draw.line([(pad, top + row_h - pad // 2), (width - pad, top + row_h - pad // 2)], fill=(230, 230, 230))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    canvas.save(out_path, optimize=True)
    return canvas.size


def _unique_stem(path, used):
    stem = os.path.splitext(os.path.basename(path))[0]
    name, n = stem, 1
    while name in used:
        n += 1
        name = '%s_%d' % (stem, n)
    used.add(name)
    return name


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('model', help='checkpoint inside a run folder, e.g. saved_models/resnet18/toy_lvw/6_2push0.9296.pth')
    parser.add_argument('images', nargs='+', help='image files')
    parser.add_argument('-out', default=None, help='output folder (default <run>/local_analysis/)')
    parser.add_argument('-topk', type=config.positive_int, default=10, help='words shown per image, by similarity (default 10)')
    config.add_device_args(parser)
    args = parser.parse_args(argv)
    ckpt = require_kind(load_checkpoint(args.model), args.model, 'words', 'local_analysis.py')
    device = config.pick_device(args.device, args.gpuid)
    model, s = model_from_checkpoint(ckpt, device, path=args.model)
    P = s['prototype_shape'][0]
    if not 1 <= args.topk <= P:
        raise config.UserError('-topk must be between 1 and the number of words (%d), got %d' % (P, args.topk))
    for path in args.images:
        if not os.path.isfile(path):
            raise config.UserError('image not found: %s' % path)
    run_dir = os.path.dirname(args.model) or '.'
    out_dir = args.out or os.path.join(run_dir, 'local_analysis')
    class_names = list(ckpt['class_names'])
    source = source_of_words(run_dir, ckpt, args.model, s)
    config.check_output_folder(out_dir)  # refused before the work, not after it
    used, results = set(), []
    stems = [_unique_stem(path, used) for path in args.images]
    for stem in stems:
        for ext in ('.png', '.json'):
            config.check_output_file(os.path.join(out_dir, stem + ext), 'the output file')
    for path, stem in zip(args.images, stems):
        image = load_image(path, s['img_size'])  # a file that does not decode: one line naming it
        r = analyse_image(model, s, image, args.topk)
        info = result_json(path, args.model, r, class_names, source, args.topk, s)
        png, js = os.path.join(out_dir, stem + '.png'), os.path.join(out_dir, stem + '.json')
        info['png'] = png
        draw_analysis(image, r, info, class_names, png)
        config.save_json(info, js)
        print('%s: %s (p = %.3f)%s -> %s' % (path, info['prediction']['name'], info['prediction']['probability'],
                                            '' if info['words_are_patches'] else ' [words are not patches]', png))
        results.append(info)
    if not source['folder']:
        print('note: %s' % source['note'])
    return results


if __name__ == '__main__':
    config.run_cli(main)
