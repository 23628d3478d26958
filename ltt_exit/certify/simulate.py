"""Monte-Carlo checks of the guarantee on synthetic loss tables with known true risks.

Used by the validity test (tests/test_validity_simulation.py) and the power benchmark
(benchmarks/bench_certify.py --power); also handy for checking a custom p-value or procedure.

For each of ``draws`` independent calibration sets of ``n`` examples, every candidate's losses are
drawn with known mean ``risks[j]``; the p-values and the procedure run on all draws at once
(vectorised); the chosen λ is the certified candidate furthest along the grid (the always-safe
fallback, risk 0, when nothing is certified). The *violation rate* is the fraction of draws whose
chosen candidate has true risk > δ; LTT guarantees it is at most ε.

Loss families, from uniforms U (by default one latent U_i per example, shared by all candidates,
so losses grow along the grid as they do for real thresholds; ``shared_latent=False`` draws an
independent U_ij per candidate instead):

* ``"bernoulli"``:  L_ij = 1[U < r_j]           (mean r_j, losses in {0, 1})
* ``"continuous"``: L_ij = U^{1/r_j - 1}        (mean r_j, losses in [0, 1]; L = 0 when r_j = 0)

Pareto Testing (:func:`simulate_pareto`) works on a configuration space with several risks: true
risks (K, R) and costs (K,). Each draw needs only the empirical risks of the optimisation and the
testing part, which for Bernoulli losses are drawn exactly without materialising the examples
(:func:`bernoulli_part_risks`), so thousands of draws of n = 1,000 examples take milliseconds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .procedures import Procedure, get_procedure
from .pvalues import PValue, RiskPValue, get_pvalue

__all__ = [
    "synthetic_losses",
    "batch_pvalues",
    "chosen_index",
    "SimulationResult",
    "simulate",
    "bernoulli_part_risks",
    "ParetoSimulation",
    "simulate_pareto",
]

FAMILIES = ("bernoulli", "continuous")


def synthetic_losses(
    risks, n: int, draws: int, family: str, rng: np.random.Generator, *, shared_latent: bool = True
) -> np.ndarray:
    """Losses of shape (draws, n, K) whose column j has true mean ``risks[j]``."""
    risks = np.asarray(risks, dtype=np.float64)
    if risks.ndim != 1 or (risks < 0).any() or (risks > 1).any():
        raise ValueError("risks must be a 1-D array of values in [0, 1]")
    u = rng.random((draws, n, 1 if shared_latent else risks.size))
    if family == "bernoulli":
        return (u < risks).astype(np.float64)
    if family == "continuous":
        with np.errstate(divide="ignore"):
            exponent = np.where(risks > 0, 1.0 / np.maximum(risks, 1e-300) - 1.0, np.inf)
        return np.where(risks > 0, u ** exponent, 0.0)
    raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")


def batch_pvalues(pvalue: str | PValue, losses: np.ndarray, delta: float, epsilon: float, seed: int = 0) -> np.ndarray:
    """p-values (draws, K) for losses (draws, n, K), each draw its own calibration set."""
    kind = get_pvalue(pvalue)
    draws, n, k = losses.shape
    if isinstance(kind, RiskPValue):
        return kind.from_risk(losses.mean(axis=1), n, delta)
    # Order-dependent p-values: treat every (draw, candidate) pair as one column of an (n, D·K)
    # matrix; the examples of a draw are i.i.d., so one shared shuffle is as good as any.
    columns = np.ascontiguousarray(losses.transpose(1, 0, 2).reshape(n, draws * k))
    return kind(columns, delta, epsilon=epsilon, seed=seed).reshape(draws, k)


def chosen_index(certified: np.ndarray) -> np.ndarray:
    """(draws,) index of the certified candidate furthest along the grid, -1 when none."""
    k = certified.shape[-1]
    last = k - 1 - np.argmax(certified[..., ::-1], axis=-1)
    return np.where(certified.any(axis=-1), last, -1)


@dataclass(frozen=True)
class SimulationResult:
    """Outcome of one p-value × procedure pair over all draws."""

    pvalue: str
    procedure: str
    family: str
    draws: int
    epsilon: float
    violation_rate: float          # fraction of draws whose chosen λ has true risk > δ
    standard_error: float          # Monte-Carlo standard error of a rate equal to ε
    oracle_rate: float             # fraction of draws choosing the oracle λ (furthest with risk ≤ δ)
    mean_gap: float                # mean grid steps from the chosen λ to the oracle (fallback = position -1)
    nothing_certified_rate: float  # fraction of draws certifying nothing

    @property
    def bound(self) -> float:
        """ε plus three Monte-Carlo standard errors: the test's threshold for the violation rate."""
        return self.epsilon + 3.0 * self.standard_error


def simulate(
    risks,
    delta: float,
    epsilon: float,
    *,
    n: int,
    draws: int,
    family: str,
    pvalues,
    procedures,
    seed: int = 0,
    shared_latent: bool = True,
) -> list[SimulationResult]:
    """Run every p-value × procedure pair on the same ``draws`` synthetic calibration sets."""
    risks = np.asarray(risks, dtype=np.float64)
    rng = np.random.default_rng(seed)
    losses = synthetic_losses(risks, n, draws, family, rng, shared_latent=shared_latent)
    safe = risks <= delta
    oracle = int(np.flatnonzero(safe)[-1]) if safe.any() else -1
    standard_error = float(np.sqrt(epsilon * (1 - epsilon) / draws))
    results = []
    for pvalue in pvalues:
        kind = get_pvalue(pvalue)
        p = batch_pvalues(kind, losses, delta, epsilon, seed=seed)
        for procedure in procedures:
            proc: Procedure = get_procedure(procedure)
            chosen = chosen_index(proc.select(p, epsilon))
            chosen_risk = np.where(chosen >= 0, risks[np.maximum(chosen, 0)], 0.0)
            results.append(
                SimulationResult(
                    pvalue=kind.name,
                    procedure=proc.name,
                    family=family,
                    draws=draws,
                    epsilon=epsilon,
                    violation_rate=float(np.mean(chosen_risk > delta)),
                    standard_error=standard_error,
                    oracle_rate=float(np.mean(chosen == oracle)),
                    mean_gap=float(np.mean(oracle - chosen)),
                    nothing_certified_rate=float(np.mean(chosen < 0)),
                )
            )
    return results


# --------------------------------------------------------------------------- Pareto Testing
def bernoulli_part_risks(
    true_risks, n: int, draws: int, rng: np.random.Generator, *, shared_latent: bool = True
) -> np.ndarray:
    """Empirical risks (draws, K, R) of n Bernoulli examples per draw, true risks (K, R).

    ``shared_latent=True``: one uniform U per example and risk, shared by every configuration,
    L[k, r] = 1[U_r < true_risks[k, r]] (configurations' losses are comonotone, as for nested
    thresholds). The count below each distinct threshold is then a cumulative sum of one multinomial
    over the gaps between sorted thresholds: exact, without drawing the n examples.
    ``shared_latent=False``: independent losses per configuration, counts ~ Binomial(n, risk).
    """
    risks = np.asarray(true_risks, dtype=np.float64)
    if risks.ndim != 2 or (risks < 0).any() or (risks > 1).any():
        raise ValueError("true_risks must have shape (K, R) with values in [0, 1]")
    k, r = risks.shape
    if not shared_latent:
        return rng.binomial(n, risks, size=(draws, k, r)) / n
    out = np.empty((draws, k, r))
    for j in range(r):
        thresholds, position = np.unique(risks[:, j], return_inverse=True)
        gaps = np.diff(np.concatenate(([0.0], thresholds, [1.0])))
        counts = np.cumsum(rng.multinomial(n, gaps, size=draws), axis=1)  # (draws, m + 1): #U below each edge
        out[:, :, j] = counts[:, position] / n
    return out


@dataclass(frozen=True)
class ParetoSimulation:
    """Outcome of Pareto Testing (or a variant) over all draws of one synthetic space."""

    method: str
    draws: int
    epsilon: float
    violation_rate: float          # fraction of draws whose chosen configuration has some true risk > δ_r
    standard_error: float          # Monte-Carlo standard error of a rate equal to ε
    mean_cost: float               # mean cost of the chosen configuration (safe configuration when none)
    nothing_certified_rate: float

    @property
    def bound(self) -> float:
        return self.epsilon + 3.0 * self.standard_error


def simulate_pareto(
    true_risks,
    costs,
    delta,
    epsilon: float,
    *,
    n: int,
    draws: int,
    split: float = 0.5,
    safe_index: int = 0,
    seed: int = 0,
    shared_latent: bool = True,
    pvalue: str | PValue = "hoeffding-bentkus",
    order_by: str = "optimisation",
) -> ParetoSimulation:
    """Pareto Testing on ``draws`` synthetic calibration sets of a space with known true risks.

    ``true_risks`` (K, R) or (K,), ``costs`` (K,), ``delta`` float or (R,). Each draw splits n
    Bernoulli examples into round(split·n) optimisation and the rest testing examples and applies
    :func:`ltt_exit.certify.pareto_rule.pareto_decide`. ``order_by="testing"`` is the negative control:
    the front and order are estimated on the testing part itself (this breaks the guarantee).
    """
    from .pareto_rule import normalised_scores, pareto_decide

    risks = np.asarray(true_risks, dtype=np.float64)
    if risks.ndim == 1:
        risks = risks[:, None]
    deltas = np.broadcast_to(np.asarray(delta, dtype=np.float64), (risks.shape[1],))
    costs = np.asarray(costs, dtype=np.float64)
    if order_by not in ("optimisation", "testing"):
        raise ValueError(f"order_by must be 'optimisation' or 'testing'; got {order_by!r}")
    kind = get_pvalue(pvalue)
    if not isinstance(kind, RiskPValue):
        raise ValueError("simulate_pareto draws empirical risks only; use a risk-only p-value (not WSR)")
    rng = np.random.default_rng(seed)
    n_opt = min(max(int(round(split * n)), 1), n - 1)
    opt = bernoulli_part_risks(risks, n_opt, draws, rng, shared_latent=shared_latent)
    test = bernoulli_part_risks(risks, n - n_opt, draws, rng, shared_latent=shared_latent)
    pvalues = np.max(
        np.stack([kind.from_risk(test[..., j], n - n_opt, float(deltas[j])) for j in range(risks.shape[1])], axis=-1),
        axis=-1,
    )
    scores = normalised_scores(opt if order_by == "optimisation" else test, deltas)
    chosen, _, _ = pareto_decide(scores, costs, pvalues, epsilon)
    decoded = np.where(chosen >= 0, chosen, safe_index)
    violates = (risks > deltas).any(axis=1)
    return ParetoSimulation(
        method=f"pareto-testing (order by {order_by} part)",
        draws=draws,
        epsilon=epsilon,
        violation_rate=float(np.mean(violates[decoded])),
        standard_error=float(np.sqrt(epsilon * (1 - epsilon) / draws)),
        mean_cost=float(np.mean(costs[decoded])),
        nothing_certified_rate=float(np.mean(chosen < 0)),
    )
