"""Model-family backends of the early-exit decoder, picked from the model's type."""
from __future__ import annotations

import torch

from .base import ExitBackend, PromptBatch
from .decoder_only import SUPPORTED_CAUSAL_LMS, DecoderOnlyBackend
from .t5 import T5Backend

__all__ = ["ExitBackend", "PromptBatch", "T5Backend", "DecoderOnlyBackend", "BACKENDS", "backend_for"]

BACKENDS: dict[str, type[ExitBackend]] = {T5Backend.family: T5Backend, DecoderOnlyBackend.family: DecoderOnlyBackend}


def backend_for(model: torch.nn.Module) -> ExitBackend:
    """The backend wrapping ``model``; TypeError naming the supported families otherwise."""
    for backend_class in BACKENDS.values():
        if backend_class.supports(model):
            return backend_class(model)
    supported = ["T5ForConditionalGeneration", *(cls.__name__ for cls in SUPPORTED_CAUSAL_LMS)]
    raise TypeError(
        f"EarlyExitDecoder does not support {type(model).__name__}; supported model classes: {', '.join(supported)}"
    )
