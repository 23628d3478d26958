"""Model-family backends of the early-exit decoder, picked from the model's type."""
from __future__ import annotations

import torch
import transformers
from packaging.version import Version

# The backends call the library's layers and mask helpers with the cache keyword ``cache=`` (named
# ``past_key_values`` before 5.24); an older transformers would take it as an unknown keyword and
# decode without a cache, silently wrong, so it is refused here.
MIN_TRANSFORMERS = "5.24"
if Version(transformers.__version__).release < Version(MIN_TRANSFORMERS).release:
    raise ImportError(
        f"ltt-exit's decoder needs transformers >= {MIN_TRANSFORMERS}, found {transformers.__version__}; "
        f"pip install 'transformers>={MIN_TRANSFORMERS},<6'"
    )

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
