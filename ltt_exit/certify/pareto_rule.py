"""The Pareto Testing decision rule and its re-derivation from a stored record (numpy / scipy only).

Owns what :func:`ltt_exit.certify.certify_pareto` decides once the losses are reduced to risks —
the Pareto front and tested order of the optimisation part (:func:`pareto_front_order`), fixed-sequence
testing along it and the least-cost choice (:func:`pareto_decide`, vectorised over leading batch axes
for the simulations) — and :func:`rederive_record`, which recomputes that decision from a stored
certificate record alone. It does not import :mod:`ltt_exit.certificate`, so the certificate can call
it on load without an import loop; its errors are :class:`ParetoRecordError` (a ``ValueError``), which
the certificate turns into ``CertificateError``. docs/certification.md#pareto-testing has the contract.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .pvalues import RiskPValue, get_pvalue

__all__ = [
    "ParetoDecision",
    "ParetoRecordError",
    "normalised_scores",
    "pareto_decide",
    "pareto_front_order",
    "rederive_record",
    "split_indices",
    "tested_order",
]


class ParetoRecordError(ValueError):
    """A stored Pareto Testing record whose decision does not re-derive (or that is malformed)."""


# --------------------------------------------------------------------------- the decision rule
def pareto_front_order(scores, costs) -> tuple[np.ndarray, np.ndarray]:
    """Sort configurations by (score, cost) and mark the Pareto front, for any leading batch axes.

    Parameters
    ----------
    scores, costs:
        (..., K) optimisation-part score s[k] (lower = safer) and cost c[k] (lower = cheaper).

    Returns
    -------
    sorted_index:
        (..., K) configuration indices sorted by score, ties by cost, then by index (stable).
    on_front:
        (..., K) booleans *in sorted order*: True where the configuration's cost is strictly below
        the cost of every configuration sorted before it (no other is at least as safe and cheaper).
    """
    scores = np.asarray(scores, dtype=np.float64)
    costs = np.broadcast_to(np.asarray(costs, dtype=np.float64), scores.shape)
    sorted_index = np.lexsort((costs, scores), axis=-1)
    sorted_costs = np.take_along_axis(costs, sorted_index, axis=-1)
    cheapest_before = np.empty_like(sorted_costs)
    cheapest_before[..., 0] = np.inf
    np.minimum.accumulate(sorted_costs[..., :-1], axis=-1, out=cheapest_before[..., 1:])
    return sorted_index, sorted_costs < cheapest_before


def pareto_decide(scores, costs, test_pvalues, epsilon: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Pareto Testing decision, vectorised over leading batch axes (e.g. simulated draws).

    Parameters
    ----------
    scores, costs:
        (..., K) optimisation-part scores and costs (see :func:`pareto_front_order`).
    test_pvalues:
        (..., K) testing-part p-value per configuration (already the max over risks).
    epsilon:
        family-wise error level ε.

    Returns
    -------
    chosen:
        (...,) index of the chosen configuration, -1 when nothing is certified.
    certified:
        (..., K) booleans in configuration order.
    tested:
        (..., K) booleans in configuration order: on the Pareto front (hence in the tested order).
    """
    p = np.asarray(test_pvalues, dtype=np.float64)
    sorted_index, on_front = pareto_front_order(scores, costs)
    p_sorted = np.take_along_axis(p, sorted_index, axis=-1)
    # Off-front configurations are not tested: they neither stop the sequence nor get certified.
    still_going = np.logical_and.accumulate((p_sorted <= epsilon) | ~on_front, axis=-1)
    certified_sorted = still_going & on_front
    costs_sorted = np.take_along_axis(np.broadcast_to(np.asarray(costs, dtype=np.float64), p.shape), sorted_index, axis=-1)
    # Front costs strictly fall along the order, so the cheapest certified one is unique.
    best = np.argmin(np.where(certified_sorted, costs_sorted, np.inf), axis=-1)
    chosen = np.where(certified_sorted.any(axis=-1), np.take_along_axis(sorted_index, best[..., None], axis=-1)[..., 0], -1)
    certified = np.zeros(p.shape, dtype=bool)
    np.put_along_axis(certified, sorted_index, certified_sorted, axis=-1)
    tested = np.zeros(p.shape, dtype=bool)
    np.put_along_axis(tested, sorted_index, on_front, axis=-1)
    return chosen, certified, tested


def normalised_scores(risks, deltas) -> np.ndarray:
    """s = max_r risk[..., r] / δ_r for risks (..., K, R) and deltas (R,): shape (..., K)."""
    return np.max(np.asarray(risks, dtype=np.float64) / np.asarray(deltas, dtype=np.float64), axis=-1)


def split_indices(n: int, split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(optimisation rows, testing rows) of n examples: a seeded permutation cut at round(split·n)."""
    n_opt = min(max(int(round(split * n)), 1), n - 1)
    permutation = np.random.default_rng(seed).permutation(n)
    return permutation[:n_opt], permutation[n_opt:]


def tested_order(scores: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Configuration indices of the Pareto front in tested order (lowest score first)."""
    sorted_index, on_front = pareto_front_order(scores, costs)
    return sorted_index[on_front]



# --------------------------------------------------------------------------- re-deriving a record
@dataclass(frozen=True)
class ParetoDecision:
    """What the stored record implies: tested order, certified set, chosen index (None = safe)."""

    tested_order: list[int]
    pvalues: list[float]
    certified: list[bool]
    chosen_index: int | None
    lambda_hat: float


def rederive_record(record: Any, *, check: bool = True) -> ParetoDecision:
    """Recompute a Pareto Testing certificate's decision from its stored fields alone.

    From ``pareto.risks`` (δ_r, optimisation risks, testing risks, per-risk p-values), ``costs``,
    ``epsilon``, ``pvalue_method`` and ``pareto.split.n_testing``: the scores, the Pareto front
    and tested order, the per-risk p-values (recomputed from the testing risks for the risk-only
    p-values; taken as stored for WSR), the combined p-values, the fixed-sequence certified set
    and the chosen configuration. ``record`` is a ``Certificate`` (anything with those attributes)
    or its ``to_dict()``.

    With ``check=True`` (default) every re-derived value is compared with the stored one and the
    first disagreement raises :class:`ParetoRecordError` naming the field.
    """
    get = record.__getitem__ if isinstance(record, Mapping) else (lambda name: getattr(record, name))
    try:
        pareto = get("pareto")
        if not isinstance(pareto, Mapping):
            raise ParetoRecordError("pareto: not a Pareto Testing certificate (no pareto record)")
        epsilon = float(get("epsilon"))
        costs = np.asarray(get("costs"), dtype=np.float64)
        risks = pareto["risks"]
        deltas = np.array([float(risk["delta"]) for risk in risks])
        opt_risk = np.array([risk["optimisation_risk"] for risk in risks], dtype=np.float64).T   # (K, R)
        test_risk = np.array([risk["testing_risk"] for risk in risks], dtype=np.float64).T       # (K, R)
        stored_p = np.array([risk["pvalues"] for risk in risks], dtype=np.float64).T             # (K, R)
        n_test = int(pareto["split"]["n_testing"])
        kind = get_pvalue(get("pvalue_method"))
        safe = int(pareto["safe_index"])
        lambdas = list(get("lambdas"))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, ParetoRecordError):
            raise
        raise ParetoRecordError(f"pareto: the stored record is incomplete or malformed ({exc})") from None
    k = costs.shape[0] if costs.ndim == 1 else -1
    if costs.ndim != 1 or opt_risk.shape != (k, len(risks)) or test_risk.shape != opt_risk.shape or stored_p.shape != opt_risk.shape:
        raise ParetoRecordError("pareto: costs and every risk's lists must have one entry per configuration")
    if not 0 <= safe < k:
        raise ParetoRecordError(f"pareto.safe_index {safe} is outside the {k} configurations")

    if isinstance(kind, RiskPValue):
        per_risk_p = np.column_stack([kind.from_risk(test_risk[:, j], n_test, deltas[j]) for j in range(len(risks))])
        per_risk_p = np.clip(per_risk_p, 0.0, 1.0)
    else:  # order-dependent p-values need the losses themselves; trust the stored ones
        per_risk_p = stored_p
    combined = per_risk_p.max(axis=1)
    scores = normalised_scores(opt_risk, deltas)
    chosen, certified, _ = pareto_decide(scores, costs, combined, epsilon)
    chosen = int(chosen)
    decision = ParetoDecision(
        tested_order=tested_order(scores, costs).tolist(),
        pvalues=combined.tolist(),
        certified=certified.tolist(),
        chosen_index=None if chosen < 0 else chosen,
        lambda_hat=float(lambdas[safe if chosen < 0 else chosen]),
    )
    if check:
        if not np.allclose(per_risk_p, stored_p, rtol=1e-9, atol=1e-12):
            raise ParetoRecordError("pareto.risks[].pvalues disagree with the p-values recomputed from the testing risks")
        comparisons = (
            ("pareto.tested_order", list(pareto["tested_order"]), decision.tested_order),
            ("certified", list(get("certified")), decision.certified),
            ("chosen_index", get("chosen_index"), decision.chosen_index),
            ("lambda_hat", float(get("lambda_hat")), decision.lambda_hat),
        )
        for field_name, stored, derived in comparisons:
            if stored != derived:
                raise ParetoRecordError(
                    f"{field_name} is {stored!r} but the stored risks, costs and p-values give {derived!r}"
                )
        if not np.allclose(np.asarray(get("pvalues"), dtype=np.float64), combined, rtol=1e-9, atol=1e-12):
            raise ParetoRecordError("pvalues disagree with the max over risks of pareto.risks[].pvalues")
        configs = pareto.get("configurations")
        if configs is not None and pareto.get("configuration") != configs[safe if chosen < 0 else chosen]:
            raise ParetoRecordError("pareto.configuration is not the chosen (or safe) configuration")
    return decision
