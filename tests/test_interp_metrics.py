import math

import pytest
import torch

from metrics import interp_metrics as im, perturbation_metrics as pm, word_metrics as wm


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def point_map(H, W, y, x, n=1):
    m = torch.zeros(n, H, W)
    m[:, y, x] = 1.0
    return m


def pixel_mask(H, W, pixels, n=1):
    m = torch.zeros(n, H, W, dtype=torch.bool)
    for (y, x) in pixels:
        m[:, y, x] = True
    return m


def brute_force_hit(mask, y, x, tau):
    """Reference: explicit loop over every mask pixel."""
    H, W = mask.shape
    for v in range(H):
        for u in range(W):
            if mask[v, u] and (v - y) ** 2 + (u - x) ** 2 < tau ** 2:
                return True
    return False


# ---------------------------------------------------------------------------
# pointing game
# ---------------------------------------------------------------------------

def test_pointing_tolerance():
    assert im.pointing_tolerance(224) == pytest.approx(15.0)
    assert im.pointing_tolerance(64) == pytest.approx(15 * 64 / 224)
    assert im.pointing_tolerance(448) == pytest.approx(30.0)
    assert im.pointing_tolerance(100, base=10, base_size=200) == pytest.approx(5.0)


def test_pointing_game_inside_and_far_outside():
    H = W = 20
    mask = pixel_mask(H, W, [(y, x) for y in range(5, 10) for x in range(5, 10)], n=2)
    maps = torch.cat([point_map(H, W, 7, 7), point_map(H, W, 18, 18)])
    hits = im.pointing_game_hits(maps, mask, tau=3.0)
    assert hits.tolist() == [1.0, 0.0]


def test_pointing_game_tolerance_boundary_is_strict():
    H = W = 20
    mask = pixel_mask(H, W, [(10, 10)], n=5)
    # peaks at squared distances 9 (= tau^2 -> miss), 4, 8 (hits), 9, 10 (misses)
    peaks = [(10, 13), (10, 12), (12, 12), (13, 10), (13, 11)]
    maps = torch.cat([point_map(H, W, y, x) for (y, x) in peaks])
    hits = im.pointing_game_hits(maps, mask, tau=3.0)
    assert hits.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    # non-integer tolerance: tau^2 = 6.25 -> 4 hits, 8 misses
    hits = im.pointing_game_hits(maps[1:3], mask[1:3], tau=2.5)
    assert hits.tolist() == [1.0, 0.0]
    # tau = 0 never hits, even on the mask itself
    assert im.pointing_game_hits(point_map(H, W, 10, 10), mask[:1], tau=0.0).tolist() == [0.0]


def test_pointing_game_ties_first_in_row_major_order():
    H = W = 10
    maps = torch.zeros(1, H, W)
    maps[0, 2, 8] = 5.0
    maps[0, 7, 1] = 5.0  # same value, later in row-major order
    pts = im.map_argmax_points(maps)
    assert pts.tolist() == [[2, 8]]
    # flat zero map -> point (0, 0)
    assert im.map_argmax_points(torch.zeros(1, 4, 4)).tolist() == [[0, 0]]
    mask_near_first = pixel_mask(H, W, [(2, 7)])
    mask_near_second = pixel_mask(H, W, [(7, 2)])
    assert im.pointing_game_hits(maps, mask_near_first, 1.5).tolist() == [1.0]
    assert im.pointing_game_hits(maps, mask_near_second, 1.5).tolist() == [0.0]


def test_pointing_game_empty_mask_is_a_miss():
    # Issue 8: an empty mask used to give NaN (image left out). TorchRay's PointingGame.evaluate
    # returns -1 (a miss) for it: there is no mask pixel within tau of any point. 4 images, all
    # pointing at (3, 3): masks on the point, on the point, far away, empty -> hit, hit, miss, miss.
    maps = point_map(8, 8, 3, 3, n=4)
    masks = torch.zeros(4, 8, 8, dtype=torch.bool)
    masks[0:2, 3, 3] = True
    masks[2, 7, 7] = True
    hits = im.pointing_game_hits(maps, masks, 2.0)
    assert hits.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert im.image_mean(hits) == (0.5, 4)  # 2 / 4, not 2 / 3 = 0.667 as when the empty one was skipped
    s = im.pointing_game_summary(hits, torch.zeros(4, dtype=torch.long), num_classes=1)
    assert s["image_mean"] == 0.5 and s["n_valid"] == 4 and s["n_skipped"] == 0


def test_pointing_game_matches_brute_force_and_dilation():
    g = torch.Generator().manual_seed(123)
    N, H, W = 40, 17, 13
    maps = torch.rand(N, H, W, generator=g)
    masks = torch.rand(N, H, W, generator=g) > 0.97
    masks[0] = False
    for tau in (1.0, 2.0, 3.7, 5.0):
        hits = im.pointing_game_hits(maps, masks, tau)
        pts = im.map_argmax_points(maps)
        dil = im.dilate_mask(masks, tau)
        for i in range(N):
            y, x = pts[i].tolist()
            ref = brute_force_hit(masks[i], y, x, tau)  # False for the empty masks[0]: a miss, not NaN
            assert hits[i].item() == float(ref)
            assert bool(dil[i, y, x]) == ref
        # dilation contains the mask and agrees with the gather test everywhere
        ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        ys = ys.reshape(1, -1).expand(N, -1)
        xs = xs.reshape(1, -1).expand(N, -1)
        all_hits = im.points_hit_mask(masks, ys, xs, tau).reshape(N, H, W)
        assert torch.equal(all_hits, dil)
        assert bool((dil | ~masks).all())


def test_pointing_game_class_averaging_torchray():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    hits = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, float("nan")])  # class 2 only skipped
    s = im.pointing_game_summary(hits, labels, num_classes=4)  # class 3 has no samples
    assert s["per_class"].tolist() == pytest.approx([2 / 3, 1.0, 0.0, 0.0])
    assert s["class_mean_all"] == pytest.approx((2 / 3 + 1.0) / 4)
    assert s["class_mean_present"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert s["image_mean"] == pytest.approx(4 / 5)
    assert s["hits_per_class"].tolist() == [2, 2, 0, 0]
    assert s["misses_per_class"].tolist() == [1, 0, 0, 0]
    assert s["n_valid"] == 5 and s["n_skipped"] == 1
    assert s["n_classes_present"] == 2 and s["present"].tolist() == [True, True, False, False]
    with pytest.raises(ValueError):
        im.pointing_game_summary(hits, torch.tensor([0, 0, 0, 1, 1, 4]), num_classes=4)


def test_pointing_game_class_mean_over_present_classes():
    # Issue 8: labels drawn from 2 of 4 classes (as a -max_images subset can be). The headline
    # mean is over those 2: class 0 hits 2 of 3, class 2 hits 1 of 2 -> (2/3 + 1/2) / 2 = 7/12.
    # TorchRay's mean over all 4 (absent classes as 0) stays available: 7/24.
    labels = torch.tensor([0, 0, 0, 2, 2])
    hits = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    s = im.pointing_game_summary(hits, labels, num_classes=4)
    assert s["class_mean_present"] == pytest.approx(7 / 12)
    assert s["n_classes_present"] == 2
    assert s["class_mean_all"] == pytest.approx(7 / 24)
    assert s["image_mean"] == pytest.approx(3 / 5)
    full = im.pointing_game_summary(hits, torch.tensor([0, 0, 1, 2, 3]), num_classes=4)
    assert full["n_classes_present"] == 4  # every class present: the two means agree
    # per class 1/2, 1, 1, 0 -> 2.5 / 4
    assert full["class_mean_present"] == full["class_mean_all"] == pytest.approx(0.625)


NONFINITE = [float("nan"), float("inf"), float("-inf")]
MAP_FUNCTIONS = {
    "pointing_game_hits": lambda m, k: im.pointing_game_hits(m, k, 2.0),
    "stochastic_pointing_game": lambda m, k: im.stochastic_pointing_game(m, k, 2.0),
    "content_heatmap": im.content_heatmap,
    "box_precision": im.box_precision,
    "area_size": lambda m, k: im.area_size(m),
    "map_argmax_points": lambda m, k: im.map_argmax_points(m),
    "sample_map_points": lambda m, k: im.sample_map_points(m, 5),
    "stability_iou": lambda m, k: im.stability_iou(torch.rand(m.shape), m),
    "insertion_auc": lambda m, k: pm.insertion_auc(mean_prob_model, torch.rand(m.shape[0], 3, *m.shape[1:]), m),
    "deletion_auc": lambda m, k: pm.deletion_auc(mean_prob_model, torch.rand(m.shape[0], 3, *m.shape[1:]), m),
}


@pytest.mark.parametrize("bad", NONFINITE)
@pytest.mark.parametrize("name", sorted(MAP_FUNCTIONS))
def test_nonfinite_maps_are_refused(name, bad):
    # Issue 8: NaN compares false with everything, so a NaN map's argmax fell one row below the
    # image and could still score a hit; every function taking maps now refuses NaN / inf.
    maps = torch.rand(3, 8, 8)
    maps[1, 4, 5] = bad
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[:, 7, 0:3] = True
    with pytest.raises(ValueError, match="map 1 holds NaN or inf"):
        MAP_FUNCTIONS[name](maps, masks)


def test_nan_map_would_have_hit_below_the_image():
    # Why the check exists: the first-maximum search finds no maximum in an all-NaN row and
    # returns the flat index H * W, i.e. (H, 0), within tau of a mask on the last row.
    maps = torch.full((1, 8, 8), float("nan"))
    assert im._first_argmax_flat(maps.reshape(1, -1)).tolist() == [64]
    assert im.first_nonfinite_map(maps) == 0
    assert im.first_nonfinite_map(torch.rand(2, 8, 8)) is None
    ok = torch.rand(2, 8, 8)
    assert im.check_finite_maps(ok) is ok


# ---------------------------------------------------------------------------
# stochastic pointing game
# ---------------------------------------------------------------------------

def test_spg_all_inside_and_all_outside():
    H = W = 30
    masks = torch.zeros(2, H, W, dtype=torch.bool)
    masks[:, 0:10, 0:10] = True
    maps = torch.zeros(2, H, W)
    maps[0, 2:8, 2:8] = torch.rand(6, 6, generator=torch.Generator().manual_seed(0)) + 0.1
    maps[1, 20:30, 20:30] = 1.0  # >= 10 px away from the mask, tau = 3
    spg = im.stochastic_pointing_game(maps, masks, tau=3.0, seed=0)
    assert spg.tolist() == [100.0, 0.0]


def test_spg_half_half_within_binomial_bound():
    N, H, W = 20, 30, 30
    masks = torch.zeros(N, H, W, dtype=torch.bool)
    masks[:, 0:5, 0:5] = True
    maps = torch.zeros(N, H, W)
    maps[:, 2, 2] = 3.0    # inside
    maps[:, 25, 25] = 3.0  # far outside
    spg = im.stochastic_pointing_game(maps, masks, tau=3.0, num_samples=100, seed=7)
    # per image Binomial(100, 0.5): sd 5 -> 6 sd bound; mean over 20 images sd 1.12 -> 5 sd bound
    assert bool(((spg >= 20) & (spg <= 80)).all())
    mean, n = im.image_mean(spg)
    assert n == N
    assert abs(mean - 50.0) < 5.6
    # scores are multiples of 1 (100 * hits / 100)
    assert torch.equal(spg, spg.round())


def test_spg_sampling_frequencies_and_zero_mass_pixels():
    H = W = 10
    maps = torch.zeros(1, H, W)
    maps[0, 1, 1] = 0.8
    maps[0, 8, 8] = 0.2
    ys, xs = im.sample_map_points(maps, 20000, seed=3)
    flat = (ys * W + xs)[0]
    assert set(flat.tolist()) <= {1 * W + 1, 8 * W + 8}
    frac = (flat == 11).double().mean().item()
    assert abs(frac - 0.8) < 0.015  # sd 0.0028
    masks = pixel_mask(H, W, [(1, 1)])
    spg = im.stochastic_pointing_game(maps, masks, tau=1.0, num_samples=20000, seed=3)
    assert abs(spg.item() - 80.0) < 1.5
    assert spg.item() == pytest.approx(100 * frac, abs=1e-4)


def test_spg_reproducible_and_seed_dependent():
    g = torch.Generator().manual_seed(1)
    N, H, W = 10, 24, 24
    maps = torch.rand(N, H, W, generator=g) ** 4
    masks = torch.zeros(N, H, W, dtype=torch.bool)
    masks[:, 6:14, 6:14] = True
    a = im.stochastic_pointing_game(maps, masks, tau=2.0, seed=11)
    b = im.stochastic_pointing_game(maps, masks, tau=2.0, seed=11)
    c = im.stochastic_pointing_game(maps, masks, tau=2.0, seed=12)
    d = im.stochastic_pointing_game(maps, masks, tau=2.0,
                                    generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, b)
    assert torch.equal(a, d)
    assert not torch.equal(a, c)


def test_spg_skips_zero_maps_and_scores_empty_masks_0():
    H = W = 8
    maps = torch.zeros(3, H, W)
    maps[0, 1, 1] = 1.0
    maps[2, 1, 1] = 1.0
    masks = torch.zeros(3, H, W, dtype=torch.bool)
    masks[:2, 1, 1] = True  # image 2: empty mask; image 1: zero map
    spg = im.stochastic_pointing_game(maps, masks, tau=1.0, seed=0)
    assert spg[0].item() == 100.0
    # a zero map has nothing to sample: skipped. An empty mask (was NaN before issue 8) is
    # 0 %: every sample misses, the pointing game's TorchRay rule.
    assert math.isnan(spg[1].item()) and spg[2].item() == 0.0
    assert im.image_mean(spg) == (50.0, 2)


def test_spg_empty_mask_counts_as_a_miss():
    # 4 images drawing all their samples at (1, 1): masks there, there, far, empty ->
    # 100, 100, 0, 0 %: image mean 50, not 66.7 as when the empty mask was skipped.
    maps = point_map(8, 8, 1, 1, n=4)
    masks = torch.zeros(4, 8, 8, dtype=torch.bool)
    masks[0:2, 1, 1] = True
    masks[2, 7, 7] = True
    spg = im.stochastic_pointing_game(maps, masks, tau=1.0, seed=0)
    assert spg.tolist() == [100.0, 100.0, 0.0, 0.0]
    assert im.image_mean(spg) == (50.0, 4)


# ---------------------------------------------------------------------------
# content heatmap
# ---------------------------------------------------------------------------

def test_content_heatmap():
    H = W = 10
    masks = torch.zeros(3, H, W, dtype=torch.bool)
    masks[:, 0:5, 0:5] = True  # 25 of 100 pixels
    maps = torch.ones(3, H, W)
    maps[1] = 0.0
    maps[1, 0, 0] = 3.0   # inside
    maps[1, 9, 9] = 1.0   # outside -> 75 %
    maps[2] = 0.0          # skipped
    ch = im.content_heatmap(maps, masks)
    assert ch[0].item() == pytest.approx(25.0)
    assert ch[1].item() == pytest.approx(75.0)
    assert math.isnan(ch[2].item())
    mean, n = im.image_mean(ch)
    assert n == 2 and mean == pytest.approx(50.0)


# ---------------------------------------------------------------------------
# insertion / deletion
# ---------------------------------------------------------------------------

def test_curve_auc_hand_made():
    assert pm.curve_auc(torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])).item() == pytest.approx(0.5)
    # (0 + 1 + 1 + 1 + 1 - 0/2 - 1/2) / 4 = 3.5 / 4
    assert pm.curve_auc(torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0])).item() == pytest.approx(0.875)
    assert pm.curve_auc(torch.tensor([[0.2, 0.6], [1.0, 1.0]])).tolist() == pytest.approx([0.4, 1.0])


def mean_prob_model(x):
    """p0 = mean of channel 0 (values in [0, 1])."""
    m = x[:, 0].mean(dim=(1, 2))
    return torch.stack([m, 1 - m], dim=1)


def test_deletion_and_insertion_exact_curves():
    images = torch.ones(1, 3, 2, 2)
    maps = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])
    auc, curves, tg = pm.deletion_auc(mean_prob_model, images, maps, step=1, return_curves=True)
    assert tg.tolist() == [0]
    assert curves[0].tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert auc.item() == pytest.approx(0.5)
    # default step = W = 2 -> n = 3
    _, curves, _ = pm.deletion_auc(mean_prob_model, images, maps, return_curves=True)
    assert curves[0].tolist() == pytest.approx([1.0, 0.5, 0.0])
    # step 3 -> n = ceil(4 / 3) + 1 = 3, removed counts 0, 3, 4
    auc, curves, _ = pm.deletion_auc(mean_prob_model, images, maps, step=3, return_curves=True)
    assert curves[0].tolist() == pytest.approx([1.0, 0.25, 0.0])
    assert auc.item() == pytest.approx((1.25 - 0.5) / 2)
    # insertion from a zero baseline
    auc, curves, _ = pm.insertion_auc(mean_prob_model, images, maps, step=1,
                                      baseline=torch.zeros_like(images), return_curves=True)
    assert curves[0].tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert auc.item() == pytest.approx(0.5)


def test_deletion_order_descending_with_stable_ties():
    # model looks only at pixel (0, 1); its value is 1, everything else 0.5
    def model(x):
        p = x[:, 0, 0, 1]
        return torch.stack([p, 1 - p], dim=1)
    images = torch.full((2, 3, 2, 2), 0.5)
    images[:, :, 0, 1] = 1.0
    maps = torch.zeros(2, 2, 2)
    maps[0] = 1.0                 # all tied -> index order: (0,1) is removed 2nd
    maps[1] = torch.tensor([[0.0, 0.0], [5.0, 5.0]])  # (0,1) tied with (0,0), removed 4th
    _, curves, tg = pm.deletion_auc(model, images, maps, step=1, return_curves=True)
    assert tg.tolist() == [0, 0]
    assert curves[0].tolist() == pytest.approx([1.0, 1.0, 0.0, 0.0, 0.0])
    assert curves[1].tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.0])


def region_model(x):
    """Logistic in the mean of the top-left 8x8 region of a 16x16 image."""
    m = x[:, :, :8, :8].mean(dim=(1, 2, 3))
    p = torch.sigmoid(4.0 * (m - 1.0))
    return torch.stack([p, 1 - p], dim=1)


def test_insertion_deletion_good_map_beats_reversed():
    N = 3
    images = torch.full((N, 3, 16, 16), -2.0)
    images[:, :, :8, :8] = 2.0
    images += 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    good = torch.zeros(N, 16, 16)
    good[:, :8, :8] = 1.0
    bad = 1.0 - good
    ins_good, c_ins_good, tg = pm.insertion_auc(region_model, images, good, return_curves=True)
    ins_bad = pm.insertion_auc(region_model, images, bad)
    del_good = pm.deletion_auc(region_model, images, good)
    del_bad = pm.deletion_auc(region_model, images, bad)
    assert tg.tolist() == [0, 0, 0]
    assert c_ins_good.shape == (N, 16 * 16 // 16 + 1)
    # end of insertion = clean image prob
    assert c_ins_good[:, -1].tolist() == pytest.approx(region_model(images)[:, 0].tolist(), abs=1e-6)
    assert bool((ins_good > ins_bad + 0.3).all())
    assert bool((del_good + 0.3 < del_bad).all())
    assert ins_good.mean().item() > 0.8 and del_good.mean().item() < 0.2


class TinyCNN(torch.nn.Module):
    def __init__(self, k=5):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(8, k)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return torch.softmax(self.fc(h), dim=1)


def naive_deletion_curves(model, images, maps, step):
    N, C, H, W = images.shape
    L = H * W
    n = math.ceil(L / step) + 1
    with torch.no_grad():
        targets = model(images).argmax(1)
        curves = torch.zeros(N, n)
        for i in range(N):
            vals = maps[i].reshape(-1).tolist()
            order = sorted(range(L), key=lambda j: (-vals[j], j))
            for k in range(n):
                x = images[i].clone().reshape(C, L)
                x[:, order[:min(k * step, L)]] = 0.0
                curves[i, k] = model(x.reshape(1, C, H, W))[0, targets[i]]
    return curves, targets


def test_perturbation_batching_matches_naive_reference():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    g = torch.Generator().manual_seed(5)
    images = torch.randn(3, 3, 8, 8, generator=g)
    maps = torch.randint(0, 4, (3, 8, 8), generator=g).float()  # many ties
    ref, ref_t = naive_deletion_curves(model, images, maps, step=5)
    for bs in (1, 7, 1000):
        auc, curves, tg = pm.deletion_auc(model, images, maps, step=5, batch_size=bs,
                                          return_curves=True)
        assert curves.shape == (3, math.ceil(64 / 5) + 1)
        assert torch.equal(tg, ref_t)
        assert torch.allclose(curves, ref, atol=1e-5)
        assert torch.allclose(auc, pm.curve_auc(ref), atol=1e-5)


def test_mean_auc_equals_auc_of_mean_curve_and_blur_baseline():
    torch.manual_seed(1)
    model = TinyCNN().eval()
    g = torch.Generator().manual_seed(2)
    images = torch.randn(6, 3, 12, 12, generator=g)
    maps = torch.rand(6, 12, 12, generator=g)
    aucs, curves, _ = pm.insertion_auc(model, images, maps, return_curves=True, batch_size=32)
    assert curves.shape == (6, 13)
    assert aucs.mean().item() == pytest.approx(pm.curve_auc(curves.mean(0)).item(), abs=1e-6)
    # first point of insertion = blurred image, last = clean image
    blurred = pm.gaussian_blur(images, 11, 5.0)
    with torch.no_grad():
        p_blur = model(blurred)
        p_clean = model(images)
    tg = p_clean.argmax(1)
    assert torch.allclose(curves[:, 0], p_blur.gather(1, tg[:, None])[:, 0], atol=1e-6)
    assert torch.allclose(curves[:, -1], p_clean.gather(1, tg[:, None])[:, 0], atol=1e-6)


def test_gaussian_blur_properties():
    # constant interior is preserved (kernel sums to 1), zero padding darkens borders
    x = torch.ones(1, 3, 32, 32)
    y = pm.gaussian_blur(x, 11, 5.0)
    assert torch.allclose(y[:, :, 5:27, 5:27], torch.ones(1, 3, 22, 22), atol=1e-5)
    assert y[0, 0, 0, 0].item() < 0.5
    # channels are blurred separately
    x = torch.zeros(1, 3, 21, 21)
    x[0, 1, 10, 10] = 1.0
    y = pm.gaussian_blur(x, 11, 5.0)
    assert y[0, 0].abs().max().item() == 0.0 and y[0, 2].abs().max().item() == 0.0
    assert y[0, 1].sum().item() == pytest.approx(1.0, abs=1e-5)
    # ratio of neighbouring weights follows the Gaussian
    r = (y[0, 1, 10, 11] / y[0, 1, 10, 10]).item()
    assert r == pytest.approx(math.exp(-1 / 50), rel=1e-5)


# ---------------------------------------------------------------------------
# stability IoU
# ---------------------------------------------------------------------------

def test_stability_iou():
    H = W = 10
    a = torch.zeros(4, H, W)
    b = torch.zeros(4, H, W)
    # 0: identical random maps
    a[0] = torch.rand(H, W, generator=torch.Generator().manual_seed(0))
    b[0] = a[0] * 3.0 + 1.0  # min-max scaling makes the scale irrelevant
    # 1: disjoint top regions
    a[1, :3, :3] = 1.0
    b[1, 6:, 6:] = 1.0
    # 2: partial overlap, 4x4 blocks shifted by 2 columns: |A&B| = 8, |A|B| = 24
    a[2, 0:4, 0:4] = 1.0
    b[2, 0:4, 2:6] = 1.0
    # 3: both constant -> both binary maps empty
    a[3] = 0.7
    b[3] = 0.7
    iou = im.stability_iou(a, b)
    assert not torch.isnan(iou).any()
    assert iou[0].item() == pytest.approx(1.0)
    assert iou[1].item() < 1e-6
    # per-row averaging would give (4 * 1/3 + 6 * 1) / 10 = 0.733; the 2-D IoU is 1/3
    assert iou[2].item() == pytest.approx(1 / 3, abs=1e-6)
    assert iou[3].item() == pytest.approx(1.0)


def test_stability_iou_threshold_and_constant_vs_peaked():
    a = torch.tensor([[[0.0, 0.25, 0.5, 1.0]]])
    b = torch.tensor([[[0.0, 0.0, 0.0, 1.0]]])
    # default threshold 100/255 = 0.392 -> A = {2, 3}, B = {3}
    assert im.stability_iou(a, b).item() == pytest.approx((1 + 1e-6) / (2 + 1e-6))
    # threshold is strict: 0.5 is not above 0.5 -> A = {3}
    assert im.stability_iou(a, b, threshold=0.5).item() == pytest.approx(1.0)
    # threshold 0.2 -> A = {1, 2, 3}
    assert im.stability_iou(a, b, threshold=0.2).item() == pytest.approx((1 + 1e-6) / (3 + 1e-6))
    const = torch.full((1, 1, 4), 2.0)
    v = im.stability_iou(const, b).item()
    assert not math.isnan(v) and v == pytest.approx(1e-6 / (1 + 1e-6))


# ---------------------------------------------------------------------------
# part purity and top locations
# ---------------------------------------------------------------------------

def test_part_purity_hand_made():
    N, K, H, W = 2, 2, 4, 4
    pm = torch.zeros(N, K, H, W, dtype=torch.bool)
    pm[0, 0, 0:2] = True   # head: rows 0-1 of image 0
    pm[0, 1, 1:3] = True   # wing: rows 1-2 of image 0 (row 1 overlaps -> head)
    pm[1, 1, :, 0] = True  # wing: column 0 of image 1
    locs = [
        [(0, 0, 0), (0, 1, 1), (0, 2, 0), (0, 3, 3)],  # head, head(overlap), wing, background
        [(1, 0, 0), (1, 3, 0), (0, 2, 3)],              # wing, wing, wing
        [(1, 0, 1), (1, 2, 2)],                         # background x2
        [],
    ]
    res = wm.part_purity(locs, pm, ["head", "wing"])
    assert res["categories"] == ["head", "wing", "background"]
    assert res["counts"].tolist() == [[2, 1, 1], [0, 3, 0], [0, 0, 2], [0, 0, 0]]
    assert res["purity"][:3].tolist() == pytest.approx([0.5, 1.0, 1.0])
    assert math.isnan(res["purity"][3].item())
    assert res["dominant"] == ["head", "wing", "background", None]
    assert res["mean_purity"] == pytest.approx(2.5 / 3)
    # same result from a (P, n, 3) tensor; tie 1-1 -> the earlier category
    t = torch.tensor([[[0, 0, 0], [0, 2, 0]], [[1, 1, 1], [1, 2, 2]]])
    res = wm.part_purity(t, pm, ["head", "wing"])
    assert res["counts"].tolist() == [[1, 1, 0], [0, 0, 2]]
    assert res["dominant"] == ["head", "background"]
    assert res["purity"].tolist() == pytest.approx([0.5, 1.0])


def test_top_locations_hand_made():
    N, P, H, W = 3, 2, 4, 4
    s = torch.zeros(N, P, H, W)
    s[0, 0, 1, 2] = 0.5
    s[1, 0, 3, 0] = 0.9
    s[2, 0, 0, 0] = 0.7
    s[2, 0, 3, 3] = 0.7        # tie inside an image -> first in row-major order (0, 0)
    s[0, 1, 2, 2] = 0.3
    s[1, 1, 0, 1] = 0.3        # tie across images -> lower image index first
    s[2, 1, 1, 1] = 0.1
    top = wm.top_locations(s, 2)
    assert top.shape == (P, 2, 3)
    assert top[0].tolist() == [[1, 3, 0], [2, 0, 0]]
    assert top[1].tolist() == [[0, 2, 2], [1, 0, 1]]
    # n larger than N is capped, one location per image
    top = wm.top_locations(s, 10)
    assert top.shape == (P, 3, 3)
    assert sorted(top[0, :, 0].tolist()) == [0, 1, 2]
    v, ys, xs = wm.word_argmax_locations(s)
    assert v[:, 0].tolist() == pytest.approx([0.5, 0.9, 0.7])
    assert torch.equal(wm.top_locations_from_maxima(v, ys, xs, 2), wm.top_locations(s, 2))


# ---------------------------------------------------------------------------
# classes per word
# ---------------------------------------------------------------------------

def test_classes_per_word_protopnet_init():
    C, per = 4, 3
    P = C * per
    identity = torch.zeros(P, C)
    identity[torch.arange(P), torch.arange(P) // per] = 1.0
    w = 1.0 * identity.t() - 0.5 * (1 - identity.t())  # (C, P)
    counts, mean = wm.classes_per_word(w)
    assert counts.tolist() == [1] * P
    assert mean == 1.0


def test_classes_per_word_hand_made():
    w = torch.tensor([
        [1.0, 0.4, -1.0, 0.0, 1.0],
        [0.6, 0.5, -2.0, 0.0, 0.5],
        [0.2, 0.1, -0.5, 0.0, 0.49],
    ])
    counts, mean = wm.classes_per_word(w)
    assert counts.tolist() == [2, 2, 0, 0, 2]
    assert mean == pytest.approx(6 / 5)
    counts, _ = wm.classes_per_word(w, rel=0.1)
    assert counts.tolist() == [3, 3, 0, 0, 3]
    counts, _ = wm.classes_per_word(w, rel=1.0)
    assert counts.tolist() == [1, 1, 0, 0, 1]


# ---------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------

def test_results_to_markdown():
    md = im.results_to_markdown({
        "pointing_game": {"value": 0.8125, "averaging": "class mean (TorchRay)",
                          "params": {"tau": 4.2857142857, "num_classes": 4}, "n": 50},
        "spg": {"value": float("nan"), "averaging": "image mean", "params": {"seed": 0}},
        "classes_per_word": 1.0,
    })
    lines = md.strip().split("\n")
    assert lines[0] == "| Metric | Value | Averaging | N | Parameters |"
    assert len(lines) == 5
    assert lines[2] == "| pointing_game | 0.8125 | class mean (TorchRay) | 50 | tau=4.2857, num_classes=4 |"
    assert lines[3] == "| spg | nan | image mean |  | seed=0 |"
    assert lines[4] == "| classes_per_word | 1.0000 |  |  |  |"


# ---- SCOUTER's area size and box precision ------------------------------------------------------

def test_area_size_is_the_mean_map_value():
    maps = torch.tensor([[[0.0, 1.0], [0.5, 0.5]], [[1.0, 1.0], [1.0, 1.0]]])
    assert im.area_size(maps).tolist() == pytest.approx([0.5, 1.0])


def test_mask_boxes_by_hand():
    masks = torch.zeros(3, 5, 6, dtype=torch.bool)
    masks[0, 1, 2] = masks[0, 3, 4] = True   # two pixels: box rows 1-3, cols 2-4
    masks[1, 4, 0] = True
    assert im.mask_boxes(masks).tolist() == [[1, 3, 2, 4], [4, 4, 0, 0], [-1, -1, -1, -1]]


def test_box_precision_counts_the_whole_box_not_only_the_mask():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True   # box = the top-left 2 x 2
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 1] = 2.0   # inside the box, outside the mask
    maps[0, 1, 1] = 1.0   # inside both
    maps[0, 3, 3] = 1.0   # outside
    maps[1] = 1.0         # empty mask: skipped
    precision = im.box_precision(maps, masks)
    assert precision[0].item() == pytest.approx(3 / 4)
    assert math.isnan(precision[1].item())
    assert im.content_heatmap(maps[:1], masks[:1])[0].item() == pytest.approx(100 / 4)  # the mask alone
    # a map of zeros has no mass to place
    assert math.isnan(im.box_precision(torch.zeros(1, 4, 4), masks[:1])[0].item())
