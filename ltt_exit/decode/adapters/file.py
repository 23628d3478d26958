"""The adapter file and the object it loads into: :class:`ExitAdapters`, its format and its fingerprint.

An :class:`ExitAdapters` object holds one map per adapted layer (1-based; layers without a map and the
last layer pass h_ℓ through unchanged), the fingerprint of the model it was fitted for, where its fitting
prompts came from (``overlap.ExampleHashes``) and optionally a fitted exit classifier. It is what
``EarlyExitDecoder(..., exit_adapters=...)`` takes (``apply(layer, hidden)``, ``describe()``). Files are
safetensors with a JSON header in the metadata (layout version ``ADAPTER_FORMAT_VERSION``); the file's
own fingerprint covers the tensors and the header, and loading refuses a file that was edited, or that
was fitted for another model.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import AdapterMismatch, CalibrationOverlap
from .maps import LAYER_MAPS, LayerMap, LowRankMap
from .overlap import ExampleHashes, canonical_json

__all__ = ["ADAPTER_FORMAT_VERSION", "ExitAdapters", "resolve_exit_adapters", "check_disjoint"]

#: version of the file layout (tensor names and header keys)
ADAPTER_FORMAT_VERSION = 1
_HEADER_KEY = "ltt_exit_exit_adapters"
_HASHES_KEY = "ltt_exit_fit_example_hashes"
_CLASSIFIER_WEIGHT = "exit_classifier.weight"
_CLASSIFIER_BIAS = "exit_classifier.bias"


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
        from ..scorers import LogisticExitModel

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
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        model_fingerprint: str | None = None,
        num_layers: int | None = None,
        hidden_size: int | None = None,
        expected_fingerprint: str | None = None,
    ) -> "ExitAdapters":
        """Read a file written by :meth:`save`; check its integrity and, when given, that it belongs to the
        model with ``model_fingerprint``, to a decoder of ``num_layers`` x ``hidden_size``, and that its
        fingerprint is ``expected_fingerprint``. Any mismatch raises AdapterMismatch."""
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
            from ..scorers import LogisticExitModel

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
    digest.update(canonical_json({"header": header, "example_hashes": hashes}))
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
