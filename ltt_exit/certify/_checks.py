"""Input checks shared by the certification core, the loss table and the certificate.

Each check either returns a clean numpy value or raises ``InputError`` / ``InputTypeError`` (a
``ValueError`` / ``TypeError``; :mod:`ltt_exit.validation`) with a message that says what was wrong
and what is expected. Scalar checks delegate to :mod:`ltt_exit.validation`; the array checks here are
the vectorised ones.
"""
from __future__ import annotations

import numbers

import numpy as np

from ltt_exit import validation
from ltt_exit.validation import InputError, InputTypeError, check_whole

ORDERS = ("descending", "ascending")


def as_loss_matrix(losses, *, name: str = "losses") -> np.ndarray:
    """Return ``losses`` as a float64 array of shape (n_examples, n_candidates), values in [0, 1].

    Raises on: non-numeric data, wrong number of dimensions, n = 0, zero candidates, NaN, ±inf,
    values outside [0, 1]. The message names the first offending example and candidate.
    """
    matrix = as_real_array(losses, name)
    if matrix.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array of shape (n_examples, n_candidates); got shape {matrix.shape}"
        )
    n, k = matrix.shape
    if n == 0:
        raise ValueError(f"{name} has no examples (n = 0): certification needs at least one")
    if k == 0:
        raise ValueError(f"{name} has no candidate columns: the candidate grid is empty")
    # Column minima and maxima propagate NaN, so two reductions check finiteness and range.
    col_min = matrix.min(axis=0)
    col_max = matrix.max(axis=0)
    if np.isnan(col_min).any() or np.isnan(col_max).any():
        i, j = _first(np.isnan(matrix))
        raise ValueError(f"{name} contain NaN (first at example {i}, candidate {j}); losses must be finite, in [0, 1]")
    if np.isinf(col_min).any() or np.isinf(col_max).any():
        i, j = _first(np.isinf(matrix))
        raise ValueError(
            f"{name} contain {matrix[i, j]} (first at example {i}, candidate {j}); losses must be finite, in [0, 1]"
        )
    if (col_min < 0).any() or (col_max > 1).any():
        i, j = _first((matrix < 0) | (matrix > 1))
        raise ValueError(
            f"{name} must lie in [0, 1]; found {matrix[i, j]!r} at example {i}, candidate {j}"
        )
    return matrix


def as_real_array(values, name: str) -> np.ndarray:
    """``values`` as a float64 array, refusing what a cast would silently change: complex numbers (the
    imaginary part would be dropped), strings ("0.5" is not a loss) and other non-numeric objects."""
    try:
        raw = np.asarray(values)
    except (TypeError, ValueError) as exc:  # ragged nested lists
        raise InputTypeError(f"{name} must be a numeric array; {exc}") from None
    if raw.dtype.kind == "c":
        raise InputTypeError(f"{name} must be real numbers; got complex values ({raw.dtype})")
    if raw.dtype.kind not in "biuf":
        if raw.dtype.kind == "O" and all(
            isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) for v in raw.reshape(-1)
        ):
            return raw.astype(np.float64)
        raise InputTypeError(f"{name} must be numeric (real numbers); got an array of {raw.dtype}")
    return raw.astype(np.float64, copy=False)


def check_counts(n, name: str = "n"):
    """Example counts: a whole number >= 1, or an array of them (float arrays with whole values are
    accepted for simulations). Refuses bools, fractions, NaN and ±inf instead of returning NaN p-values."""
    if np.ndim(n) == 0:
        if isinstance(n, np.ndarray):
            n = n.item()
        return check_whole(n, name, minimum=1)
    counts = np.asarray(n)
    if counts.dtype.kind not in "iuf":
        raise InputTypeError(f"{name} must hold whole numbers >= 1; got an array of {counts.dtype}")
    if counts.dtype.kind == "f" and not (np.isfinite(counts).all() and (counts == np.round(counts)).all()):
        raise InputError(f"{name} must hold whole numbers >= 1; found {counts[~(np.isfinite(counts) & (counts == np.round(counts)))].reshape(-1)[0]!r}")
    if (counts < 1).any():
        raise InputError(f"{name} must be at least 1; found {counts[counts < 1].reshape(-1)[0]!r}")
    return counts


def _first(mask: np.ndarray) -> tuple[int, int]:
    i, j = np.argwhere(mask)[0]
    return int(i), int(j)


def check_order(order) -> str:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}; got {order!r}")
    return order


def as_grid(lambdas, n_candidates: int | None, order: str, *, name: str = "lambdas") -> np.ndarray:
    """Return the candidate grid as a float64 (K,) array, checked against ``order``.

    ``order="descending"``: strictly decreasing (largest, most conservative λ first);
    ``order="ascending"``: strictly increasing. ``n_candidates`` (when given) must equal K.
    """
    check_order(order)
    try:
        grid = np.asarray(lambdas, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a 1-D array of numbers; {exc}") from None
    if grid.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per candidate); got shape {grid.shape}")
    if grid.size == 0:
        raise ValueError(f"{name} is empty: the candidate grid needs at least one value")
    if not np.isfinite(grid).all():
        raise ValueError(f"{name} must be finite; got {grid[~np.isfinite(grid)][0]!r}")
    if n_candidates is not None and grid.size != n_candidates:
        raise ValueError(
            f"{name} has {grid.size} values but the loss matrix has {n_candidates} candidate columns; "
            "column j must belong to lambdas[j]"
        )
    steps = np.diff(grid)
    bad = np.flatnonzero(steps >= 0) if order == "descending" else np.flatnonzero(steps <= 0)
    if bad.size:
        j = int(bad[0])
        wanted = "strictly decreasing (most conservative, largest λ first)" if order == "descending" \
            else "strictly increasing (most conservative, smallest λ first)"
        raise ValueError(
            f"{name} is not in the declared order {order!r}: it must be {wanted}, but "
            f"{name}[{j}] = {grid[j]!r} is followed by {name}[{j + 1}] = {grid[j + 1]!r}. "
            "The grid order is fixed before seeing data; declare the other order if that is intended."
        )
    return grid


def check_open_unit(value, name: str) -> float:
    """Return ``value`` as float, requiring a real number strictly between 0 and 1 (δ, ε)."""
    return validation.check_open_unit(value, name)


def check_seed(seed) -> int:
    """A non-negative whole number of any integer type (a bool or a float is refused)."""
    if isinstance(seed, numbers.Integral) and not isinstance(seed, (bool, np.bool_)) and seed < 0:
        raise InputTypeError(f"seed must be a non-negative integer; got {seed!r}")  # a TypeError, as before
    return validation.check_whole(seed, "seed", minimum=0)


def is_binary(losses: np.ndarray) -> bool:
    """True when every entry of ``losses`` is exactly 0 or 1."""
    return not bool(np.any((losses != 0) & (losses != 1)))
