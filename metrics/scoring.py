"""The scoring core of eval_metrics.py: every metric of every map source on a test set with
ground-truth masks, and the markdown table of the results.

A source (eval_metrics.WordSource, GradCamSource, PeerSource) is read through its `role` and its
methods only: batch(images_n, labels[, indices]) -> (maps, predictions[, similarity maps]) and
predict_proba(x). The metrics themselves are in interp_metrics.py, perturbation_metrics.py and
word_metrics.py; eval_metrics.py's docstring lists them.
"""
import itertools
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from data.image_data import normalize, npy_problem, open_npz
from metrics import interp_metrics as im, perturbation_metrics as pert, word_metrics as wm
from metrics.iou import map_iou
from run import config


MASK_SUFFIX = '.masks.npz'
IOU_THR = 50  # eval_iou.py's percentile threshold for the IoU with the base model's Grad-CAM
HEADLINE = (('iou_gradcam', 'IoU with the base Grad-CAM, thr %d' % IOU_THR, 'higher'),
            ('pointing_game', 'pointing game (object), class mean', 'higher'),
            ('stochastic_pointing_game', 'stochastic pointing game (object), %', 'higher'),
            ('content_heatmap', 'content heatmap (object), %', 'higher'),
            ('insertion_auc', 'insertion AUC', 'higher'),
            ('deletion_auc', 'deletion AUC', 'lower'),
            ('area_size', 'area size (SCOUTER), mean map value', 'lower'),
            ('precision', 'precision (SCOUTER), mass in the object box', 'higher'))


def mask_path(image_path):
    return os.path.splitext(image_path)[0] + MASK_SUFFIX


def _resize_bool(mask, size):
    """Nearest-neighbour resize of a bool (H, W) mask to (size, size), as the image is resized."""
    if mask.shape == (size, size):
        return mask.astype(bool)
    from PIL import Image
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
    return np.asarray(img) > 127


def load_masks(image_paths, size, folder=''):
    """Ground truth of the images: {'object': (N, S, S) bool, 'parts': (N, K, S, S) bool or None,
    'part_names': K names or None}. Every image needs its <stem>.masks.npz with an `object` mask."""
    missing = [p for p in image_paths if not os.path.isfile(mask_path(p))]
    if len(missing) == len(image_paths):
        raise config.UserError('the test set %s has no ground-truth masks (<stem>%s beside each image); '
                               'data/make_toy.py and data/prepare_datasets.py (pets, dogs) write them'
                               % (folder, MASK_SUFFIX))
    if missing:
        raise config.UserError('%d of %d test images have no mask file (first: %s)'
                               % (len(missing), len(image_paths), mask_path(missing[0])))
    objects, parts, names = [], [], None
    for n, path in enumerate(image_paths):
        try:
            with open_npz(mask_path(path), 'mask file') as z:
                if 'object' not in z:
                    raise config.UserError('%s has no `object` mask' % mask_path(path))
                objects.append(_resize_bool(np.asarray(z['object']), size))
                here = [str(v) for v in z['part_names']] if 'parts' in z and 'part_names' in z else None
                if n == 0:
                    names = here
                if parts is not None and here is not None and here == names:
                    parts.append(np.stack([_resize_bool(np.asarray(m), size) for m in z['parts']]))
                else:
                    parts = None  # parts only when every image has the same ones
        except config.UserError:
            raise
        except Exception as err:  # noqa: BLE001 - a corrupt member: zlib, zip, pickle or shape errors
            reason = npy_problem(mask_path(path), err, '.npz')
            raise config.UserError('cannot read mask file %s: %s' % (mask_path(path), reason)) from None
    out = {'object': torch.from_numpy(np.stack(objects)), 'parts': None, 'part_names': None}
    if parts and len(parts) == len(image_paths):
        out['parts'] = torch.from_numpy(np.stack(parts))
        out['part_names'] = names
    return out


def evenly_spaced(n_total, n):
    """n indices spread evenly over range(n_total) (all of them when n >= n_total)."""
    if n >= n_total:
        return list(range(n_total))
    return sorted({int(round(v)) for v in np.linspace(0, n_total - 1, n)})


def spg_per_image(maps, masks, tau, num_samples, seed, indices):
    """Stochastic pointing game with one generator per image, seeded with seed + test-set index,
    so a score does not depend on batching or on the subset evaluated."""
    out = torch.empty(maps.shape[0], dtype=torch.float64)
    for j, i in enumerate(indices):
        out[j] = float(im.stochastic_pointing_game(maps[j:j + 1], masks[j:j + 1], tau, num_samples,
                                                   seed=seed + int(i))[0])
    return out


def refuse_nonfinite_maps(name, maps, idx, dataset, test_dir):
    """Refuse a source's maps holding NaN or inf, once, before any metric sees them: such a map
    has no argmax, pixel order or distribution (interp_metrics.check_finite_maps), and the user
    needs the source and the image, not a ValueError from whichever metric meets it first."""
    j = im.first_nonfinite_map(maps)
    if j is not None:
        path = os.path.relpath(dataset.samples[idx[j]][0], test_dir).replace(os.sep, '/')
        raise config.UserError('source %s: the map of test image %s holds NaN or inf values' % (name, path))


def part_pointing_hits(maps, part_mask, tau):
    """Pointing game against one part mask, NaN (left out) for the images without that part.
    Unlike the object game (an empty object mask is a miss), a part missing from an image is not
    a target there, as TorchRay only plays a class in the images that contain it."""
    hits = im.pointing_game_hits(maps, part_mask, tau).double()
    has_part = part_mask.flatten(1).any(dim=1)
    return torch.where(has_part, hits, torch.full_like(hits, float('nan'))).cpu()


def word_maxima(sim_maps, size, interpolation, max_elements=1 << 24):
    """Per image and word: the maximum of the word map resized to (size, size) and where it is
    (word_metrics.word_argmax_locations), in image chunks that keep memory bounded."""
    B, P = sim_maps.shape[:2]
    chunk = max(1, max_elements // max(1, P * size * size))
    vals, ys, xs = [], [], []
    align = True if interpolation == 'bilinear' else False
    for start in range(0, B, chunk):
        up = F.interpolate(sim_maps[start:start + chunk], size=(size, size), mode=interpolation, align_corners=align)
        v, y, x = wm.word_argmax_locations(up)
        vals.append(v.cpu())
        ys.append(y.cpu())
        xs.append(x.cpu())
    return torch.cat(vals), torch.cat(ys), torch.cat(xs)


def word_grid(s):
    """(Hg, Wg) of the word layer of settings `s` (its backbone at img_size), the grid a map of a
    model without words (Grad-CAM, a peer) is pooled to for the cell rules."""
    from model import make_backbone
    from receptive_field import layer_specs, word_layer_rf_info
    n = int(word_layer_rf_info(s['img_size'], layer_specs(make_backbone(s['base_architecture'])))[0])
    return (n, n)


def cell_entries(cells, object_mask, grid, tau, params):
    """The fair top-location metrics of cells (..., 3) = (image, h, w): the share whose footprint
    holds object pixels, and whose centre is within tau of the object (word_metrics)."""
    on = wm.cells_on_mask(cells, object_mask, grid).double()
    near = wm.cells_near_mask(cells, object_mask, grid, tau).double()
    return {'top_cells_on_object': _entry(float(on.mean()), 'share of the locations whose cell footprint holds '
                                          'object pixels', params, int(on.numel())),
            'top_cells_near_object': _entry(float(near.mean()), 'share of the locations whose cell centre is within '
                                            'tau of the object (pointing game rule)', params, int(near.numel()))}


def part_entries(cells, part_masks, part_names, grid, weight):
    """The part-level word metrics (FunnyBirds-style) at the latent cell: which part (or the
    background) each word's top cells point at (word_metrics.cell_parts), and per class whether
    the words it uses (word_use) cover each of its parts. cells (P, n, 3); part_masks (N, K, S, S)."""
    K = len(part_names)
    categories = list(part_names) + ['background']
    cell_categories = wm.cell_parts(cells, part_masks, grid)                     # (P, n)
    counts = wm.word_part_counts(cell_categories, K)                              # (P, K+1)
    dominant = counts.argmax(dim=1)  # first maximum: parts before the background on ties
    covered = wm.class_part_coverage(wm.word_use(weight), dominant, K)           # (C, K)
    on_parts = counts[:, :K].sum(dim=1).double() / counts.sum(dim=1).clamp(min=1).double()
    return {
        'top_cells_on_parts': _entry(float(on_parts.mean()), 'mean over words of the share of its top cells whose '
                                     'footprint holds part pixels', {'categories': categories}, len(on_parts),
                                     counts=counts.tolist(), dominant=[categories[int(d)] for d in dominant],
                                     top_cells=cells.tolist(), cell_categories=cell_categories.tolist(),
                                     words_per_dominant_part={c: int((dominant == j).sum()) for j, c in
                                                              enumerate(categories)}),
        'class_part_coverage': _entry(float(covered.double().mean()), 'mean over classes of the share of the %d parts '
                                      'that a word the class uses points at (its dominant part)' % K,
                                      {'use': 'W[c,p] > 0 and >= 0.5 max_c W[c,p]'}, int(covered.shape[0]),
                                      per_class=[[part_names[k] for k in range(K) if covered[c, k]]
                                                 for c in range(covered.shape[0])])}


def image_classes_per_word(locations, labels):
    """Distinct true classes among the images of each word's top locations: (P,) long."""
    img = locations[:, :, 0]
    return torch.tensor([len(set(labels[img[p]].tolist())) for p in range(img.shape[0])], dtype=torch.long)


def _entry(value, averaging, params, n, **extra):
    out = {'value': value, 'averaging': averaging, 'params': params, 'n': n}
    out.update(extra)
    return out


def pointing_game_entry(summary, C, params):
    """metrics.json's pointing game: the class mean over the classes present (mean_{c present}
    hits_c / n_c), so that classes a -max_images subset drew no image of do not count as 0; TorchRay's
    mean over all C classes (absent = 0) beside it, equal when every class is present."""
    n_present = summary['n_classes_present']
    return _entry(summary['class_mean_present'], 'class mean over the %d of %d classes present' % (n_present, C),
                  params, summary['n_valid'], image_mean=summary['image_mean'], classes_present=n_present,
                  class_mean_all_classes_torchray=summary['class_mean_all'],
                  per_class=[v if p else None for v, p in zip(summary['per_class'].tolist(),
                                                               summary['present'].tolist())])


def log_absent_classes(labels, C, log):
    """Say when the images evaluated miss whole classes: the pointing game's class mean is then
    over fewer classes than the test set has."""
    n_present = int((torch.bincount(labels, minlength=C) > 0).sum())
    if n_present < C:
        log('pointing game: the %d images evaluated cover %d of the %d classes; its class mean is over those %d '
            '(TorchRay\'s mean over all %d, absent classes as 0, is reported beside it)'
            % (len(labels), n_present, C, n_present, C))


def evaluate(sources, dataset, gt, indices, s, tau, spg_samples=100, seed=0, auc_indices=(), step=None,
             auc_batch=128, purity_n=10, batch_size=50, parts=True, device='cpu', log=print):
    """All metrics for the images `indices` of `dataset` (gt: load_masks of those images, in that
    order). sources: eval_metrics's WordSource / GradCamSource / PeerSource (each `role` says which). Returns the metrics.json dict."""
    timing = {}
    t0 = time.time()
    N = len(indices)
    S = s['img_size']
    C = len(dataset.classes)
    labels = torch.tensor([dataset.samples[i][1] for i in indices])
    auc_pos = {i: k for k, i in enumerate(sorted(set(auc_indices) & set(indices)))}  # test index -> row
    names = [src.name for src in sources]
    per = {n: {'pg': [], 'spg': [], 'ch': [], 'pred': [], 'pg_part': [], 'ch_part': [], 'iou': [], 'area': [],
               'precision': []} for n in names}
    reference = next((src.name for src in sources if src.role == 'gradcam'), None)
    maxima = {src.name: [] for src in sources if src.role == 'words'}
    cell_maxima = {name: [] for name in maxima}  # (values, h, w) of the raw H x W word maps
    map_cells = {src.name: [] for src in sources if src.role != 'words'}
    grid = word_grid(s) if map_cells else None  # word sources take theirs from their maps
    word_grids = {}
    stability = {pair: [] for pair in itertools.combinations(names, 2)}
    keep_images = torch.zeros(len(auc_pos), 3, S, S)
    keep_maps = {n: torch.zeros(len(auc_pos), S, S) for n in names}
    part_masks = gt['parts'] if (parts and gt['parts'] is not None) else None
    for start in range(0, N, batch_size):
        idx = indices[start:start + batch_size]
        x = torch.stack([dataset[i][0] for i in idx]).to(device)
        y = labels[start:start + batch_size].to(device)
        xn = normalize(x)
        obj = gt['object'][start:start + len(idx)].to(device)
        maps = {}
        for src in sources:
            if src.role == 'words':
                m, pred, sim = src.batch(xn, y)
                maxima[src.name].append(word_maxima(sim, S, src.s['eval_map_interpolation']))
                cell_maxima[src.name].append(tuple(t.cpu() for t in wm.word_argmax_locations(sim)))
                word_grids[src.name] = tuple(sim.shape[2:])
            else:
                m, pred = src.batch(xn, y, idx)
            m = m.detach().float()
            refuse_nonfinite_maps(src.name, m, idx, dataset, s['test_dir'])
            maps[src.name] = m
            if src.role != 'words':
                map_cells[src.name].append(wm.map_top_cells(m, grid) + torch.tensor([start, 0, 0]))
            r = per[src.name]
            r['pg'].append(im.pointing_game_hits(m, obj, tau).double().cpu())
            r['spg'].append(spg_per_image(m, obj, tau, spg_samples, seed, idx))
            r['ch'].append(im.content_heatmap(m, obj).double().cpu())
            r['pred'].append(pred.cpu() if pred is not None else None)
            if part_masks is not None:
                pm = part_masks[start:start + len(idx)].to(device)
                r['pg_part'].append(torch.stack([part_pointing_hits(m, pm[:, k], tau) for k in range(pm.shape[1])],
                                                dim=1))
                r['ch_part'].append(torch.stack([im.content_heatmap(m, pm[:, k]).double().cpu()
                                                 for k in range(pm.shape[1])], dim=1))
        for name in names:
            r = per[name]
            r['area'].append(im.area_size(maps[name]).cpu())
            r['precision'].append(im.box_precision(maps[name], obj).cpu())
            if reference is not None:
                r['iou'].append(map_iou(maps[name], maps[reference], IOU_THR).cpu())
        for a, b in stability:
            stability[(a, b)].append(im.stability_iou(maps[a], maps[b]).cpu())
        for j, i in enumerate(idx):
            if i in auc_pos:
                keep_images[auc_pos[i]] = xn[j].cpu()
                for n in names:
                    keep_maps[n][auc_pos[i]] = maps[n][j].cpu()
        log('maps and pointing metrics: %d/%d images' % (min(start + batch_size, N), N))
    timing['maps_and_pointing'] = round(time.time() - t0, 1)

    pg_params = {'tau_px': round(tau, 4), 'tau_rule': '15 px at 224 scaled with S', 'S': S, 'mask': 'object',
                 'empty_mask': 'miss (TorchRay)'}
    log_absent_classes(labels, C, log)
    results = {}
    for src in sources:
        r = per[src.name]
        hits = torch.cat(r['pg'])
        summary = im.pointing_game_summary(hits, labels, C)
        spg, n_spg = im.image_mean(torch.cat(r['spg']))
        ch, n_ch = im.image_mean(torch.cat(r['ch']))
        metrics = {
            'pointing_game': pointing_game_entry(summary, C, pg_params),
            'stochastic_pointing_game': _entry(spg, 'image mean of the per-image hit %', dict(
                pg_params, samples=spg_samples, seed='seed + test-set index', base_seed=seed), n_spg),
            'content_heatmap': _entry(ch, 'image mean of the % of map mass inside the mask', {'mask': 'object'}, n_ch),
        }
        area, n_area = im.image_mean(torch.cat(r['area']))
        metrics['area_size'] = _entry(area, 'image mean of the mean map value', {
            'map': 'the source\'s map in [0, 1] at S px (SCOUTER: classes min-max normalised jointly)'}, n_area)
        precision, n_precision = im.image_mean(torch.cat(r['precision']))
        metrics['precision'] = _entry(precision, 'image mean of the share of map mass inside the bounding box '
                                      'of the object mask', {'mask': 'object', 'box': 'bounding box'}, n_precision)
        if r['iou']:
            iou, n_iou = im.image_mean(torch.cat(r['iou']))
            metrics['iou_gradcam'] = _entry(iou, 'image mean (as eval_iou.py)', {
                'reference': reference, 'thr': IOU_THR, 'region': 'low (value <= the map\'s thr-th percentile)'}, n_iou)
        if part_masks is not None:
            pg_part, ch_part = torch.cat(r['pg_part']), torch.cat(r['ch_part'])
            for k, part in enumerate(gt['part_names']):
                v, n = im.image_mean(pg_part[:, k])
                metrics['pointing_game_%s' % part] = _entry(v, 'image mean (images with the part)',
                                                            dict(pg_params, mask='part %s' % part,
                                                                 empty_mask='image left out'), n)
                v, n = im.image_mean(ch_part[:, k])
                metrics['content_heatmap_%s' % part] = _entry(v, 'image mean', {'mask': 'part %s' % part}, n)
        entry = {'map': src.description, 'checkpoint': src.path, 'metrics': metrics}
        preds = r['pred']
        if preds and preds[0] is not None:
            entry['accuracy'] = float((torch.cat(preds) == labels).double().mean())
        results[src.name] = entry

    t1 = time.time()
    auc_params = {'step_px': step if step is not None else S, 'batch': auc_batch,
                  'insertion_start': 'gaussian blur 11x11, sigma 5, of the normalised image',
                  'deletion_fill': '0 in normalised space (the mean colour)',
                  'target': 'class the scoring model predicts on the clean image'}
    if auc_pos:
        images = keep_images.to(device)
        for src in sources:
            if src.model is None:
                results[src.name]['auc_note'] = 'no model to score with (give -base for Grad-CAM)'
                continue
            src.model.eval().to(memory_format=torch.channels_last)  # about 1.3x faster on CPU, same numbers
            scorer = '%s softmax' % ('the base model' if src.role == 'gradcam' else 'its own model')
            m = keep_maps[src.name].to(device)
            ins, ins_curves, _ = pert.insertion_auc(src.predict_proba, images, m, step, auc_batch, return_curves=True)
            dele, del_curves, _ = pert.deletion_auc(src.predict_proba, images, m, step, auc_batch, return_curves=True)
            v_ins, n_ins = im.image_mean(ins.cpu())
            v_del, n_del = im.image_mean(dele.cpu())
            params = dict(auc_params, scored_by=scorer, images='%d evenly spaced test images' % len(auc_pos))
            metrics = results[src.name]['metrics']
            metrics['insertion_auc'] = _entry(v_ins, 'image mean of per-image AUC (normalised trapezoid)', params,
                                              n_ins, mean_curve=ins_curves.mean(0).cpu().tolist())
            metrics['deletion_auc'] = _entry(v_del, 'image mean of per-image AUC (normalised trapezoid)', params,
                                             n_del, mean_curve=del_curves.mean(0).cpu().tolist())
            log('insertion/deletion %s: %.4f / %.4f (%.0fs so far)' % (src.name, v_ins, v_del, time.time() - t1))
    timing['insertion_deletion'] = round(time.time() - t1, 1)

    obj = gt['object']
    cell_params = {'S': S, 'tau_px': round(tau, 4)}
    for name, cells in map_cells.items():
        cells = torch.cat(cells)
        results[name]['cells'] = cell_entries(cells, obj, grid, tau, dict(
            cell_params, grid=list(grid), locations='one per test image: the cell of the map\'s largest footprint mean'))
    for src in sources:
        if src.role != 'words':
            continue
        v, hs, ws = (torch.cat(t) for t in zip(*cell_maxima[src.name]))
        cells = wm.top_locations_from_maxima(v, hs, ws, purity_n)
        results[src.name]['cells'] = cell_entries(cells, obj, word_grids[src.name], tau, dict(
            cell_params, grid=list(word_grids[src.name]),
            locations='%d top test images per word by its similarity, the cell where it is attained' % cells.shape[1]))
        if part_masks is not None:
            results[src.name]['cells'].update(part_entries(cells, part_masks, gt['part_names'],
                                                           word_grids[src.name], src.weight))
        results[src.name]['cells']['distinct_words'] = _entry(
            wm.distinct_words(src.model.prototype_vectors), 'distinct word vectors (equal rows counted once)',
            {'words': int(src.weight.shape[1])}, int(src.weight.shape[1]))
        counts, mean = wm.classes_per_word(src.weight)
        words = {'classes_per_word': _entry(mean, 'mean over %d words' % len(counts),
                                            {'rule': 'W[c,p] > 0 and >= 0.5 max_c W[c,p]'}, len(counts),
                                            counts=counts.tolist(),
                                            histogram=np.bincount(counts.numpy(), minlength=1).tolist())}
        v, ys, xs = (torch.cat(t) for t in zip(*maxima[src.name]))
        locations = wm.top_locations_from_maxima(v, ys, xs, purity_n)
        img_classes = image_classes_per_word(locations, labels)
        on_object = gt['object'][locations[..., 0], locations[..., 1], locations[..., 2]].double().mean(dim=1)
        words['top_locations_on_object'] = _entry(
            float(on_object.mean()), 'mean over words of the share of its top locations inside the object mask',
            {'locations': '%d top-activating test images per word, one location each' % locations.shape[1]},
            len(on_object), per_word=on_object.tolist())
        words['image_classes_per_word'] = _entry(
            float(img_classes.double().mean()), 'mean over words',
            {'locations': 'each word\'s %d top-activating test images (argmax of its upsampled map)' % locations.shape[1]},
            len(img_classes), counts=img_classes.tolist())
        if part_masks is not None:
            purity = wm.part_purity(locations, part_masks, gt['part_names'])
            dominant = {c: sum(1 for d in purity['dominant'] if d == c) for c in purity['categories']}
            words['part_purity'] = _entry(purity['mean_purity'], 'mean over words of max_part count / n', {
                'locations': '%d top-activating test images per word, one location each' % locations.shape[1],
                'categories': purity['categories']}, len(purity['dominant']),
                per_word=purity['purity'].tolist(), dominant=purity['dominant'], words_per_dominant_part=dominant,
                counts=purity['counts'].tolist())
        results[src.name]['words'] = words

    pairs = {}
    for (a, b), vals in stability.items():
        v, n = im.image_mean(torch.cat(vals))
        pairs['%s vs %s' % (a, b)] = _entry(v, 'image mean', {'threshold': '100/255 of the min-max scaled map',
                                                               'iou': '(|A & B| + 1e-6) / (|A | B| + 1e-6)'}, n)
    timing['total'] = round(time.time() - t0, 1)
    area = gt['object'].flatten(1).double().mean(1) * 100
    return {'dataset': s['dataset'], 'test_dir': s['test_dir'], 'img_size': S, 'n_images': N, 'num_classes': C,
            'object_area_percent': _entry(float(area.mean()), 'image mean', {'mask': 'object'}, N,
                                          note='the content heatmap of a uniform map'),
            'image_selection': 'all' if N == len(dataset) else '%d evenly spaced of %d' % (N, len(dataset)),
            'auc_images': len(auc_pos), 'sources': results, 'stability_iou': pairs,
            'part_names': gt['part_names'] if part_masks is not None else None, 'seconds': timing}


def _fmt(v, digits=4):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return 'n/a'
    return ('%.' + str(digits) + 'f') % v


def stability_matrix(names, pairs):
    """The pairwise stability IoUs as a symmetric markdown table (1 on the diagonal)."""
    value = lambda a, b: 1.0 if a == b else (pairs.get('%s vs %s' % (a, b)) or pairs.get('%s vs %s' % (b, a)))['value']
    rows = ['| | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
    rows += ['| %s | %s |' % (a, ' | '.join(_fmt(value(a, b), 3) for b in names)) for a in names]
    return '\n'.join(rows)


def to_markdown(res):
    """metrics.md: the comparison table first, then stability, words, and the details with the
    averaging and parameters of every number."""
    names = list(res['sources'])
    title = '# Interpretability metrics: %s test set (%d images at %d px)' % (res['dataset'], res['n_images'], res['img_size'])
    rows = ['| metric | ' + ' | '.join(names) + ' | better |', '|---' * (len(names) + 2) + '|']

    def row(label, getter, better=''):
        vals = [getter(res['sources'][n]) for n in names]
        if all(v is None for v in vals):
            return
        rows.append('| %s | %s | %s |' % (label, ' | '.join(_fmt(v) for v in vals), better))

    metric = lambda key: (lambda src: src['metrics'].get(key, {}).get('value'))
    row('test accuracy of the model', lambda src: src.get('accuracy'), 'higher')
    for key, label, better in HEADLINE:
        row(label, metric(key), better)
    row('pointing game (object), image mean', lambda src: src['metrics']['pointing_game'].get('image_mean'), 'higher')
    pg = lambda src: src['metrics']['pointing_game']
    if any(pg(src).get('classes_present', res['num_classes']) < res['num_classes'] for src in res['sources'].values()):
        row('pointing game (object), TorchRay mean over all %d classes (absent = 0)' % res['num_classes'],
            lambda src: pg(src).get('class_mean_all_classes_torchray'))
    for part in res.get('part_names') or []:
        row('pointing game, part %s' % part, metric('pointing_game_%s' % part))
        row('content heatmap, part %s, %%' % part, metric('content_heatmap_%s' % part))
    words = lambda key: (lambda src: src.get('words', {}).get(key, {}).get('value'))
    row('classes per word (last layer)', words('classes_per_word'))
    row('true classes among a word\'s top images', words('image_classes_per_word'))
    row('share of words\' top locations on the object', words('top_locations_on_object'), 'higher')
    row('part purity of words (toy; background is a category)', words('part_purity'))
    cells = lambda key: (lambda src: src.get('cells', {}).get(key, {}).get('value'))
    row('top cells on the object (words: their top locations; maps: the argmax cell)', cells('top_cells_on_object'),
        'higher')
    row('top cells within the pointing tolerance of the object', cells('top_cells_near_object'), 'higher')
    row('distinct word vectors', cells('distinct_words'))
    row('words: share of top cells on a part (cell rule)', cells('top_cells_on_parts'), 'higher')
    row('classes: share of their parts covered by their words', cells('class_part_coverage'), 'higher')
    md = [title, '', '\n'.join(rows), '']
    if 'object_area_percent' in res:
        md += ['Reference: the object covers %.2f%% of an image on average (image mean), the content heatmap of a '
               'uniform map. Pointing-game tolerance %.2f px.' % (
                   res['object_area_percent']['value'],
                   next(iter(res['sources'].values()))['metrics']['pointing_game']['params']['tau_px']), '']
    if res['stability_iou']:
        md += ['## Stability IoU between sources', '', stability_matrix(names, res['stability_iou']), '',
               im.results_to_markdown(res['stability_iou'])]
    for name, src in res['sources'].items():
        md += ['## %s' % name, '', src['map'] + ('' if 'accuracy' not in src else '; test accuracy %.4f' % src['accuracy']), '']
        detail = {k: {kk: vv for kk, vv in v.items() if kk in ('value', 'averaging', 'params', 'n')}
                  for k, v in src['metrics'].items()}
        md.append(im.results_to_markdown(detail))
        if src.get('auc_note'):
            md += ['Insertion/deletion: %s.' % src['auc_note'], '']
        if 'words' in src:
            w = src['words']
            hist = w['classes_per_word']['histogram']
            md.append('Classes per word (last layer): %s.' % ', '.join('%d words serve %d' % (n, k) for k, n in enumerate(hist) if n))
            if 'part_purity' in w:
                dom = w['part_purity']['words_per_dominant_part']
                md.append('Dominant part of the words\' top locations: %s; mean purity %s.'
                          % (', '.join('%s %d' % (k, v) for k, v in dom.items()), _fmt(w['part_purity']['value'], 3)))
            c = src.get('cells', {})
            if 'top_cells_on_parts' in c:
                dom = c['top_cells_on_parts']['words_per_dominant_part']
                md.append('Dominant part of the words\' top cells (cell rule): %s. Parts covered per class: %s.'
                          % (', '.join('%s %d' % kv for kv in dom.items()),
                             '; '.join('%d: %s' % (k, ', '.join(v) or 'none')
                                       for k, v in enumerate(c['class_part_coverage']['per_class']))))
            md.append('')
            md.append(im.results_to_markdown({k: {kk: vv for kk, vv in v.items() if kk in ('value', 'averaging', 'params', 'n')}
                                              for k, v in w.items()}))
    md += ['Timing (s): %s.' % ', '.join('%s %s' % kv for kv in res['seconds'].items()), '']
    return '\n'.join(md)
