"""Re-derive a stored certificate's decision from its own evidence (numpy / scipy only; no torch).

A certificate's digest detects edits but is not a signature: anyone can change a field and
recompute it. So loading a certificate does not trust its stored decision. :func:`rederive` takes
the stored record (the parsed JSON object) and recomputes, from the stored evidence alone,

* the p-values, for p-value kinds that depend on the data only through the empirical risk
  (everything but WSR): from ``empirical_risk``, ``n`` and ``delta``;
* the certified set: the stored procedure (with its stored parameters) applied to the stored
  p-values at the stored ``epsilon``;
* the chosen index: the selection rule (lowest cost among certified, ties to the later in grid
  order; without costs the certified candidate furthest along the grid);
* ``lambda_hat``: the grid value at the chosen index, or — nothing certified — an always-safe
  value (:func:`check_fallback`).

It returns an :class:`Expected` record; :func:`disagreements` lists every stored field that differs
from it, and ``Certificate.from_dict`` refuses the file naming the first one.

Extending it: each *selection kind* (how a certificate chooses what it certifies) registers a
function ``record -> Expected`` in :data:`SELECTION_KINDS`; :func:`selection_kind` says which kind
a record is. Today there is one kind, ``"grid"`` (one knob λ, the grid in its a-priori order);
a kind that chooses among configurations (Pareto testing) adds its own entry and its own expected
fields in ``Expected.extra``. Every loadable ``schema_version`` (today: 1) goes through here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from ltt_exit.validation import InputError

from ._checks import ORDERS
from .procedures import PROCEDURES, MultiStart, Procedure, get_procedure
from .pvalues import PVALUES, RiskPValue

__all__ = [
    "Expected",
    "RederiveError",
    "SELECTION_KINDS",
    "always_safe_lambda",
    "check_fallback",
    "choose",
    "disagreements",
    "procedure_from_record",
    "rederive",
    "selection_kind",
]

#: stored p-values may differ from the recomputed ones by this much (another scipy build rounds differently)
PVALUE_RTOL = 1e-9
PVALUE_ATOL = 1e-12


class RederiveError(InputError):
    """The stored record cannot be re-derived (unknown method, bad parameters); names the field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"field {field_name!r}: {message}")
        self.field = field_name


@dataclass
class Expected:
    """What a certificate's fields must be, recomputed from its evidence. Arrays have shape (K,).

    ``pvalues`` is None when the p-value kind cannot be recomputed from the stored record (WSR needs
    the loss matrix). ``lambda_hat`` is None when nothing is certified and the stored value passed
    :func:`check_fallback`. ``extra`` holds expected values of fields a selection kind adds.
    """

    pvalues: np.ndarray | None
    certified: np.ndarray
    certified_any: bool
    chosen_index: int | None
    lambda_hat: float | None
    extra: dict[str, Any] = field(default_factory=dict)


def always_safe_lambda(lambdas: np.ndarray, order: str) -> float:
    """The λ returned when nothing is certified.

    Descending grids (confidence thresholds, exit when confidence ≥ λ): ``max(1.0, lambdas[0])``,
    i.e. λ = 1 (the full model) unless the grid starts above 1. Ascending grids (small λ is
    conservative): ``min(0.0, lambdas[0])``.
    """
    first = float(lambdas[0])
    return max(1.0, first) if order == "descending" else min(0.0, first)


def check_fallback(value: float, lambdas: np.ndarray, order: str) -> bool:
    """True when ``value`` may stand for "nothing certified" on this grid: it is at least as conservative
    as :func:`always_safe_lambda` (descending grids: ``value >= max(1, lambdas[0])``, e.g. λ = 2 never
    exits either; ascending grids: ``value <= min(0, lambdas[0])``). A value between the always-safe one
    and the grid, or on the grid, would use a threshold that nothing certified.
    """
    safe = always_safe_lambda(lambdas, order)
    return value >= safe if order == "descending" else value <= safe


def choose(certified: np.ndarray, costs: np.ndarray | None) -> int | None:
    """The chosen index among ``certified`` (K,): lowest cost (ties: later in grid order), else the last."""
    indices = np.flatnonzero(certified)
    if indices.size == 0:
        return None
    if costs is None:
        return int(indices[-1])  # furthest along the grid order
    candidate_costs = costs[indices]
    cheapest = np.flatnonzero(candidate_costs == candidate_costs.min())
    return int(indices[cheapest[-1]])  # ties: the later in grid order


def procedure_from_record(procedure: Mapping[str, Any], n_candidates: int) -> Procedure:
    """Rebuild the procedure a certificate names, checking that its stored parameters are the ones it
    writes for this grid size (so a different procedure cannot hide behind a known name)."""
    name = procedure.get("name")
    params = procedure.get("params")
    if not isinstance(name, str) or name not in PROCEDURES or PROCEDURES.canonical(name) != name:
        raise RederiveError("procedure", f"unknown procedure {name!r}; known: {list(PROCEDURES)}")
    if not isinstance(params, Mapping):
        raise RederiveError("procedure", f"params must be an object; got {params!r}")
    try:
        if PROCEDURES[name] is MultiStart:
            rebuilt: Procedure = MultiStart(start_indices=params.get("start_indices"))
        else:
            rebuilt = get_procedure(name)
        expected = rebuilt.params(n_candidates)
    except (TypeError, ValueError) as exc:
        raise RederiveError("procedure", f"bad parameters {dict(params)!r} for {name!r}: {exc}") from None
    if dict(params) != expected:
        raise RederiveError("procedure", f"{name!r} with a grid of {n_candidates} writes params {expected!r}, "
                                         f"the file has {dict(params)!r}")
    return rebuilt


def _rederive_grid(record: Mapping[str, Any]) -> Expected:
    """The one-knob certificate: a grid of λ in its a-priori order."""
    lambdas = np.asarray(record["lambdas"], dtype=np.float64)
    k = lambdas.size
    order = record["order"]
    if order not in ORDERS:
        raise RederiveError("order", f"must be one of {ORDERS}; got {order!r}")
    method = record["pvalue_method"]
    if not isinstance(method, str) or method not in PVALUES or PVALUES.canonical(method) != method:
        raise RederiveError("pvalue_method", f"unknown p-value {method!r}; known: {list(PVALUES)}")
    kind = PVALUES[method]()
    seed = record.get("wsr_seed")
    if kind.order_dependent and seed is None:
        raise RederiveError("wsr_seed", f"the {method!r} p-value depends on the example order, so the seed "
                                        "of its shuffle must be recorded")
    if not kind.order_dependent and seed is not None:
        raise RederiveError("wsr_seed", f"must be null for the order-free {method!r} p-value; got {seed!r}")

    delta, epsilon, n = record["delta"], record["epsilon"], record["n"]
    stored_pvalues = np.asarray(record["pvalues"], dtype=np.float64)
    expected_pvalues = None
    if isinstance(kind, RiskPValue):
        risk = np.asarray(record["empirical_risk"], dtype=np.float64)
        try:
            expected_pvalues = np.clip(np.asarray(kind.from_risk(risk, n, delta), dtype=np.float64), 0.0, 1.0)
        except ValueError as exc:
            raise RederiveError("empirical_risk", f"cannot recompute the {method!r} p-values: {exc}") from None
    procedure = procedure_from_record(record["procedure"], k)
    certified = np.asarray(procedure.select(stored_pvalues, epsilon), dtype=bool)
    costs = record.get("costs")
    chosen = choose(certified, None if costs is None else np.asarray(costs, dtype=np.float64))
    if chosen is not None:
        lambda_hat: float | None = float(lambdas[chosen])
    else:
        stored = record["lambda_hat"]
        lambda_hat = None if check_fallback(stored, lambdas, order) else always_safe_lambda(lambdas, order)
    return Expected(expected_pvalues, certified, chosen is not None, chosen, lambda_hat)


def _is_grid(record: Mapping[str, Any]) -> bool:
    return "lambdas" in record


#: selection kind -> (does a record belong to it?, record -> Expected); checked in order
SELECTION_KINDS: dict[str, tuple[Callable[[Mapping[str, Any]], bool], Callable[[Mapping[str, Any]], Expected]]] = {
    "grid": (_is_grid, _rederive_grid),
}

#: certificate schema versions whose records can be re-derived
REDERIVABLE_VERSIONS = (1,)


def selection_kind(record: Mapping[str, Any]) -> str:
    """The name in :data:`SELECTION_KINDS` of the first kind that claims ``record``."""
    for name, (claims, _) in SELECTION_KINDS.items():
        if claims(record):
            return name
    raise RederiveError("(top level)", "the record matches no known selection kind")


def rederive(record: Mapping[str, Any]) -> Expected:
    """Recompute what ``record``'s decision fields must be from its stored evidence.

    ``record``: a certificate as parsed JSON that already passed the JSON Schema (types, ranges).
    Raises :class:`RederiveError` (naming the field) when the evidence cannot be re-derived.
    """
    version = record.get("schema_version")
    if version not in REDERIVABLE_VERSIONS:
        raise RederiveError("schema_version", f"version {version!r} cannot be re-derived; known: {REDERIVABLE_VERSIONS}")
    return SELECTION_KINDS[selection_kind(record)][1](record)


def disagreements(record: Mapping[str, Any], expected: Expected) -> list[str]:
    """One message per stored field that differs from ``expected`` (empty: the record re-derives)."""
    problems = []
    if expected.pvalues is not None:
        stored = np.asarray(record["pvalues"], dtype=np.float64)
        off = ~np.isclose(stored, expected.pvalues, rtol=PVALUE_RTOL, atol=PVALUE_ATOL)
        if off.any():
            j = int(np.flatnonzero(off)[0])
            problems.append(
                f"field 'pvalues': pvalues[{j}] = {float(stored[j])!r}, but the {record['pvalue_method']!r} p-value of the "
                f"stored empirical risk {record['empirical_risk'][j]!r} with n = {record['n']} and "
                f"δ = {record['delta']!r} is {float(expected.pvalues[j])!r}"
            )
    certified = np.asarray(record["certified"], dtype=bool)
    if certified.shape != expected.certified.shape or (certified != expected.certified).any():
        expected_list = expected.certified.astype(bool).tolist()
        problems.append(
            f"field 'certified': {record['procedure'].get('name')!r} at ε = {record['epsilon']!r} on the stored "
            f"p-values certifies {expected_list}, the file says {certified.tolist()}"
        )
    if bool(record["certified_any"]) != expected.certified_any:
        problems.append(f"field 'certified_any': expected {expected.certified_any}, the file says {record['certified_any']}")
    if record["chosen_index"] != expected.chosen_index:
        problems.append(
            f"field 'chosen_index': the selection rule ({'lowest cost' if record.get('costs') is not None else 'furthest along the grid'}"
            f" among certified candidates) gives {expected.chosen_index!r}, the file says {record['chosen_index']!r}"
        )
    if expected.lambda_hat is not None and not _same_float(record["lambda_hat"], expected.lambda_hat):
        what = "lambdas[chosen_index]" if expected.chosen_index is not None else \
            "an always-safe value (nothing is certified)"
        problems.append(f"field 'lambda_hat': expected {what} = {expected.lambda_hat!r}, the file says {record['lambda_hat']!r}")
    for name, value in expected.extra.items():
        if record.get(name) != value:
            problems.append(f"field {name!r}: expected {value!r}, the file says {record.get(name)!r}")
    return problems


def _same_float(a: Any, b: float) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool) and float(a) == b
