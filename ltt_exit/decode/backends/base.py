"""The interface every model family implements for the early-exit decoder.

A backend wraps the library's own modules of one family (layers, norms, rotary embedding, LM head)
and its cache objects. The decoder drives it one generated token at a time:

    state = backend.start(input_ids, attention_mask)      # encoder / prompt prefill, cache set up
    for each token:
        h = backend.begin_step(state, tokens)              # (B, 1, d) input of layer 1 (h_0)
        for i in range(L):                                 # 0-based layer index i = layer ℓ - 1
            h = backend.run_layer(state, i, h)             # appends this position's K/V at layer i
            # or, once every row has exited:
            backend.propagate_kv(state, i, h_frozen)       # K/V projections of the copied state only
        backend.end_step(state)
        logits = backend.head(h_ℓ, ids)                    # exit head at any layer

``run_layer`` on a row's frozen state appends exactly the K/V that state propagation prescribes
(the layer's own K/V projections of the copied hidden state; for rotary models K is rotated at the
token's position), so exited rows of a batch keep running through the layers with their outputs
discarded; ``propagate_kv`` is the cheaper equivalent when no row of the batch needs the layer output.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple

import torch

__all__ = ["ExitBackend", "PromptBatch", "HeadWeights", "pruned_logits"]


class HeadWeights(NamedTuple):
    """Rows of the LM head for a pruned vocabulary set: weight (B, k, d), bias (B, k) or None."""

    weight: torch.Tensor
    bias: torch.Tensor | None


def pruned_logits(normed: torch.Tensor, weights: HeadWeights) -> torch.Tensor:
    """normed (B, d) head input -> (B, k) logits of the gathered vocabulary rows (d·k multiply-adds per row)."""
    # a row-wise dot product: batched bmm with one column is several times slower on CPU at B > 1
    logits = torch.linalg.vecdot(weights.weight, normed.to(weights.weight.dtype).unsqueeze(-2))
    if weights.bias is not None:
        logits = logits + weights.bias
    return logits


class PromptBatch:
    """input_ids (B, P) and attention_mask (B, P) on the model device, plus real prompt lengths (B,)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.lengths = [int(n) for n in attention_mask.sum(dim=-1).tolist()]


class ExitBackend(ABC):
    """One model family. Subclasses set the attributes below in ``__init__``."""

    family: ClassVar[str]
    #: decoder-only models predict the first new token from the prompt prefill (always the full model)
    first_token_from_prompt: ClassVar[bool]
    #: which side prompts are padded on when the decoder tokenizes them
    padding_side: ClassVar[str]

    model: torch.nn.Module
    num_layers: int
    hidden_size: int
    vocab_size: int

    @classmethod
    @abstractmethod
    def supports(cls, model: torch.nn.Module) -> bool:
        """Whether ``model`` belongs to this family."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ---- inputs ---------------------------------------------------------------------------------
    def check_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Raise ValueError for inputs this family cannot decode (e.g. right padding)."""

    def pad_token_id(self) -> int:
        pad = getattr(self.model.config, "pad_token_id", None)
        return int(pad) if isinstance(pad, int) else 0

    def default_eos_token_ids(self) -> list[int]:
        """EOS ids from the generation config (else the model config); [] when none is defined."""
        for source in (getattr(self.model, "generation_config", None), self.model.config):
            eos = getattr(source, "eos_token_id", None)
            if eos is None:
                continue
            return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        return []

    # ---- decoding -------------------------------------------------------------------------------
    @abstractmethod
    def start(self, prompt: PromptBatch) -> Any:
        """Run the encoder / prompt prefill once and return the decoding state (cache inside)."""

    @abstractmethod
    def first_inputs(self, state: Any) -> torch.Tensor:
        """(B,) token ids fed at the first decoding step (T5: decoder start; decoder-only: the token
        predicted by the prefill)."""

    def prompt_logits(self, state: Any) -> torch.Tensor:
        """(B, V) full-model logits for the first new token (decoder-only only)."""
        raise NotImplementedError

    @abstractmethod
    def begin_step(self, state: Any, tokens: torch.Tensor) -> torch.Tensor:
        """Embed tokens (B,) for the next position and prepare masks / positions; returns h_0 (B, 1, d)."""

    @abstractmethod
    def run_layer(self, state: Any, index: int, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Layer ``index`` (0-based) on hidden (B, 1, d) through the library module, cache updated.

        rows: (b,) batch rows whose output is needed (None: all). The other rows hold frozen copies: the
        layer must still append their K/V (so its attention runs on every row), but a backend may skip
        the rest of their work (the feed-forward block); their output is then unspecified.
        """

    @abstractmethod
    def propagate_kv(self, state: Any, index: int, hidden: torch.Tensor) -> None:
        """Append layer ``index``'s self-attention K/V computed from hidden (B, 1, d) to the cache only."""

    def overwrite_last_kv(self, state: Any, index: int, rows: torch.Tensor, hidden: torch.Tensor) -> None:
        """After ``end_step``: replace the self-attention K/V of the newest position of batch rows ``rows``
        (R,) long at layer ``index`` with the K/V projections of hidden (R, 1, d) — exactly what
        ``propagate_kv`` appends for a row whose token froze at that state (rotary K rotated at the row's
        position). The sweep's shared rows use it after copying a row for candidates that exited lower."""
        raise NotImplementedError(f"{type(self).__name__} does not implement overwrite_last_kv")

    def end_step(self, state: Any) -> None:
        """Advance per-step bookkeeping after all layers ran."""

    @abstractmethod
    def head(
        self, hidden: torch.Tensor, ids: torch.Tensor | None = None, weights: HeadWeights | None = None
    ) -> torch.Tensor:
        """Exit head (final norm + LM head). hidden (B, d); ids None -> (B, V); ids (B, k) -> (B, k).

        weights: ``head_weights(ids)`` computed earlier for the same ids (saves gathering them again).
        """

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the LM head multiplies: the final norm of hidden (B, d) (and any family rescale), (B, d)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement head_input")

    def head_logits(self, normed: torch.Tensor, ids: torch.Tensor | None, weights: HeadWeights | None = None
                    ) -> torch.Tensor:
        """The LM head on its input normed (B, d): (B, V) logits, or (B, k) for vocabulary ids (B, k)."""
        if ids is None:
            return self.model.lm_head(normed)
        return pruned_logits(normed, weights if weights is not None else self.head_weights(ids))

    def head_weights(self, ids: torch.Tensor) -> HeadWeights:
        """The LM head's weight rows (B, k, d) and bias (B, k) (None without one) of vocabulary ids (B, k)."""
        lm_head = self.model.lm_head
        return HeadWeights(lm_head.weight[ids], None if lm_head.bias is None else lm_head.bias[ids])

    @abstractmethod
    def select_rows(self, state: Any, keep: torch.Tensor) -> None:
        """Rebuild the batch as rows ``keep`` (1-D long tensor) of the state and its cache: drops rows, and a
        repeated index duplicates a row (every per-row piece of state is copied)."""

    # ---- cost model (FLOPs = 2 x multiply-accumulates; norms, softmax, rotary ignored) -------------
    @abstractmethod
    def layer_flops(self, context: int, source_length: int) -> float:
        """One position through one decoder layer attending over ``context`` positions
        (``source_length`` = encoder length, T5 only)."""

    @abstractmethod
    def kv_flops(self) -> float:
        """The self-attention K and V projections of one position at one layer."""

    @abstractmethod
    def prefill_flops(self, prompt_length: int) -> float:
        """Prompt work early exit does not change (see CostAccount.prefill_flops)."""

    def head_flops(self, rows: int) -> float:
        return 2.0 * self.hidden_size * rows

    def describe(self) -> dict[str, Any]:
        """JSON-able facts about the backend that change outputs."""
        return {
            "backend": self.family,
            "model_type": getattr(self.model.config, "model_type", None),
            "dtype": str(self.dtype).replace("torch.", ""),
            "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
        }
