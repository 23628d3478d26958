"""p-values for H_j: E[L(λ_j)] > δ — hand-derived values, an independent slow implementation,
edge cases and properties."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ltt_exit.certify import PVALUES, get_pvalue, wsr_pvalues_in_order
from ltt_exit.certify.pvalues import (
    WSR,
    Bentkus,
    Binomial,
    Hoeffding,
    HoeffdingBentkus,
    HoeffdingKL,
    RiskPValue,
)

E = math.e


# ---------------------------------------------------------------------------- slow reference
# Written from the formulas in DESIGN.md §3 with the standard library only (no numpy / scipy):
# exact rational arithmetic for n·R̂ and its ceiling, math.comb for binomial tails, plain loops.

def slow_binom_cdf(k: int, n: int, p: float) -> float:
    return math.fsum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(0, min(k, n) + 1))


def slow_h1(a: float, b: float) -> float:
    first = 0.0 if a == 0 else a * math.log(a / b)
    second = 0.0 if a == 1 else (1 - a) * math.log((1 - a) / (1 - b))
    return first + second


def slow_pvalue(kind: str, column: list[float], delta: float, epsilon: float = 0.1) -> float:
    n = len(column)
    exact_total = sum(Fraction(x) for x in column)  # floats are exact rationals
    risk = float(exact_total / n)
    if kind == "hoeffding":
        p = math.exp(-2 * n * max(0.0, delta - risk) ** 2)
    elif kind == "hoeffding-kl":
        p = math.exp(-n * slow_h1(min(risk, delta), delta))
    elif kind == "bentkus":
        p = E * slow_binom_cdf(math.ceil(exact_total), n, delta)
    elif kind == "hoeffding-bentkus":
        p = min(slow_pvalue("hoeffding-kl", column, delta), slow_pvalue("bentkus", column, delta))
    elif kind == "binomial":
        assert exact_total.denominator == 1
        p = slow_binom_cdf(int(exact_total), n, delta)
    elif kind == "wsr":
        p = slow_wsr(column, delta, epsilon)
    else:
        raise AssertionError(kind)
    return min(1.0, max(0.0, p))


def slow_wsr(column: list[float], delta: float, epsilon: float) -> float:
    n = len(column)
    running_sum = 0.0
    running_dev2 = 0.0
    var_prev = 0.25  # σ̂²_0
    wealth = 1.0
    best = -math.inf
    for t, x in enumerate(column, start=1):
        nu = min(1.0, math.sqrt(2 * math.log(1 / epsilon) / (n * var_prev)))
        wealth *= 1 - nu * (x - delta)
        best = max(best, wealth)
        running_sum += x
        mu = (0.5 + running_sum) / (t + 1)
        running_dev2 += (x - mu) ** 2
        var_prev = (0.25 + running_dev2) / (t + 1)
    return min(1.0, 1.0 / best)


# ---------------------------------------------------------------------------- hand-computed values

def test_hand_computed_binary_example():
    # n = 10 examples, one loss of 1 → R̂ = 0.1; δ = 0.3.
    #   Hoeffding:  exp(-2·10·(0.3-0.1)²) = exp(-0.8)
    #   Hoeffding-KL: h1(0.1, 0.3) = 0.1 ln(0.1/0.3) + 0.9 ln(0.9/0.7); p = exp(-10 h1) ≈ 0.31248
    #   binomial:   P[Bin(10, 0.3) ≤ 1] = 0.7^10 + 10·0.3·0.7^9 ≈ 0.14931
    #   Bentkus:    ⌈10·0.1⌉ = 1 → e · 0.14931 ≈ 0.40586
    #   HB:         min(0.31248, 0.40586) = 0.31248
    losses = np.zeros((10, 1))
    losses[3, 0] = 1.0
    delta = 0.3
    binomial_tail = 0.7**10 + 10 * 0.3 * 0.7**9
    h1 = 0.1 * math.log(0.1 / 0.3) + 0.9 * math.log(0.9 / 0.7)
    expected = {
        "hoeffding": math.exp(-0.8),
        "hoeffding-kl": math.exp(-10 * h1),
        "binomial": binomial_tail,
        "bentkus": E * binomial_tail,
        "hoeffding-bentkus": math.exp(-10 * h1),
    }
    assert expected["hoeffding-kl"] == pytest.approx(0.31248, abs=1e-5)
    assert binomial_tail == pytest.approx(0.1493083, abs=1e-7)
    for name, value in expected.items():
        assert PVALUES[name]()(losses, delta)[0] == pytest.approx(value, rel=1e-12), name


def test_hand_computed_continuous_example_uses_the_ceiling():
    # n = 20 losses summing to 1.5 → R̂ = 0.075, δ = 0.3.
    #   Bentkus rounds n·R̂ = 1.5 *up* to 2: e · P[Bin(20, 0.3) ≤ 2]
    #     = e · (0.7^20 + 20·0.3·0.7^19 + 190·0.09·0.7^18)
    #   Hoeffding: exp(-2·20·0.225²) = exp(-2.025)
    losses = np.zeros((20, 1))
    losses[:3, 0] = 0.5
    tail_2 = 0.7**20 + 20 * 0.3 * 0.7**19 + 190 * 0.09 * 0.7**18
    tail_1 = 0.7**20 + 20 * 0.3 * 0.7**19
    p = Bentkus()(losses, 0.3)[0]
    assert p == pytest.approx(E * tail_2, rel=1e-12)
    assert p != pytest.approx(E * tail_1, rel=1e-3)  # rounding down would be anti-conservative
    assert Hoeffding()(losses, 0.3)[0] == pytest.approx(math.exp(-2.025), rel=1e-12)
    with pytest.raises(ValueError, match="0, 1"):
        Binomial()(losses, 0.3)


def test_wsr_hand_computed_two_examples():
    # n = 2, δ = 0.5, ε = exp(-1/16) so that 2 ln(1/ε)/n = 1/16.
    #   t=1: σ̂²_0 = 1/4 → ν_1 = sqrt((1/16)/(1/4)) = 1/2;  x_1 = 0 → K_1 = 1 - ½(0 - ½) = 5/4
    #        μ̂_1 = (½ + 0)/2 = ¼;  σ̂²_1 = (¼ + (0 - ¼)²)/2 = 5/32
    #   t=2: ν_2 = sqrt((1/16)/(5/32)) = sqrt(2/5)
    #        x_2 = 1 → K_2 = 5/4 · (1 - ½ sqrt(2/5)) ≈ 0.8547 < K_1 → p = 1/K_1 = 0.8
    #        x_2 = 0 → K_2 = 5/4 · (1 + ½ sqrt(2/5)) ≈ 1.6453 → p = 1/K_2 ≈ 0.6078
    epsilon = math.exp(-1 / 16)
    losses = np.array([[0.0, 0.0], [1.0, 0.0]])  # column 0: (0, 1); column 1: (0, 0)
    p = wsr_pvalues_in_order(losses, 0.5, epsilon)
    assert p[0] == pytest.approx(0.8, rel=1e-12)
    assert p[1] == pytest.approx(1 / (1.25 * (1 + 0.5 * math.sqrt(0.4))), rel=1e-12)
    assert p[1] == pytest.approx(0.6078, abs=1e-4)


def test_wsr_single_example():
    # n = 1, ε = 0.05: ν_1 = min(1, sqrt(2 ln 20 / ¼)) = 1.
    #   x = 0 → K_1 = 1 + δ → p = 1/(1 + δ);  x = 1 → K_1 = δ → p = 1.
    losses = np.array([[0.0, 1.0]])
    p = wsr_pvalues_in_order(losses, 0.2, 0.05)
    assert p[0] == pytest.approx(1 / 1.2, rel=1e-12)
    assert p[1] == 1.0


# ---------------------------------------------------------------------------- edge cases (Bentkus / HB)

@pytest.mark.parametrize("n", [1, 2, 7, 50])
@pytest.mark.parametrize("delta", [0.05, 0.3, 0.9])
def test_zero_empirical_risk(n, delta):
    # R̂ = 0: ⌈0⌉ = 0 so Bentkus = e (1-δ)^n (capped at 1); h1(0, δ) = -ln(1-δ) so KL = (1-δ)^n;
    # HB = min of the two = (1-δ)^n; exact binomial = (1-δ)^n.
    losses = np.zeros((n, 1))
    q = (1 - delta) ** n
    assert Bentkus()(losses, delta)[0] == pytest.approx(min(1.0, E * q), rel=1e-12)
    assert HoeffdingKL()(losses, delta)[0] == pytest.approx(q, rel=1e-12)
    assert HoeffdingBentkus()(losses, delta)[0] == pytest.approx(q, rel=1e-12)
    assert Binomial()(losses, delta)[0] == pytest.approx(q, rel=1e-12)
    assert Hoeffding()(losses, delta)[0] == pytest.approx(math.exp(-2 * n * delta**2), rel=1e-12)


@pytest.mark.parametrize("n", [1, 3, 40])
@pytest.mark.parametrize("excess", [0.0, 0.05, 0.5])
def test_empirical_risk_at_or_above_delta_gives_one(n, excess):
    # R̂ ≥ δ: Hoeffding and KL have a zero exponent; Bentkus ≥ e · P[Bin(n,δ) ≤ nδ] ≥ e/2 > 1.
    delta = 0.3
    value = min(1.0, delta + excess)
    losses = np.full((n, 1), value)
    for kind in (Hoeffding(), HoeffdingKL(), Bentkus(), HoeffdingBentkus()):
        assert kind(losses, delta)[0] == 1.0, kind


def test_binomial_at_risk_equal_delta_is_the_exact_tail_not_one():
    # The exact test does not jump to 1 at R̂ = δ: P[Bin(10, 0.3) ≤ 3].
    losses = np.zeros((10, 1))
    losses[:3] = 1.0
    assert Binomial()(losses, 0.3)[0] == pytest.approx(slow_binom_cdf(3, 10, 0.3), rel=1e-12)
    assert Binomial()(losses, 0.3)[0] < 1.0


def test_n_equals_one_with_a_fractional_loss():
    # n = 1, R̂ = 0.3, δ = 0.5: ⌈0.3⌉ = 1 → Bentkus = e·1 → 1;
    # KL: h1(0.3, 0.5) = 0.3 ln 0.6 + 0.7 ln 1.4 → HB = exp(-h1) ≈ 0.921.
    losses = np.array([[0.3]])
    h1 = 0.3 * math.log(0.6) + 0.7 * math.log(1.4)
    assert Bentkus()(losses, 0.5)[0] == 1.0
    assert HoeffdingBentkus()(losses, 0.5)[0] == pytest.approx(math.exp(-h1), rel=1e-12)
    assert math.exp(-h1) == pytest.approx(0.921, abs=1e-3)


def test_ceiling_absorbs_float_summation_error():
    # 0.2 + 0.4 + 0.3 + 0.1 is exactly 1 in decimal but sums to 1.0000000000000002 in floats;
    # ⌈n R̂⌉ must be 1, not 2.
    losses = np.array([[0.2], [0.4], [0.3], [0.1]])
    assert losses.sum() > 1.0  # the floating-point artefact this test is about
    assert Bentkus()(losses, 0.6)[0] == pytest.approx(E * slow_binom_cdf(1, 4, 0.6), rel=1e-12)


def test_bentkus_equals_e_times_binomial_on_binary_losses():
    rng = np.random.default_rng(3)
    losses = (rng.random((60, 12)) < np.linspace(0, 0.5, 12)).astype(float)
    assert np.allclose(Bentkus()(losses, 0.2), np.minimum(1.0, E * Binomial()(losses, 0.2)), rtol=1e-12)


def test_bentkus_is_not_monotone_in_n_for_a_fixed_fractional_risk():
    # Documented behaviour (docs/certification.md): because of ⌈n R̂⌉, Bentkus can *increase* with n
    # at fixed R̂. R̂ = 0.1, δ = 0.3: n = 20 → ⌈2⌉ = 2, n = 21 → ⌈2.1⌉ = 3:
    # e·P[Bin(20,.3) ≤ 2] ≈ e·0.0355 ≈ 0.096  <  e·P[Bin(21,.3) ≤ 3] ≈ e·0.0856 ≈ 0.233.
    small = Bentkus().from_risk(0.1, 20, 0.3)
    large = Bentkus().from_risk(0.1, 21, 0.3)
    assert small == pytest.approx(E * slow_binom_cdf(2, 20, 0.3), rel=1e-12)
    assert large == pytest.approx(E * slow_binom_cdf(3, 21, 0.3), rel=1e-12)
    assert small == pytest.approx(0.0965, abs=1e-4) and large == pytest.approx(0.2327, abs=1e-4)


# ---------------------------------------------------------------------------- independent implementation

loss_values = st.one_of(
    st.floats(0.0, 1.0, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 1.0, 0.5, 0.1, 0.2, 0.3]),
)


@st.composite
def loss_tables(draw, binary=False, max_n=40, max_k=4):
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(1, max_k))
    element = st.sampled_from([0.0, 1.0]) if binary else loss_values
    values = draw(st.lists(st.lists(element, min_size=k, max_size=k), min_size=n, max_size=n))
    return np.array(values, dtype=np.float64)


deltas = st.floats(0.01, 0.99)


@pytest.mark.parametrize("kind", ["hoeffding", "hoeffding-kl", "bentkus", "hoeffding-bentkus"])
@given(losses=loss_tables(), delta=deltas)
@settings(max_examples=60, deadline=None)
def test_matches_slow_reference_bounded(kind, losses, delta):
    fast = PVALUES[kind]()(losses, delta)
    slow = [slow_pvalue(kind, losses[:, j].tolist(), delta) for j in range(losses.shape[1])]
    assert np.allclose(fast, slow, rtol=1e-9, atol=1e-12)


@given(losses=loss_tables(binary=True), delta=deltas)
@settings(max_examples=60, deadline=None)
def test_binomial_matches_slow_reference(losses, delta):
    fast = Binomial()(losses, delta)
    slow = [slow_pvalue("binomial", losses[:, j].tolist(), delta) for j in range(losses.shape[1])]
    assert np.allclose(fast, slow, rtol=1e-9, atol=1e-12)


@given(losses=loss_tables(max_n=60), delta=deltas, epsilon=st.floats(0.001, 0.5))
@settings(max_examples=60, deadline=None)
def test_wsr_in_order_matches_slow_reference(losses, delta, epsilon):
    fast = wsr_pvalues_in_order(losses, delta, epsilon)
    slow = [slow_wsr(losses[:, j].tolist(), delta, epsilon) for j in range(losses.shape[1])]
    assert np.allclose(fast, slow, rtol=1e-9, atol=1e-12)


def test_wsr_wide_and_narrow_code_paths_agree_with_slow_reference():
    # ≥ 32 candidates use the row-block scan, fewer the transposed cumulative sums.
    rng = np.random.default_rng(7)
    losses = rng.random((700, 70)) * rng.random(70)
    wide = WSR()(losses, 0.15, epsilon=0.05, seed=11)
    narrow = np.concatenate([WSR()(losses[:, j:j + 5], 0.15, epsilon=0.05, seed=11) for j in range(0, 70, 5)])
    order = np.random.default_rng(11).permutation(700)
    slow = [slow_wsr(losses[order, j].tolist(), 0.15, 0.05) for j in range(70)]
    assert np.allclose(wide, slow, rtol=1e-9, atol=1e-300)
    assert np.allclose(narrow, slow, rtol=1e-9, atol=1e-300)


def test_wsr_shuffle_is_seeded_and_recorded_by_seed():
    rng = np.random.default_rng(0)
    losses = rng.random((300, 3)) * 0.4
    a = WSR()(losses, 0.2, epsilon=0.05, seed=5)
    b = WSR()(losses, 0.2, epsilon=0.05, seed=5)
    c = WSR()(losses, 0.2, epsilon=0.05, seed=6)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    order = np.random.default_rng(5).permutation(300)
    assert np.allclose(a, wsr_pvalues_in_order(losses[order], 0.2, 0.05), rtol=1e-13)


def test_wsr_needs_epsilon():
    with pytest.raises(ValueError, match="epsilon"):
        WSR()(np.zeros((3, 1)), 0.2)


# ---------------------------------------------------------------------------- properties

@pytest.mark.parametrize("kind", list(PVALUES))
@given(data=st.data(), delta=deltas)
@settings(max_examples=40, deadline=None)
def test_pvalues_lie_in_unit_interval(kind, data, delta):
    losses = data.draw(loss_tables(binary=kind == "binomial"))
    p = PVALUES[kind]()(losses, delta, epsilon=0.05, seed=1)
    assert p.shape == (losses.shape[1],)
    assert np.all((p >= 0) & (p <= 1))


@pytest.mark.parametrize("kind", ["hoeffding", "hoeffding-kl", "bentkus", "hoeffding-bentkus"])
@given(n=st.integers(1, 500), delta=deltas, risks=st.lists(st.floats(0, 1), min_size=2, max_size=30))
@settings(max_examples=80, deadline=None)
def test_nondecreasing_in_empirical_risk(kind, n, delta, risks):
    risks = np.sort(np.array(risks))
    p = PVALUES[kind]().from_risk(risks, n, delta)
    assert np.all(np.diff(p) >= -1e-15)


@given(n=st.integers(1, 500), delta=deltas, data=st.data())
@settings(max_examples=80, deadline=None)
def test_binomial_nondecreasing_in_failure_count(n, delta, data):
    counts = np.sort(np.array(data.draw(st.lists(st.integers(0, n), min_size=2, max_size=30))))
    p = Binomial().from_risk(counts / n, n, delta)
    assert np.all(np.diff(p) >= -1e-15)


@pytest.mark.parametrize("kind", ["hoeffding", "hoeffding-kl"])
@given(delta=deltas, fraction=st.floats(0, 1, exclude_max=True))
@settings(max_examples=80, deadline=None)
def test_smooth_bounds_nonincreasing_in_n(kind, delta, fraction):
    risk = fraction * delta  # R̂ < δ
    p = PVALUES[kind]().from_risk(np.full(400, risk), np.arange(1, 401), delta)
    assert np.all(np.diff(p) <= 1e-15)


@pytest.mark.parametrize("kind", ["bentkus", "hoeffding-bentkus", "binomial"])
@given(delta=deltas, data=st.data())
@settings(max_examples=80, deadline=None)
def test_binomial_tail_bounds_nonincreasing_in_n_along_whole_counts(kind, delta, data):
    # For the ceiling-based p-values, fix R̂ = a/b < δ and let n = b·t, so that n·R̂ = a·t is whole.
    b = data.draw(st.integers(1, 30))
    a = data.draw(st.integers(0, b - 1))
    if a / b >= delta:
        a = int(math.floor(delta * b - 1e-9))
        if a < 0 or a / b >= delta:
            return
    t = np.arange(1, 60)
    p = PVALUES[kind]().from_risk(np.full(t.size, a / b), b * t, delta)
    assert np.all(np.diff(p) <= 1e-12)


# ---------------------------------------------------------------------------- registry and input checks

def test_registry_names_alias_and_instances():
    assert list(PVALUES) == ["binomial", "hoeffding", "hoeffding-kl", "bentkus", "hoeffding-bentkus", "wsr"]
    assert "hb" in PVALUES and PVALUES["hb"] is HoeffdingBentkus
    assert isinstance(get_pvalue("hb"), HoeffdingBentkus)
    instance = WSR()
    assert get_pvalue(instance) is instance
    assert all(issubclass(PVALUES[name], RiskPValue) for name in PVALUES if name != "wsr")
    with pytest.raises(ValueError, match="unknown p-value 'bentkus2'"):
        get_pvalue("bentkus2")


@pytest.mark.parametrize(
    "losses, message",
    [
        (np.array([[0.1], [np.nan]]), "NaN"),
        (np.array([[0.1], [np.inf]]), "inf"),
        (np.array([[0.1], [1.5]]), r"\[0, 1\]"),
        (np.array([[-0.1]]), r"\[0, 1\]"),
        (np.zeros((0, 3)), "n = 0"),
        (np.zeros((3, 0)), "grid is empty"),
        (np.zeros(4), "2-D"),
    ],
)
def test_bad_losses_rejected(losses, message):
    with pytest.raises(ValueError, match=message):
        Hoeffding()(losses, 0.1)


@pytest.mark.parametrize("delta", [0.0, 1.0, -0.2, 1.5, float("nan")])
def test_bad_delta_rejected(delta):
    with pytest.raises(ValueError, match="delta"):
        HoeffdingBentkus()(np.zeros((3, 1)), delta)
