"""Grad-CAM consistency ("GC", Pillai & Pirsiavash, AAAI 2021; ../shared/PEERS_SPEC.md section 2).

A plain classifier on the project's ResNet trunk (global average pooling, or global max pooling
when s['gc_maxpool'], the GMP variant, then one fc), trained with

    L = CE(f(x), y) + gc_lambda * L_GC

Grad-CAM (element-wise, = HiResCAM), on the layer4 output F (C, h, w), y_c the pre-softmax logit of
the ground-truth class:
    G = ReLU(sum_k dy_c/dF_k * F_k)                       (h, w)
    G_hat = G / (sum_ij G_ij + 1e-8) + 1e-8                a spatial probability map
Composite: X (3, 2S, 2S) holds the image x in quadrant q (q = 2 * row + col) and one image of each
of 3 distractor classes (drawn uniformly from the other classes, with replacement) in the other
quadrants. T (2h, 2w) is zero except quadrant q, which holds G_hat(x); T is not detached.
    L_GC = mean over the batch and the cells of |G_hat(X) - T|
Grad-CAMs are taken with create_graph=True, so L_GC double-backpropagates into the network.

Deliberate differences from the reference:
- Grid sizes. When the composite's layer4 grid is exactly twice the image's (ResNet at 224 px:
  7 vs 14, at 64 px: 2 vs 4) T is placed at grid resolution, as the reference does for ResNet.
  Otherwise (ResNet at 112 px, the toy preset: 4 vs 7) both normalised maps are bilinearly
  upsampled (align_corners=False) to S and 2S without renormalisation and the L1 is taken there:
  the reference's rule for AlexNet (6 vs 13), applied to any grid that is not exactly 2x.
- The reference sorts the batch by quadrant and fills it block-wise; here each image keeps its
  own quadrant in place. That is an implementation detail with the same loss.
- Augmentation is the wrapped dataset's own, drawn independently for the image and each
  distractor: by default (gc_augment='flip') resize + random horizontal flip, not the reference's
  RandomResizedCrop + flip (gc_augment='crop_flip').
- The reference's batch of 256 is split over 4 GPUs by DataParallel, so its BatchNorm sees 64
  images; here BatchNorm sees the whole gc_batch_size. Its evaluation explains uncropped images
  resized to short side 448 (batch 1); here the test images at img_size, as for every method.
- Single-label only (the ImageNet script); the COCO multi-label variant is not implemented.
- explain() follows the project's peer interface: the predicted class by default (the reference
  evaluates the GT class: pass target=labels), min-max to [0, 1] instead of sum to 1.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from peers import common
from run.config import UserError

PREFIX = 'gc'
NUM_DISTRACTORS = 3


class GCNet(nn.Module):
    """ResNet trunk -> global average (or max) pooling -> fc. forward(x normalised) -> logits."""

    def __init__(self, s, num_classes):
        super().__init__()
        self.trunk = common.make_trunk(s)
        self.maxpool = bool(s['gc_maxpool'])
        self.fc = nn.Linear(self.trunk.out_channels, num_classes)

    def classify(self, features):
        """Logits (B, K) from layer4 features (B, C, h, w)."""
        pooled = features.amax(dim=(2, 3)) if self.maxpool else features.mean(dim=(2, 3))
        return self.fc(pooled)

    def features_and_logits(self, x):
        """(layer4 output F (B, C, h, w), logits (B, K)); any input size works."""
        features = self.trunk(x)
        return features, self.classify(features)

    def forward(self, x):
        return self.features_and_logits(x)[1]


def build(s, num_classes, method):
    return GCNet(s, num_classes)


def elementwise_gradcam(features, logits, targets, create_graph):
    """G = ReLU(sum_k dy_c/dF_k * F_k): (B, h, w) from features F (B, C, h, w) and logits (B, K)
    computed from them, y_c = logits[b, targets[b]] (pre-softmax). The gradient is taken of the
    sum of the picked logits; each image's gradient is its own except through BatchNorm in train
    mode (which couples a batch, as in the reference). create_graph=True keeps the graph of the
    gradient, so a loss on G backpropagates through dy_c/dF as well."""
    score = logits.gather(1, targets.view(-1, 1)).sum()
    grads, = torch.autograd.grad(score, features, create_graph=create_graph)
    return F.relu((grads * features).sum(dim=1))


def normalise_cam(cams):
    """G / (sum_ij G_ij + 1e-8) + 1e-8 per image: (B, h, w) -> (B, h, w), sums to 1 + h*w*1e-8."""
    return cams / (cams.sum(dim=(1, 2), keepdim=True) + 1e-8) + 1e-8


def _tiles_to_grid(tiles):
    """(B, 4, ..., H, W) tiles in quadrant order (q = 2 * row + col) -> (B, ..., 2H, 2W)."""
    b, _, *middle, h, w = tiles.shape
    grid = tiles.reshape(b, 2, 2, -1, h, w).permute(0, 3, 1, 4, 2, 5)  # (B, M, row, H, col, W)
    return grid.reshape(b, *middle, 2 * h, 2 * w)


def assemble_composite(images, distractors, quadrants):
    """Composites (B, 3, 2S, 2S): images (B, 3, S, S) in quadrant quadrants[b] (0 top-left,
    1 top-right, 2 bottom-left, 3 bottom-right), distractors (B, 3, 3, S, S) in the other three
    quadrants in increasing quadrant order."""
    candidates = torch.cat([images[:, None], distractors], dim=1)  # 0: the image, 1..3: distractors
    slots = torch.arange(4, device=images.device).view(1, 4)
    q = quadrants.to(images.device).view(-1, 1)
    # slot j shows the image if j == q, else distractor j (or j - 1 once past q)
    source = torch.where(slots == q, torch.zeros_like(slots), slots + 1 - (slots > q).long())
    tiles = candidates[torch.arange(len(images), device=images.device)[:, None], source]
    return _tiles_to_grid(tiles)


def place_in_quadrant(maps, quadrants):
    """Target T (B, 2h, 2w): zeros except quadrant quadrants[b], which holds maps[b] (B, h, w).
    Built by multiplication, so gradients flow back into `maps`."""
    one_hot = F.one_hot(quadrants.to(maps.device).long(), 4).to(maps.dtype)  # (B, 4)
    return _tiles_to_grid(one_hot[:, :, None, None] * maps[:, None])


def consistency_loss(cam_image, cam_composite, quadrants, image_size):
    """L_GC: mean |G_hat(X) - T| over the batch and the cells, from the normalised Grad-CAMs of
    the images (B, h, w) and of their composites (B, H, W).

    H, W == 2h, 2w (ResNet at 224 or 64 px): T = place_in_quadrant(cam_image) at grid resolution.
    Otherwise (e.g. ResNet at 112 px: 4 vs 7): both maps are upsampled bilinearly
    (align_corners=False) to image_size and 2 * image_size, not renormalised, and the L1 is taken
    over the 2S x 2S pixels (the reference's AlexNet rule)."""
    h, w = cam_image.shape[-2:]
    if cam_composite.shape[-2:] != (2 * h, 2 * w):
        cam_image = common.resize_maps(cam_image, image_size)
        cam_composite = common.resize_maps(cam_composite, 2 * image_size)
    target = place_in_quadrant(cam_image, quadrants)
    return (cam_composite - target).abs().mean()


class CompositeDataset(torch.utils.data.Dataset):
    """Wraps an ImageDataset: item i -> (image (3, S, S), label, composite (3, 2S, 2S), quadrant)
    with images in [0, 1]. Distractor classes are drawn uniformly from the other classes with
    replacement, an image uniformly within each, each through the wrapped dataset (its own random
    flip); the quadrant is uniform in {0, 1, 2, 3}. torch's global RNG, so DataLoader worker
    seeding applies."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.classes, self.samples, self.paths = dataset.classes, dataset.samples, dataset.paths
        self.indices_by_class = {}
        for index, (_, label) in enumerate(dataset.samples):
            self.indices_by_class.setdefault(label, []).append(index)
        if len(self.indices_by_class) < 2:
            raise UserError('GC needs images of at least 2 classes for its composites, got %d'
                            % len(self.indices_by_class))
        self.labels_with_images = sorted(self.indices_by_class)

    def __len__(self):
        return len(self.dataset)

    def random_image_of(self, label):
        members = self.indices_by_class[label]
        return self.dataset[members[torch.randint(len(members), ()).item()]][0]

    def __getitem__(self, index):
        item = self.dataset[index]
        image, label = item[0], item[-1]
        others = [c for c in self.labels_with_images if c != label]
        picks = torch.randint(len(others), (NUM_DISTRACTORS,)).tolist()
        distractors = torch.stack([self.random_image_of(others[p]) for p in picks])
        quadrant = torch.randint(4, ())
        composite = assemble_composite(image[None], distractors[None], quadrant[None])[0]
        return image, label, composite, quadrant


def trainable_parameters(model, s):
    return list(model.parameters())


def train_dataset(dataset, s):
    return CompositeDataset(dataset)


def batch_loss(model, images, labels, extra, s, method):
    """terms = {'cross_entropy', 'consistency', 'total' = CE + gc_lambda * L_GC}, and the logits of
    `images`. extra = (composites already normalised (B, 3, 2S, 2S), quadrants (B,)). Grad-CAMs
    of the GT class with create_graph=True; autograd is switched on since Grad-CAM needs it."""
    composites, quadrants = extra
    with torch.enable_grad():
        features, logits = model.features_and_logits(images)
        cross_entropy = F.cross_entropy(logits, labels)
        cam_image = normalise_cam(elementwise_gradcam(features, logits, labels, create_graph=True))
        composite_features, composite_logits = model.features_and_logits(composites)
        cam_composite = normalise_cam(
            elementwise_gradcam(composite_features, composite_logits, labels, create_graph=True))
        consistency = consistency_loss(cam_image, cam_composite, quadrants, images.shape[-1])
        total = cross_entropy + s['gc_lambda'] * consistency
    return {'cross_entropy': cross_entropy, 'consistency': consistency, 'total': total}, logits


def explain(model, images, target=None):
    """(B, S, S) maps in [0, 1]: the element-wise Grad-CAM on layer4 (what GC trains and is
    evaluated with) for `target` (int or (B,); default the predicted class), in eval mode,
    min-max, bilinear resize to S, min-max (common.to_unit_maps)."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            features = model.trunk(images)
            if not features.requires_grad:  # a frozen model: take the gradient wrt F itself
                features = features.detach().requires_grad_(True)
            logits = model.classify(features)
            if target is None:
                targets = logits.argmax(dim=1)
            else:
                targets = torch.as_tensor(target, device=logits.device).long().expand(len(images))
            cams = elementwise_gradcam(features, logits, targets, create_graph=False)
    finally:
        model.train(was_training)
    return common.to_unit_maps(cams.detach(), images.shape[-1])
