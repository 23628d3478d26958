"""Family-wise error procedures: fixed-sequence (and its off-by-one trap), multi-start, Bonferroni, Holm."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from statsmodels.stats.multitest import multipletests

from ltt_exit.certify import PROCEDURES, get_procedure
from ltt_exit.certify.procedures import Bonferroni, FixedSequence, Holm, MultiStart, Procedure

EPS = 0.05

pvalue_lists = st.lists(
    st.one_of(st.floats(0, 1), st.sampled_from([0.0, EPS, 0.01, 0.0125, 0.025, 1.0])), min_size=1, max_size=25
)


# ---------------------------------------------------------------------------- fixed sequence

def test_fixed_sequence_stops_at_first_non_rejection_exact_example():
    # p_3 = 0.5 > ε stops the sequence: H_1, H_2 rejected; H_4 is *not*, although p_4 ≤ ε.
    # The last rejected hypothesis is H_2 (index 1) — not H_3 (the first failure) and not H_1.
    p = [0.01, 0.02, 0.5, 0.01]
    assert FixedSequence().select(p, EPS).tolist() == [True, True, False, False]


def test_fixed_sequence_boundary_p_equal_to_epsilon_is_rejected():
    p = [0.0, EPS, np.nextafter(EPS, 1.0), 0.0]
    assert FixedSequence().select(p, EPS).tolist() == [True, True, False, False]


def test_fixed_sequence_rejects_nothing_when_first_fails():
    assert not FixedSequence().select([0.2, 0.0, 0.0], EPS).any()


def test_fixed_sequence_rejects_everything_when_all_pass():
    assert FixedSequence().select([0.0, 0.01, 0.049], EPS).all()


@given(p=pvalue_lists)
@settings(max_examples=200, deadline=None)
def test_fixed_sequence_never_certifies_past_first_non_rejection(p):
    mask = FixedSequence().select(p, EPS)
    failures = [j for j, value in enumerate(p) if value > EPS]
    first_failure = failures[0] if failures else len(p)
    assert mask.tolist() == [j < first_failure for j in range(len(p))]


# ---------------------------------------------------------------------------- multi-start

def test_multi_start_exact_example():
    # K = 9, s = 3 → starts ⌊i·9/3⌋ = 0, 3, 6, each a fixed sequence at level ε/3 ≈ 0.0167.
    #   start 0: 0.001, 0.002 pass, 0.03 > ε/3 stops       → {0, 1}
    #   start 3: 0.04 > ε/3 fails at once                    → {}
    #   start 6: 0.01, 0.016 pass, 0.02 > ε/3 (end of grid)  → {6, 7}
    p = [0.001, 0.002, 0.03, 0.04, 0.0, 0.0, 0.01, 0.016, 0.02]
    procedure = MultiStart(starts=3)
    assert procedure.indices(9) == [0, 3, 6]
    assert procedure.select(p, EPS).tolist() == [True, True, False, False, False, False, True, True, False]
    assert procedure.describe(9) == {"name": "multi-start", "params": {"starts": 3, "start_indices": [0, 3, 6]}}


def test_multi_start_runs_overlap_and_union():
    # A run from start 0 may pass start 3; the union is still each index at most once.
    p = [0.0] * 6
    assert MultiStart(starts=2).select(p, EPS).all()


def test_multi_start_with_more_starts_than_candidates_uses_distinct_starts():
    # K = 2, s = 5 → starts {0, 1}; the level is ε/2, not ε/5.
    procedure = MultiStart(starts=5)
    assert procedure.indices(2) == [0, 1]
    p = [0.02, 0.9]  # 0.02 ≤ ε/2 = 0.025 but > ε/5 = 0.01
    assert procedure.select(p, EPS).tolist() == [True, False]


def test_multi_start_with_one_start_is_fixed_sequence():
    rng = np.random.default_rng(0)
    p = rng.random((200, 12)) * 0.1
    assert np.array_equal(MultiStart(starts=1).select(p, EPS), FixedSequence().select(p, EPS))


def test_multi_start_explicit_start_indices():
    procedure = MultiStart(start_indices=[4, 0])
    assert procedure.indices(6) == [0, 4]
    p = [0.9, 0.0, 0.0, 0.0, 0.01, 0.02]  # level ε/2 = 0.025
    assert procedure.select(p, EPS).tolist() == [False, False, False, False, True, True]
    with pytest.raises(ValueError, match="outside the grid"):
        MultiStart(start_indices=[0, 7]).select(p, EPS)
    with pytest.raises(ValueError):
        MultiStart(start_indices=[1, 1])
    with pytest.raises(ValueError):
        MultiStart(starts=0)


@given(p=pvalue_lists, starts=st.integers(1, 6))
@settings(max_examples=150, deadline=None)
def test_multi_start_is_union_of_fixed_sequences_at_reduced_level(p, starts):
    k = len(p)
    indices = sorted({(i * k) // starts for i in range(starts)})
    level = EPS / len(indices)
    expected = [False] * k
    for start in indices:
        for j in range(start, k):
            if p[j] > level:
                break
            expected[j] = True
    assert MultiStart(starts=starts).select(p, EPS).tolist() == expected


# ---------------------------------------------------------------------------- Bonferroni / Holm

def slow_holm(p, epsilon):
    # Holm (1979), written out: sort ascending, compare the i-th smallest (i = 0..K-1) with
    # ε/(K - i), stop at the first failure; everything before it is rejected.
    k = len(p)
    order = sorted(range(k), key=lambda j: p[j])
    rejected = [False] * k
    for rank, j in enumerate(order):
        if p[j] > epsilon / (k - rank):
            break
        rejected[j] = True
    return rejected


@st.composite
def pvalue_batches(draw):
    # Several families of the same size K at once: the 2-D (batched) code path.
    k = draw(st.integers(1, 20))
    element = st.one_of(st.floats(0, 1), st.sampled_from([0.0, EPS, 0.01, 0.0125, 0.025, 1.0]))
    return draw(st.lists(st.lists(element, min_size=k, max_size=k), min_size=1, max_size=8))


@given(batch=pvalue_batches())
@settings(max_examples=200, deadline=None)
def test_holm_and_bonferroni_against_independent_rules_batched(batch):
    holm = Holm().select(batch, EPS)
    bonferroni = Bonferroni().select(batch, EPS)
    for row, p in enumerate(batch):
        assert holm[row].tolist() == slow_holm(p, EPS)
        assert bonferroni[row].tolist() == [value <= EPS / len(p) for value in p]


def test_holm_and_bonferroni_single_family_against_independent_rules():
    # One family (1-D) goes through statsmodels' multipletests itself; it runs a full garbage
    # collection per call, so this path gets a fixed set of cases rather than hypothesis.
    rng = np.random.default_rng(4)
    for case in range(25):
        k = int(rng.integers(1, 15))
        p = np.where(rng.random(k) < 0.6, rng.choice([0.0, 0.0125, EPS / 3, 0.02, 0.03], k), rng.random(k)).tolist()
        assert Holm().select(p, EPS).tolist() == slow_holm(p, EPS), p
        assert Bonferroni().select(p, EPS).tolist() == [value <= EPS / k for value in p], p


@given(batch=pvalue_batches())
@settings(max_examples=200, deadline=None)
def test_bonferroni_subset_of_holm(batch):
    bonferroni = Bonferroni().select(batch, EPS)
    holm = Holm().select(batch, EPS)
    assert not np.any(bonferroni & ~holm)


def test_holm_exact_example():
    # K = 4, sorted p: 0.01 ≤ ε/4 = 0.0125 ✓, 0.016 ≤ ε/3 ≈ 0.0167 ✓, 0.03 > ε/2 = 0.025 ✗ → stop.
    # Bonferroni (ε/4 for all) rejects only 0.01.
    p = [0.03, 0.01, 0.9, 0.016]
    assert Holm().select(p, EPS).tolist() == [False, True, False, True]
    assert Bonferroni().select(p, EPS).tolist() == [False, True, False, False]


def test_batched_paths_equal_statsmodels_row_by_row():
    rng = np.random.default_rng(1)
    p = np.where(rng.random((300, 15)) < 0.5, rng.random((300, 15)) * 0.02, rng.random((300, 15)))
    p[:5, :3] = 0.0125  # ties exactly at thresholds
    for procedure, method in ((Holm(), "holm"), (Bonferroni(), "bonferroni")):
        batched = procedure.select(p, EPS)
        rows = np.array([multipletests(row, alpha=EPS, method=method)[0] for row in p[:25]])
        assert np.array_equal(batched[:25], rows), method
        assert np.array_equal(batched[7], procedure.select(p[7], EPS))


@pytest.mark.parametrize("name", list(PROCEDURES))
def test_batched_select_equals_per_row(name):
    rng = np.random.default_rng(2)
    p = rng.random((20, 9)) * 0.08
    procedure = get_procedure(name)
    batched = procedure.select(p.reshape(4, 5, 9), EPS).reshape(20, 9)
    for row in range(20):
        assert np.array_equal(batched[row], procedure.select(p[row], EPS))


# ---------------------------------------------------------------------------- registry

def test_registry_and_instances():
    assert list(PROCEDURES) == ["fixed-sequence", "multi-start", "bonferroni", "holm"]
    assert isinstance(get_procedure("holm"), Holm)
    assert get_procedure("multi-start", starts=4).starts == 4
    instance = MultiStart(starts=7)
    assert get_procedure(instance) is instance
    with pytest.raises(ValueError, match="unknown procedure"):
        get_procedure("benjamini-hochberg")
    with pytest.raises(ValueError, match="bad parameters"):
        get_procedure("holm", starts=3)


def test_custom_procedure_behind_the_interface():
    class RejectNothing(Procedure):
        name = "reject-nothing"

        def _select(self, pvalues, epsilon):
            return np.zeros(pvalues.shape, dtype=bool)

    assert not get_procedure(RejectNothing()).select([0.0, 0.0], EPS).any()


@pytest.mark.parametrize("bad", [[np.nan], [1.2], [-0.1], []])
def test_bad_pvalues_rejected(bad):
    with pytest.raises(ValueError):
        FixedSequence().select(bad, EPS)


@pytest.mark.parametrize("epsilon", [0.0, 1.0, 2.0])
def test_bad_epsilon_rejected(epsilon):
    with pytest.raises(ValueError, match="epsilon"):
        Holm().select([0.1], epsilon)
