"""Vocabulary pruning of the exit head after the minimum exit layer j, behind one interface.

At every consulted layer ℓ (j <= ℓ < L) a pruning object turns "the exit head at layer ℓ" into the
rows' current vocabulary set S_ℓ and the logits over it; the exit distribution at ℓ is the softmax
over S_ℓ (pruning renormalises). Sets are always the *best-ranked* ids by logit, never the lowest
ids. The last layer L is never pruned (the decoder computes the full head there itself).

``head(ids)`` given to :meth:`VocabPruning.select` evaluates the exit head on this layer's hidden
state: ``head(None) -> (B, V)``, ``head(ids (B, k)) -> (B, k)`` logits for those vocabulary rows.
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
    "PRUNINGS",
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


PRUNINGS: dict[str, type[VocabPruning]] = {cls.name: cls for cls in (NoPruning, FixedPruning, DecayingPruning)}


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
