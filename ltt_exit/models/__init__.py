"""Models: loading by alias / folder / hub id / GGUF file, the GGUF conversion cache, model
fingerprints and prompt formatting.

Importing this package does not import torch or transformers; they are imported when a model is
loaded or fingerprinted.
"""
from __future__ import annotations

from .fingerprint import FINGERPRINT_VERSION, fingerprint_parts, model_fingerprint
from .gguf_cache import default_cache_dir, ensure_gguf_cache, file_sha256, load_gguf_uncached
from .loading import (
    DEFAULT_MODEL,
    MODEL_ALIASES,
    SUPPORTED_MODEL_TYPES,
    LoadedModel,
    ModelUnavailableError,
    PackagedGGUF,
    default_device,
    load_model,
)
from .prompting import FAMILIES, format_prompt, has_chat_template

__all__ = [
    "DEFAULT_MODEL",
    "FAMILIES",
    "FINGERPRINT_VERSION",
    "MODEL_ALIASES",
    "SUPPORTED_MODEL_TYPES",
    "LoadedModel",
    "ModelUnavailableError",
    "PackagedGGUF",
    "default_cache_dir",
    "default_device",
    "ensure_gguf_cache",
    "file_sha256",
    "fingerprint_parts",
    "format_prompt",
    "has_chat_template",
    "load_gguf_uncached",
    "load_model",
    "model_fingerprint",
]
