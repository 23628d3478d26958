"""p-values for the null hypotheses H_j: E[L(λ_j)] > δ, one per candidate.

Every p-value kind is a small object behind one interface (:class:`PValue`), registered by name in
:data:`PVALUES`. Calling one on a loss matrix of shape (n_examples, n_candidates) returns a (K,)
array of p-values, vectorised over candidates. The kinds that depend on the data only through the
empirical risk R̂ (everything except WSR) also expose :meth:`RiskPValue.from_risk`, which takes R̂
of any shape (handy for simulations that vectorise over calibration draws).

Formulas (R̂ = mean loss of the candidate over n examples; docs/certification.md derives them):

* Hoeffding:          p = exp(-2 n max(0, δ - R̂)²)
* Hoeffding–KL:       p = exp(-n h1(min(R̂, δ), δ)),  h1(a, b) = a ln(a/b) + (1-a) ln((1-a)/(1-b))
* Bentkus:            p = e · P[Binom(n, δ) ≤ ⌈n R̂⌉]
* Hoeffding–Bentkus:  p = min(Hoeffding–KL, Bentkus)
* binomial (exact, losses in {0, 1} only): p = P[Binom(n, δ) ≤ n R̂]
* WSR (betting, Bates et al. 2021): p = min(1, 1 / max_t K_t), see :class:`WSR`.

All p-values are clipped to [0, 1].
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
from scipy.special import rel_entr
from scipy.stats import binom

from ltt_exit.validation import InputError

from ._checks import as_loss_matrix, as_real_array, check_counts, check_open_unit, check_seed, is_binary
from ._registry import Registry

__all__ = [
    "PValue",
    "RiskPValue",
    "Hoeffding",
    "HoeffdingKL",
    "Bentkus",
    "HoeffdingBentkus",
    "Binomial",
    "WSR",
    "PVALUES",
    "get_pvalue",
    "wsr_pvalues_in_order",
]

# Float summation error is at most a few ulps of the total per log2(n) levels of numpy's pairwise
# summation; a count that is an integer up to this tolerance is treated as that integer.
_COUNT_RTOL = 64 * np.finfo(np.float64).eps


class PValue(ABC):
    """A p-value for H_j: E[L(λ_j)] > δ, computed for every candidate column at once."""

    #: registry name, written into the certificate
    name: ClassVar[str] = ""
    #: True when the p-value is only valid for losses in {0, 1}
    binary_only: ClassVar[bool] = False
    #: True when the p-value depends on the order of the examples (then a seeded shuffle is used)
    order_dependent: ClassVar[bool] = False

    def __call__(self, losses, delta: float, *, epsilon: float | None = None, seed: int = 0) -> np.ndarray:
        """p-values of shape (K,) for ``losses`` of shape (n, K) with entries in [0, 1].

        ``epsilon`` (the allowed failure probability) is only used by p-values that tune on it
        (WSR); ``seed`` only by order-dependent ones (WSR's shuffle of the examples).
        """
        matrix = as_loss_matrix(losses)
        delta = check_open_unit(delta, "delta")
        if epsilon is not None:
            epsilon = check_open_unit(epsilon, "epsilon")
        seed = check_seed(seed)
        if self.binary_only and not is_binary(matrix):
            raise ValueError(
                f"the {self.name!r} p-value is exact only for losses in {{0, 1}}, but the losses "
                "contain other values; use 'hoeffding-bentkus' (or 'wsr') for bounded losses"
            )
        return self._compute(matrix, delta, epsilon, seed)

    @abstractmethod
    def _compute(self, losses: np.ndarray, delta: float, epsilon: float | None, seed: int) -> np.ndarray:
        """p-values (K,) for already-checked ``losses`` (n, K)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


class RiskPValue(PValue):
    """A p-value that depends on the losses only through R̂ and n."""

    def _compute(self, losses, delta, epsilon, seed):
        n = losses.shape[0]
        risk = losses.sum(axis=0) / n
        return self.from_risk(risk, n, delta)

    @abstractmethod
    def from_risk(self, risk, n, delta: float) -> np.ndarray:
        """p-values for empirical risks ``risk`` (any shape) from ``n`` examples (int or broadcastable array)."""


def _prepare(risk, n, delta):
    risk = as_real_array(risk, "risk")
    if np.any(~np.isfinite(risk)) or np.any(risk < 0) or np.any(risk > 1):
        raise InputError("empirical risks must lie in [0, 1]")
    n = check_counts(n, "n")
    delta = check_open_unit(delta, "delta")
    return risk, n, delta


def _count_ceil(risk: np.ndarray, n) -> np.ndarray:
    """⌈n R̂⌉, treating n R̂ within float summation error of an integer as that integer."""
    total = risk * n
    return np.ceil(total - _COUNT_RTOL * np.maximum(total, 1.0))


class Hoeffding(RiskPValue):
    """p = exp(-2 n max(0, δ - R̂)²)  (Hoeffding's inequality, losses in [0, 1])."""

    name = "hoeffding"

    def from_risk(self, risk, n, delta):
        risk, n, delta = _prepare(risk, n, delta)
        gap = np.maximum(0.0, delta - risk)
        return np.clip(np.exp(-2.0 * n * gap * gap), 0.0, 1.0)


class HoeffdingKL(RiskPValue):
    """p = exp(-n h1(min(R̂, δ), δ)), the Kullback–Leibler (Chernoff) form of Hoeffding's bound.

    h1(a, b) = a ln(a/b) + (1-a) ln((1-a)/(1-b)) is the Bernoulli relative entropy; ``rel_entr``
    applies the 0·ln 0 = 0 convention, so R̂ = 0 gives p = (1 - δ)^n.
    """

    name = "hoeffding-kl"

    def from_risk(self, risk, n, delta):
        risk, n, delta = _prepare(risk, n, delta)
        a = np.minimum(risk, delta)
        h1 = rel_entr(a, delta) + rel_entr(1.0 - a, 1.0 - delta)
        return np.clip(np.exp(-n * h1), 0.0, 1.0)


class Bentkus(RiskPValue):
    """p = e · P[Binom(n, δ) ≤ ⌈n R̂⌉] (Bentkus 2004), clipped to 1."""

    name = "bentkus"

    def from_risk(self, risk, n, delta):
        risk, n, delta = _prepare(risk, n, delta)
        tail = binom.cdf(_count_ceil(risk, n), n, delta)
        return np.clip(math.e * tail, 0.0, 1.0)


class HoeffdingBentkus(RiskPValue):
    """p = min(Hoeffding–KL, Bentkus): the LTT paper's recommended p-value for bounded losses."""

    name = "hoeffding-bentkus"

    def from_risk(self, risk, n, delta):
        return np.minimum(HoeffdingKL().from_risk(risk, n, delta), Bentkus().from_risk(risk, n, delta))


class Binomial(RiskPValue):
    """Exact p = P[Binom(n, δ) ≤ n R̂] for losses in {0, 1} (no factor e: the tail is exact)."""

    name = "binomial"
    binary_only = True

    def from_risk(self, risk, n, delta):
        risk, n, delta = _prepare(risk, n, delta)
        total = risk * n
        count = np.rint(total)
        if np.any(np.abs(total - count) > _COUNT_RTOL * np.maximum(total, 1.0)):
            raise ValueError(
                "the 'binomial' p-value needs losses in {0, 1}: n·R̂ must be a whole number of failures"
            )
        return np.clip(binom.cdf(count, n, delta), 0.0, 1.0)


def wsr_pvalues_in_order(losses, delta: float, epsilon: float) -> np.ndarray:
    """WSR p-values (K,) for ``losses`` (n, K) taken in the given row order (no shuffle).

    With x_1..x_n one candidate's losses in order (Bates et al. 2021, RCPS, "WSR" bound):

        μ̂_t  = (1/2 + Σ_{i≤t} x_i) / (t + 1)
        σ̂²_t = (1/4 + Σ_{i≤t} (x_i - μ̂_i)²) / (t + 1)          (σ̂²_0 = 1/4)
        ν_t  = min(1, sqrt(2 ln(1/ε) / (n σ̂²_{t-1})))
        K_t  = Π_{i≤t} (1 - ν_i (x_i - δ))
        p    = min(1, 1 / max_{1≤t≤n} K_t)

    Under H_j (E[x] > δ) K_t is a non-negative supermartingale, so Ville's inequality makes p valid.
    The running product is kept directly (no logarithms): its factors lie in [δ, 1 + δ); an
    overflow to +inf only happens when p < 1e-308 (and gives p = 0), and an underflow towards 0
    only affects values far below the running maximum (which starts at K_1 ≥ δ).
    """
    matrix = np.asarray(losses, dtype=np.float64)
    return _wsr(matrix, np.arange(matrix.shape[0]), delta, epsilon)


# Below this many candidates the per-row Python loop of the row-block scan costs more than it saves.
_NARROW = 32
# Column chunk and row-block sizes: temporaries of about 1 MiB each stay in the CPU cache.
_MAX_COLUMNS = 4096
_BLOCK_BYTES = 1 << 20


def _wsr(losses: np.ndarray, order: np.ndarray, delta: float, epsilon: float) -> np.ndarray:
    """WSR p-values (K,) for ``losses`` (n, K) with the examples taken in ``order`` (n,)."""
    n, k = losses.shape
    c0 = 2.0 * math.log(1.0 / epsilon) / n
    out = np.empty(k, dtype=np.float64)
    # The running product may overflow (p → 0, correct) or underflow (harmless, see above).
    with np.errstate(over="ignore", under="ignore"):
        if k < _NARROW:
            # Few candidates: one contiguous row per candidate, cumulative sums along it.
            out[:] = _wsr_transposed(np.ascontiguousarray(losses[order].T), delta, c0)
            return out
        for j0 in range(0, k, _MAX_COLUMNS):
            j1 = min(k, j0 + _MAX_COLUMNS)
            out[j0:j1] = _wsr_row_blocks(losses, order, j0, j1, delta, c0)
    return out


def _wsr_transposed(x: np.ndarray, delta: float, c0: float) -> np.ndarray:
    """WSR p-values for ``x`` of shape (c, n): one candidate per row, examples in betting order."""
    n = x.shape[1]
    inv_t_plus_1 = 1.0 / np.arange(2, n + 2, dtype=np.float64)  # 1/(t+1), t = 1..n
    mu = np.cumsum(x, axis=1)  # Σ_{i≤t} x_i, then μ̂_t
    mu += 0.5
    mu *= inv_t_plus_1
    dev2 = np.subtract(x, mu, out=mu)  # (x_t - μ̂_t)²
    dev2 *= dev2
    var_prev = np.empty_like(x)  # σ̂²_{t-1}, t = 1..n
    var_prev[:, 0] = 0.25
    np.cumsum(dev2[:, :-1], axis=1, out=var_prev[:, 1:])
    var_prev[:, 1:] += 0.25
    var_prev[:, 1:] *= inv_t_plus_1[:-1]
    nu = np.divide(c0, var_prev, out=var_prev)  # ν_t = min(1, sqrt(c0 / σ̂²_{t-1}))
    np.sqrt(nu, out=nu)
    np.minimum(nu, 1.0, out=nu)
    factor = np.subtract(x, delta, out=dev2)  # 1 - ν_t (x_t - δ)
    factor *= nu
    np.subtract(1.0, factor, out=factor)
    wealth = np.cumprod(factor, axis=1, out=factor)  # K_t
    return _to_pvalue(wealth.max(axis=1))


def _wsr_row_blocks(losses, order, j0, j1, delta, c0) -> np.ndarray:
    """WSR p-values for candidates j0..j1-1, scanning the examples in blocks of rows.

    Same recursion as :func:`_wsr_transposed`, in the loss matrix's own (example, candidate)
    layout: each cumulative sum / product runs down the rows as one vectorised operation per row
    (across all candidates of the chunk), with carries between blocks. numpy's own
    ``cumsum(axis=0)`` walks each column separately and is several times slower here.
    """
    n = losses.shape[0]
    width = j1 - j0
    rows_per_block = max(16, _BLOCK_BYTES // (8 * width))
    running_sum = np.zeros(width)       # Σ x_i
    running_dev2 = np.zeros(width)      # Σ (x_i - μ̂_i)²
    var_last = np.full(width, 0.25)     # σ̂²_{t-1} for the first row of the next block
    wealth_last = np.ones(width)        # K_{t-1}
    best = np.zeros(width)              # max K_t so far
    add, multiply = np.add, np.multiply
    source = losses if width == losses.shape[1] else losses[:, j0:j1]
    for r0 in range(0, n, rows_per_block):
        r1 = min(n, r0 + rows_per_block)
        x = np.take(source, order[r0:r1], axis=0)
        rows = r1 - r0
        inv_t_plus_1 = (1.0 / np.arange(r0 + 2, r1 + 2, dtype=np.float64))[:, None]
        # running sums Σ_{i≤t} x_i, one vectorised add per row
        mu = np.empty_like(x)
        add(running_sum, x[0], out=mu[0])
        for i in range(1, rows):
            add(mu[i - 1], x[i], out=mu[i])
        running_sum = mu[-1].copy()
        mu += 0.5
        mu *= inv_t_plus_1
        dev2 = np.subtract(x, mu, out=mu)
        dev2 *= dev2
        add(running_dev2, dev2[0], out=dev2[0])
        for i in range(1, rows):
            add(dev2[i - 1], dev2[i], out=dev2[i])
        running_dev2 = dev2[-1].copy()
        var = dev2  # σ̂²_t for the block's rows
        var += 0.25
        var *= inv_t_plus_1
        nu = np.empty_like(x)  # ν_t from σ̂²_{t-1}: shift by one row, carry across blocks
        nu[0] = var_last
        nu[1:] = var[:-1]
        var_last = var[-1].copy()
        np.divide(c0, nu, out=nu)
        np.sqrt(nu, out=nu)
        np.minimum(nu, 1.0, out=nu)
        factor = np.subtract(x, delta, out=var)
        factor *= nu
        np.subtract(1.0, factor, out=factor)
        multiply(wealth_last, factor[0], out=factor[0])
        for i in range(1, rows):
            multiply(factor[i - 1], factor[i], out=factor[i])
        wealth_last = factor[-1].copy()
        np.maximum(best, factor.max(axis=0), out=best)
    return _to_pvalue(best)


def _to_pvalue(best_wealth: np.ndarray) -> np.ndarray:
    # p = min(1, 1 / max_t K_t); K_1 ≥ δ > 0, so the maximum is positive (+inf gives p = 0).
    return np.clip(1.0 / best_wealth, 0.0, 1.0)


class WSR(PValue):
    """Waudby-Smith–Ramdas betting p-value (order-dependent; examples shuffled with a recorded seed).

    The examples are permuted with ``numpy.random.default_rng(seed).permutation(n)`` (one
    permutation shared by all candidates) and then scanned as in :func:`wsr_pvalues_in_order`;
    the certificate records the seed so the p-values can be reproduced exactly.
    """

    name = "wsr"
    order_dependent = True

    def _compute(self, losses, delta, epsilon, seed):
        if epsilon is None:
            raise ValueError("the 'wsr' p-value needs epsilon (its bet size ν_t is tuned with ln(1/ε))")
        order = np.random.default_rng(seed).permutation(losses.shape[0])
        return _wsr(losses, order, delta, epsilon)


#: p-value kinds by name; ``PVALUES["hb"]`` resolves the alias to ``"hoeffding-bentkus"``.
PVALUES: Registry = Registry(
    {cls.name: cls for cls in (Binomial, Hoeffding, HoeffdingKL, Bentkus, HoeffdingBentkus, WSR)},
    {"hb": "hoeffding-bentkus"},
)


def get_pvalue(pvalue: str | PValue) -> PValue:
    """Resolve a registry name (or alias) or pass an instance through."""
    if isinstance(pvalue, PValue):
        return pvalue
    if isinstance(pvalue, type) and issubclass(pvalue, PValue):
        return pvalue()
    if isinstance(pvalue, str) and pvalue in PVALUES:
        return PVALUES[pvalue]()
    raise ValueError(f"unknown p-value {pvalue!r}; choose one of {PVALUES.names()} or pass a PValue instance")
