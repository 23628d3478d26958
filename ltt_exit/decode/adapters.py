"""Exit adapters: per-layer maps applied to the hidden state h_ℓ before the exit head.

A model that was not trained for early exit predicts poorly from its intermediate layers: the
residual stream after layer ℓ is not yet in the "language" the final norm and LM head read. An exit
adapter A_ℓ maps h_ℓ towards the final hidden state h_L, and the exit head then reads
``head(A_ℓ(h_ℓ))`` instead of ``head(h_ℓ)``. The backbone, the last layer and the head stay frozen, so
the full model's output Y_full — what a certificate's guarantee compares against — never changes;
an adapter only changes *which* tokens leave early and with which prediction.

Two kinds of per-layer map (``LAYER_MAPS``, selected by name):

* ``affine``  — A(h) = W h + b, W (d, d). Fitted in closed form (:func:`RidgeStatistics.solve`):
  ridge regression of h_L on h_ℓ, shrunk towards the identity, solved per layer from accumulated
  second-moment statistics (memory O(L d²), independent of the number of prompts).
* ``low-rank`` — A(h) = h + U (D h) + c, D (r, d), U (d, r). Trained with a distillation loss
  (KL from the final layer's distribution to the adapted exit head's) for a few hundred steps
  (:func:`train_low_rank`). U = 0, c = 0 is the identity.

An :class:`ExitAdapters` object holds one map per adapted layer (1-based; layers without a map and the
last layer pass h_ℓ through unchanged), the fingerprint of the model it was fitted for, and where its
fitting prompts came from. It is what ``EarlyExitDecoder(..., exit_adapters=...)`` takes
(``apply(layer, hidden)``, ``describe()``). Files are safetensors with a JSON header in the metadata;
the file's own fingerprint covers the tensors and the header, and loading refuses a file that was
edited, or that was fitted for another model.

The fitting prompts must not be calibration prompts: the certificate's guarantee needs calibration
examples the decoder (adapters included) did not see. The file keeps hashes of the fitting examples
(ids, prompts, long text fields); :meth:`ExitAdapters.check_disjoint` refuses a calibration set that
shares any of them, and :func:`fitting_set` refuses to draw fitting prompts from the calibration split
unless the calibration sample is excluded.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

__all__ = [
    "ADAPTER_FORMAT_VERSION",
    "LAYER_MAPS",
    "AdapterMismatch",
    "CalibrationOverlap",
    "LayerMap",
    "AffineMap",
    "LowRankMap",
    "ExitAdapters",
    "ExampleHashes",
    "StateBatch",
    "collect_states",
    "head_logits",
    "RidgeStatistics",
    "TokenReservoir",
    "ExitFitData",
    "train_low_rank",
    "fitting_set",
    "DEFAULT_CLASSIFIER_FEATURES",
    "exit_classifier_samples",
    "fit_logistic_exit_model",
    "fit_exit_classifier",
    "resolve_exit_adapters",
    "check_disjoint",
]

#: version of the file layout (tensor names and header keys)
ADAPTER_FORMAT_VERSION = 1
_HEADER_KEY = "ltt_exit_exit_adapters"
_HASHES_KEY = "ltt_exit_fit_example_hashes"
_CLASSIFIER_WEIGHT = "exit_classifier.weight"
_CLASSIFIER_BIAS = "exit_classifier.bias"
#: text fields at least this long are hashed (shorter values, e.g. labels, collide by chance)
_MIN_FIELD_CHARS = 32


class AdapterMismatch(ValueError):
    """The adapter file does not belong to this model or decoder (other model, shapes, edited file)."""


class CalibrationOverlap(ValueError):
    """Calibration examples were used to fit the exit adapters."""


# ------------------------------------------------------------------------------ per-layer maps


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


# ------------------------------------------------------------------------------ fitting-example hashes


def _short_hash(*parts: str) -> str:
    digest = hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()
    return digest[:24]  # 96 bits: collisions are not a practical concern for sets of this size


_HASH_FIELDS = ("ids", "prompts", "texts", "recipes", "sources")


@dataclass
class ExampleHashes:
    """Hashes of the fitting examples, kept in the adapter file to check calibration sets against.

    ids:     hashes of the example ids (compared only for the same recipe name or the same source)
    prompts: hashes of the formatted prompts
    texts:   hashes of every text field of at least 32 characters (the dialogue, the article, ...),
             so that the same document under another template or recipe name is still recognised
    recipes / sources: the recipe names and source descriptions the examples came from
    """

    ids: set[str] = field(default_factory=set)
    prompts: set[str] = field(default_factory=set)
    texts: set[str] = field(default_factory=set)
    recipes: set[str] = field(default_factory=set)
    sources: set[str] = field(default_factory=set)

    @staticmethod
    def _example_parts(example) -> tuple[str, str, list[str]]:
        texts = [
            _short_hash("text", value)
            for name, value in sorted(getattr(example, "fields", {}).items())
            if name != "id" and isinstance(value, str) and len(value.strip()) >= _MIN_FIELD_CHARS
        ]
        return _short_hash("id", str(example.id)), _short_hash("prompt", str(example.prompt)), texts

    @classmethod
    def of(cls, examples: Iterable, *, recipe: str, source: str) -> "ExampleHashes":
        hashes = cls(recipes={recipe}, sources={source})
        for example in examples:
            id_hash, prompt_hash, texts = cls._example_parts(example)
            hashes.ids.add(id_hash)
            hashes.prompts.add(prompt_hash)
            hashes.texts.update(texts)
        return hashes

    def overlapping(self, calibration_set) -> list[str]:
        """Ids of the calibration examples that were (or share a document with) fitting examples."""
        recipe, source = getattr(calibration_set, "recipe", None), getattr(calibration_set, "source", None)
        return [str(example.id) for example in calibration_set.examples
                if self.overlaps(example, recipe=recipe, source=source)]

    def overlaps(self, example, *, recipe: str | None, source: str | None) -> bool:
        """Whether ``example`` (of data set ``recipe`` / ``source``) was, or shares a document with, a fitting
        example; ids count only within the same recipe name or source (positional ids collide across data)."""
        id_hash, prompt_hash, texts = self._example_parts(example)
        same_data = recipe in self.recipes or source in self.sources
        return prompt_hash in self.prompts or any(t in self.texts for t in texts) or (same_data and id_hash in self.ids)

    def union(self, other: "ExampleHashes | None") -> "ExampleHashes":
        """A new set holding the hashes of both."""
        return ExampleHashes(**{key: set(getattr(self, key)) | (set(getattr(other, key)) if other else set())
                                for key in _HASH_FIELDS})

    def to_json(self) -> dict[str, Any]:
        return {key: sorted(getattr(self, key)) for key in _HASH_FIELDS}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ExampleHashes":
        return cls(**{key: set(data.get(key, [])) for key in _HASH_FIELDS})

    def __len__(self) -> int:
        return len(self.prompts)


# ------------------------------------------------------------------------------ the adapter set


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class ExitAdapters:
    """Per-layer exit maps for one model: what ``EarlyExitDecoder(exit_adapters=...)`` applies.

    maps:              {layer ℓ (1-based, 1 <= ℓ < num_layers): LayerMap}, all of one kind
    num_layers:        L of the model the maps were fitted for
    hidden_size:       d
    model_fingerprint: :func:`ltt_exit.models.model_fingerprint` of that model and tokenizer
    fit_info:          JSON-able provenance (recipe, split, sizes, method, timings)
    example_hashes:    hashes of the fitting examples (see :class:`ExampleHashes`)
    exit_classifier:   optional fitted exit classifier (:class:`ltt_exit.decode.scorers.LogisticExitModel`) for
                       the ``exit-classifier`` scorer; its provenance is ``fit_info["exit_classifier"]``

    ``apply(layer, hidden (B, d)) -> (B, d)`` runs the layer's map on the hidden state's device in its
    dtype (half precisions in float32) and returns the result in the hidden state's dtype; a layer
    without a map returns ``hidden`` itself.
    """

    def __init__(
        self,
        maps: dict[int, LayerMap],
        *,
        num_layers: int,
        hidden_size: int,
        model_fingerprint: str,
        fit_info: dict[str, Any] | None = None,
        example_hashes: ExampleHashes | None = None,
        path: str | os.PathLike[str] | None = None,
        exit_classifier: Any = None,
    ):
        from .scorers import LogisticExitModel

        if exit_classifier is not None and not isinstance(exit_classifier, LogisticExitModel):
            raise TypeError(f"exit_classifier must be a LogisticExitModel or None, got {type(exit_classifier).__name__}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 2:
            raise ValueError(f"num_layers must be an int >= 2, got {num_layers!r}")
        if not isinstance(model_fingerprint, str) or not model_fingerprint:
            raise ValueError("model_fingerprint must be the fingerprint string of the model the maps belong to")
        if not maps:
            raise ValueError("no layer maps given: an adapter set needs at least one adapted layer")
        kinds = {type(m).kind for m in maps.values()}
        if len(kinds) != 1:
            raise ValueError(f"all layer maps must be of one kind, got {sorted(kinds)}")
        for layer, layer_map in maps.items():
            if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer < num_layers:
                raise ValueError(
                    f"adapted layers must be ints in [1, {num_layers - 1}] (the last layer never gets an "
                    f"adapter), got {layer!r}"
                )
            if not isinstance(layer_map, LayerMap):
                raise TypeError(f"layer {layer}: expected a LayerMap, got {type(layer_map).__name__}")
            if layer_map.hidden_size != hidden_size:
                raise ValueError(f"layer {layer}: map of width {layer_map.hidden_size}, expected {hidden_size}")
        self.kind = kinds.pop()
        self.maps = {int(k): maps[k].float().eval().requires_grad_(False) for k in sorted(maps)}
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.model_fingerprint = model_fingerprint
        self.fit_info = dict(fit_info or {})
        self.example_hashes = example_hashes or ExampleHashes()
        self.path = None if path is None else str(Path(path).resolve())
        self.exit_classifier = exit_classifier
        if exit_classifier is not None and exit_classifier.layers[-1] >= num_layers:
            raise ValueError(f"the exit classifier covers layers up to {exit_classifier.layers[-1]}; consulted layers "
                             f"of a {num_layers}-layer decoder end at {num_layers - 1}")
        self._device = torch.device("cpu")
        self._dtype = torch.float32
        self._fingerprint: str | None = None

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def identity(
        cls,
        kind: str,
        *,
        num_layers: int,
        hidden_size: int,
        model_fingerprint: str,
        layers: Sequence[int] | None = None,
        **params: Any,
    ) -> "ExitAdapters":
        """Identity maps of ``kind`` for ``layers`` (default 1..L-1): the raw exit heads, exactly."""
        if kind not in LAYER_MAPS:
            raise ValueError(f"unknown adapter kind {kind!r}; expected one of {sorted(LAYER_MAPS)}")
        layers = list(range(1, num_layers)) if layers is None else list(layers)
        maps = {layer: LAYER_MAPS[kind].identity(hidden_size, **params) for layer in layers}
        return cls(maps, num_layers=num_layers, hidden_size=hidden_size, model_fingerprint=model_fingerprint,
                   fit_info={"method": {"name": "identity"}})

    # ---- use ------------------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self.maps)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "ExitAdapters":
        """Move the maps (kept in float32 or wider; the file holds float32) to ``device`` / ``dtype``."""
        device = self._device if device is None else torch.device(device)
        dtype = self._dtype if dtype is None else dtype
        for layer_map in self.maps.values():
            layer_map.to(device=device, dtype=dtype)
        self._device, self._dtype = device, dtype
        return self

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, d) after layer ``layer`` -> (B, d), the exit head's input."""
        layer_map = self.maps.get(layer)
        if layer_map is None:
            return hidden
        if hidden.shape[-1] != self.hidden_size:
            raise AdapterMismatch(
                f"hidden states of width {hidden.shape[-1]} reached adapters fitted for width {self.hidden_size}"
            )
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # half precisions computed in float32
        if hidden.device != self._device or dtype != self._dtype:
            self.to(hidden.device, dtype)
        return layer_map(hidden.to(dtype)).to(hidden.dtype)

    def check_compatible(self, num_layers: int, hidden_size: int) -> None:
        """Raise AdapterMismatch unless the adapters fit a decoder of ``num_layers`` layers of width ``hidden_size``."""
        if (num_layers, hidden_size) != (self.num_layers, self.hidden_size):
            raise AdapterMismatch(
                f"these exit adapters were fitted for a {self.num_layers}-layer decoder of width "
                f"{self.hidden_size}; this decoder has {num_layers} layers of width {hidden_size}"
            )

    def check_model(self, model_fingerprint: str) -> None:
        """Raise AdapterMismatch unless the adapters were fitted for the model with ``model_fingerprint``."""
        if model_fingerprint != self.model_fingerprint:
            where = f" ({self.path})" if self.path else ""
            raise AdapterMismatch(
                f"refusing exit adapters{where} fitted for the model {self.model_fingerprint}; this model is "
                f"{model_fingerprint}. Fit adapters for this model with ltt-fit-exits."
            )

    def check_disjoint(self, calibration_set) -> None:
        """Raise CalibrationOverlap if any example of ``calibration_set`` was used for fitting."""
        overlap = self.example_hashes.overlapping(calibration_set)
        if overlap:
            shown = ", ".join(overlap[:5]) + (", ..." if len(overlap) > 5 else "")
            raise CalibrationOverlap(
                f"{len(overlap)} of {len(calibration_set.examples)} calibration examples were used to fit "
                f"these exit adapters (ids {shown}); a certificate needs calibration examples the decoder did "
                "not see. Calibrate on another split, or refit the adapters excluding this calibration sample "
                "(ltt-fit-exits --calibration-size N ...)."
            )

    # ---- description and identity -----------------------------------------------------------------
    def _header(self) -> dict[str, Any]:
        header = {
            "format_version": ADAPTER_FORMAT_VERSION,
            "kind": self.kind,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "layers": self.layers,
            "params": {str(layer): m.params() for layer, m in self.maps.items()},
            "model_fingerprint": self.model_fingerprint,
            "fit": self.fit_info,
        }
        if self.exit_classifier is not None:  # absent otherwise, so files without one keep their fingerprint
            header["exit_classifier"] = self.exit_classifier.to_json()
        return header

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            f"layer.{layer}.{name}": tensor.to("cpu", torch.float32).contiguous()
            for layer, layer_map in self.maps.items()
            for name, tensor in layer_map.tensors().items()
        }
        if self.exit_classifier is not None:  # float64: the loaded classifier is bit-identical to the fitted one
            tensors[_CLASSIFIER_WEIGHT] = self.exit_classifier.weight.to("cpu", torch.float64).contiguous()
            tensors[_CLASSIFIER_BIAS] = self.exit_classifier.bias.to("cpu", torch.float64).contiguous()
        return tensors

    def with_exit_classifier(self, model: Any, info: dict[str, Any] | None = None,
                             example_hashes: ExampleHashes | None = None) -> "ExitAdapters":
        """A copy of these adapters holding the fitted exit classifier ``model`` (a LogisticExitModel).

        info:           its provenance (fitting prompts, features, pruning, settings), kept in
                        ``fit_info["exit_classifier"]`` and so covered by the fingerprint
        example_hashes: hashes of its fitting examples, merged with the adapters' own so that
                        :meth:`check_disjoint` also refuses calibration examples the classifier saw
        The copy has no path (save it)."""
        hashes = self.example_hashes.union(example_hashes)
        fit_info = dict(self.fit_info) | {"exit_classifier": dict(info or {})}
        # copies of the maps: the constructor moves them to float32 in place, which must not touch ours
        maps = {layer: copy.deepcopy(layer_map) for layer, layer_map in self.maps.items()}
        return ExitAdapters(maps, num_layers=self.num_layers, hidden_size=self.hidden_size,
                            model_fingerprint=self.model_fingerprint, fit_info=fit_info, example_hashes=hashes,
                            exit_classifier=model)

    @property
    def fingerprint(self) -> str:
        """``"sha256:<hex>"`` over the header (kind, shapes, model fingerprint, provenance), the fitting-
        example hashes and every tensor's name, dtype, shape and bytes."""
        if self._fingerprint is None:
            self._fingerprint = _fingerprint(self._header(), self.example_hashes.to_json(), self._tensors())
        return self._fingerprint

    def flops(self, layer: int) -> float:
        """FLOPs (2 per multiply-add) of one application at ``layer`` to one position; 0 without a map.
        For the decoder's cost account: charge it at every consulted layer below the exit."""
        layer_map = self.maps.get(layer)
        if layer_map is None:
            return 0.0
        d = self.hidden_size
        if isinstance(layer_map, LowRankMap):
            return 2.0 * (2 * d * layer_map.rank)
        return 2.0 * d * d

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self._tensors().values())

    def _params_summary(self) -> dict[str, Any]:
        """The maps' parameters (e.g. {"rank": 64}); per layer only when layers differ."""
        params = {str(layer): m.params() for layer, m in self.maps.items()}
        distinct = {json.dumps(p, sort_keys=True) for p in params.values()}
        return json.loads(distinct.pop()) if len(distinct) == 1 else params

    def describe(self) -> dict[str, Any]:
        """JSON-able record for ``EarlyExitDecoder.config_dict()["exit_adapters"]``.

        ``fingerprint`` identifies the file's content; ``path`` says where it was loaded from (informational:
        :class:`ltt_exit.apply.CertifiedDecoder` compares fingerprints, not paths)."""
        fit = self.fit_info
        return {
            "kind": self.kind,
            "fingerprint": self.fingerprint,
            "model_fingerprint": self.model_fingerprint,
            "layers": self.layers,
            "params": self._params_summary(),
            "method": fit.get("method", {}).get("name"),
            "fitted_on": {key: fit.get(key) for key in ("recipe", "split", "fit_set_sha256", "n_prompts", "n_tokens")},
            "path": self.path,
        } | ({} if self.exit_classifier is None else {"exit_classifier": self._classifier_summary()})

    def _classifier_summary(self) -> dict[str, Any]:
        info = self.fit_info.get("exit_classifier", {})
        return self.exit_classifier.to_json() | {
            key: info.get(key) for key in ("pruning", "min_exit_layer", "fit_set_sha256", "n_prompts", "n_tokens")
        }

    def __repr__(self) -> str:
        return (
            f"ExitAdapters(kind={self.kind!r}, layers={self.layers[0]}..{self.layers[-1]} ({len(self.maps)}), "
            f"hidden_size={self.hidden_size}, fingerprint={self.fingerprint[:19]}...)"
        )

    # ---- files ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a safetensors file atomically; returns its path. The header and example hashes go in
        the file's metadata, with the fingerprint."""
        from safetensors.torch import save

        from ltt_exit._atomic import atomic_write_bytes

        path = Path(path)
        header = self._header() | {"fingerprint": self.fingerprint}
        metadata = {_HEADER_KEY: json.dumps(header, sort_keys=True), _HASHES_KEY: json.dumps(self.example_hashes.to_json())}
        atomic_write_bytes(path, save(self._tensors(), metadata=metadata))
        self.path = str(path.resolve())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], **checks: Any) -> "ExitAdapters":
        """Read a file written by :meth:`save`; check its integrity and, when given, that it belongs to the
        model with ``model_fingerprint``, to a decoder of ``num_layers`` x ``hidden_size``, and that its
        fingerprint is ``expected_fingerprint``. Any mismatch — and any damaged header — raises AdapterMismatch."""
        try:
            return cls._load(path, **checks)
        except AdapterMismatch as error:
            if str(path) in str(error):
                raise
            raise AdapterMismatch(f"{path}: {error}") from None
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as error:
            # a header of the wrong shape (edited, or damaged in a way safetensors does not notice)
            raise AdapterMismatch(f"{path}: not a valid exit-adapter file (damaged header: "
                                  f"{type(error).__name__}: {error})") from None

    @classmethod
    def _load(
        cls,
        path: str | os.PathLike[str],
        *,
        model_fingerprint: str | None = None,
        num_layers: int | None = None,
        hidden_size: int | None = None,
        expected_fingerprint: str | None = None,
    ) -> "ExitAdapters":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"exit-adapter file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:  # safetensors raises its own error types for bad files
            raise AdapterMismatch(f"{path} is not a readable safetensors file ({error})") from None
        if _HEADER_KEY not in metadata:
            raise AdapterMismatch(f"{path} is a safetensors file but not an ltt-exit exit-adapter file (no header)")
        header = json.loads(metadata[_HEADER_KEY])
        hashes_json = json.loads(metadata.get(_HASHES_KEY, "{}"))
        if header.get("format_version") != ADAPTER_FORMAT_VERSION:
            raise AdapterMismatch(
                f"{path}: adapter file format {header.get('format_version')!r}; this ltt-exit reads "
                f"format {ADAPTER_FORMAT_VERSION}"
            )
        kind = header["kind"]
        if kind not in LAYER_MAPS:
            raise AdapterMismatch(f"{path}: unknown adapter kind {kind!r}; known: {sorted(LAYER_MAPS)}")
        hidden = int(header["hidden_size"])
        maps = {}
        for layer in header["layers"]:
            prefix = f"layer.{layer}."
            own = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
            maps[int(layer)] = LAYER_MAPS[kind].from_tensors(hidden, own, header["params"][str(layer)])
        classifier = None
        if "exit_classifier" in header:
            from .scorers import LogisticExitModel

            if _CLASSIFIER_WEIGHT not in tensors or _CLASSIFIER_BIAS not in tensors:
                raise AdapterMismatch(f"{path}: the header names an exit classifier but its tensors are missing")
            try:
                classifier = LogisticExitModel(header["exit_classifier"]["features"], header["exit_classifier"]["layers"],
                                               tensors[_CLASSIFIER_WEIGHT], tensors[_CLASSIFIER_BIAS])
            except (KeyError, ValueError) as error:
                raise AdapterMismatch(f"{path}: bad exit classifier ({error})") from None
        adapters = cls(
            maps,
            num_layers=int(header["num_layers"]),
            hidden_size=hidden,
            model_fingerprint=header["model_fingerprint"],
            fit_info=header.get("fit") or {},
            example_hashes=ExampleHashes.from_json(hashes_json),
            path=path,
            exit_classifier=classifier,
        )
        extra = set(tensors) - set(adapters._tensors())
        if extra:
            raise AdapterMismatch(f"{path}: unexpected tensors {sorted(extra)[:5]}")
        if adapters.fingerprint != header.get("fingerprint"):
            raise AdapterMismatch(
                f"{path}: its content does not match the fingerprint recorded in it (the file was changed "
                "after it was written); refit the adapters"
            )
        if expected_fingerprint is not None and adapters.fingerprint != expected_fingerprint:
            raise AdapterMismatch(
                f"{path} holds exit adapters {adapters.fingerprint}, not the certified {expected_fingerprint}"
            )
        if model_fingerprint is not None:
            adapters.check_model(model_fingerprint)
        if num_layers is not None or hidden_size is not None:
            adapters.check_compatible(
                adapters.num_layers if num_layers is None else num_layers,
                adapters.hidden_size if hidden_size is None else hidden_size,
            )
        return adapters


def _fingerprint(header: dict[str, Any], hashes: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    digest.update(_canonical({"header": header, "example_hashes": hashes}))
    for name in sorted(tensors):
        tensor = tensors[name]
        meta = f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode("utf-8")
        digest.update(len(meta).to_bytes(8, "little"))
        digest.update(meta)
        digest.update(tensor.numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def resolve_exit_adapters(
    value: Any,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    model_fingerprint: str | None = None,
    num_layers: int | None = None,
    hidden_size: int | None = None,
) -> ExitAdapters | None:
    """None, an adapter object, or a path to an adapter file -> None or an :class:`ExitAdapters`.

    For a path, the file is loaded and checked against ``model_fingerprint`` (computed from ``model`` and
    ``tokenizer`` when not given and both are; that hashes every weight) and the decoder's shape.
    """
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        if model_fingerprint is None and model is not None and tokenizer is not None:
            from ltt_exit.models import model_fingerprint as fingerprint_of

            model_fingerprint = fingerprint_of(model, tokenizer)
        if model_fingerprint is None:
            raise ValueError(
                "loading exit adapters from a path needs the model's fingerprint to check them against: pass a "
                "tokenizer (or load them with ExitAdapters.load(path, model_fingerprint=...))"
            )
        return ExitAdapters.load(value, model_fingerprint=model_fingerprint, num_layers=num_layers,
                                 hidden_size=hidden_size)
    if not (hasattr(value, "apply") and hasattr(value, "describe")):
        raise TypeError(
            f"exit_adapters must be None, a path to an adapter file or an object with apply() and describe(); "
            f"got {type(value).__name__}"
        )
    if isinstance(value, ExitAdapters) and num_layers is not None and hidden_size is not None:
        value.check_compatible(num_layers, hidden_size)
    return value


def check_disjoint(adapters: Any, calibration_set) -> None:
    """Raise CalibrationOverlap if ``adapters`` (an ExitAdapters, or None: nothing to check) were fitted on
    any example of ``calibration_set``."""
    if adapters is None:
        return
    if not isinstance(adapters, ExitAdapters):
        raise TypeError(f"check_disjoint needs ExitAdapters, got {type(adapters).__name__}")
    adapters.check_disjoint(calibration_set)


# ------------------------------------------------------------------------------ hidden states


@dataclass
class StateBatch:
    """The states of the generated positions of one prompt.

    hidden: {layer ℓ: (T, d)} the residual stream after layer ℓ at the T positions that predict the
            T greedy tokens; final: (T, d) the *pre-norm* state after the last layer there (the exit
            head of layer L reads ``head(final)``); tokens: the T greedy tokens; teacher_top: (T, k) the
            ids of the k most probable tokens of the full model's distribution at each position.
    """

    hidden: dict[int, torch.Tensor]
    final: torch.Tensor
    tokens: list[int]
    teacher_top: torch.Tensor


class _PreNormCapture:
    """Forward pre-hook on the final norm: its input is the pre-norm state after the last layer.

    (In transformers 5 the last entry of ``hidden_states`` is already normed, for Llama and for T5.)"""

    def __init__(self, norm: torch.nn.Module):
        self.value: torch.Tensor | None = None
        self.handle = norm.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.value = args[0]

    def close(self):
        self.handle.remove()


def _final_norm(backend) -> torch.nn.Module:
    return backend.model.decoder.final_layer_norm if backend.family == "t5" else backend.base.norm


def head_logits(backend, hidden: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """The exit head on hidden (N, d): (N, V) logits, or (N, K) for vocabulary rows ``ids`` (K,) shared by
    all rows (unlike ``backend.head``, whose ids are per row, this never materialises (N, K, d))."""
    if ids is None:
        return backend.head(hidden)
    if backend.family == "t5":
        normed = backend.decoder.dropout(backend.decoder.final_layer_norm(hidden))
        if backend.rescale_head_input:
            normed = normed * (backend.hidden_size**-0.5)
    else:
        normed = backend.base.norm(hidden)
    lm_head = backend.model.lm_head
    bias = None if lm_head.bias is None else lm_head.bias[ids]
    return torch.nn.functional.linear(normed, lm_head.weight[ids], bias)


@torch.inference_mode()
def collect_states(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    layers: Sequence[int] | None = None,
    teacher_top_k: int = 64,
    eos_token_id: int | Sequence[int] | None = None,
    batch_size: int = 1,
) -> Iterator[StateBatch]:
    """Greedy decoding of each prompt with the full model (the library's own forward, with its cache),
    recording at every generated position the states after the chosen layers, the pre-norm final state
    and the full model's top-``teacher_top_k`` ids. Yields one :class:`StateBatch` per prompt, in order;
    nothing is kept between batches.

    The tokens are the full model's greedy output Y_full (plain arg-max, as the early-exit decoder at
    λ = 1); prompts are tokenized as the decoder tokenizes them (``add_special_tokens=True``); EOS ids
    default to the model's generation config.

    batch_size: prompts decoded together (padded as the decoder pads them: left for decoder-only models,
    the encoder's mask for T5). One forward serves the whole batch at every step, which on a GPU is most
    of the collection time; states agree with one-prompt batches to rounding (padding changes the order
    of some sums), and a row stops being recorded at its EOS.
    """
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    from .backends import backend_for
    from .decoder import pad_token_rows

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    backend = backend_for(model)
    model.eval()
    num_layers = backend.num_layers
    layers = list(range(1, num_layers)) if layers is None else [int(x) for x in layers]
    if any(not 1 <= x < num_layers for x in layers):
        raise ValueError(f"layers must lie in [1, {num_layers - 1}], got {layers}")
    if eos_token_id is None:
        eos = set(backend.default_eos_token_ids())
    else:
        eos = {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id}
    top_k = min(int(teacher_top_k), backend.vocab_size)
    device = backend.device
    capture = _PreNormCapture(_final_norm(backend))
    try:
        for first in range(0, len(prompts), batch_size):
            rows = [list(tokenizer(str(prompt), add_special_tokens=True)["input_ids"])
                    for prompt in prompts[first:first + batch_size]]
            ids, mask = pad_token_rows(rows, tokenizer, backend)
            ids, mask, batch = ids.to(device), mask.to(device), len(rows)
            if backend.family == "t5":
                config = model.decoder.config
                cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
                encoder_outputs = model.encoder(input_ids=ids, attention_mask=mask)

                def step(token_ids):
                    result = model(encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=token_ids,
                                   cache=cache, use_cache=True, output_hidden_states=True)
                    return result.decoder_hidden_states, result.logits

                inputs = torch.full((batch, 1), backend.decoder_start_token_id(), device=device)
            else:
                cache = DynamicCache(config=model.config)
                seen = mask
                positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate() derives them

                def step(token_ids):
                    nonlocal seen, positions
                    if token_ids.shape[1] == 1:  # a generated token: one more position for every row
                        seen = torch.cat([seen, torch.ones_like(seen[:, :1])], dim=-1)
                        positions = positions[:, -1:] + 1
                    result = model(input_ids=token_ids, attention_mask=seen, position_ids=positions, cache=cache,
                                   use_cache=True, output_hidden_states=True, logits_to_keep=1)
                    return result.hidden_states, result.logits

                inputs = ids
            hidden = [{layer: [] for layer in layers} for _ in range(batch)]
            finals, tops, tokens = ([[] for _ in range(batch)] for _ in range(3))
            live = [True] * batch
            for t in range(max_new_tokens):
                states, logits = step(inputs)
                scores = logits[:, -1].float()
                best = scores.argmax(dim=-1)
                top = scores.topk(top_k, dim=-1).indices
                for i in (i for i in range(batch) if live[i]):
                    for layer in layers:
                        hidden[i][layer].append(states[layer][i, -1].float())
                    finals[i].append(capture.value[i, -1].float())
                    tops[i].append(top[i])
                    token = int(best[i])
                    tokens[i].append(token)
                    live[i] = token not in eos
                if not any(live):
                    break
                inputs = best[:, None]  # finished rows keep decoding; nothing of theirs is recorded
            for i in range(batch):
                yield StateBatch(
                    hidden={layer: torch.stack(values) for layer, values in hidden[i].items()},
                    final=torch.stack(finals[i]),
                    tokens=tokens[i],
                    teacher_top=torch.stack(tops[i]),
                )
    finally:
        capture.close()


# ------------------------------------------------------------------------------ closed-form fit


class RidgeStatistics:
    """Running sums for the per-layer ridge fit of the final state on h_ℓ (float64, O(L d²) memory).

    For each layer: n, Σx, Σy, Σxxᵀ, Σxyᵀ over tokens, x = h_ℓ and y = the regression target (see
    ``target``). Statistics are merged with Chan's pairwise update (means and centred sums), which keeps
    float64 accurate over many batches.

    target: "final" (the default) regresses the pre-norm final state h_L itself; "final-normalized"
            regresses h_L / rms(h_L). The head's RMS/layer norm ignores the scale of its input, so both
            targets describe the same exit prediction; the normalised one weighs every token equally
            instead of by the size of its final state. On SmolLM2-135M / SAMSum the two gave held-out
            top-1 agreements within 0.02 of each other, "final" slightly ahead.
    """

    TARGETS = ("final", "final-normalized")

    def __init__(self, layers: Sequence[int], hidden_size: int, *, target: str = "final"):
        if target not in self.TARGETS:
            raise ValueError(f"unknown ridge target {target!r}; expected one of {list(self.TARGETS)}")
        self.layers = [int(x) for x in layers]
        self.hidden_size = hidden_size
        self.target = target
        d = hidden_size
        self.count = 0
        self.mean_y = torch.zeros(d, dtype=torch.float64)
        self.mean_x = {layer: torch.zeros(d, dtype=torch.float64) for layer in self.layers}
        self.cxx = {layer: torch.zeros(d, d, dtype=torch.float64) for layer in self.layers}
        self.cxy = {layer: torch.zeros(d, d, dtype=torch.float64) for layer in self.layers}

    def _target(self, final: torch.Tensor) -> torch.Tensor:
        if self.target == "final":
            return final
        return final / final.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)

    def _to(self, device: torch.device) -> None:
        """Keep the sums where the states are (a GPU makes the per-prompt d × d products cheap)."""
        if self.mean_y.device == device:
            return
        self.mean_y = self.mean_y.to(device)
        for sums in (self.mean_x, self.cxx, self.cxy):
            for layer in self.layers:
                sums[layer] = sums[layer].to(device)

    def update(self, batch: StateBatch) -> None:
        """Add the tokens of one :class:`StateBatch` (on the batch's device; float64)."""
        self._to(batch.final.device)
        y = self._target(batch.final.double())
        m = y.shape[0]
        if m == 0:
            return
        n = self.count
        total = n + m
        mean_y_batch = y.mean(dim=0)
        delta_y = mean_y_batch - self.mean_y
        yc = y - mean_y_batch
        for layer in self.layers:
            x = batch.hidden[layer].double().to(y.device)
            mean_x_batch = x.mean(dim=0)
            xc = x - mean_x_batch
            delta_x = mean_x_batch - self.mean_x[layer]
            factor = n * m / total
            self.cxx[layer] += xc.T @ xc + factor * torch.outer(delta_x, delta_x)
            self.cxy[layer] += xc.T @ yc + factor * torch.outer(delta_x, delta_y)
            self.mean_x[layer] += delta_x * (m / total)
        self.mean_y += delta_y * (m / total)
        self.count = total

    def solve(self, ridge: float = 0.1) -> dict[int, AffineMap]:
        """Per layer, W and b minimising Σ‖W x + b − y‖² + α‖W − s·I‖²_F, α = ridge · tr(Cxx)/d.

        Cxx, Cxy are the centred sums; s = tr(Cxy)/tr(Cxx) is the best multiple of the identity. The
        penalty shrinks towards s·I, i.e. towards the raw exit head (whose norm ignores the scale s), so a
        large ``ridge`` gives back the raw head up to the mean shift b, and ``ridge`` = 0 is plain least
        squares. Solved as (Cxx + αI) Wᵀ = Cxy + α s I. Returns {layer: AffineMap}.
        """
        if not ridge >= 0 or not math.isfinite(ridge):
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
        if self.count < 2:
            raise ValueError(f"the ridge fit needs at least 2 tokens, got {self.count}")
        d = self.hidden_size
        eye = torch.eye(d, dtype=torch.float64, device=self.mean_y.device)
        maps = {}
        for layer in self.layers:
            cxx, cxy = self.cxx[layer], self.cxy[layer]
            scale_x2 = float(torch.trace(cxx)) / d
            alpha = ridge * scale_x2
            # s: least-squares scale of y ≈ s x (through the centred sums), the identity's best multiple
            s = float(torch.trace(cxy)) / max(float(torch.trace(cxx)), 1e-300)
            # (Cxx + αI) Wᵀ = Cxy + α s I
            weight_t = torch.linalg.solve(cxx + alpha * eye, cxy + alpha * s * eye)
            weight = weight_t.T
            bias = self.mean_y - weight @ self.mean_x[layer]
            weight, bias = weight.cpu(), bias.cpu()
            layer_map = AffineMap(d)
            with torch.no_grad():
                layer_map.weight.copy_(weight.float())
                layer_map.bias.copy_(bias.float())
            maps[layer] = layer_map.requires_grad_(False)
        return maps


# ------------------------------------------------------------------------------ trained low-rank fit


class TokenReservoir:
    """A uniform random sample of at most ``capacity`` tokens (reservoir sampling, seeded), so training
    data stays bounded however many prompts stream past.

    hidden: {layer: (capacity, d)} float32; final: (capacity, d); teacher_top: (capacity, k) long.
    Only the first ``size`` rows are filled.
    """

    def __init__(self, layers: Sequence[int], hidden_size: int, capacity: int, *, teacher_top_k: int = 64,
                 seed: int = 0):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        self.layers = [int(x) for x in layers]
        self.capacity = capacity
        self.hidden = {layer: torch.empty(capacity, hidden_size) for layer in self.layers}
        self.final = torch.empty(capacity, hidden_size)
        self.teacher_top = torch.empty(capacity, teacher_top_k, dtype=torch.long)
        self.size = 0
        self.seen = 0
        self._rng = np.random.default_rng(seed)

    def update(self, batch: StateBatch) -> None:
        m = batch.final.shape[0]
        rows, slots = [], []
        for i in range(m):
            index = self.seen + i
            slot = index if index < self.capacity else int(self._rng.integers(0, index + 1))
            if slot < self.capacity:
                rows.append(i)
                slots.append(slot)
        self.seen += m
        self.size = min(self.seen, self.capacity)
        if not rows:
            return
        rows_t, slots_t = torch.tensor(rows), torch.tensor(slots)
        self.final[slots_t] = batch.final.cpu()[rows_t]
        k = min(self.teacher_top.shape[1], batch.teacher_top.shape[1])
        self.teacher_top[slots_t, :k] = batch.teacher_top.cpu()[rows_t, :k]
        self.teacher_top[slots_t, k:] = batch.teacher_top.cpu()[rows_t, :1]  # pad with the top id
        for layer in self.layers:
            self.hidden[layer][slots_t] = batch.hidden[layer].cpu()[rows_t]


class _FrozenHead:
    """Within the block, the exit head's parameters (final norm, LM head) do not require gradients."""

    def __init__(self, backend):
        self.backend = backend
        self._flags: list[tuple[torch.nn.Parameter, bool]] = []

    def __enter__(self):
        for module in (self.backend.model.lm_head, _final_norm(self.backend)):
            for parameter in module.parameters():
                self._flags.append((parameter, parameter.requires_grad))
                parameter.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for parameter, flag in self._flags:
            parameter.requires_grad_(flag)
        return False

    def logits(self, hidden: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (N, d) float32 -> (N, V) or (N, K) float32 logits (ids (K,) shared by all rows)."""
        return head_logits(self.backend, hidden.to(self.backend.dtype), ids).float()


def train_low_rank(
    model: torch.nn.Module,
    reservoir: TokenReservoir,
    *,
    rank: int = 32,
    steps: int = 300,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    weight_decay: float = 0.0,
    vocabulary: str = "sampled",
    teacher_top_k: int = 64,
    negatives: int = 1024,
    seed: int = 0,
    log_every: int = 0,
    start: dict[int, LayerMap] | None = None,
) -> tuple[dict[int, LayerMap], dict[str, Any]]:
    """Train one low-rank map per layer of ``reservoir`` with a distillation loss; backbone and head frozen.

    Loss per token and layer: KL(p_L ‖ p_ℓ), with p_L = softmax(head(h_L)) the full model's distribution
    and p_ℓ = softmax(head(A_ℓ(h_ℓ))) the adapted exit head's, summed over layers (the maps are
    independent) and averaged over a batch of ``batch_size`` reservoir tokens; AdamW (``weight_decay``
    pulls U, D and c towards 0, i.e. the map towards the identity) with a cosine-decayed learning rate
    for ``steps`` steps. Training runs on the model's device (a GPU when the model is on one).

    vocabulary: "full" — both distributions over the whole vocabulary (exact; 2·N·d·V multiply-adds per
                layer and step forward, as much again backward; comfortable on a GPU).
                "sampled" — both restricted to one vocabulary set per step and renormalised: the union of
                the batch's teacher top-``teacher_top_k`` ids (recorded while collecting) and ``negatives``
                uniformly drawn ids. The set holds nearly all of the teacher's mass, and the random ids keep
                the student from raising tokens the teacher never ranks; it costs a few percent of "full",
                which is what makes CPU training practical.
    start:      {layer: map} to train instead of fresh identity-initialised low-rank maps (copies are
                trained; ``rank`` is then ignored). With the ridge solution as the start this fine-tunes the
                closed-form maps on the head's own objective (as the "tuned lens" does); ``weight_decay``
                then pulls every parameter towards 0, not towards the start, so leave it at 0 there.
    Returns ({layer: map on the CPU}, training facts for the file's provenance).
    """
    from .backends import backend_for

    if vocabulary not in ("full", "sampled"):
        raise ValueError(f"vocabulary must be 'full' or 'sampled', got {vocabulary!r}")
    if reservoir.size < 1:
        raise ValueError("the reservoir holds no tokens to train on")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("teacher_top_k", teacher_top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(negatives, bool) or not isinstance(negatives, int) or negatives < 0:
        raise ValueError(f"negatives must be an int >= 0, got {negatives!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
    backend = backend_for(model)
    device = backend.device
    layers = reservoir.layers
    d = reservoir.final.shape[1]
    vocab = backend.vocab_size
    if start is None:
        maps = {layer: LowRankMap(d, rank, seed=seed + layer).to(device) for layer in layers}
    else:
        if sorted(start) != sorted(layers):
            raise ValueError(f"start maps cover layers {sorted(start)}, the reservoir layers {sorted(layers)}")
        maps = {layer: copy.deepcopy(start[layer]).float().to(device).requires_grad_(True) for layer in layers}
    optimizer = torch.optim.AdamW([p for m in maps.values() for p in m.parameters()], lr=learning_rate,
                                  weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    n = reservoir.size
    top_k = min(teacher_top_k, reservoir.teacher_top.shape[1])
    started = time.perf_counter()
    losses: list[float] = []
    with _FrozenHead(backend) as head, torch.enable_grad():
        for step in range(steps):
            rows = torch.randint(0, n, (min(batch_size, n),), generator=generator)
            final = reservoir.final[rows].to(device)
            ids = None
            if vocabulary == "sampled":
                random_ids = torch.randint(0, vocab, (negatives,), generator=generator)
                ids = torch.unique(torch.cat([reservoir.teacher_top[rows, :top_k].reshape(-1), random_ids])).to(device)
            with torch.no_grad():
                teacher = torch.log_softmax(head.logits(final, ids), dim=-1)
                teacher_p = teacher.exp()
            loss = torch.zeros((), device=device)
            for layer in layers:
                adapted = maps[layer](reservoir.hidden[layer][rows].to(device))
                student = torch.log_softmax(head.logits(adapted, ids), dim=-1)
                loss = loss + (teacher_p * (teacher - student)).sum(dim=-1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()) / len(layers))
            if log_every and (step + 1) % log_every == 0:
                print(f"  step {step + 1}/{steps}: mean KL per layer {np.mean(losses[-log_every:]):.4f}", flush=True)
    facts = {
        "name": "distill",
        "start": "identity" if start is None else "given",
        "rank": rank if start is None else None,
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "optimizer": "adamw, cosine decay",
        "weight_decay": weight_decay,
        "vocabulary": vocabulary,
        "teacher_top_k": top_k if vocabulary == "sampled" else None,
        "negatives": negatives if vocabulary == "sampled" else None,
        "seed": seed,
        "train_tokens": n,
        "first_loss": losses[0],
        "final_loss": float(np.mean(losses[-max(1, steps // 10):])),
        "device": str(device),
        "train_seconds": time.perf_counter() - started,
    }
    return {layer: m.cpu().requires_grad_(False) for layer, m in maps.items()}, facts


# ------------------------------------------------------------------------------ fitting sets


def _fit_set_digest(examples) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(_canonical([str(example.id), str(example.prompt)]))
    return "sha256:" + digest.hexdigest()


def fitting_set(
    recipe,
    *,
    size: int | None,
    seed: int = 0,
    split: str | None = None,
    data_files=None,
    data_dir=None,
    family: str = "decoder-only",
    tokenizer: Any = None,
    exclude=None,
):
    """The fitting examples: ``size`` examples (seeded sample) of ``recipe``'s ``split`` that are not in
    ``exclude`` (a CalibrationSet, or a list of them).

    Refuses (CalibrationOverlap, a ValueError) to draw from the recipe's calibration split — ``split`` None or equal to the
    recipe's own split — unless ``exclude`` gives the calibration sample to leave out. For recipes with one
    split only (aclsum ``all``, gensim), pass the calibration sample as ``exclude``: fitting then uses a
    seeded sample of the remaining rows. Returns (examples, info dict for the adapter file).
    """
    from ltt_exit.recipes import load_recipe

    if isinstance(recipe, (str, os.PathLike)):
        recipe = load_recipe(recipe)
    excluded = [] if exclude is None else (list(exclude) if isinstance(exclude, (list, tuple)) else [exclude])
    fit_split = recipe.split if split is None else split
    if fit_split == recipe.split and not excluded:
        raise CalibrationOverlap(
            f"refusing to fit exit adapters on the split {fit_split!r}: it is the split recipe {recipe.name!r} "
            "calibrates on, and calibration examples must not be seen by the decoder. Fit on another split "
            "(e.g. split='test' with data_files=<that split's file>), or give the calibration sample to exclude "
            "(exclude=<CalibrationSet>; ltt-fit-exits: --calibration-size N [--calibration-seed S] "
            "[--calibration-data-files FILE])."
        )
    pool = recipe.load(size="all", seed=seed, split=fit_split, data_files=data_files, data_dir=data_dir,
                       family=family, tokenizer=tokenizer)
    hashes = [ExampleHashes.of(c.examples, recipe=c.recipe, source=c.source) for c in excluded]
    keep = []
    for example in pool.examples:
        if any(h.overlaps(example, recipe=pool.recipe, source=pool.source) for h in hashes):
            continue
        keep.append(example)
        if size is not None and len(keep) == size:
            break
    if not keep:
        raise ValueError(f"no fitting examples left in split {fit_split!r} of recipe {recipe.name!r} after exclusion")
    if size is not None and len(keep) < size:
        import warnings

        warnings.warn(f"asked for {size} fitting examples but only {len(keep)} are available; using them all",
                      stacklevel=2)
    info = {
        "recipe": pool.recipe,
        "split": fit_split,
        "source": pool.source,
        "family": family,
        "sample_seed": seed,
        "n_prompts": len(keep),
        "fit_set_sha256": _fit_set_digest(keep),
        "excluded": [
            {"recipe": c.recipe, "split": c.split, "n": len(c.examples), "seed": c.seed, "fingerprint": c.fingerprint}
            for c in excluded
        ],
    }
    return keep, info


# ------------------------------------------------------------------------------ the whole fit


class ExitFitData:
    """Streams fitting prompts through the model once and keeps what both fits need: ridge statistics
    (closed form, O(L d²)) and a bounded token reservoir (distillation, O(capacity · L · d)).

        examples, info = fitting_set("samsum", split="test", data_files=..., size=200, tokenizer=lm.tokenizer)
        data = ExitFitData.collect(lm, examples, info, max_new_tokens=32, layers=range(10, 30))
        affine = data.affine(ridge=0.1)                # ExitAdapters, kind "affine"
        low_rank = data.low_rank(rank=32, steps=300)   # ExitAdapters, kind "low-rank"
        affine.save("smollm2-samsum.affine.safetensors")
    """

    def __init__(self, loaded, layers: Sequence[int], *, max_train_tokens: int = 8192,
                 target: str = "final", teacher_top_k: int = 64, seed: int = 0):
        self.loaded = loaded
        self.layers = [int(x) for x in layers]
        config = loaded.model.config
        self.hidden_size = int(config.d_model if loaded.family == "t5" else config.hidden_size)
        self.statistics = RidgeStatistics(self.layers, self.hidden_size, target=target)
        self.reservoir = None
        if max_train_tokens > 0:
            self.reservoir = TokenReservoir(self.layers, self.hidden_size, max_train_tokens,
                                            teacher_top_k=teacher_top_k, seed=seed)
        self.info: dict[str, Any] = {}
        self.hashes = ExampleHashes()
        self.collect_seconds = 0.0

    @classmethod
    def collect(
        cls,
        loaded,
        examples: Sequence,
        info: dict[str, Any],
        *,
        max_new_tokens: int,
        layers: Sequence[int] | None = None,
        max_train_tokens: int = 8192,
        target: str = "final",
        teacher_top_k: int = 64,
        seed: int = 0,
        progress: bool = False,
        batch_size: int = 1,
    ) -> "ExitFitData":
        """Decode every example (greedy, full model) and accumulate its states.

        loaded:   a LoadedModel (model, tokenizer, fingerprint, family, num_layers)
        examples: recipe examples (``id``, ``prompt``, ``fields``), e.g. from :func:`fitting_set`
        info:     provenance for the file (recipe, split, source, ...; :func:`fitting_set` returns it)
        layers:   the layers to adapt (default 1..L-1); only layers >= the decoder's min_exit_layer matter
        batch_size: prompts decoded together (see :func:`collect_states`)
        """
        num_layers = loaded.num_layers
        layers = list(range(1, num_layers)) if layers is None else [int(x) for x in layers]
        data = cls(loaded, layers, max_train_tokens=max_train_tokens, target=target,
                   teacher_top_k=teacher_top_k, seed=seed)
        started = time.perf_counter()
        tokens = 0
        prompts = [example.prompt for example in examples]
        states = collect_states(loaded.model, loaded.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                layers=layers, teacher_top_k=teacher_top_k, batch_size=batch_size)
        for index, batch in enumerate(states):
            data.statistics.update(batch)
            if data.reservoir is not None:
                data.reservoir.update(batch)
            tokens += len(batch.tokens)
            if progress and (index + 1) % 25 == 0:
                print(f"  collected {index + 1}/{len(prompts)} prompts, {tokens} tokens "
                      f"({time.perf_counter() - started:.0f}s)", flush=True)
        data.collect_seconds = time.perf_counter() - started
        data.info = dict(info) | {"n_prompts": len(prompts), "n_tokens": tokens, "max_new_tokens": max_new_tokens,
                                  "collect_seconds": round(data.collect_seconds, 3)}
        data.hashes = ExampleHashes.of(examples, recipe=info.get("recipe", ""), source=info.get("source", ""))
        return data

    def _adapters(self, maps, method: dict[str, Any]) -> ExitAdapters:
        return ExitAdapters(
            maps,
            num_layers=self.loaded.num_layers,
            hidden_size=self.hidden_size,
            model_fingerprint=self.loaded.fingerprint,
            fit_info=self.info | {"method": method},
            example_hashes=self.hashes,
        )

    def affine(self, ridge: float = 0.1, distill: dict[str, Any] | None = None) -> ExitAdapters:
        """Closed-form affine adapters (ridge towards the scaled identity; see RidgeStatistics.solve).

        distill: options of :func:`train_low_rank` (steps, learning_rate, vocabulary, ...) to fine-tune the
        closed-form maps with the distillation loss afterwards (needs the token reservoir); None keeps the
        closed form."""
        started = time.perf_counter()
        maps = self.statistics.solve(ridge)
        method = {"name": "ridge", "ridge": ridge, "target": self.statistics.target,
                  "fit_seconds": round(time.perf_counter() - started, 3)}
        if distill is not None:
            if self.reservoir is None:
                raise ValueError("no token reservoir was kept (max_train_tokens=0): cannot distil the affine maps")
            maps, facts = train_low_rank(self.loaded.model, self.reservoir, start=maps, **distill)
            facts["train_seconds"] = round(facts["train_seconds"], 3)
            method = method | {"name": "ridge+distill", "distill": facts}
        return self._adapters(maps, method)

    def low_rank(self, **train_options: Any) -> ExitAdapters:
        """Trained low-rank adapters (options: see :func:`train_low_rank`)."""
        if self.reservoir is None:
            raise ValueError("no token reservoir was kept (max_train_tokens=0): cannot train low-rank adapters")
        maps, facts = train_low_rank(self.loaded.model, self.reservoir, **train_options)
        facts["train_seconds"] = round(facts["train_seconds"], 3)
        return self._adapters(maps, facts)


# ------------------------------------------------------------------------------ exit classifier


#: features of the default exit classifier (see ltt_exit.decode.scorers.EXIT_FEATURES)
DEFAULT_CLASSIFIER_FEATURES: tuple[str, ...] = (
    "top1-log-odds", "margin", "entropy", "previous-agrees", "previous-top1-log-odds", "previous-margin",
    "hidden-cosine",
)


@torch.inference_mode()
def exit_classifier_samples(
    backend,
    batch: StateBatch,
    adapters: Any,
    *,
    pruning: Any,
    min_exit_layer: int,
    features: Sequence[str] = DEFAULT_CLASSIFIER_FEATURES,
    skip_first: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced training samples of an exit classifier from one prompt's states.

    At every position of ``batch`` and consulted layer ℓ (``min_exit_layer`` <= ℓ < L), the exit decision's
    inputs are built as the decoder builds them: the exit head on ``adapters.apply(ℓ, h_ℓ)`` (adapters None:
    the raw head), ``pruning`` chained over the consulted layers, an :class:`ExitView` with ``logits_at`` over
    the layer's vocabulary set, and :func:`exit_features` of it. The label is whether the layer's prediction
    (arg-max over its set) equals the full model's token. ``batch.hidden`` must hold layers
    ``min_exit_layer - 1`` .. L-1. ``skip_first`` (default: decoder-only models) drops position 0, whose token
    the decoder-only decoder takes from the prompt's prefill without an exit decision.

    Returns features (T, L - min_exit_layer, G) float64 and labels (T, L - min_exit_layer) bool.
    """
    from .pruning import resolve_pruning
    from .scorers import ExitView, exit_features

    pruning = resolve_pruning(pruning)
    num_layers = backend.num_layers
    if not 2 <= min_exit_layer < num_layers:
        raise ValueError(f"fitting an exit classifier needs min_exit_layer in [2, {num_layers - 1}] (states are "
                         f"collected from layer 1 up), got {min_exit_layer}")
    missing = [a for a in range(min_exit_layer - 1, num_layers) if a not in batch.hidden]
    if missing:
        raise ValueError(f"the states lack layers {missing}; collect layers {max(1, min_exit_layer - 1)}..{num_layers - 1}")
    if skip_first is None:
        skip_first = backend.first_token_from_prompt
    target = torch.tensor(batch.tokens, device=backend.device)
    adapted: dict[int, torch.Tensor] = {}

    def head(layer: int, ids: torch.Tensor | None) -> torch.Tensor:
        if layer not in adapted:
            hidden = batch.hidden[layer].to(backend.device, backend.dtype)
            adapted[layer] = hidden if adapters is None else adapters.apply(layer, hidden)
        return backend.head(adapted[layer], ids)

    rows, labels = [], []
    set_ids = None
    for layer in range(min_exit_layer, num_layers):
        pruned = pruning.select(layer, min_exit_layer=min_exit_layer, num_layers=num_layers, prev_ids=set_ids,
                                head=lambda ids, layer=layer: head(layer, ids))
        view = ExitView(layer=layer, logits=pruned.logits,
                        hidden=batch.hidden[layer].to(backend.device, backend.dtype),
                        hidden_prev=batch.hidden[layer - 1].to(backend.device, backend.dtype),
                        logits_at=lambda a, ids=pruned.ids: head(a, ids))
        rows.append(exit_features(view, tuple(features)).double().cpu())
        best = pruned.logits.argmax(dim=-1)
        predicted = best if pruned.ids is None else pruned.ids.gather(-1, best[:, None])[:, 0]
        labels.append((predicted == target).cpu())
        set_ids = pruned.ids
    x, y = torch.stack(rows, dim=1).numpy(), torch.stack(labels, dim=1).numpy()
    return (x[1:], y[1:]) if skip_first else (x, y)


def fit_logistic_exit_model(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    layers: Sequence[int],
    names: Sequence[str],
    l2: float = 1e-3,
    per_layer: bool = False,
    max_iterations: int = 5000,
):
    """L2-penalised logistic regression of ``labels`` on ``features``, one intercept per layer.

    features: (N, n, G) for N positions at the n consulted ``layers``; labels: (N, n) bool
    l2:       penalty (on standardised features) on the weights, not on the intercepts; the mean log-loss
              is minimised, so l2 does not depend on N
    per_layer: one weight vector per layer (False: one shared by all layers)
    Minimised with scipy's L-BFGS-B (exact gradient); the standardisation is folded into the returned
    coefficients. Returns (LogisticExitModel, facts).
    """
    from scipy.optimize import minimize
    from scipy.special import expit, log_expit

    from .scorers import LogisticExitModel

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if x.ndim != 3 or y.shape != x.shape[:2]:
        raise ValueError(f"features must be (N, layers, G) and labels (N, layers); got {x.shape} and {y.shape}")
    n_layers, n_features = x.shape[1], x.shape[2]
    if len(layers) != n_layers or len(names) != n_features:
        raise ValueError(f"{n_layers} layers and {n_features} features in the data, but {len(layers)} layer numbers "
                         f"and {len(names)} feature names")
    if x.shape[0] < 1:
        raise ValueError("no samples to fit the exit classifier on")
    if not np.isfinite(x).all():
        raise ValueError("exit-classifier features contain NaN or infinity")
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0 (separable data has no finite unpenalised fit), got {l2!r}")
    mean = x.reshape(-1, n_features).mean(axis=0)
    scale = x.reshape(-1, n_features).std(axis=0)
    scale[scale == 0] = 1.0  # a constant feature carries nothing beyond the intercepts
    z = (x - mean) / scale
    sign = np.where(y, 1.0, -1.0)
    count = y.size
    rows = n_layers if per_layer else 1

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        bias, weight = theta[:n_layers], theta[n_layers:].reshape(rows, n_features)
        logit = bias + np.einsum("nlg,lg->nl", z, np.broadcast_to(weight, (n_layers, n_features)))
        value = -log_expit(sign * logit).sum() / count + 0.5 * l2 * (weight**2).sum()
        residual = -sign * expit(-sign * logit) / count  # d loss / d logit
        grad_weight = np.einsum("nlg,nl->lg", z, residual)
        if not per_layer:
            grad_weight = grad_weight.sum(axis=0, keepdims=True)
        return value, np.concatenate([residual.sum(axis=0), (grad_weight + l2 * weight).ravel()])

    started = time.perf_counter()
    result = minimize(loss, np.zeros(n_layers + rows * n_features), jac=True, method="L-BFGS-B",
                      options={"maxiter": max_iterations, "gtol": 1e-9})
    bias, weight = result.x[:n_layers], np.broadcast_to(result.x[n_layers:].reshape(rows, n_features),
                                                        (n_layers, n_features))
    raw_weight = weight / scale
    raw_bias = bias - raw_weight @ mean
    model = LogisticExitModel(names, layers, torch.from_numpy(raw_weight.copy()), torch.from_numpy(raw_bias.copy()))
    facts = {"l2": l2, "per_layer": per_layer, "samples": int(count), "positive_share": float(y.mean()),
             "log_loss": float(result.fun), "converged": bool(result.success), "iterations": int(result.nit),
             "fit_seconds": round(time.perf_counter() - started, 3)}
    return model, facts


def fit_exit_classifier(
    loaded,
    adapters: ExitAdapters,
    examples: Sequence,
    info: dict[str, Any],
    *,
    max_new_tokens: int,
    min_exit_layer: int,
    pruning: Any = "decaying",
    features: Sequence[str] = DEFAULT_CLASSIFIER_FEATURES,
    l2: float = 1e-3,
    per_layer: bool = False,
    progress: bool = False,
    batch_size: int = 1,
) -> ExitAdapters:
    """Fit an exit classifier for ``adapters`` and return a copy of them that holds it.

    loaded:   a LoadedModel; examples / info: fitting prompts and their provenance (:func:`fitting_set`). Use
              prompts the adapters were *not* fitted on: on their own fitting prompts the adapted heads agree
              more often than on new prompts, and the classifier would learn that optimism.
    The full model greedy-decodes every prompt (``collect_states``); the samples are
    :func:`exit_classifier_samples` with the decoder's ``pruning`` and ``min_exit_layer`` (a classifier is
    fitted for one pruning: it sees the pruned softmax). The fit is :func:`fit_logistic_exit_model`.
    """
    from .backends import backend_for
    from .pruning import resolve_pruning

    backend = backend_for(loaded.model)
    pruning = resolve_pruning(pruning)
    layers = list(range(min_exit_layer - 1, backend.num_layers))
    started = time.perf_counter()
    xs, ys = [], []
    if not examples:
        raise ValueError("no prompts to fit the exit classifier on (an empty fitting set)")
    prompts = [example.prompt for example in examples]
    for index, batch in enumerate(collect_states(loaded.model, loaded.tokenizer, prompts, batch_size=batch_size,
                                                 max_new_tokens=max_new_tokens, layers=layers)):
        x, y = exit_classifier_samples(backend, batch, adapters, pruning=pruning, min_exit_layer=min_exit_layer,
                                       features=features)
        xs.append(x)
        ys.append(y)
        if progress and (index + 1) % 25 == 0:
            print(f"  classifier samples: {index + 1}/{len(prompts)} prompts ({time.perf_counter() - started:.0f}s)",
                  flush=True)
    collect_seconds = time.perf_counter() - started
    x, y = np.concatenate(xs), np.concatenate(ys)
    model, facts = fit_logistic_exit_model(x, y, layers=list(range(min_exit_layer, backend.num_layers)),
                                           names=tuple(features), l2=l2, per_layer=per_layer)
    record = {key: info.get(key) for key in ("recipe", "split", "source", "family", "sample_seed")} | {
        "n_prompts": len(prompts),
        "n_tokens": int(x.shape[0]),
        "fit_set_sha256": _fit_set_digest(examples),
        "max_new_tokens": max_new_tokens,
        "min_exit_layer": min_exit_layer,
        "pruning": {"name": pruning.name, "params": pruning.params()},
        "features": list(features),
        "method": {"name": "logistic"} | facts,
        "collect_seconds": round(collect_seconds, 3),
    }
    hashes = ExampleHashes.of(examples, recipe=info.get("recipe", ""), source=info.get("source", ""))
    return adapters.with_exit_classifier(model, record, hashes)
