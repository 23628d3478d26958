"""``certify``: from a loss matrix and a candidate grid to a :class:`~ltt_exit.certificate.Certificate`."""
from __future__ import annotations

from typing import Any

import numpy as np

from ltt_exit.certificate import Certificate
from ltt_exit.validation import InputError, check_real

from ._checks import as_grid, as_loss_matrix, check_open_unit, check_order, check_seed, is_binary
from .procedures import FixedSequence, Procedure, get_procedure
from .pvalues import PValue, RiskPValue, get_pvalue
from .rederive import always_safe_lambda, check_fallback, choose

__all__ = ["certify", "always_safe_lambda"]


def certify(
    losses,
    lambdas,
    delta: float,
    epsilon: float,
    *,
    pvalue: str | PValue = "hoeffding-bentkus",
    procedure: str | Procedure = "fixed-sequence",
    order: str = "descending",
    costs=None,
    metadata: dict[str, Any] | None = None,
    seed: int = 0,
    fallback_lambda: float | None = None,
) -> Certificate:
    """Certify candidates λ_j with Learn-Then-Test and choose one.

    Parameters
    ----------
    losses:
        (n_examples, n_candidates) losses in [0, 1]; column j belongs to ``lambdas[j]``.
    lambdas:
        (n_candidates,) the candidate grid in its a-priori order, most conservative first, fixed
        before seeing the data. ``order="descending"``: strictly decreasing (largest λ first, for
        confidence thresholds); ``"ascending"``: strictly increasing. Any other order is an error.
    delta:
        risk tolerance δ ∈ (0, 1): the largest acceptable expected loss.
    epsilon:
        allowed failure probability ε ∈ (0, 1).
    pvalue:
        a name from ``PVALUES`` ("binomial", "hoeffding", "hoeffding-kl", "bentkus",
        "hoeffding-bentkus" / "hb", "wsr") or a :class:`PValue` instance.
    procedure:
        a name from ``PROCEDURES`` ("fixed-sequence", "multi-start", "bonferroni", "holm") or a
        :class:`Procedure` instance (e.g. ``MultiStart(starts=5)``).
    costs:
        optional (n_candidates,) cost per candidate (e.g. mean layers used). When given, the chosen
        λ is the certified candidate of lowest cost (ties: the later in grid order); otherwise the
        certified candidate furthest along the grid order.
    metadata:
        free-form JSON-serialisable dict stored in the certificate (model and tokenizer
        fingerprints, decoder configuration, dataset fingerprint, ...).
    seed:
        seed of the example shuffle for order-dependent p-values (WSR); recorded as ``wsr_seed``.
    fallback_lambda:
        λ to return when nothing is certified; default :func:`always_safe_lambda`.

    Returns
    -------
    Certificate
        With probability ≥ 1 - ε over the calibration set, every certified candidate (hence the
        chosen λ) has expected loss ≤ δ — provided the calibration examples are exchangeable with
        the examples the threshold will be used on.
    """
    delta = check_open_unit(delta, "delta")
    epsilon = check_open_unit(epsilon, "epsilon")
    check_order(order)
    seed = check_seed(seed)
    pvalue_kind = get_pvalue(pvalue)
    procedure_kind = get_procedure(procedure)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict (JSON object); got {type(metadata).__name__}")

    matrix = as_loss_matrix(losses)
    n, k = matrix.shape
    grid = as_grid(lambdas, k, order)
    cost_vector = _as_costs(costs, k)
    if fallback_lambda is None:
        fallback = always_safe_lambda(grid, order)
    else:
        fallback = check_real(fallback_lambda, "fallback_lambda")
        if not check_fallback(fallback, grid, order):
            raise InputError(
                f"fallback_lambda {fallback!r} is not always safe on this {order} grid: it must be at least as "
                f"conservative as {always_safe_lambda(grid, order)!r} ({'>=' if order == 'descending' else '<='} it; "
                "a certificate's load re-checks this)"
            )

    if pvalue_kind.binary_only and not is_binary(matrix):
        raise ValueError(
            f"the {pvalue_kind.name!r} p-value is exact only for losses in {{0, 1}}, but the losses contain "
            "other values; use 'hoeffding-bentkus' (or 'wsr') for bounded losses"
        )
    risk = matrix.sum(axis=0) / n
    if isinstance(pvalue_kind, RiskPValue):
        pvalues = pvalue_kind.from_risk(risk, n, delta)
    else:
        pvalues = pvalue_kind._compute(matrix, delta, epsilon, seed)
    pvalues = np.asarray(pvalues, dtype=np.float64)
    if pvalues.shape != (k,) or np.isnan(pvalues).any():
        raise ValueError(f"p-value {pvalue_kind!r} returned {pvalues.shape} values (or NaN); expected ({k},)")
    pvalues = np.clip(pvalues, 0.0, 1.0)
    risk = np.clip(risk, 0.0, 1.0)  # the mean of values in [0, 1] can round a hair outside

    certified = np.asarray(procedure_kind.select(pvalues, epsilon), dtype=bool)
    chosen = choose(certified, cost_vector)
    if chosen is None:
        lambda_hat = fallback
        reason = _reason_nothing_certified(grid, risk, pvalues, delta, epsilon, n, procedure_kind, fallback, order)
    else:
        lambda_hat = float(grid[chosen])
        reason = None

    return Certificate(
        lambda_hat=lambda_hat,
        certified_any=chosen is not None,
        chosen_index=chosen,
        reason=reason,
        delta=delta,
        epsilon=epsilon,
        n=n,
        pvalue_method=pvalue_kind.name,
        procedure=procedure_kind.describe(k),
        order=order,
        lambdas=grid.tolist(),
        empirical_risk=risk.tolist(),
        pvalues=pvalues.tolist(),
        certified=certified.tolist(),
        costs=None if cost_vector is None else cost_vector.tolist(),
        wsr_seed=seed if pvalue_kind.order_dependent else None,
        metadata=metadata,
    )


def _as_costs(costs, k: int) -> np.ndarray | None:
    if costs is None:
        return None
    try:
        vector = np.asarray(costs, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"costs must be numeric, one per candidate; {exc}") from None
    if vector.shape != (k,):
        raise ValueError(f"costs must have shape ({k},), one per candidate; got {vector.shape}")
    if not np.isfinite(vector).all():
        raise ValueError("costs must be finite")
    return vector


def _reason_nothing_certified(grid, risk, pvalues, delta, epsilon, n, procedure, fallback, order) -> str:
    if isinstance(procedure, FixedSequence):
        why = (
            f"fixed-sequence testing stopped at the first candidate λ = {float(grid[0])!r} "
            f"(empirical risk {risk[0]:.4g}, p-value {pvalues[0]:.3g} > ε = {epsilon:g})"
        )
    else:
        j = int(np.argmin(pvalues))
        why = (
            f"{procedure.name} at ε = {epsilon:g} rejected no hypothesis; the smallest p-value is "
            f"{pvalues[j]:.3g} at λ = {float(grid[j])!r} (empirical risk {risk[j]:.4g})"
        )
    if risk.min() >= delta:
        hint = f"every candidate's empirical risk is at least δ = {delta:g}"
    else:
        hint = f"with n = {n} examples the evidence is too weak; more examples, a larger δ or a larger ε would help"
    what = "the full model" if order == "descending" and fallback == 1.0 else "the always-safe value"
    return f"{why}; {hint}. Falling back to λ = {fallback!r} ({what})."
