"""Pareto Testing: certify a whole exit configuration, under one or several risks at once.

Owns :func:`certify_pareto` (loss table with a configuration axis → :class:`Certificate`): input
checks, the split, the risks and p-values, and the certificate record. The decision rule it shares
with the simulations (:func:`pareto_decide`) and the re-derivation from a stored record live in
:mod:`ltt_exit.certify.pareto_rule`; :func:`rederive_pareto` wraps the latter with
``CertificateError``. numpy / scipy only; never imports torch.

The procedure (Laufer-Goldshtein, Fisch, Barzilay, Jaakkola, ICLR 2023), as implemented here:

1. Split the n calibration examples with ``numpy.random.default_rng(seed).permutation(n)``: the
   first ``n_opt = clip(round(split · n), 1, n - 1)`` examples are the *optimisation* part, the
   rest the *testing* part. Fraction, seed and both sizes go into the certificate.
2. On the optimisation part only: per configuration k the empirical risk R̂ᵒ[k, r] of every risk r
   and the cost c[k] (given per configuration, or the mean of per-example costs over the
   optimisation part). The *score* s[k] = max_r R̂ᵒ[k, r] / δ_r (the worst risk relative to its own
   tolerance). The Pareto front of (s, c): configurations that no other has both a lower-or-equal
   score and a lower cost. Sorted by (s, c) ascending, a configuration is on the front when its
   cost is strictly below every cost before it; the *tested order* is the front in that order,
   lowest score (safest) first.
3. On the testing part only: per configuration and risk the p-value p[k, r] for
   H_{k,r}: E[L_r(k)] > δ_r, and the configuration's p-value p[k] = max_r p[k, r] (it is certified
   only if every risk is). Fixed-sequence testing along the tested order at level ε: certified =
   every configuration before the first p[k] > ε.
4. Chosen = the certified configuration of lowest cost (on the front the costs strictly fall along
   the order, so this is the last certified). Nothing certified → the *safe* configuration
   (``safe_index``), which must reproduce the full model (λ = 1: zero risk by construction).

Why it is valid: the tested order depends only on the optimisation part, which is independent of
the testing part, so conditionally on it the order is fixed in advance and fixed-sequence testing
controls the family-wise error at ε; a max of valid p-values is a valid p-value for the union of
the per-risk nulls. Hence with probability ≥ 1 - ε every certified configuration has E[L_r] ≤ δ_r
for every r. Ordering by the testing part's own risks would break this (the tests show it does).
"""
from __future__ import annotations

import numbers
from typing import Any, Mapping, Sequence

import numpy as np

from ltt_exit.certificate import Certificate, CertificateError

from ._checks import check_open_unit, check_seed, is_binary
from .pareto_rule import (
    ParetoDecision,
    ParetoRecordError,
    normalised_scores,
    pareto_decide,
    pareto_front_order,
    rederive_record,
    split_indices,
    tested_order,
)
from .pvalues import PValue, RiskPValue, get_pvalue

__all__ = [
    "PROCEDURE_NAME",
    "ParetoDecision",
    "certify_pareto",
    "pareto_decide",
    "pareto_front_order",
    "rederive_pareto",
    "split_indices",
]

#: ``procedure["name"]`` of a Pareto Testing certificate
PROCEDURE_NAME = "pareto-testing"


# --------------------------------------------------------------------------- public entry point
def certify_pareto(
    losses,
    costs,
    delta,
    epsilon: float,
    *,
    split: float = 0.5,
    seed: int = 0,
    pvalue: str | PValue = "hoeffding-bentkus",
    configurations: Sequence[Mapping[str, Any]] | None = None,
    safe_index: int | None = None,
    risk_names: Sequence[str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Certificate:
    """Certify one configuration out of a space with Pareto Testing, for one or several risks.

    Parameters
    ----------
    losses:
        (n, K) or (n, K, R) losses in [0, 1]: example × configuration (× risk). n ≥ 2.
    costs:
        (K,) cost per configuration, or (n, K) per-example costs (e.g. mean layers of each
        example), which are averaged over the optimisation part only. Lower is better.
    delta:
        one δ ∈ (0, 1) for every risk, or (R,) one δ_r per risk.
    epsilon:
        allowed failure probability ε ∈ (0, 1).
    split:
        fraction of the examples in the optimisation part, in (0, 1); both parts keep ≥ 1 example.
    seed:
        seed of the split permutation (recorded; also WSR's shuffle of the testing part).
    pvalue:
        p-value kind (name or instance) used on the testing part, as in :func:`certify`.
    configurations:
        optional K JSON-serialisable dicts describing the configurations (a ``"lambda"`` key, when
        present, fills the certificate's ``lambdas``; otherwise the configuration index does).
    safe_index:
        configuration returned when nothing is certified; it must reproduce the full model
        (zero risk). Default: the first configuration whose ``"lambda"`` is ≥ 1 when
        ``configurations`` are given; otherwise the configuration of highest cost.
    risk_names:
        optional R names for the risks (default ``risk0``, ``risk1``, ...).
    metadata:
        free-form JSON-serialisable dict stored in the certificate.

    Returns
    -------
    Certificate
        ``procedure["name"] == "pareto-testing"``; ``chosen_index`` the chosen configuration (None
        when nothing is certified); ``pvalues`` the testing-part p-value per configuration (max over
        risks); ``delta`` / ``empirical_risk`` the first risk's δ and testing-part risk; ``costs`` the
        costs used; ``pareto`` every risk's δ, optimisation and testing risks and p-values, the
        tested order, the split, the configurations, the safe index and the configuration to decode
        with. With probability ≥ 1 - ε every certified configuration has E[L_r] ≤ δ_r for all r.
    """
    epsilon = check_open_unit(epsilon, "epsilon")
    seed = check_seed(seed)
    if isinstance(split, (bool, np.bool_)) or not isinstance(split, numbers.Real) or not 0.0 < float(split) < 1.0:
        raise ValueError(f"split must be a fraction strictly between 0 and 1; got {split!r}")
    split = float(split)
    kind = get_pvalue(pvalue)
    table = _as_loss_cube(losses)
    n, k, r = table.shape
    deltas = _as_deltas(delta, r)
    names = _risk_names(risk_names, r)
    if kind.binary_only and not is_binary(table):
        raise ValueError(
            f"the {kind.name!r} p-value is exact only for losses in {{0, 1}}, but the losses contain "
            "other values; use 'hoeffding-bentkus' (or 'wsr') for bounded losses"
        )
    configs = _as_configurations(configurations, k)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict (JSON object); got {type(metadata).__name__}")

    opt_rows, test_rows = split_indices(n, split, seed)
    cost_vector, cost_source = _optimisation_costs(costs, n, k, opt_rows)
    safe = _safe_index(safe_index, configs, cost_vector, k)

    opt_risk = np.clip(table[opt_rows].mean(axis=0), 0.0, 1.0)          # (K, R)
    test = table[test_rows]
    test_risk = np.clip(test.mean(axis=0), 0.0, 1.0)                     # (K, R)
    per_risk_p = np.empty((k, r))
    for j in range(r):
        if isinstance(kind, RiskPValue):
            per_risk_p[:, j] = kind.from_risk(test_risk[:, j], test.shape[0], deltas[j])
        else:
            per_risk_p[:, j] = kind._compute(np.ascontiguousarray(test[:, :, j]), float(deltas[j]), epsilon, seed)
    per_risk_p = np.clip(per_risk_p, 0.0, 1.0)
    combined_p = per_risk_p.max(axis=1)

    scores = normalised_scores(opt_risk, deltas)
    chosen, certified, _ = pareto_decide(scores, cost_vector, combined_p, epsilon)
    chosen = int(chosen)
    order = tested_order(scores, cost_vector)

    lambdas = _configuration_lambdas(configs, k)
    decode_index = safe if chosen < 0 else chosen
    reason = None
    if chosen < 0:
        reason = _reason_nothing_certified(order, combined_p, test_risk, deltas, names, epsilon, safe, len(test_rows))
    pareto = {
        "split": {"fraction": split, "seed": seed, "n_optimisation": int(len(opt_rows)), "n_testing": int(len(test_rows))},
        "risks": [
            {
                "name": names[j],
                "delta": float(deltas[j]),
                "optimisation_risk": opt_risk[:, j].tolist(),
                "testing_risk": test_risk[:, j].tolist(),
                "pvalues": per_risk_p[:, j].tolist(),
            }
            for j in range(r)
        ],
        "score": "max over risks of optimisation risk / delta",
        "cost_source": cost_source,
        "tested_order": order.tolist(),
        "safe_index": safe,
        "configurations": configs,
        "configuration": None if configs is None else configs[decode_index],
    }
    return Certificate(
        lambda_hat=float(lambdas[decode_index]),
        certified_any=chosen >= 0,
        chosen_index=None if chosen < 0 else chosen,
        reason=reason,
        delta=float(deltas[0]),
        epsilon=epsilon,
        n=n,
        pvalue_method=kind.name,
        procedure={"name": PROCEDURE_NAME, "params": {"split": split, "seed": seed}},
        order="descending",
        lambdas=lambdas.tolist(),
        empirical_risk=test_risk[:, 0].tolist(),
        pvalues=combined_p.tolist(),
        certified=certified.tolist(),
        costs=cost_vector.tolist(),
        wsr_seed=seed if kind.order_dependent else None,
        metadata=metadata,
        pareto=pareto,
    )


# --------------------------------------------------------------------------- re-deriving a record
def rederive_pareto(record: Certificate | Mapping[str, Any], *, check: bool = True) -> ParetoDecision:
    """Recompute a Pareto Testing certificate's decision from its stored fields alone.

    See :func:`ltt_exit.certify.pareto_rule.rederive_record`; a disagreement (or a certificate
    without a Pareto record) raises :class:`CertificateError` naming the field.
    """
    try:
        return rederive_record(record, check=check)
    except ParetoRecordError as exc:
        raise CertificateError(str(exc)) from None


# --------------------------------------------------------------------------- input checks
def _as_loss_cube(losses) -> np.ndarray:
    try:
        table = np.asarray(losses, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"losses must be numeric (floats in [0, 1]); {exc}") from None
    if table.ndim == 2:
        table = table[:, :, None]
    if table.ndim != 3:
        raise ValueError(
            f"losses must have shape (n_examples, n_configurations) or (n_examples, n_configurations, n_risks); got {table.shape}"
        )
    n, k, r = table.shape
    if n < 2:
        raise ValueError(f"losses has {n} example(s); Pareto Testing splits them in two parts and needs at least 2")
    if k == 0 or r == 0:
        raise ValueError(f"losses has an empty configuration or risk axis (shape {table.shape})")
    bad = ~np.isfinite(table) | (table < 0) | (table > 1)
    if bad.any():
        i, j, q = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(
            f"losses must be finite and in [0, 1]; found {table[i, j, q]!r} at example {i}, configuration {j}, risk {q}"
        )
    return table


def _as_deltas(delta, r: int) -> np.ndarray:
    if isinstance(delta, numbers.Real) and not isinstance(delta, (bool, np.bool_)):
        return np.full(r, check_open_unit(delta, "delta"))
    try:
        values = [float(v) for v in delta]
    except (TypeError, ValueError):
        raise TypeError(f"delta must be a number or one number per risk; got {delta!r}") from None
    if len(values) != r:
        raise ValueError(f"delta has {len(values)} values but the losses have {r} risk(s); give one δ_r per risk")
    return np.array([check_open_unit(v, f"delta[{j}]") for j, v in enumerate(values)])


def _risk_names(names, r: int) -> list[str]:
    if names is None:
        return [f"risk{j}" for j in range(r)]
    names = [str(name) for name in names]
    if len(names) != r or len(set(names)) != r:
        raise ValueError(f"risk_names must be {r} distinct names, one per risk; got {names!r}")
    return names


def _optimisation_costs(costs, n: int, k: int, opt_rows: np.ndarray) -> tuple[np.ndarray, str]:
    try:
        array = np.asarray(costs, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"costs must be numeric; {exc}") from None
    if not np.isfinite(array).all():
        raise ValueError("costs must be finite")
    if array.shape == (k,):
        return array, "per configuration"
    if array.shape == (n, k):
        return array[opt_rows].mean(axis=0), "per-example mean over the optimisation part"
    raise ValueError(f"costs must have shape ({k},) or ({n}, {k}); got {array.shape}")


def _as_configurations(configurations, k: int) -> list[dict] | None:
    if configurations is None:
        return None
    configs = list(configurations)
    if len(configs) != k:
        raise ValueError(f"configurations has {len(configs)} entries but the losses have {k} configuration columns")
    for j, config in enumerate(configs):
        if not isinstance(config, Mapping):
            raise TypeError(f"configurations[{j}] must be a dict; got {type(config).__name__}")
    return [dict(config) for config in configs]


def _configuration_lambdas(configs, k: int) -> np.ndarray:
    if configs is not None and all("lambda" in c for c in configs):
        values = np.array([float(c["lambda"]) for c in configs])
        if np.isfinite(values).all():
            return values
    return np.arange(k, dtype=np.float64)


def _safe_index(safe_index, configs, costs: np.ndarray, k: int) -> int:
    if safe_index is not None:
        if isinstance(safe_index, (bool, np.bool_)) or not isinstance(safe_index, numbers.Integral) or not 0 <= safe_index < k:
            raise ValueError(f"safe_index must be a configuration index in [0, {k - 1}]; got {safe_index!r}")
        return int(safe_index)
    if configs is not None:
        for j, config in enumerate(configs):
            value = config.get("lambda")
            if isinstance(value, numbers.Real) and value >= 1.0:
                return j
    return int(np.argmax(costs))  # first of the most expensive: closest to the full model


def _reason_nothing_certified(order, combined_p, test_risk, deltas, names, epsilon, safe, n_test) -> str:
    first = int(order[0])
    worst = int(np.argmax(test_risk[first] / deltas))
    return (
        f"fixed-sequence testing along the Pareto order stopped at its first configuration {first} "
        f"(p-value {combined_p[first]:.3g} > ε = {epsilon:g}; worst risk {names[worst]!r}: testing risk "
        f"{test_risk[first, worst]:.4g} vs δ = {deltas[worst]:g}, n_testing = {n_test}). "
        f"Falling back to the safe configuration {safe} (the full model)."
    )
