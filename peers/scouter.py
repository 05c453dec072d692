"""SCOUTER (Li et al., ICCV 2021): a slot-attention classifier head on the ResNet trunk
(../shared/PEERS_SPEC.md section 1). Methods 'scouter+' (e = +1) and 'scouter-' (e = -1).

Each class owns `slots_per_class` learnable slots; a slot's logit is the mass of trunk features
it attends to. Shapes: B images, K classes, S = K * slots_per_class slots, d = scouter_hidden_dim,
h x w the trunk grid, N = h * w positions.

    F' = ReLU(conv1x1(trunk(x)))                       (B, d, h, w), the values V = F' as (B, N, d)
    P  = DETR sine position encoding                   (d, h, w); keys K = to_k(F' + P)   (B, N, d)
    per iteration, from the slots (B, S, d):
        D = slots K^T / sqrt(d);  D[s] <- D[s] * sum_{s',n} D / sum_n D[s]   (B, S, N)
        A = sigmoid(D);  U = A V / d                  (B, S, N), (B, S, d)
        slots <- GRU(input U, hidden slots)
    z_c = e * sum_{s in c} sum_j U[s, j]              with A, U of the last iteration
        = e * sum_{s in c} sum_n A[s, n] mean_j F'[n, j]
    loss = NLL(log_softmax(z), y) + lambda * mean(A) ** power     (mean over batch, ALL slots, N)

Explanation of class c: A_c = sum of its slots' attention, (h, w); all classes' maps of an image
are min-max normalised jointly (one min and max), as SCOUTER's visualisation, then resized.

Training data as the reference's CUB recipe: images resized only (scouter_augment='none'; its
imgaug option is off by default) and the last incomplete batch dropped (scouter_drop_last).

Deliberate differences from the reference code:
- the reference's `to_q` projection is never used there, so it is left out (no dead parameters);
- slots start from Normal(mu, |sigma|), mu, sigma ~ randn(d): the reference passes the signed
  sigma, which current PyTorch rejects;
- the grid size is read from the feature map (the reference hard-codes 9 x 9, i.e. 260 px input);
- the GRU is an nn.GRUCell, the same computation as one step of the reference's nn.GRU;
- SCOUTER-'s default explained class is the one with the LOWEST logit (see `explain`).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcam_extract import minmax_per_image
from peers import common
from run.config import UserError

PREFIX = 'scouter'
SIGNS = {'scouter+': 1, 'scouter-': -1}


# ---- math -------------------------------------------------------------------------------------

def sine_position_encoding(d, h, w, device=None, dtype=torch.float32):
    """DETR's fixed 2-D sine encoding, (d, h, w); d must be a multiple of 4.

    Row i (1-based) gives y = i / (h + 1e-6) * 2 pi, column j gives x = j / (w + 1e-6) * 2 pi.
    With q = d / 2 and f_k = 10000 ** (2 * (k // 2) / q), channel k < q holds sin(y / f_k) for
    even k and cos(y / f_k) for odd k; channels q + k hold the same of x (y part first)."""
    half = d // 2
    rows = torch.arange(1, h + 1, device=device, dtype=torch.float64) / (h + 1e-6) * 2 * math.pi
    cols = torch.arange(1, w + 1, device=device, dtype=torch.float64) / (w + 1e-6) * 2 * math.pi
    k = torch.arange(half, device=device)
    freq = 10000.0 ** (2 * (k // 2) / half).double()
    even = (k % 2 == 0)

    def encode(coord):  # (L,) -> (half, L), sin on even channels, cos on odd ones
        angle = coord[None, :] / freq[:, None]
        return torch.where(even[:, None], angle.sin(), angle.cos())

    y_part = encode(rows)[:, :, None].expand(half, h, w)
    x_part = encode(cols)[:, None, :].expand(half, h, w)
    return torch.cat([y_part, x_part]).to(dtype)


def slot_attention_step(slots, keys, values, gru):
    """One SCOUTER iteration. slots (B, S, d), keys and values (B, N, d), gru an nn.GRUCell(d, d).

    D = slots keys^T / sqrt(d); D[b, s] <- D[b, s] * sum_{s', n} D[b] / sum_n D[b, s] (the
    reference's row re-normalisation; it is unstable when a row sums to about 0); A = sigmoid(D);
    U = A values / d; new slots = gru(U, slots). Returns (new slots (B, S, d), A (B, S, N), U (B, S, d))."""
    b, num_slots, d = slots.shape
    scores = torch.einsum('bsd,bnd->bsn', slots, keys) / math.sqrt(d)
    row_sums = scores.sum(dim=2, keepdim=True)
    image_sums = scores.sum(dim=(1, 2), keepdim=True)
    scores = scores / row_sums * image_sums
    attention = torch.sigmoid(scores)
    updates = torch.einsum('bsn,bnd->bsd', attention, values) / d
    new_slots = gru(updates.reshape(b * num_slots, d), slots.reshape(b * num_slots, d))
    return new_slots.view(b, num_slots, d), attention, updates


def slot_logits(updates, slots_per_class, sign):
    """z[b, c] = sign * sum over the slots s of class c (s // slots_per_class == c) and over the
    d channels of updates[b, s]. updates (B, S, d) -> (B, K)."""
    per_slot = updates.sum(dim=2)
    return sign * per_slot.view(per_slot.shape[0], -1, slots_per_class).sum(dim=2)


def area_loss(attention, lam, power):
    """lam * mean(attention) ** power, the mean over everything (batch, all slots, positions)."""
    return lam * attention.mean() ** power


def class_maps(attention, hw, slots_per_class):
    """Per-class attention maps: attention (B, S, N) -> (B, K, h, w), summed over each class's slots."""
    b, num_slots, _ = attention.shape
    return attention.view(b, num_slots // slots_per_class, slots_per_class, *hw).sum(dim=2)


def explanation_maps(attention, hw, slots_per_class, target, size):
    """SCOUTER's explanation: per image, all class maps min-max normalised jointly (one min, one
    max), then the map of class target[b] resized bilinearly to (size, size) and clamped to [0, 1];
    no renormalisation after, so maps of weak classes stay weak. target: (B,) long. -> (B, size, size)."""
    maps = class_maps(attention, hw, slots_per_class)
    maps = minmax_per_image(maps.flatten(2)).view_as(maps)
    chosen = maps[torch.arange(maps.shape[0], device=maps.device), target]
    return common.resize_maps(chosen, size).clamp(0, 1)


# ---- the network ------------------------------------------------------------------------------

class ScouterNet(nn.Module):
    def __init__(self, s, num_classes, method):
        super().__init__()
        if method not in SIGNS:
            raise UserError('scouter: method must be scouter+ or scouter-, got %r' % (method,))
        d = s['scouter_hidden_dim']
        if d % 4:
            raise UserError('scouter_hidden_dim must be a multiple of 4 (sine encoding), got %r' % (d,))
        self.sign = SIGNS[method]
        self.num_classes = num_classes
        self.slots_per_class = s['scouter_slots_per_class'][method[-1]]
        self.iterations = s['scouter_iterations']
        self.hidden_dim = d
        self.trunk = common.make_trunk(s)
        self.channel_reduce = nn.Conv2d(self.trunk.out_channels, d, kernel_size=1)
        layers = []
        for i in range(s['scouter_to_k_layers']):
            layers += [nn.ReLU()] if i else []
            layers.append(nn.Linear(d, d))
        self.to_k = nn.Sequential(*layers)
        # no to_q: the reference defines one but uses the slots themselves as queries
        num_slots = num_classes * self.slots_per_class
        mu, sigma = torch.randn(d), torch.randn(d)
        self.initial_slots = nn.Parameter(torch.normal(mu.expand(num_slots, d), sigma.abs().expand(num_slots, d)))
        self.gru = nn.GRUCell(d, d)

    def features(self, x):
        """F' = ReLU(conv1x1(trunk(x))): (B, d, h, w)."""
        return F.relu(self.channel_reduce(self.trunk(x)))

    def forward_with_attention(self, x):
        """(logits (B, K), last-iteration attention (B, S, N), (h, w)) for normalised x (B, 3, S, S)."""
        feats = self.features(x)
        b, d, h, w = feats.shape
        position = sine_position_encoding(d, h, w, feats.device, feats.dtype)
        values = feats.flatten(2).transpose(1, 2)
        keys = self.to_k((feats + position).flatten(2).transpose(1, 2))
        slots = self.initial_slots.expand(b, -1, -1)
        for _ in range(self.iterations):
            # the last GRU output is discarded, as in the reference: the outputs use A, U before it
            slots, attention, updates = slot_attention_step(slots, keys, values, self.gru)
        return slot_logits(updates, self.slots_per_class, self.sign), attention, (h, w)

    def forward(self, x):
        return self.forward_with_attention(x)[0]


# ---- the peer-method interface (peers/common.py) ----------------------------------------------

def build(s, num_classes, method):
    return ScouterNet(s, num_classes, method)


def trainable_parameters(model, s):
    """Freeze the trunk's conv1, bn1 and first f = scouter_freeze_layers of layer1..layer4
    (requires_grad False; f = 0 freezes nothing); everything else trains. As in the reference,
    BatchNorm running statistics of frozen stages still update in train mode."""
    f = s['scouter_freeze_layers']
    frozen = (['conv1', 'bn1'] + ['layer%d' % i for i in range(1, f + 1)]) if f > 0 else []
    for name, child in model.trunk.named_children():
        for p in child.parameters():
            p.requires_grad_(name not in frozen)
    return [p for p in model.parameters() if p.requires_grad]


def train_dataset(dataset, s):
    return dataset


def batch_loss(model, images, labels, extra, s, method):
    """({'cross_entropy', 'area' (mean attention, logged only), 'total'}, logits) with
    total = NLL(log_softmax(z), y) + lambda * mean(A) ** power (spec 1.2); extra is unused."""
    logits, attention, _ = model.forward_with_attention(images)
    cross_entropy = F.nll_loss(F.log_softmax(logits, dim=1), labels)
    lam = s['scouter_lambda'][method[-1]]
    total = cross_entropy + area_loss(attention, lam, s['scouter_power'])
    return {'cross_entropy': cross_entropy, 'area': attention.mean().detach(), 'total': total}, logits


@torch.no_grad()
def explain(model, images, target=None):
    """(B, S, S) maps in [0, 1] of class `target` (int or (B,)); see `explanation_maps`.

    target None: SCOUTER+ explains its predicted class (highest logit). SCOUTER- explains the class
    with the LOWEST logit, the class the model finds least like the image: our rule for the
    reproduction's "least similar class" (WordNet similarity has no analogue on our data).
    Runs in eval mode and restores the model's previous mode."""
    was_training = model.training
    model.eval()
    try:
        logits, attention, hw = model.forward_with_attention(images)
    finally:
        model.train(was_training)
    if target is None:
        target = logits.argmax(dim=1) if model.sign > 0 else logits.argmin(dim=1)
    target = torch.as_tensor(target, device=logits.device).long().expand(logits.shape[0])
    return explanation_maps(attention, hw, model.slots_per_class, target, images.shape[-1])
