"""Losses (spec section 3), the word attention map, and one training or test pass.

LVW (class_specific False) and ProtoPNet (class_specific True) share this code:

    L = crs_ent * CE + clst * Cluster + [sep * Separation] + l1 * L1 + attention_weight * Attn

with, for min distances d_min (B, P), labels y, class identity I (P, C) and last layer W (C, P):
    LVW       Cluster = mean_i min_p d_min[i, p]                     L1 = sum |W|
    ProtoPNet Cluster = mean_i (D - max_{p of class y_i} (D - d_min[i, p]))
              Separation = mean_i (D - max_{p not of class y_i} (D - d_min[i, p]))
              L1 = sum |W * (1 - I^T)|                               (D = max_dist)
    Attn = mean over pixels of (A_i - G_i)^2, A_i the normalised top-k word map, G_i the Grad-CAM map.
Setting diversity_coef > 0 adds diversity_coef * Diversity (word_diversity), and word_anchor_coef > 0
adds word_anchor_coef * Anchor (word_anchor) in the passes that train the words; both off by default.
"""
import contextlib
import copy
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data.image_data import normalize
from receptive_field import push_cells
from run import distributed

METRIC_NAMES = ('cross_entropy', 'cluster', 'separation', 'attention', 'accuracy', 'l1', 'p_dist_pair')


# ---- losses -------------------------------------------------------------------------------------

def cluster_cost(min_distances, labels, class_identity, class_specific, max_dist):
    """Class-agnostic: mean_i min_p d_min[i, p] (only the closest word of each image is pulled).
    Class-specific (ProtoPNet): mean_i (max_dist - max over own-class words of (max_dist - d_min)).
    min_distances: (B, P); labels: (B,); class_identity: (P, C)."""
    if not class_specific:
        return min_distances.min(dim=1).values.mean()
    own = class_identity[:, labels].t()  # (B, P), 1 where word p belongs to class y_i
    return (max_dist - ((max_dist - min_distances) * own).max(dim=1).values).mean()


def separation_cost(min_distances, labels, class_identity, max_dist):
    """ProtoPNet: mean_i (max_dist - max over other-class words of (max_dist - d_min)), i.e. the
    distance to the closest word of another class. (B, P), (B,), (P, C) -> scalar."""
    other = 1 - class_identity[:, labels].t()
    return (max_dist - ((max_dist - min_distances) * other).max(dim=1).values).mean()


def l1_penalty(weight, class_identity, class_specific):
    """sum |W| over all entries (LVW), or over the connections to other classes' words only
    (ProtoPNet: mask 1 - I^T). weight: (C, P); class_identity: (P, C)."""
    if class_specific:
        return (weight * (1 - class_identity.t())).abs().sum()
    return weight.abs().sum()


def word_diversity(prototypes, margin):
    """Penalty on words that point the same way (in the spirit of TesNet's and ProtoPool's
    diversity terms): mean over the P (P - 1) / 2 pairs i < j of relu(cos(p_i, p_j) - margin)^2,
    with cos(a, b) = a.b / max(|a| |b|, 1e-8). prototypes (P, D[, 1, 1]) -> scalar; 0 when no two
    words are closer than the margin in angle."""
    p = prototypes.reshape(prototypes.shape[0], -1)
    norms = p.norm(dim=1)
    cosine = (p @ p.t()) / (norms[:, None] * norms[None, :]).clamp(min=1e-8)
    i, j = torch.triu_indices(p.shape[0], p.shape[0], offset=1, device=p.device)
    return F.relu(cosine[i, j] - margin).pow(2).mean()


def word_anchor(distances, cells=None):
    """Every word near some patch of the batch (Li et al. 2018's R1 regulariser, the converse of
    the cluster cost): mean over words p of min over images i and cells (h, w) of d[i, p, h, w],
    the cells limited to `cells` ((H, W) bool, the ones the push may pick; None: all), so a word
    never drifts far from every patch it could be pushed onto. distances (B, P, H, W) -> scalar."""
    if cells is not None:
        distances = distances[:, :, cells]
    return distances.transpose(0, 1).reshape(distances.shape[1], -1).amin(dim=1).mean()


def word_attention_map(similarity_maps, min_distances, k, size, interpolation='bilinear', normalisation='max'):
    """The model's attention map: the per-pixel max over the k most activated words' maps.

    similarity_maps: (B, P, H, W); min_distances: (B, P) (the k smallest pick the words; the pick
    carries no gradient). Each picked map is resized to (size, size) (bilinear: align_corners=True,
    as the reference training; bicubic: align_corners=False, equal to cv2.INTER_CUBIC, as the
    reference evaluation), then A = max over the k maps, normalised per image by
    'max': A / (max A + 1e-5)  or  'minmax': (A - min A) / (max A - min A), 0 where A is constant.
    Returns (B, size, size).
    """
    idx = torch.topk(min_distances, k, dim=1, largest=False).indices
    picked = similarity_maps.gather(1, idx[:, :, None, None].expand(-1, -1, *similarity_maps.shape[2:]))
    align = True if interpolation == 'bilinear' else False
    up = F.interpolate(picked, size=(size, size), mode=interpolation, align_corners=align)
    att = up.amax(dim=1)
    flat = att.flatten(1)
    if normalisation == 'max':
        flat = flat / (flat.amax(dim=1, keepdim=True) + 1e-5)
    else:
        lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
        flat = (flat - lo) / (hi - lo).clamp_min(1e-12)
    return flat.view_as(att)


def attention_loss(word_map, gradcam):
    """MSE with mean reduction over all B * S * S pixels; both (B, S, S)."""
    return F.mse_loss(word_map, gradcam)


def mean_pairwise_word_distance(prototypes):
    """Mean over all P x P pairs (diagonal included, as the reference logs it) of |p_i - p_j|^2."""
    p = prototypes.reshape(prototypes.shape[0], -1)
    return torch.cdist(p, p).pow(2).mean()


# ---- phases -------------------------------------------------------------------------------------

def _set_trainable(model, features, add_on, prototypes, last_layer):
    for p in model.features.parameters():
        p.requires_grad_(features)
    for p in model.add_on_layers.parameters():
        p.requires_grad_(add_on)
    model.prototype_vectors.requires_grad_(prototypes)
    model.last_layer.weight.requires_grad_(last_layer)


def warm_only(model):
    """Backbone frozen. The last layer keeps requires_grad (as the reference) but no optimiser holds it."""
    _set_trainable(model, False, True, True, True)


def joint(model):
    _set_trainable(model, True, True, True, True)


def last_only(model):
    _set_trainable(model, False, False, False, True)


def make_optimizers(model, s):
    """Warm, joint (with its StepLR) and last-layer Adam optimisers, as the reference builds them;
    with setting last_layer_joint_lr the warm and joint ones also train the last layer."""
    lrs, wd = s['joint_optimizer_lrs'], s['weight_decay']
    joint_opt = torch.optim.Adam([
        {'params': model.features.parameters(), 'lr': lrs['features'], 'weight_decay': wd},
        {'params': model.add_on_layers.parameters(), 'lr': lrs['add_on_layers'], 'weight_decay': wd},
        {'params': [model.prototype_vectors], 'lr': lrs['prototype_vectors']},
    ])
    scheduler = torch.optim.lr_scheduler.StepLR(joint_opt, step_size=s['joint_lr_step_size'], gamma=0.1)
    warm = s['warm_optimizer_lrs']
    warm_opt = torch.optim.Adam([
        {'params': model.add_on_layers.parameters(), 'lr': warm['add_on_layers'], 'weight_decay': wd},
        {'params': [model.prototype_vectors], 'lr': warm['prototype_vectors']},
    ])
    if s.get('last_layer_joint_lr') is not None:  # W learns with the words (ProtoPool); decays with StepLR
        for opt in (warm_opt, joint_opt):
            opt.add_param_group({'params': model.last_layer.parameters(), 'lr': s['last_layer_joint_lr']})
    last_opt = torch.optim.Adam([{'params': model.last_layer.parameters(), 'lr': s['last_layer_optimizer_lr']}])
    return warm_opt, joint_opt, scheduler, last_opt


# ---- one pass -----------------------------------------------------------------------------------

AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def amp_context(device, amp):
    """Autocast for setting `amp` ('bf16' | 'fp16'; None: no context at all, plain float32).
    LVWNet.head turns it off again after the add-on layers."""
    return contextlib.nullcontext() if amp is None else torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def model_input(images, device, s):
    """A [0, 1] image batch as the network takes it: on `device`, normalised, and channels-last
    when the setting says so."""
    images = normalize(images.to(device, non_blocking=True))
    return images.contiguous(memory_format=torch.channels_last) if s.get('channels_last') else images


def per_image_attention(word_map, gradcam):
    """The attention MSE of each image: mean over pixels of (A_i - G_i)^2; (B, S, S) x2 -> (B,)."""
    return (word_map - gradcam).pow(2).flatten(1).mean(1)


def batch_losses(out, labels, gradcam, net, s, use_attention, collect=None):
    """All loss terms of one batch as scalar tensors, plus 'total'. `net` is the unwrapped model.
    `collect` (a dict of lists), if given, receives the batch's min distances and per-image
    attention MSE (what the last-layer cache needs of a test pass)."""
    attention = None
    if gradcam is not None:
        word_map = word_attention_map(out.similarity_maps, out.min_distances, s['topk'], gradcam.shape[-1],
                                      s['train_map_interpolation'], s['train_map_normalisation'])
        attention = attention_loss(word_map, gradcam)
        if collect is not None:
            collect.setdefault('attention', []).append(per_image_attention(word_map, gradcam).detach())
    if collect is not None:
        collect.setdefault('min_distances', []).append(out.min_distances.detach())
    anchor = None
    # a term on the words, left out where they are frozen (the last-layer passes, cached or not)
    if s.get('word_anchor_coef') and net.prototype_vectors.requires_grad:
        H, W = out.distances.shape[2:]
        anchor = word_anchor(out.distances, push_cells(H, W, s['push_exclude_border'], out.distances.device))
    return combine_losses(out.logits, out.min_distances, labels, attention, net, s, use_attention, anchor)


def combine_losses(logits, min_distances, labels, attention, net, s, use_attention, anchor=None):
    """The loss terms from the logits (B, C), min distances (B, P), the attention term and the
    word anchor (word_anchor; scalars or None), and their weighted sum 'total' (module docstring)."""
    identity = net.prototype_class_identity
    terms = {
        'cross_entropy': F.cross_entropy(logits, labels),
        'cluster': cluster_cost(min_distances, labels, identity, s['class_specific'], net.max_dist),
        'l1': l1_penalty(net.last_layer.weight, identity, s['class_specific']),
    }
    coefs = s['coefs']
    total = coefs['crs_ent'] * terms['cross_entropy'] + coefs['clst'] * terms['cluster'] + coefs['l1'] * terms['l1']
    if s['class_specific']:
        terms['separation'] = separation_cost(min_distances, labels, identity, net.max_dist)
        total = total + coefs['sep'] * terms['separation']
    if s.get('diversity_coef'):
        terms['diversity'] = word_diversity(net.prototype_vectors, s['diversity_margin'])
        total = total + s['diversity_coef'] * terms['diversity']
    if anchor is not None:
        terms['anchor'] = anchor
        total = total + s['word_anchor_coef'] * anchor
    if attention is not None:
        terms['attention'] = attention
        if use_attention and s['attention_weight']:
            total = total + s['attention_weight'] * terms['attention']
    terms['total'] = total
    return terms


def freeze_batchnorm(module):
    """BatchNorm layers of `module` in eval mode: running statistics used, not updated."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def train_or_test(model, loader, device, s, optimizer=None, use_attention=False, desc='', frozen_bn=False,
                  collect=None, scaler=None):
    """One pass over `loader`; trains when `optimizer` is given (model.train(), as the reference,
    also in the frozen phases; with `frozen_bn` the backbone's BatchNorm stays in eval mode), else
    tests under no_grad in eval mode. `collect`: see batch_losses. `scaler`: the GradScaler of
    amp='fp16'.

    Returns the per-batch means of the loss terms, accuracy (fraction), time, |W|_1 and the mean
    pairwise word distance.
    """
    net = model.module if hasattr(model, 'module') else model
    training = optimizer is not None
    model.train(training)
    if training and frozen_bn:
        freeze_batchnorm(net.features)
    # under torchrun: this rank's slice of each global batch, and its weight (run/distributed.py)
    slices = loader.batch_sampler if isinstance(loader.batch_sampler, distributed.GlobalBatchSlices) else None
    sums, n_batches, correct, seen = {}, 0, 0, 0
    start = time.time()
    with torch.set_grad_enabled(training):
        for batch in tqdm(loader, desc=desc, leave=False, disable=None):
            images, gradcam, labels = batch if len(batch) == 3 else (batch[0], None, batch[1])
            images = model_input(images, device, s)
            labels = labels.to(device, non_blocking=True)
            if gradcam is not None:
                gradcam = gradcam.to(device, non_blocking=True)
            with amp_context(device, s.get('amp')):
                out = model(images)
            terms = batch_losses(out, labels, gradcam, net, s, use_attention, collect)
            total = terms['total']
            if slices is not None:
                weight = slices.weight(n_batches)
                total = total * weight
                terms = {name: value * (weight / slices.parts) for name, value in terms.items()}
                if weight == 0:  # the stand-in sample of an empty slice counts nowhere
                    labels = labels[:0]
                    if collect is not None:
                        for key in ('attention', 'min_distances'):
                            if key in collect:
                                collect[key].pop()
                elif collect is not None:
                    collect.setdefault('indices', []).append(slices.global_indices(n_batches))
            if training:
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(total).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    total.backward()
                    optimizer.step()
            # summed on the device: one synchronisation per pass, not per batch
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach()
            correct = correct + count_correct(out.logits[:len(labels)], labels)
            n_batches += 1
            seen += labels.numel()
    return pass_metrics(net, sums, n_batches, correct, seen, start, across_ranks=slices is not None)


def count_correct(logits, labels):
    """The number of images whose top logit is their label: sum_i [argmax_c logits[i, c] == y_i];
    logits (B, C), labels (B,) -> 0-d tensor. Every pass counts its decisions here (the tests
    record them through it)."""
    return (logits.argmax(dim=1) == labels).sum()


def pass_metrics(net, sums, n_batches, correct, seen, start, across_ranks=False):
    """The per-batch means of the summed terms, accuracy, time, |W|_1 and the mean pairwise word
    distance; `across_ranks`: the ranks' sums (their shares of each global batch) are added up."""
    if across_ranks:
        sums = {name: distributed.all_reduce_sum(total) for name, total in sums.items()}
        correct, seen = distributed.all_reduce_sum(correct), int(distributed.all_reduce_sum(seen))
    metrics = {name: total.item() / max(n_batches, 1) for name, total in sums.items()}
    metrics['accuracy'] = float(correct) / max(seen, 1)
    metrics['time'] = time.time() - start
    with torch.no_grad():
        metrics['l1'] = net.last_layer.weight.abs().sum().item()
        metrics['p_dist_pair'] = mean_pairwise_word_distance(net.prototype_vectors).item()
    return metrics


# ---- last-layer passes from cached similarities (setting last_layer_cache) ----------------------

@torch.no_grad()
def build_last_layer_cache(net, train_set, test_set, device, s, train_features=None, test_outputs=None):
    """What the frozen network gives every image, computed once after a push (the backbone, add-on
    layers and words do not change in the last-layer passes; BatchNorm must be in eval mode):
        train_min (F, N, P)          min distances of each training image, unflipped [0] and, if the
                                     training set flips (F = 2), flipped [1]
        train_attention (F, F, N)    the image's attention MSE for image orientation i, map orientation j
        test_min (Nt, P), test_attention (Nt,), test_labels (Nt,)
    Memory: (F N + Nt) P + F^2 N + 2 Nt numbers.
    Passes it can skip: `train_features` (push.nearest_patches' 'features' and 'feature_indices'),
    the add-on output z of the unflipped training images, gives their distances to the pushed
    words; `test_outputs`, what the test after the push collected (train_or_test's `collect`),
    is the test part. Under torchrun each rank computes its rows and every rank gets them all.
    The loaders draw from a generator of their own, so the run's generator is left as the
    uncached run leaves it."""
    net.eval()
    flips = (False, True) if train_set.flip != 'none' else (False,)
    plain = copy.copy(train_set)
    plain.flip = 'none'
    if train_features is not None:
        features, rows = train_features['features'], train_features['feature_indices']
    else:
        features, rows = None, list(range(*distributed.slice_bounds(len(plain), distributed.rank(),
                                                                     distributed.world_size())))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(plain, rows), batch_size=s['test_batch_size'],
                                         num_workers=s['num_workers'], generator=torch.Generator())
    mins, atts, done = [], [], 0
    for images, gradcam, _ in tqdm(loader, desc='cache train', leave=False, disable=None):
        gradcam, batch_rows = gradcam.to(device), slice(done, done + len(images))
        done += len(images)
        batch_min, batch_att = [], []
        for image_flip in flips:
            with amp_context(device, s.get('amp')):
                if image_flip or features is None:
                    out = net(model_input(images.flip(-1) if image_flip else images, device, s))
                else:
                    out = net.head(features[batch_rows].to(device))
            word_map = word_attention_map(out.similarity_maps, out.min_distances, s['topk'], gradcam.shape[-1],
                                          s['train_map_interpolation'], s['train_map_normalisation'])
            batch_min.append(out.min_distances)
            batch_att.append(torch.stack([per_image_attention(word_map, gradcam.flip(-1) if map_flip else gradcam)
                                          for map_flip in flips]))
        mins.append(torch.stack(batch_min, dim=1))    # (B, F, P)
        atts.append(torch.stack(batch_att).permute(2, 0, 1))  # (B, F, F)
    n = len(plain)
    cache = {'train_min': distributed.gather_rows(torch.cat(mins), rows, n).transpose(0, 1).contiguous(),
             'train_attention': distributed.gather_rows(torch.cat(atts), rows, n).permute(1, 2, 0).contiguous()}
    if test_outputs is None:
        test_outputs = {}
        test_rows = list(range(*distributed.slice_bounds(len(test_set), distributed.rank(), distributed.world_size())))
        plain_test = torch.utils.data.DataLoader(torch.utils.data.Subset(test_set, test_rows),
                                                 batch_size=s['test_batch_size'], num_workers=s['num_workers'],
                                                 generator=torch.Generator())
        for images, gradcam, labels in tqdm(plain_test, desc='cache test', leave=False, disable=None):
            with amp_context(device, s.get('amp')):
                out = net(model_input(images, device, s))
            batch_losses(out, labels.to(device), gradcam.to(device), net, s, False, collect=test_outputs)
        test_outputs['indices'] = [test_rows]
    test_rows = [i for part in test_outputs['indices'] for i in part] if 'indices' in test_outputs else None
    for name, key in (('test_min', 'min_distances'), ('test_attention', 'attention')):
        values = torch.cat(test_outputs[key])
        cache[name] = values if test_rows is None else distributed.gather_rows(values, test_rows, len(test_set))
    cache['test_labels'] = torch.tensor([label for _, label in test_set.samples], device=device)
    return cache


def cached_last_layer_pass(net, cache, draws_loader, device, s, optimizer, desc=''):
    """One last-layer training pass on cached min distances: the batches and flips come from
    `draws_loader` (a loader over image_data.FlipDraws of the training set, built as the training
    loader), so they are those the uncached pass draws; W sees the same inputs, losses and steps."""
    start, sums, n_batches, correct, seen = time.time(), {}, 0, 0, 0
    for index, image_flip, map_flip, labels in tqdm(draws_loader, desc=desc, leave=False, disable=None):
        index, labels = index.to(device), labels.to(device)
        image_flip, map_flip = image_flip.long().to(device), map_flip.long().to(device)
        min_distances = cache['train_min'][image_flip, index]
        attention = cache['train_attention'][image_flip, map_flip, index].mean()
        logits = net.last_layer(net.similarity(min_distances))
        terms = combine_losses(logits, min_distances, labels, attention, net, s, use_attention=True)
        optimizer.zero_grad(set_to_none=True)
        terms['total'].backward()
        optimizer.step()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.detach()
        correct = correct + count_correct(logits, labels)
        n_batches += 1
        seen += labels.numel()
    return pass_metrics(net, sums, n_batches, correct, seen, start)


@torch.no_grad()
def cached_test(net, cache, test_loader, s):
    """The test pass on cached min distances, batch by batch as `test_loader` would give them."""
    iter(test_loader)  # the uncached pass starts an iterator, which draws a seed from the run's generator
    start, sums, n_batches, correct, seen = time.time(), {}, 0, 0, 0
    size = test_loader.batch_sampler.batch_size  # the global batch under torchrun too
    for begin in range(0, len(cache['test_labels']), size):
        rows = slice(begin, begin + size)
        min_distances, labels = cache['test_min'][rows], cache['test_labels'][rows]
        logits = net.last_layer(net.similarity(min_distances))
        terms = combine_losses(logits, min_distances, labels, cache['test_attention'][rows].mean(), net, s, False)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value
        correct = correct + count_correct(logits, labels)
        n_batches += 1
        seen += labels.numel()
    return pass_metrics(net, sums, n_batches, correct, seen, start)


def format_metrics(m):
    """One log line: time, CE, cluster, separation, attention, accuracy, |W|_1, p dist pair."""
    parts = ['time %.1fs' % m['time'], 'ce %.4f' % m.get('cross_entropy', float('nan')),
             'cluster %.4f' % m.get('cluster', float('nan'))]
    if 'separation' in m:
        parts.append('separation %.4f' % m['separation'])
    if 'attention' in m:
        parts.append('attn %.4f' % m['attention'])
    if 'diversity' in m:
        parts.append('diversity %.4f' % m['diversity'])
    if 'anchor' in m:
        parts.append('anchor %.4f' % m['anchor'])
    parts += ['acc %.2f%%' % (100 * m['accuracy']), 'l1 %.2f' % m['l1'], 'p dist pair %.4f' % m['p_dist_pair']]
    return ' | '.join(parts)
