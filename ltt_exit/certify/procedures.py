"""Family-wise error procedures: which hypotheses H_j: E[L(λ_j)] > δ may be rejected at level ε.

Every procedure is a small object behind one interface (:class:`Procedure`), registered by name in
:data:`PROCEDURES`. ``select(pvalues, epsilon)`` takes p-values in the grid's a-priori order, shape
(..., K) (leading axes are independent families, e.g. simulated calibration draws), and returns a
boolean mask of the same shape: True = rejected = candidate certified. Each procedure controls the
family-wise error rate at ε: with probability at least 1 - ε no candidate whose true risk exceeds δ
is certified (given valid p-values).

* ``fixed-sequence`` (default; CALM §4.3): test H_1, H_2, … at level ε each, in grid order, and
  stop at the first p_j > ε. Certified set = every hypothesis before that first non-rejection.
* ``multi-start``: s starts spread evenly over the grid; from each start a fixed-sequence run at
  level ε / s along the grid order; certified set = union of the runs.
* ``bonferroni``: reject p_j ≤ ε / K (``statsmodels.stats.multitest.multipletests``).
* ``holm``: Holm's step-down procedure (``multipletests(method="holm")``); rejects a superset of
  Bonferroni.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
from statsmodels.stats.multitest import multipletests

from ._checks import check_open_unit
from ._registry import Registry

__all__ = [
    "Procedure",
    "FixedSequence",
    "MultiStart",
    "Bonferroni",
    "Holm",
    "PROCEDURES",
    "get_procedure",
]


def _as_pvalues(pvalues) -> np.ndarray:
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim == 0 or p.shape[-1] == 0:
        raise ValueError(f"pvalues must have shape (..., K) with K ≥ 1; got shape {p.shape}")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("pvalues must lie in [0, 1] (no NaN)")
    return p


class Procedure(ABC):
    """A family-wise error procedure over p-values in the grid's a-priori order."""

    #: registry name, written into the certificate
    name: ClassVar[str] = ""

    def select(self, pvalues, epsilon: float) -> np.ndarray:
        """Boolean mask (..., K) of rejected hypotheses (= certified candidates) at level ε."""
        p = _as_pvalues(pvalues)
        epsilon = check_open_unit(epsilon, "epsilon")
        return self._select(p, epsilon)

    @abstractmethod
    def _select(self, pvalues: np.ndarray, epsilon: float) -> np.ndarray:
        ...

    def params(self, n_candidates: int) -> dict:
        """The procedure's parameters as written into a certificate for a grid of K candidates."""
        return {}

    def describe(self, n_candidates: int) -> dict:
        """``{"name": ..., "params": {...}}`` for the certificate."""
        return {"name": self.name, "params": self.params(n_candidates)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash(type(self))


def _fixed_sequence(p: np.ndarray, level: float) -> np.ndarray:
    # Rejected while every hypothesis so far had p ≤ level: the running AND stops at the first
    # p_j > level, and nothing after it is rejected (not even a later small p-value).
    return np.logical_and.accumulate(p <= level, axis=-1)


class FixedSequence(Procedure):
    """Fixed-sequence testing: reject H_1, H_2, … at level ε until the first p_j > ε."""

    name = "fixed-sequence"

    def _select(self, pvalues, epsilon):
        return _fixed_sequence(pvalues, epsilon)


class MultiStart(Procedure):
    """Multi-start fixed-sequence testing: s runs at level ε / s each, certified set = union.

    Parameters
    ----------
    starts:
        Number of evenly spaced starts s (default 3): start indices ⌊i·K/s⌋ for i = 0..s-1, so the
        first start is always the most conservative candidate. With K < s the duplicate starts
        collapse and the level is ε / (number of distinct starts).
    start_indices:
        Explicit start positions (0-based, in grid order) instead of ``starts``. They must be
        chosen before seeing the calibration data.
    """

    name = "multi-start"

    def __init__(self, starts: int = 3, start_indices=None):
        if start_indices is not None:
            indices = [int(i) for i in start_indices]
            if not indices or any(i < 0 for i in indices) or len(set(indices)) != len(indices):
                raise ValueError(
                    f"start_indices must be distinct non-negative grid positions; got {start_indices!r}"
                )
            self.start_indices = tuple(sorted(indices))
            self.starts = len(self.start_indices)
        else:
            if isinstance(starts, bool) or not isinstance(starts, (int, np.integer)) or starts < 1:
                raise ValueError(f"multi-start needs a positive whole number of starts; got {starts!r}")
            self.starts = int(starts)
            self.start_indices = None

    def indices(self, n_candidates: int) -> list[int]:
        """The distinct start positions for a grid of ``n_candidates``."""
        if self.start_indices is not None:
            if self.start_indices[-1] >= n_candidates:
                raise ValueError(
                    f"start index {self.start_indices[-1]} is outside the grid of {n_candidates} candidates"
                )
            return list(self.start_indices)
        return sorted({(i * n_candidates) // self.starts for i in range(self.starts)})

    def _select(self, pvalues, epsilon):
        k = pvalues.shape[-1]
        starts = self.indices(k)
        level = epsilon / len(starts)
        mask = np.zeros(pvalues.shape, dtype=bool)
        for start in starts:
            mask[..., start:] |= _fixed_sequence(pvalues[..., start:], level)
        return mask

    def params(self, n_candidates):
        starts = self.indices(n_candidates)
        return {"starts": len(starts), "start_indices": starts}

    def __repr__(self) -> str:
        if self.start_indices is not None:
            return f"MultiStart(start_indices={list(self.start_indices)})"
        return f"MultiStart(starts={self.starts})"


class _StatsmodelsProcedure(Procedure):
    """A single-step or step-down procedure from ``statsmodels`` ``multipletests``.

    One family (1-D p-values, what ``certify`` passes) goes to ``multipletests`` itself. Stacks of
    families (simulations over thousands of draws) use :meth:`_batch`, the same rule written with
    array operations and the same floating-point thresholds: ``multipletests`` runs a full garbage
    collection on every Holm call, which makes a per-row loop take minutes. The tests check that
    both paths agree.
    """

    method: ClassVar[str] = ""

    def _select(self, pvalues, epsilon):
        if pvalues.ndim == 1:
            return np.asarray(multipletests(pvalues, alpha=epsilon, method=self.method)[0], dtype=bool)
        return self._batch(pvalues, epsilon)

    @abstractmethod
    def _batch(self, pvalues: np.ndarray, epsilon: float) -> np.ndarray:
        ...


class Bonferroni(_StatsmodelsProcedure):
    """Bonferroni: reject H_j when p_j ≤ ε / K. Ignores the grid order."""

    name = "bonferroni"
    method = "bonferroni"

    def _batch(self, pvalues, epsilon):
        return pvalues <= epsilon / float(pvalues.shape[-1])


class Holm(_StatsmodelsProcedure):
    """Holm's step-down: sort p ascending, reject p_(i) ≤ ε / (K - i + 1) until the first failure."""

    name = "holm"
    method = "holm"

    def _batch(self, pvalues, epsilon):
        k = pvalues.shape[-1]
        order = np.argsort(pvalues, axis=-1)
        sorted_p = np.take_along_axis(pvalues, order, axis=-1)
        rejected_sorted = np.logical_and.accumulate(sorted_p <= epsilon / np.arange(k, 0, -1), axis=-1)
        rejected = np.empty_like(rejected_sorted)
        np.put_along_axis(rejected, order, rejected_sorted, axis=-1)
        return rejected


#: family-wise error procedures by name
PROCEDURES: Registry = Registry(
    {cls.name: cls for cls in (FixedSequence, MultiStart, Bonferroni, Holm)},
    {"fixed_sequence": "fixed-sequence", "multi_start": "multi-start"},
)


def get_procedure(procedure: str | Procedure, **params) -> Procedure:
    """Resolve a registry name (with optional constructor parameters) or pass an instance through."""
    if isinstance(procedure, Procedure):
        if params:
            raise ValueError("parameters can only be given with a procedure name, not with an instance")
        return procedure
    if isinstance(procedure, type) and issubclass(procedure, Procedure):
        return procedure(**params)
    if isinstance(procedure, str) and procedure in PROCEDURES:
        try:
            return PROCEDURES[procedure](**params)
        except TypeError as exc:
            raise ValueError(f"bad parameters for procedure {procedure!r}: {exc}") from None
    raise ValueError(
        f"unknown procedure {procedure!r}; choose one of {list(PROCEDURES)} or pass a Procedure instance"
    )
