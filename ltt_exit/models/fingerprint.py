"""Fingerprints of a model and its tokenizer, recorded in certificates to refuse misuse.

``model_fingerprint(model, tokenizer)`` is ``"sha256:<hex>"`` over three canonical parts:

* **config**: ``model.config.to_dict()`` without keys that name a file, a library version or a
  runtime switch (see :data:`VOLATILE_CONFIG_KEYS`), plus the model class name and the dtypes the
  parameters actually have;
* **tokenizer**: the fast tokenizer's full definition (vocabulary, merges, added tokens,
  normaliser, pre-tokeniser, post-processor, decoder; its mutable padding/truncation state
  excluded), or for a slow tokenizer its sentencepiece model / vocabulary, plus the special tokens
  and the chat template;
* **weights**: every parameter and buffer in name order, each as name, dtype, shape and raw bytes
  (bfloat16 and other dtypes numpy lacks are hashed as their bytes). Tensors are hashed on the CPU
  in their own dtype, so the fingerprint does not depend on the device.

The same weights loaded from a GGUF file or from its converted cache give the same fingerprint;
one changed weight, a changed tokenizer or a dtype change give a different one.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = [
    "FINGERPRINT_VERSION",
    "VOLATILE_CONFIG_KEYS",
    "model_fingerprint",
    "fingerprint_parts",
    "config_digest",
    "tokenizer_digest",
    "weights_digest",
]

FINGERPRINT_VERSION = 1

# Keys of config.to_dict() that do not describe the computation: file names, library versions,
# the stored dtype (replaced by the parameters' real dtype), quantisation bookkeeping of the source
# file (the weights themselves are hashed), and runtime switches that callers flip freely.
VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "_name_or_path",
        "name_or_path",
        "_model_name_or_path",
        "_commit_hash",
        "torch_dtype",
        "dtype",
        "quantization_config",
        "architectures",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "attn_implementation",
        "_experts_implementation",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "torchscript",
    }
)

# Tokenizer state that changes when a caller pads or truncates a batch.
_VOLATILE_TOKENIZER_KEYS = ("truncation", "padding")


def _canonical_json(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr
    ).encode("utf-8")


def _without_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            str(k): _without_volatile(v) for k, v in value.items() if k not in VOLATILE_CONFIG_KEYS
        }
    if isinstance(value, (list, tuple)):
        return [_without_volatile(v) for v in value]
    return value


def config_digest(model) -> str:
    """sha256 of the canonical architecture description (config, class, parameter dtypes)."""
    config = _without_volatile(model.config.to_dict())
    parameter_dtypes = sorted({str(p.dtype) for p in model.parameters()})
    payload = {"class": type(model).__name__, "config": config, "parameter_dtypes": parameter_dtypes}
    return hashlib.sha256(_canonical_json(payload)).hexdigest()


def _tokenizer_description(tokenizer) -> dict[str, Any]:
    description: dict[str, Any] = {}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        for key in _VOLATILE_TOKENIZER_KEYS:
            definition.pop(key, None)
        description["backend"] = definition
    else:
        sp_model = getattr(tokenizer, "sp_model", None)
        if sp_model is not None and hasattr(sp_model, "serialized_model_proto"):
            description["sentencepiece_sha256"] = hashlib.sha256(
                sp_model.serialized_model_proto()
            ).hexdigest()
        description["vocab"] = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    description["added_tokens"] = sorted(
        (int(index), str(token), bool(getattr(token, "special", False)))
        for index, token in added.items()
    )
    description["special_tokens"] = {
        str(k): (list(v) if isinstance(v, (list, tuple)) else str(v))
        for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()
    }
    description["chat_template"] = getattr(tokenizer, "chat_template", None)
    return description


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the tokenizer's canonical definition (vocabulary, merges, specials, template)."""
    return hashlib.sha256(_canonical_json(_tokenizer_description(tokenizer))).hexdigest()


def _tensor_bytes(tensor):
    """A read-only buffer with the tensor's raw bytes (C order, CPU)."""
    import torch

    data = tensor.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    data = data.contiguous().reshape(-1)
    if data.dtype is torch.bool:
        data = data.to(torch.uint8)
    # A byte view works for every dtype, including bfloat16 which numpy cannot represent.
    return memoryview(data.view(torch.uint8).numpy())


def weights_digest(model) -> str:
    """sha256 over every parameter and buffer: name, dtype, shape and bytes, in name order."""
    tensors: dict[str, Any] = {}
    for name, tensor in model.named_parameters():
        tensors[name] = tensor
    for name, tensor in model.named_buffers():
        tensors.setdefault(name, tensor)
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        header = f"{name}\0{str(tensor.dtype)}\0{tuple(tensor.shape)}\0".encode("utf-8")
        digest.update(len(header).to_bytes(8, "little"))
        digest.update(header)
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def fingerprint_parts(model, tokenizer) -> dict[str, str]:
    """The three component digests (hex): ``config``, ``tokenizer``, ``weights``.

    Comparing parts tells *what* differs when two fingerprints disagree.
    """
    if tokenizer is None:
        raise TypeError("a tokenizer is required: the fingerprint covers model and tokenizer")
    return {
        "config": config_digest(model),
        "tokenizer": tokenizer_digest(tokenizer),
        "weights": weights_digest(model),
    }


def _combine(parts: dict[str, str]) -> str:
    payload = {"ltt_exit_fingerprint_version": FINGERPRINT_VERSION, **parts}
    return "sha256:" + hashlib.sha256(_canonical_json(payload)).hexdigest()


def model_fingerprint(model, tokenizer) -> str:
    """``"sha256:<hex>"`` identifying the architecture, the tokenizer and every weight."""
    return _combine(fingerprint_parts(model, tokenizer))
