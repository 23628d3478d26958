"""Per-token exit threshold.

λ_t = 0.9 λ + 0.1 λ exp(-τ t / N)    (CALM's code / FREE / the seed study; not the paper's eq. 5)

t is the 0-based index of the generated token, N the token budget (``max_new_tokens``); τ = 0
gives the constant λ. A base threshold λ >= 1 disables early exit altogether (λ_t = +inf), so that
λ = 1 reproduces the full model for every τ, as the fixed-sequence test's first hypothesis assumes.
The exit rule everywhere is ``confidence >= λ_t``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ltt_exit import validation

__all__ = ["ThresholdSchedule", "check_thresholds"]


def check_thresholds(threshold: float | Sequence[float], batch_size: int) -> list[float]:
    """One float per row from a real number or a per-row sequence; rejects NaN, negatives and non-numbers."""
    return validation.check_thresholds(threshold, batch_size)


class ThresholdSchedule:
    """λ_t for a batch of base thresholds; see the module docstring."""

    def __init__(self, tau: float = 0.0):
        self.tau = validation.check_tau(tau)

    def can_exit(self, base: float) -> bool:
        """Whether a row with base threshold ``base`` can exit at any token: λ_t is finite for every t
        exactly when λ < 1 (the decay only lowers it: λ_t <= λ), so λ >= 1 never consults an exit head."""
        return base < 1.0

    def value(self, base: float, t: int, budget: int) -> float:
        """λ_t for base threshold ``base`` at token index t (0-based) of budget N (inf when λ >= 1)."""
        if base >= 1.0:
            return math.inf
        if self.tau == 0.0:
            return base  # exactly λ, not 0.9 λ + 0.1 λ rounded
        return 0.9 * base + 0.1 * base * math.exp(-self.tau * t / budget)

    def at(self, base: Sequence[float], t: int, budget: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
        """(B,) tensor of λ_t for the per-row base thresholds ``base``."""
        return torch.tensor([self.value(b, t, budget) for b in base], device=device, dtype=dtype)
