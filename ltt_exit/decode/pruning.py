"""Vocabulary pruning of the exit head after the minimum exit layer j, behind one interface.

At every consulted layer ℓ (j <= ℓ < L) a pruning object turns "the exit head at layer ℓ" into the
rows' current vocabulary set S_ℓ and the logits over it; the exit distribution at ℓ is the softmax
over S_ℓ (pruning renormalises). Sets are always the *best-ranked* ids by logit, never the lowest
ids. The last layer L is never pruned (the decoder computes the full head there itself).

``head(ids)`` given to :meth:`VocabPruning.select` evaluates the exit head on this layer's hidden
state: ``head(None) -> (B, V)``, ``head(ids (B, k)) -> (B, k)`` logits for those vocabulary rows.
A pruning with ``reads_head_input`` (the low-rank shortlist) also gets ``head_input() -> (B, d)``, the
head's own input (final norm of the state), so that it can rank the vocabulary without the full head;
call it through :func:`select_pruned`, which hands over only what the pruning reads.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .scorers import split_spec

__all__ = [
    "PrunedHead",
    "VocabPruning",
    "NoPruning",
    "FixedPruning",
    "DecayingPruning",
    "ShortlistPruning",
    "LowRankHead",
    "PRUNINGS",
    "select_pruned",
    "resolve_pruning",
    "keep_best",
]

HeadFn = Callable[[torch.Tensor | None], torch.Tensor]


@dataclass
class PrunedHead:
    """ids: (B, k) vocabulary ids of S_ℓ, best-ranked first (None: the full vocabulary);
    logits: (B, k) logits of those ids (or (B, V)); rows_computed: head rows this layer evaluated."""

    ids: torch.Tensor | None
    logits: torch.Tensor
    rows_computed: int


def keep_best(logits: torch.Tensor, ids: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the k highest-logit entries of each row.

    logits: (B, n); ids: (B, n) vocabulary ids of the columns (None: column index = id).
    Returns (ids (B, k), logits (B, k)) ordered best first.
    """
    k = min(k, logits.shape[-1])
    top = torch.topk(logits, k, dim=-1, sorted=True)
    kept_ids = top.indices if ids is None else ids.gather(-1, top.indices)
    return kept_ids, top.values


def _check_positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


class VocabPruning(ABC):
    """Interface for exit-head vocabulary pruning."""

    name: ClassVar[str]
    #: whether ``select`` also takes ``head_input`` (see the module docstring)
    reads_head_input: ClassVar[bool] = False

    @abstractmethod
    def select(
        self, layer: int, *, min_exit_layer: int, num_layers: int, prev_ids: torch.Tensor | None, head: HeadFn
    ) -> PrunedHead:
        """The vocabulary set and logits at consulted layer ``layer`` (j <= layer < L).

        prev_ids: the set chosen at the previous consulted layer (None at layer j).
        """

    def params(self) -> dict[str, Any]:
        return {}

    def validate(self, vocab_size: int, num_layers: int, min_exit_layer: int) -> None:
        """Raise ValueError when the settings cannot work with this model."""

    def bind(self, backend: Any) -> VocabPruning:
        """This pruning ready for ``backend``'s model (what it precomputes from the weights); the decoder
        calls it once at construction and keeps the result. Default: nothing to precompute."""
        return self

    def extra_flops_per_token(self) -> float:
        """FLOPs a token pays once at the first consulted layer besides the head rows it evaluates."""
        return 0.0

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class NoPruning(VocabPruning):
    """Full vocabulary at every layer."""

    name = "none"

    def select(self, layer, *, min_exit_layer, num_layers, prev_ids, head):
        logits = head(None)
        return PrunedHead(None, logits, logits.shape[-1])


class FixedPruning(VocabPruning):
    """S = top-k ids by the layer-j logits (full head at j); layers after j compute only those k rows.

    k larger than the vocabulary is clamped to the vocabulary size.
    """

    name = "fixed"

    def __init__(self, k: int = 100):
        self.k = _check_positive_int(k, "k")

    def params(self) -> dict[str, Any]:
        return {"k": self.k}

    def select(self, layer, *, min_exit_layer, num_layers, prev_ids, head):
        if prev_ids is None:
            full = head(None)
            ids, logits = keep_best(full, None, self.k)
            return PrunedHead(ids, logits, full.shape[-1])
        return PrunedHead(prev_ids, head(prev_ids), prev_ids.shape[-1])


class DecayingPruning(VocabPruning):
    """k(ℓ) = max(k_min, ⌊k_max / (1 + ((k_max - k_min) / k_min) · ℓ / L)⌋); each consulted layer
    evaluates the head on the previous set and keeps its k(ℓ) best-ranked ids (full head at j)."""

    name = "decaying"

    def __init__(self, k_max: int = 1000, k_min: int = 10):
        self.k_max = _check_positive_int(k_max, "k_max")
        self.k_min = _check_positive_int(k_min, "k_min")
        if self.k_min > self.k_max:
            raise ValueError(f"k_min ({k_min}) must not exceed k_max ({k_max})")

    def params(self) -> dict[str, Any]:
        return {"k_max": self.k_max, "k_min": self.k_min}

    def k_at(self, layer: int, num_layers: int) -> int:
        """k(ℓ) of the schedule, in exact integer arithmetic:
        ⌊k_max / (1 + (k_max - k_min) ℓ / (k_min L))⌋ = ⌊k_max k_min L / (k_min L + (k_max - k_min) ℓ)⌋."""
        if not 0 <= layer <= num_layers:
            raise ValueError(f"layer must be in [0, {num_layers}], got {layer}")
        numerator = self.k_max * self.k_min * num_layers
        denominator = self.k_min * num_layers + (self.k_max - self.k_min) * layer
        return max(self.k_min, numerator // denominator)

    def select(self, layer, *, min_exit_layer, num_layers, prev_ids, head):
        k = self.k_at(layer, num_layers)
        if prev_ids is None:
            full = head(None)
            ids, logits = keep_best(full, None, k)
            return PrunedHead(ids, logits, full.shape[-1])
        ids, logits = keep_best(head(prev_ids), prev_ids, k)
        return PrunedHead(ids, logits, prev_ids.shape[-1])


class LowRankHead:
    """A rank-r factorisation of the LM head W (V, d) [+ bias (V,)]: W ≈ U_r S_r V_rᵀ (truncated SVD).

    down: (d, r) = V_r, up: (r, V) = S_r U_rᵀ, so that ``scores(x) = (x · down) · up (+ bias)`` ranks the
    whole vocabulary for 2·(d·r + r·V) FLOPs instead of the full head's 2·d·V.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rank: int):
        vocab, hidden = weight.shape
        if rank > min(vocab, hidden):
            raise ValueError(f"shortlist rank must be at most min(V, d) = {min(vocab, hidden)} for this "
                             f"model's head ({vocab} x {hidden}), got {rank}")
        # the factorisation runs in float32 at least (SVD has no half-precision kernels); the factors are
        # stored in the head's own dtype so the ranking runs at the head's speed
        work = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
        u, s, vh = torch.linalg.svd(work, full_matrices=False)  # (V, d), (d,), (d, d)
        self.rank, self.vocab_size, self.hidden_size = rank, vocab, hidden
        self.down = vh[:rank].t().contiguous().to(weight.dtype)  # (d, r)
        self.up = (s[:rank, None] * u[:, :rank].t()).contiguous().to(weight.dtype)  # (r, V)
        self.bias = None if bias is None else bias.detach()

    def scores(self, normed: torch.Tensor) -> torch.Tensor:
        """Approximate logits (B, V) of the head input normed (B, d)."""
        approx = (normed.to(self.down.dtype) @ self.down) @ self.up
        return approx if self.bias is None else approx + self.bias

    def flops(self) -> float:
        """FLOPs of :meth:`scores` for one row (see :meth:`ranking_flops`)."""
        return self.ranking_flops(self.hidden_size, self.rank, self.vocab_size)

    @staticmethod
    def ranking_flops(hidden_size: int, rank: int, vocab_size: int) -> float:
        """2·(d·r + r·V): one row through the factors (2 x multiply-accumulates; the bias ignored, as the
        head's own FLOP count ignores it)."""
        return 2.0 * (hidden_size * rank + rank * vocab_size)


class ShortlistPruning(VocabPruning):
    """A cheap first consulted head: at layer j the vocabulary is ranked by a rank-``rank`` factorisation
    of the LM head (:class:`LowRankHead`, computed once per decoder), the ``k`` best-ranked ids get their
    exact logits (k head rows), and the set is cut to k(j); later layers prune from it as
    :class:`DecayingPruning` does (k(ℓ) from k_max = ``k`` to ``k_min``; ``k_min = k`` keeps the set fixed).

    Cost at j: 2·(d·r + r·V) for the ranking + 2·k·d for the exact rows, against 2·d·V for the full head
    (SmolLM2, d 576, V 49,152, r 64, k 1,000: 6.4 M + 1.2 M = 7.5 M against 56.6 M FLOPs, about one
    decoder layer instead of seven). The last layer still
    uses the full vocabulary, so λ >= 1 reproduces the full model exactly.
    """

    name = "shortlist"
    reads_head_input = True

    def __init__(self, rank: int = 64, k: int = 1000, k_min: int = 10):
        self.rank = _check_positive_int(rank, "rank")
        self.k = _check_positive_int(k, "k")
        self.k_min = _check_positive_int(k_min, "k_min")
        if self.k_min > self.k:
            raise ValueError(f"k_min ({k_min}) must not exceed k ({k})")
        self._later = DecayingPruning(self.k, self.k_min)
        #: the head's factorisation, set by :meth:`bind` (None: not bound to a model yet)
        self.low_rank: LowRankHead | None = None

    def params(self) -> dict[str, Any]:
        return {"rank": self.rank, "k": self.k, "k_min": self.k_min}

    def bind(self, backend: Any) -> ShortlistPruning:
        lm_head = backend.model.lm_head
        bound = ShortlistPruning(self.rank, self.k, self.k_min)
        with torch.no_grad():
            bound.low_rank = LowRankHead(lm_head.weight, lm_head.bias, self.rank)
        return bound

    def extra_flops_per_token(self) -> float:
        if self.low_rank is None:
            raise RuntimeError("ShortlistPruning is not bound to a model (EarlyExitDecoder binds it)")
        return self.low_rank.flops()

    def k_at(self, layer: int, num_layers: int) -> int:
        """Size of the set kept at consulted layer ℓ (the decaying schedule from k down to k_min)."""
        return self._later.k_at(layer, num_layers)

    def shortlist(self, normed: torch.Tensor) -> torch.Tensor:
        """(B, min(k, V)) ids: the best-ranked by the low-rank scores of the head input normed (B, d)."""
        if self.low_rank is None:
            raise RuntimeError("ShortlistPruning is not bound to a model (EarlyExitDecoder binds it)")
        scores = self.low_rank.scores(normed)
        return torch.topk(scores, min(self.k, scores.shape[-1]), dim=-1, sorted=True).indices

    def select(self, layer, *, min_exit_layer, num_layers, prev_ids, head, head_input=None):
        keep = self.k_at(layer, num_layers)
        if prev_ids is None:
            if head_input is None:
                raise ValueError("the shortlist pruning needs head_input (call it through select_pruned)")
            candidates = self.shortlist(head_input())
            ids, logits = keep_best(head(candidates), candidates, keep)
            return PrunedHead(ids, logits, candidates.shape[-1])
        ids, logits = keep_best(head(prev_ids), prev_ids, keep)
        return PrunedHead(ids, logits, prev_ids.shape[-1])


def select_pruned(pruning: VocabPruning, layer: int, *, min_exit_layer: int, num_layers: int,
                  prev_ids: torch.Tensor | None, head: HeadFn,
                  head_input: Callable[[], torch.Tensor]) -> PrunedHead:
    """``pruning.select`` with ``head_input`` handed over only to a pruning that reads it."""
    extra = {"head_input": head_input} if pruning.reads_head_input else {}
    return pruning.select(layer, min_exit_layer=min_exit_layer, num_layers=num_layers, prev_ids=prev_ids,
                          head=head, **extra)


PRUNINGS: dict[str, type[VocabPruning]] = {
    cls.name: cls for cls in (NoPruning, FixedPruning, DecayingPruning, ShortlistPruning)
}


def resolve_pruning(spec: str | VocabPruning | tuple[str, dict[str, Any]]) -> VocabPruning:
    """A pruning object from a registry name, an instance, or a ``(name, kwargs)`` pair."""
    if isinstance(spec, VocabPruning):
        return spec
    name, kwargs = split_spec(spec, "pruning")
    if name not in PRUNINGS:
        raise ValueError(f"unknown pruning {name!r}; known prunings: {sorted(PRUNINGS)}")
    try:
        return PRUNINGS[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad parameters for pruning {name!r}: {err}") from None
