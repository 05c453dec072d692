"""The word metrics checked on constructed cases whose answer is known (issue 17, item 1): a word
set to a known patch of a known image, W set by hand to share a word, duplicates, and the map from
a latent cell to image pixels against a brute-force receptive field."""
import pytest
import torch

from metrics import word_metrics as wm
from model import LVWNet, ResNetFeatures
from receptive_field import layer_specs, rf_box, word_layer_rf_info


def test_cell_boxes_tile_the_image_and_centres_sit_inside():
    for size, n in ((112, 4), (224, 7), (50, 3)):
        cover = torch.zeros(size, size, dtype=torch.long)
        for h in range(n):
            for w in range(n):
                y0, y1, x0, x1 = wm.cell_box(h, w, (n, n), size)
                cover[y0:y1, x0:x1] += 1
                ys, xs = wm.cell_centre(torch.tensor(h), torch.tensor(w), (n, n), size)
                assert y0 <= int(ys) < y1 and x0 <= int(xs) < x1
        assert bool((cover == 1).all())
    assert wm.cell_box(1, 2, (4, 4), 112) == (28, 56, 56, 84)
    ys, xs = wm.cell_centre(torch.tensor([0, 3]), torch.tensor([1, 2]), (4, 4), 112)
    assert ys.tolist() == [14, 98] and xs.tolist() == [42, 70]  # floor(28 (h + 1/2))


def test_cells_on_and_near_a_known_object():
    # an object of one pixel at (30, 60) of a 112 px image, 4 x 4 cells of 28 px: it lies in cell (1, 2)
    mask = torch.zeros(1, 112, 112, dtype=torch.bool)
    mask[0, 30, 60] = True
    cells = torch.tensor([[[0, 1, 2], [0, 0, 0], [0, 1, 1], [0, 2, 2]]])  # (1 word, 4 locations, 3)
    assert wm.cells_on_mask(cells, mask, (4, 4)).tolist() == [[True, False, False, False]]
    # centre of (1, 2) is (42, 70): distance sqrt(12^2 + 10^2) = 15.62; of (1, 1) (42, 42): 21.63
    assert wm.cells_near_mask(cells, mask, (4, 4), tau=15.7).tolist() == [[True, False, False, False]]
    assert wm.cells_near_mask(cells, mask, (4, 4), tau=15.5).tolist() == [[False, False, False, False]]
    assert wm.cells_near_mask(cells, mask, (4, 4), tau=21.7).tolist() == [[True, False, True, False]]


def test_map_top_cells_pools_to_the_grid():
    maps = torch.zeros(2, 112, 112)
    maps[0, 30:40, 60:70] = 1.0            # mass in cell (1, 2)
    maps[0, 100, 5] = 5.0                  # one bright pixel in (3, 0): 5 < 100 in the mean of its cell
    maps[1, 90:112, 84:112] = 1.0          # cell (3, 3)
    assert wm.map_top_cells(maps, (4, 4)).tolist() == [[0, 1, 2], [1, 3, 3]]


def test_distinct_words_counts_duplicates():
    v = torch.rand(5, 8, 1, 1)
    v[3] = v[1]
    v[4] = v[1]
    assert wm.distinct_words(v) == 3


def test_a_word_pushed_onto_a_known_patch_finds_it():
    """A word set to the add-on output of image 1 at cell (2, 3) has distance 0 there: its top
    location is that image and cell, and the cell rules score it against the part it was put on."""
    torch.manual_seed(0)
    net = LVWNet(ResNetFeatures('resnet18'), (6, 16, 1, 1), 3).eval()
    x = torch.rand(4, 3, 128, 128)
    with torch.no_grad():
        z = net.conv_features(x)                                    # (4, 16, 4, 4)
        net.prototype_vectors[2] = z[1, :, 2, 3][:, None, None]
        out = net(x)
    assert out.min_distances[1, 2] == pytest.approx(0.0, abs=1e-4)
    cells = wm.top_locations(out.similarity_maps, 1)
    assert cells[2, 0].tolist() == [1, 2, 3]
    part = torch.zeros(4, 128, 128, dtype=torch.bool)
    part[1, 70:80, 100:110] = True                                   # inside cell (2, 3) = [64, 96) x [96, 128)
    assert bool(wm.cells_on_mask(cells[2:3], part, (4, 4))[0, 0])
    assert not bool(wm.cells_on_mask(cells[2:3], torch.roll(part, 40, dims=2), (4, 4))[0, 0])


def test_classes_per_word_with_a_hand_set_shared_word():
    W = torch.full((3, 4), -0.5)
    W[0, 0] = W[1, 1] = W[2, 2] = 1.0
    W[0, 3], W[2, 3] = 1.0, 0.6            # word 3 shared by classes 0 and 2 (0.6 >= 0.5 * 1.0)
    counts, mean = wm.classes_per_word(W)
    assert counts.tolist() == [1, 1, 1, 2] and mean == pytest.approx(1.25)
    W[2, 3] = 0.4                          # below half of the word's largest weight: not a user
    assert wm.classes_per_word(W)[0].tolist() == [1, 1, 1, 1]


def test_receptive_field_of_a_cell_matches_brute_force():
    """The pixels that can change cell (h, w) of the features (the gradient's support, with
    BatchNorm in eval mode and all weights positive so that nothing cancels) lie in rf_box, and
    they reach its edges where the image does not clip it."""
    torch.manual_seed(0)
    feats = ResNetFeatures('resnet18').eval()
    with torch.no_grad():
        for p in feats.parameters():
            p.abs_()
    size = 96
    info = word_layer_rf_info(size, layer_specs(feats))
    assert info[0] == 3 and info[1] == 32
    x = torch.rand(1, 3, size, size, requires_grad=True)
    y = feats(x)
    assert y.shape[-1] == 3
    for h, w in ((0, 0), (1, 2)):
        grad, = torch.autograd.grad(y[0, :, h, w].sum(), x, retain_graph=True)
        support = grad.abs().sum(1)[0] > 0
        ys, xs = support.any(1).nonzero()[:, 0], support.any(0).nonzero()[:, 0]
        h0, h1, w0, w1 = rf_box(info, h, w, size)
        assert h0 <= int(ys.min()) and int(ys.max()) < h1 and w0 <= int(xs.min()) and int(xs.max()) < w1
        # the receptive field of ResNet-18 (435 px) covers a 96 px image from every cell
        assert (h0, h1, w0, w1) == (0, size, 0, size)
        assert (int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())) == (0, size - 1, 0, size - 1)


def test_cell_parts_word_part_counts_and_class_coverage_by_hand():
    """A 2 x 2 grid on 8 px images (4 px cells). Image 0: part 0 fills the top-left cell, part 1
    has 3 pixels and part 0 one pixel in the top-right cell; image 1: no part at all."""
    parts = torch.zeros(2, 2, 8, 8, dtype=torch.bool)
    parts[0, 0, 0:4, 0:4] = True
    parts[0, 1, 0, 4:7] = True
    parts[0, 0, 3, 7] = True
    cells = torch.tensor([[[0, 0, 0], [0, 0, 1], [0, 1, 1]],    # word 0: part 0, part 1, background
                          [[1, 0, 0], [1, 1, 1], [0, 0, 0]]])   # word 1: background, background, part 0
    categories = wm.cell_parts(cells, parts, (2, 2))
    assert categories.tolist() == [[0, 1, 2], [2, 2, 0]]
    counts = wm.word_part_counts(categories, 2)
    assert counts.tolist() == [[1, 1, 1], [1, 0, 2]]
    # classes: class 0 uses word 0 (dominant part 0: ties go to the earlier), class 1 uses word 1 (background)
    weight = torch.tensor([[1.0, -0.2], [0.1, 0.8]])
    use = wm.word_use(weight)
    assert use.tolist() == [[True, False], [False, True]]
    covered = wm.class_part_coverage(use, counts.argmax(dim=1), 2)
    assert covered.tolist() == [[True, False], [False, False]]
    # a word shared by both classes covers its part for both
    shared = wm.class_part_coverage(torch.tensor([[True, False], [True, False]]), torch.tensor([1, 0]), 2)
    assert shared.tolist() == [[False, True], [False, True]]
