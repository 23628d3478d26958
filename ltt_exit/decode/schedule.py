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

__all__ = ["ThresholdSchedule", "check_thresholds"]


def check_thresholds(threshold: float | Sequence[float], batch_size: int) -> list[float]:
    """One float per row from a float or a per-row sequence; rejects NaN and negatives."""
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        values = [float(threshold)] * batch_size
    elif isinstance(threshold, torch.Tensor) and threshold.ndim == 0:
        values = [float(threshold)] * batch_size
    else:
        if isinstance(threshold, (str, bytes)):
            raise TypeError(f"threshold must be a float or a sequence of floats, got {threshold!r}")
        try:
            values = [float(v) for v in threshold]
        except (TypeError, ValueError):
            raise TypeError(f"threshold must be a float or a sequence of floats, got {threshold!r}") from None
        if len(values) != batch_size:
            raise ValueError(
                f"got {len(values)} thresholds for a batch of {batch_size} rows; give one per row or a float"
            )
    for value in values:
        if math.isnan(value) or value < 0:
            raise ValueError(f"thresholds must be >= 0 (and not NaN), got {value}")
    return values


class ThresholdSchedule:
    """λ_t for a batch of base thresholds; see the module docstring."""

    def __init__(self, tau: float = 0.0):
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or math.isnan(tau) or tau < 0:
            raise ValueError(f"tau must be a number >= 0, got {tau!r}")
        self.tau = float(tau)

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
