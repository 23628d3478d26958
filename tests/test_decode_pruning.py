"""Exit-head vocabulary pruning and the threshold schedule (pure tensor objects)."""
import math

import pytest
import torch

from ltt_exit.decode import PRUNINGS, ThresholdSchedule, keep_best, resolve_pruning
from ltt_exit.decode.pruning import DecayingPruning, FixedPruning, NoPruning
from ltt_exit.decode.schedule import check_thresholds


def test_registry_names():
    assert set(PRUNINGS) == {"none", "fixed", "decaying", "shortlist"}


def test_keep_best_keeps_best_ranked_not_lowest_ids():
    # logits grow with the id: the lowest ids are the worst tokens
    logits = torch.arange(10, dtype=torch.float32).unsqueeze(0)
    ids, values = keep_best(logits, None, 3)
    assert ids.tolist() == [[9, 8, 7]]
    assert values.tolist() == [[9.0, 8.0, 7.0]]
    # with an explicit id set, the kept ids are looked up through it
    set_ids = torch.tensor([[40, 3, 17, 25]])
    set_logits = torch.tensor([[0.1, -2.0, 5.0, 1.0]])
    ids, values = keep_best(set_logits, set_ids, 2)
    assert ids.tolist() == [[17, 25]]
    assert values.tolist() == [[5.0, 1.0]]


def fake_head(table):
    """head(ids) over a fixed (B, V) logit table."""
    calls = []

    def head(ids):
        calls.append(None if ids is None else ids.clone())
        return table if ids is None else table.gather(-1, ids)

    return head, calls


def test_fixed_pruning_selects_top_k_at_j_and_keeps_the_set():
    vocab = 12
    # row 0 prefers high ids, row 1 a scattered set
    layer_j = torch.stack([torch.arange(vocab, dtype=torch.float32), torch.tensor([0, 9, 1, 2, 8, 3, 4, 7, 5, 6, 0, 1.0])])
    head, calls = fake_head(layer_j)
    pruning = FixedPruning(k=3)
    first = pruning.select(2, min_exit_layer=2, num_layers=6, prev_ids=None, head=head)
    assert first.ids.tolist() == [[11, 10, 9], [1, 4, 7]]
    assert first.rows_computed == vocab
    assert calls[0] is None  # the full head at j
    # a later layer with different preferences: same set, logits recomputed only for those 3 rows
    later = torch.randn(2, vocab)
    head, calls = fake_head(later)
    second = pruning.select(3, min_exit_layer=2, num_layers=6, prev_ids=first.ids, head=head)
    assert second.ids is first.ids
    assert torch.equal(second.logits, later.gather(-1, first.ids))
    assert second.rows_computed == 3
    assert calls[0].shape == (2, 3)


def test_fixed_pruning_k_larger_than_vocab_is_clamped():
    head, _ = fake_head(torch.randn(1, 5))
    out = FixedPruning(k=100).select(1, min_exit_layer=1, num_layers=2, prev_ids=None, head=head)
    assert out.ids.shape == (1, 5)


def test_no_pruning_is_the_full_head():
    table = torch.randn(2, 7)
    head, calls = fake_head(table)
    out = NoPruning().select(1, min_exit_layer=1, num_layers=3, prev_ids=None, head=head)
    assert out.ids is None and torch.equal(out.logits, table) and out.rows_computed == 7


@pytest.mark.parametrize(
    "k_max, k_min, num_layers, layer, expected",
    [
        # k_max / (1 + ((k_max - k_min) / k_min) * layer / L), floored, then at least k_min
        (1000, 10, 24, 0, 1000),
        (1000, 10, 24, 1, 195),  # 1000 / 5.125 = 195.1
        (1000, 10, 24, 6, 38),  # 1000 / 25.75 = 38.8
        (1000, 10, 24, 12, 19),  # 1000 / 50.5 = 19.8
        (1000, 10, 24, 24, 10),  # 1000 / 100
        (100, 10, 10, 1, 52),  # 100 / 1.9 = 52.6
        (100, 10, 10, 5, 18),  # 100 / 5.5 = 18.2
        (100, 10, 10, 10, 10),  # exactly 10
        (50, 50, 8, 4, 50),  # k_min = k_max: constant
    ],
)
def test_decaying_schedule_points(k_max, k_min, num_layers, layer, expected):
    assert DecayingPruning(k_max=k_max, k_min=k_min).k_at(layer, num_layers) == expected


def test_decaying_keeps_best_of_previous_set_by_current_logits():
    vocab, num_layers = 40, 4
    pruning = DecayingPruning(k_max=20, k_min=2)
    # 20 / (1 + 9 * 1/4) = 6.15 -> 6 ; 20 / (1 + 9 * 2/4) = 3.6 -> 3
    assert [pruning.k_at(layer, num_layers) for layer in (1, 2)] == [6, 3]
    layer1 = torch.arange(vocab, dtype=torch.float32).unsqueeze(0)  # best: 39, 38, ..., 34
    head, _ = fake_head(layer1)
    first = pruning.select(1, min_exit_layer=1, num_layers=num_layers, prev_ids=None, head=head)
    assert first.ids.tolist() == [[39, 38, 37, 36, 35, 34]]
    # layer 2 reverses the preference: the best *in the previous set* are 34, 35, 36, even though
    # ids 0, 1, 2 score higher at layer 2 (they left the set at layer 1)
    layer2 = -torch.arange(vocab, dtype=torch.float32).unsqueeze(0)
    head, calls = fake_head(layer2)
    second = pruning.select(2, min_exit_layer=1, num_layers=num_layers, prev_ids=first.ids, head=head)
    assert second.ids.tolist() == [[34, 35, 36]]
    assert second.logits.tolist() == [[-34.0, -35.0, -36.0]]
    assert second.rows_computed == 6  # the head ran on the previous set
    assert calls[0].tolist() == first.ids.tolist()


def test_decaying_rows_prune_independently():
    pruning = DecayingPruning(k_max=4, k_min=2)
    table = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0.0, 1, 2, 3, 4, 5]])
    head, _ = fake_head(table)
    out = pruning.select(1, min_exit_layer=1, num_layers=2, prev_ids=None, head=head)  # k(1) = 4/(1+1/2) = 2.67 -> 2
    assert out.ids.tolist() == [[0, 1], [5, 4]]


@pytest.mark.parametrize(
    "spec",
    [("fixed", {"k": 0}), ("fixed", {"k": -3}), ("fixed", {"k": 2.5}), ("decaying", {"k_max": 0}),
     ("decaying", {"k_min": 0}), ("decaying", {"k_max": 5, "k_min": 10})],
)
def test_bad_pruning_parameters(spec):
    with pytest.raises(ValueError):
        resolve_pruning(spec)


def test_resolve_pruning():
    assert isinstance(resolve_pruning("none"), NoPruning)
    assert resolve_pruning(("fixed", {"k": 7})).params() == {"k": 7}
    instance = DecayingPruning(k_max=30, k_min=3)
    assert resolve_pruning(instance) is instance
    with pytest.raises(ValueError, match="unknown pruning 'topp'"):
        resolve_pruning("topp")
    with pytest.raises(ValueError, match="bad parameters"):
        resolve_pruning(("fixed", {"size": 3}))


def test_threshold_schedule():
    constant = ThresholdSchedule(0.0)
    assert constant.value(0.7, 5, 10) == 0.7  # exactly λ, no rounding through 0.9 λ + 0.1 λ
    decaying = ThresholdSchedule(4.0)
    assert decaying.value(0.8, 0, 20) == pytest.approx(0.8)
    assert decaying.value(0.8, 10, 20) == pytest.approx(0.9 * 0.8 + 0.1 * 0.8 * math.exp(-2.0))
    assert decaying.value(0.8, 20, 20) == pytest.approx(0.72 + 0.08 * math.exp(-4.0))
    # λ >= 1 never exits, whatever τ
    assert decaying.value(1.0, 15, 20) == math.inf
    assert decaying.at([1.0, 0.5, 2.0], 3, 10).tolist() == [math.inf, pytest.approx(decaying.value(0.5, 3, 10)), math.inf]
    assert decaying.at([0.5], 0, 4, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="tau"):
        ThresholdSchedule(-1.0)


def test_check_thresholds():
    assert check_thresholds(0.5, 3) == [0.5, 0.5, 0.5]
    assert check_thresholds([0.1, 1.0], 2) == [0.1, 1.0]
    with pytest.raises(ValueError, match="one per row"):
        check_thresholds([0.1, 0.2, 0.3], 2)
    with pytest.raises(ValueError, match=">= 0"):
        check_thresholds(float("nan"), 1)
    with pytest.raises(ValueError, match=">= 0"):
        check_thresholds([0.5, -0.1], 2)
    with pytest.raises(TypeError):
        check_thresholds("high", 1)
