"""ltt-exit: early-exit decoding with a Learn-Then-Test certified threshold.

Importing this package does not import torch: the certification core works on any loss matrix.
Decoder names are resolved lazily on first access.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    # name -> (module, attribute); filled in as stages land
    "EarlyExitDecoder": ("ltt_exit.decode", "EarlyExitDecoder"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'ltt_exit' has no attribute {name!r}")
