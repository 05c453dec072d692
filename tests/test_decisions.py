"""The decision comparison of tests/decisions.py on hand-made recordings: exact where a decision
is not a near-tie, near-ties counted, rank slices put back in the global order."""
import pytest
import torch

from tests import decisions

TIGHT, LOOSE, NEAR = 1e-3, 0.5, 1e-2


def recorded(logits, labels, min_distances=None):
    logits = torch.tensor(logits, dtype=torch.float64)
    far = torch.ones(len(labels), 2, dtype=torch.float64)  # every image 1 away from both words
    return {'logits': logits, 'labels': torch.tensor(labels),
            'min_distances': far if min_distances is None else torch.tensor(min_distances, dtype=torch.float64)}


def test_top_two_margin_by_hand():
    margins = decisions.top_two_margin(torch.tensor([[1.0, 3.0, 2.5], [0.0, -1.0, -4.0]]))
    assert margins.tolist() == pytest.approx([0.5, 1.0])


def test_equal_runs_count_their_right_decisions():
    a = recorded([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]], [0, 0, 0])
    assert decisions.compare_decisions([a], [a], TIGHT, LOOSE, NEAR) == [(2, 2, 0, 0)]


def test_a_flipped_near_tie_is_skipped_and_counted():
    # image 0: margin 1e-4 < 2 * TIGHT, and run b flips it within the tolerance
    a = recorded([[1.0001, 1.0], [0.0, 1.0]], [0, 1])
    b = recorded([[1.0, 1.0001], [0.0, 1.0]], [0, 1])
    assert decisions.compare_decisions([a], [b], TIGHT, LOOSE, NEAR) == [(2, 1, 1, 1)]


def test_a_flipped_decision_that_is_no_tie_fails():
    # margin 3e-3 >= 2 * TIGHT: logits within 1e-3 cannot flip it, so a flip is a real difference
    a = recorded([[1.003, 1.0]], [0])
    b = recorded([[1.0, 1.003]], [0])
    with pytest.raises(AssertionError, match='pass 0, image 0: logits differ by 0.003'):
        decisions.compare_decisions([a], [b], TIGHT, LOOSE, NEAR)
    # within a tolerance of 3e-3 the same pair is a near-tie (margin < 6e-3)
    assert decisions.compare_decisions([a], [b], 3e-3, LOOSE, NEAR) == [(1, 0, 1, 1)]


def test_an_image_at_a_word_gets_the_loose_tolerance():
    # image 0 sits at a word (d_min 0 < NEAR): 0.3 apart is allowed there, not at image 1 (d_min 1)
    a = recorded([[5.0, 1.0], [2.0, 0.0]], [0, 0], [[0.0, 3.0], [1.0, 2.0]])
    b = recorded([[5.3, 1.0], [2.0, 0.0]], [0, 0], [[0.0, 3.0], [1.0, 2.0]])
    assert decisions.compare_decisions([a], [b], TIGHT, LOOSE, NEAR) == [(2, 2, 0, 0)]
    c = recorded([[5.0, 1.0], [2.3, 0.0]], [0, 0], [[0.0, 3.0], [1.0, 2.0]])
    with pytest.raises(AssertionError, match='image 1: logits differ by 0.3'):
        decisions.compare_decisions([a], [c], TIGHT, LOOSE, NEAR)


def test_other_images_or_another_number_of_passes_fail():
    a = recorded([[1.0, 0.0]], [0])
    with pytest.raises(AssertionError, match='other images'):
        decisions.compare_decisions([a], [recorded([[1.0, 0.0]], [1])], TIGHT, LOOSE, NEAR)
    with pytest.raises(AssertionError):
        decisions.compare_decisions([a], [a, a], TIGHT, LOOSE, NEAR)


def batch(logits, labels):
    n = len(labels)
    return (torch.as_tensor(logits, dtype=torch.float64), torch.tensor(labels), torch.zeros(n, 2, dtype=torch.float64))


def test_load_puts_rank_slices_in_global_order(tmp_path):
    """A pass summed over ranks: global batch k is rank 0's slice, then rank 1's (empty for a
    stand-in); a pass every rank ran whole is rank 0's."""
    out = str(tmp_path / 'run')
    rank0 = [{'across_ranks': True, 'batches': [batch([[0.0, 1.0]], [10]), batch([[2.0, 0.0]], [12])]},
             {'across_ranks': False, 'batches': [batch([[1.0, 0.0]] * 3, [20, 21, 22])]}]
    rank1 = [{'across_ranks': True, 'batches': [batch([[0.0, 3.0]], [11]), batch(torch.zeros(0, 2), [])]},
             {'across_ranks': False, 'batches': [batch([[9.0, 0.0]] * 3, [20, 21, 22])]}]
    torch.save(rank0, out + '.rank0')
    torch.save(rank1, out + '.rank1')
    passes = decisions.load(out, processes=2)
    assert passes[0]['labels'].tolist() == [10, 11, 12]
    assert passes[0]['logits'][:, 1].tolist() == [1.0, 3.0, 0.0]
    assert passes[1]['labels'].tolist() == [20, 21, 22] and passes[1]['logits'][0, 0] == 1.0


def test_recording_sees_every_counted_decision(tmp_path, monkeypatch):
    """The recorder keeps each counted batch with the distances combine_losses saw (cut to the
    counted rows, as for a stand-in), closes a pass at pass_metrics, returns what the wrapped
    functions return and puts them back afterwards."""
    import train_and_test as tnt
    monkeypatch.setattr(tnt, 'combine_losses', lambda logits, min_distances, *rest: {'total': 0})
    monkeypatch.setattr(tnt, 'pass_metrics', lambda *args, across_ranks=False: {'across': across_ranks})
    stubs = tnt.combine_losses, tnt.pass_metrics, tnt.count_correct
    out = str(tmp_path / 'run')
    logits, labels = torch.tensor([[0.2, 0.9], [0.7, 0.1]]), torch.tensor([1, 1])
    with decisions.recording(out):
        assert tnt.combine_losses(logits, torch.tensor([[0.5, 2.0], [1.5, 0.25]]), labels) == {'total': 0}
        assert int(tnt.count_correct(logits, labels)) == 1
        assert tnt.combine_losses(logits, torch.tensor([[3.0, 4.0], [5.0, 6.0]]), labels) == {'total': 0}
        assert int(tnt.count_correct(logits[:0], labels[:0])) == 0  # a stand-in: nothing counted
        assert tnt.pass_metrics('net', across_ranks=True) == {'across': True}
    assert (tnt.combine_losses, tnt.pass_metrics, tnt.count_correct) == stubs
    passes = decisions.load(out)
    assert len(passes) == 1 and passes[0]['labels'].tolist() == [1, 1]
    assert passes[0]['min_distances'].tolist() == [[0.5, 2.0], [1.5, 0.25]]
    assert passes[0]['logits'].dtype == torch.float64


def test_tolerance_per_pass():
    # 0.01 apart: beyond a tight tolerance of 1e-3 in pass 0, within 0.05 in pass 1
    a = recorded([[1.0, 0.0]], [0])
    b = recorded([[1.01, 0.0]], [0])
    assert decisions.compare_decisions([a, a], [a, b], [TIGHT, 0.05], LOOSE, NEAR) == [(1, 1, 0, 0)] * 2
    with pytest.raises(AssertionError, match='pass 1, image 0'):
        decisions.compare_decisions([a, a], [a, b], [0.05, TIGHT], LOOSE, NEAR)


def row(phase, split, accuracy, cross_entropy):
    return {'epoch': '0', 'phase': phase, 'split': split, 'iteration': '', 'accuracy': repr(accuracy),
            'cross_entropy': repr(cross_entropy)}


def test_same_training_ties_each_logged_accuracy_to_its_decisions():
    """A logged accuracy that is not the share of the pass's recorded decisions (a rank's rows
    left out of the count, say) fails, and so does a loss beyond its tolerance."""
    decided = recorded([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]], [0, 0, 0])  # 2 of 3 right
    rows = [row('warm', 'train', 2 / 3, 1.0)]
    assert decisions.assert_same_training(rows, rows, [decided], [decided], 'same') == 0
    with pytest.raises(AssertionError):
        decisions.assert_same_training(rows, [row('warm', 'train', 1 / 2, 1.0)], [decided], [decided], 'a rank left out')
    with pytest.raises(AssertionError, match='cross_entropy'):  # 1e-4 before the first push
        decisions.assert_same_training(rows, [row('warm', 'train', 2 / 3, 1.001)], [decided], [decided], 'loss')
    assert decisions.loss_tolerance('cross_entropy', 'train', True) == 1e-1
    assert decisions.loss_tolerance('l1', 'train', True) == 1e-4
