"""Per-layer exit maps: what an exit adapter does to h_ℓ before the exit head (``LAYER_MAPS`` by name).

* ``affine``   — A(h) = W h + b, W (d, d), fitted in closed form (``fitting.RidgeStatistics``).
* ``low-rank`` — A(h) = h + U (D h) + c, D (r, d), U (d, r), trained by distillation
  (``fitting.train_low_rank``); U = 0, c = 0 is the identity.

A map only transforms (N, d) -> (N, d); the file format, fitting and provenance live elsewhere in the package.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from .errors import AdapterMismatch

__all__ = ["LayerMap", "AffineMap", "LowRankMap", "LAYER_MAPS"]


class LayerMap(torch.nn.Module):
    """One layer's map (N, d) -> (N, d). Subclasses name their tensors and JSON parameters."""

    kind: ClassVar[str] = ""
    tensor_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, hidden_size: int):
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.hidden_size = hidden_size

    def params(self) -> dict[str, Any]:
        """JSON-able parameters besides the tensors (e.g. the rank)."""
        return {}

    @classmethod
    def identity(cls, hidden_size: int, **params: Any) -> "LayerMap":
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).detach() for name in self.tensor_names}

    @classmethod
    def from_tensors(cls, hidden_size: int, tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> "LayerMap":
        layer_map = cls.identity(hidden_size, **params)
        with torch.no_grad():
            for name in cls.tensor_names:
                if name not in tensors:
                    raise AdapterMismatch(f"a {cls.kind} map needs the tensor {name!r}; the file lacks it")
                target = getattr(layer_map, name)
                if tuple(tensors[name].shape) != tuple(target.shape):
                    raise AdapterMismatch(
                        f"{cls.kind} tensor {name!r} has shape {tuple(tensors[name].shape)}, expected "
                        f"{tuple(target.shape)} for hidden size {hidden_size} and {params}"
                    )
                target.copy_(tensors[name])
        return layer_map


class AffineMap(LayerMap):
    """A(h) = h Wᵀ + b; weight (d, d) as (out, in), bias (d,)."""

    kind = "affine"
    tensor_names = ("weight", "bias")

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size)
        self.weight = torch.nn.Parameter(torch.eye(hidden_size))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size))

    @classmethod
    def identity(cls, hidden_size: int, **params: Any) -> "AffineMap":
        if params:
            raise ValueError(f"an affine map takes no parameters, got {sorted(params)}")
        return cls(hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self.weight, self.bias)


class LowRankMap(LayerMap):
    """A(h) = h + (h Dᵀ) Uᵀ + c; down D (r, d), up U (d, r), bias c (d,). U = 0, c = 0: identity."""

    kind = "low-rank"
    tensor_names = ("down", "up", "bias")

    def __init__(self, hidden_size: int, rank: int = 32, *, seed: int = 0):
        super().__init__(hidden_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= hidden_size:
            raise ValueError(f"rank must be an int in [1, hidden_size={hidden_size}], got {rank!r}")
        self.rank = rank
        generator = torch.Generator().manual_seed(seed)
        # D random (so gradients reach U), U zero (so the map starts as the identity), as in LoRA
        self.down = torch.nn.Parameter(torch.randn(rank, hidden_size, generator=generator) / math.sqrt(hidden_size))
        self.up = torch.nn.Parameter(torch.zeros(hidden_size, rank))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size))

    def params(self) -> dict[str, Any]:
        return {"rank": self.rank}

    @classmethod
    def identity(cls, hidden_size: int, rank: int = 32, seed: int = 0, **params: Any) -> "LowRankMap":
        if params:
            raise ValueError(f"a low-rank map takes rank (and seed), got {sorted(params)}")
        return cls(hidden_size, rank, seed=seed)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        linear = torch.nn.functional.linear
        return hidden + linear(linear(hidden, self.down), self.up) + self.bias


LAYER_MAPS: dict[str, type[LayerMap]] = {AffineMap.kind: AffineMap, LowRankMap.kind: LowRankMap}
