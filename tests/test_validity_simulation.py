"""The guarantee, by simulation: over ≥ 2,000 calibration draws with known true risks, the chosen λ
has true risk > δ in at most ε (+ 3 Monte-Carlo standard errors) of the draws — for every p-value ×
procedure pair, Bernoulli and bounded continuous losses (binomial: Bernoulli only).

Power (how often the chosen λ is the oracle λ, and how many grid steps short of it it lands) is
printed; run with ``-s`` (or ``-rP``) to see the table. benchmarks/bench_certify.py --power prints a
larger version for docs/benchmarks.md.
"""
from __future__ import annotations

import numpy as np
import pytest

from ltt_exit.certify import PROCEDURES, PVALUES
from ltt_exit.certify.procedures import Procedure, _fixed_sequence
from ltt_exit.certify.simulate import chosen_index, simulate, synthetic_losses

DRAWS = 2000
N = 400
DELTA = 0.1
EPSILON = 0.05

# name -> (true risk per candidate in grid order, one latent uniform shared by all candidates?)
PROFILES = {
    # risk rises along the grid (as for real thresholds), with several candidates just above δ,
    # where a miscalibrated p-value or procedure would fail most often
    "monotone": ([0.0, 0.02, 0.04, 0.06, 0.07, 0.08, 0.09, 0.095, 0.1, 0.103, 0.106, 0.11,
                  0.12, 0.14, 0.17, 0.2, 0.25, 0.3, 0.4, 0.5], True),
    # clearly safe, then a cliff just above δ: fixed-sequence tests a barely-false null on almost
    # every draw, so this is where the level of each p-value is tested most sharply
    "cliff": ([0.0, 0.01, 0.02, 0.03, 0.04, 0.101, 0.103, 0.105, 0.11, 0.13, 0.2], True),
    # safe candidates behind unsafe ones, candidates independent of each other (many chances to
    # reject a false null): exercises multi-start, Bonferroni and Holm
    "non-monotone": ([0.0, 0.03, 0.06, 0.12, 0.08, 0.101, 0.05, 0.104, 0.09, 0.2, 0.07, 0.102,
                      0.095, 0.3, 0.06, 0.11], False),
    # one safe candidate, then many independent false nulls barely above δ: a procedure without
    # multiplicity control would certify one of them far more often than ε
    "many-nulls": ([0.0, 0.05] + [0.102] * 14, False),
}


def pvalue_names(family: str) -> list[str]:
    return [name for name in PVALUES if family == "bernoulli" or not PVALUES[name].binary_only]


def format_results(results, title: str) -> str:
    lines = [title, f"{'p-value':18s} {'procedure':15s} {'violations':>10s} {'bound':>7s} {'oracle':>7s} {'gap':>6s} {'none':>6s}"]
    for r in results:
        lines.append(
            f"{r.pvalue:18s} {r.procedure:15s} {r.violation_rate:10.4f} {r.bound:7.4f} "
            f"{r.oracle_rate:7.3f} {r.mean_gap:6.2f} {r.nothing_certified_rate:6.3f}"
        )
    return "\n".join(lines)


@pytest.mark.parametrize("profile", list(PROFILES))
@pytest.mark.parametrize("family", ["bernoulli", "continuous"])
def test_violation_rate_at_most_epsilon_for_every_pair(family, profile):
    risks, shared_latent = PROFILES[profile]
    results = simulate(
        risks, DELTA, EPSILON, n=N, draws=DRAWS, family=family,
        pvalues=pvalue_names(family), procedures=list(PROCEDURES), seed=2024, shared_latent=shared_latent,
    )
    print("\n" + format_results(results, f"{family} losses, {profile} risks, n = {N}, δ = {DELTA}, ε = {EPSILON}, {DRAWS} draws"))
    assert len(results) == len(pvalue_names(family)) * len(PROCEDURES)
    for r in results:
        assert r.draws >= 2000
        assert r.violation_rate <= r.bound, f"{r.pvalue} × {r.procedure}: {r.violation_rate} > {r.bound}"


def test_power_ordering_follows_the_bounds():
    # Pointwise: exact binomial ≤ HB ≤ Hoeffding-KL ≤ Hoeffding (Pinsker), so fixed-sequence with a
    # smaller p-value certifies at least as far on every draw; the mean gap to the oracle shrinks.
    results = simulate(
        PROFILES["monotone"][0], DELTA, EPSILON, n=N, draws=DRAWS, family="bernoulli",
        pvalues=["binomial", "hoeffding-bentkus", "hoeffding-kl", "hoeffding"], procedures=["fixed-sequence"], seed=7,
    )
    gaps = [r.mean_gap for r in results]
    assert gaps == sorted(gaps)
    assert gaps[0] < gaps[-1]
    assert all(r.nothing_certified_rate == 0.0 for r in results)  # n = 400 always certifies the easy start


class OffByOneFixedSequence(Procedure):
    """The public bug: also 'certifies' the first hypothesis that was *not* rejected."""

    name = "off-by-one"

    def _select(self, pvalues, epsilon):
        mask = _fixed_sequence(pvalues, epsilon)
        first_failure = mask.sum(axis=-1)
        k = pvalues.shape[-1]
        rows = np.nonzero(first_failure < k)
        mask[rows + (first_failure[rows],)] = True
        return mask


class Uncorrected(Procedure):
    """Every candidate tested at level ε with no multiplicity correction."""

    name = "uncorrected"

    def _select(self, pvalues, epsilon):
        return pvalues <= epsilon


@pytest.mark.parametrize("procedure, profile", [(OffByOneFixedSequence(), "cliff"), (Uncorrected(), "many-nulls")])
def test_simulation_detects_invalid_procedures(procedure, profile):
    # Negative controls: the same check must flag known-invalid selections, otherwise the test
    # above could not fail.
    risks, shared_latent = PROFILES[profile]
    results = simulate(
        risks, DELTA, EPSILON, n=N, draws=DRAWS, family="bernoulli",
        pvalues=["binomial"], procedures=[procedure], seed=2024, shared_latent=shared_latent,
    )
    print(f"\n{procedure.name}: violation rate {results[0].violation_rate:.4f} (bound {results[0].bound:.4f})")
    assert results[0].violation_rate > results[0].bound


def test_synthetic_losses_have_the_declared_risks():
    rng = np.random.default_rng(0)
    risks = np.array(PROFILES["non-monotone"][0])
    for family, shared in (("bernoulli", True), ("continuous", True), ("bernoulli", False), ("continuous", False)):
        losses = synthetic_losses(risks, 500, 400, family, rng, shared_latent=shared)
        assert losses.shape == (400, 500, risks.size)
        assert losses.min() >= 0 and losses.max() <= 1
        standard_error = np.sqrt(risks * (1 - risks) / (400 * 500))
        assert np.all(np.abs(losses.mean(axis=(0, 1)) - risks) <= 5 * standard_error + 1e-12)
    assert set(np.unique(synthetic_losses(risks, 10, 10, "bernoulli", rng))) <= {0.0, 1.0}


def test_chosen_index_is_the_last_certified():
    certified = np.array([[True, True, False, True], [False, False, False, False], [True, False, False, False]])
    assert chosen_index(certified).tolist() == [3, -1, 0]
