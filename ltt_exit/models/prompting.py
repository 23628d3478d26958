"""Turning an instruction or task text into the string a model is prompted with.

Decoder-only instruct models that ship a chat template get the text as one user turn, rendered
by the tokenizer's own template with the assistant turn opened (``add_generation_prompt=True``).
T5 models and models without a chat template get the text unchanged: T5 task prefixes
("summarize: ", "question: … context: …") are part of the recipes' templates.

This module does not import torch.
"""
from __future__ import annotations

from typing import Any

__all__ = ["FAMILIES", "format_prompt", "has_chat_template"]

FAMILIES = ("t5", "decoder-only")


def _tokenizer_of(loaded_or_tokenizer: Any):
    # A LoadedModel (or anything with a .tokenizer) or a tokenizer itself.
    return getattr(loaded_or_tokenizer, "tokenizer", loaded_or_tokenizer)


def has_chat_template(tokenizer: Any) -> bool:
    """True when ``tokenizer`` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(loaded_or_tokenizer: Any, family: str | None, text: str) -> str:
    """The prompt string for ``text``: the chat template for decoder-only models that have one.

    ``loaded_or_tokenizer`` is a ``LoadedModel``, a tokenizer, or None (raw text). ``family`` is
    ``"t5"`` or ``"decoder-only"``; None takes it from a ``LoadedModel``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if family is None:
        family = getattr(loaded_or_tokenizer, "family", None)
        if family is None:
            raise ValueError("family is None: pass 't5' or 'decoder-only' (or a LoadedModel)")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {list(FAMILIES)}")
    tokenizer = _tokenizer_of(loaded_or_tokenizer)
    if family == "t5" or tokenizer is None or not has_chat_template(tokenizer):
        return text
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    if not isinstance(rendered, str):  # some versions return a list for batched input
        raise TypeError(f"apply_chat_template returned {type(rendered).__name__}, expected str")
    return rendered
