"""What every decoding path does before the first token: prompt preparation, the token budget, EOS ids.

The reference decoder (``EarlyExitDecoder.generate``), the sweep's grid decode (``generate_grid``) and
the CUDA fast path (``FastEarlyExitDecoder.generate``) all turn their arguments into a
:class:`~ltt_exit.decode.backends.PromptBatch`, a budget and a set of stop ids through these functions,
so the same call means the same prompt on every path.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .backends import ExitBackend, PromptBatch

__all__ = ["check_budget", "eos_ids", "pad_token_rows", "prepare_prompt", "resolve_device"]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"``: CUDA when present, else the CPU; anything else as ``torch.device`` reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_budget(max_new_tokens: Any) -> None:
    """The token budget N must be an int >= 1 (a bool is refused: ``True`` is not a budget)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")


def eos_ids(backend: ExitBackend, eos_token_id: int | Sequence[int] | None) -> set[int]:
    """The stop ids of a call: the model's generation config (None), one id, or a sequence ([]: never stop)."""
    if eos_token_id is None:
        return set(backend.default_eos_token_ids())
    if isinstance(eos_token_id, int) and not isinstance(eos_token_id, bool):
        return {eos_token_id}
    try:
        return {int(e) for e in eos_token_id}
    except TypeError:
        raise TypeError(f"eos_token_id must be an int, a sequence of ints or None, got {eos_token_id!r}") from None


def pad_token_rows(rows: list[list[int]], tokenizer: Any, backend: ExitBackend) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows -> (ids, attention_mask), both (B, width) long on the CPU, padded on the backend's side
    (left for decoder-only models) with the tokenizer's pad id (else the model's)."""
    if not rows:
        raise ValueError("nothing to decode: the batch is empty")
    if any(len(row) == 0 for row in rows):
        raise ValueError("every prompt needs at least one token")
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad = backend.pad_token_id() if pad is None else int(pad)
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if backend.padding_side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def prepare_prompt(
    backend: ExitBackend,
    tokenizer: Any,
    prompts: Sequence[str] | str | None,
    input_ids: torch.Tensor | Sequence[Sequence[int]] | None,
    attention_mask: torch.Tensor | None,
) -> PromptBatch:
    """The prompt batch of a ``generate`` call, on the backend's device, checked against its vocabulary.

    Exactly one of ``prompts`` (strings, tokenized with ``tokenizer``) or ``input_ids`` ((B, P) tensor with
    an optional ``attention_mask``, or token-id lists padded here) must be given.
    """
    if (prompts is None) == (input_ids is None):
        raise ValueError("give exactly one of prompts (strings) or input_ids")
    device = backend.device
    if prompts is not None:
        if isinstance(prompts, str):
            prompts = [prompts]
        if tokenizer is None:
            raise ValueError("prompts given as strings need a tokenizer; pass tokenizer=... or input_ids=...")
        if attention_mask is not None:
            raise ValueError("attention_mask goes with input_ids, not with string prompts")
        rows = [list(tokenizer(str(p), add_special_tokens=True)["input_ids"]) for p in prompts]
        ids, mask = pad_token_rows(rows, tokenizer, backend)
    elif isinstance(input_ids, torch.Tensor):
        ids = input_ids
        if ids.ndim == 1:
            ids = ids.unsqueeze(0)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
        if attention_mask is None:
            mask = torch.ones_like(ids)
        else:
            mask = attention_mask if attention_mask.ndim == 2 else attention_mask.unsqueeze(0)
            if mask.shape != ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} does not match "
                    f"input_ids {tuple(ids.shape)}"
                )
    else:
        if attention_mask is not None:
            raise ValueError("attention_mask goes with an input_ids tensor; token-id lists are padded here")
        rows = [[int(t) for t in row] for row in input_ids]
        ids, mask = pad_token_rows(rows, tokenizer, backend)
    if ids.shape[0] == 0:
        raise ValueError("nothing to decode: the batch is empty")
    ids = ids.to(device=device, dtype=torch.long)
    mask = mask.to(device=device, dtype=torch.long)
    if bool((mask.sum(dim=-1) == 0).any()):
        raise ValueError("every prompt needs at least one real (unmasked) token")
    if bool(((ids < 0) | (ids >= backend.vocab_size))[mask.bool()].any()):
        raise ValueError(f"input_ids contain ids outside the vocabulary [0, {backend.vocab_size})")
    backend.check_prompt(ids, mask)
    return PromptBatch(ids, mask)
