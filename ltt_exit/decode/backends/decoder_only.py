"""Early-exit backend for decoder-only Llama-family models (Llama / SmolLM2, Qwen2, Mistral).

Wraps the library's own modules: the base model for the prompt prefill, each ``*DecoderLayer``, the
rotary embedding module, the final RMSNorm and ``lm_head``, the masking helpers and ``DynamicCache`` (with
slotted layers, ``slotted_cache``: appends in place, row selections copy only the rows that move).
The first new token is predicted by the prefill (full model); every later token may exit early.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .base import ExitBackend, HeadWeights, PromptBatch
from .slotted_cache import select_cache_rows, slotted_cache

__all__ = ["DecoderOnlyBackend", "SUPPORTED_CAUSAL_LMS"]

SUPPORTED_CAUSAL_LMS = (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)
# layer classes whose forward is h + attn(norm1(h)), then h + mlp(norm2(h))
_PRE_NORM_LAYERS = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer")


@dataclass
class DecoderOnlyState:
    """cache: the library's DynamicCache (slotted layers); attention_mask (B, seen) 2-D padding mask; positions
    (B,) rotary position of the last fed token; prompt_logits (B, V) the prefill's last-position logits, read
    for the first token and dropped at the first decoding step; the remaining fields are per-step."""

    cache: DynamicCache
    attention_mask: torch.Tensor
    positions: torch.Tensor
    prompt_logits: torch.Tensor | None
    position_ids: torch.Tensor | None = None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    masks: dict[str, Any] = field(default_factory=dict)


class DecoderOnlyBackend(ExitBackend):
    family = "decoder-only"
    first_token_from_prompt = True
    padding_side = "left"

    def __init__(self, model: torch.nn.Module):
        if not self.supports(model):
            names = ", ".join(cls.__name__ for cls in SUPPORTED_CAUSAL_LMS)
            raise TypeError(f"the decoder-only backend supports {names}; got {type(model).__name__}")
        self.model = model
        self.base = model.model
        self.config = model.config
        self.layers = self.base.layers[: self.config.num_hidden_layers]
        self.num_layers = len(self.layers)
        self.hidden_size = int(self.config.hidden_size)
        self.vocab_size = int(model.lm_head.out_features)
        attention = self.layers[0].self_attn
        self.head_dim = int(attention.head_dim)
        self.query_dim = int(self.config.num_attention_heads * self.head_dim)
        self.key_value_dim = int(self.config.num_key_value_heads * self.head_dim)
        self.layer_types = list(
            getattr(self.config, "layer_types", None)
            or ["sliding_attention" if getattr(self.config, "sliding_window", None) is not None else "full_attention"]
            * self.num_layers
        )
        # run_layer(rows=...) composes these classes' forward from their sub-modules (tests check it against
        # the library's forward); a subclass with another forward always runs whole layers
        self._split_layers = all(type(layer).__name__ in _PRE_NORM_LAYERS for layer in self.layers)
        # the family's own rotary helper, from the module that defines its attention class
        self.apply_rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb

    @classmethod
    def supports(cls, model: torch.nn.Module) -> bool:
        return isinstance(model, SUPPORTED_CAUSAL_LMS)

    def check_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        mask = attention_mask.to(torch.long)
        if bool((mask[:, 1:] < mask[:, :-1]).any()) or bool((mask[:, -1] == 0).any()):
            raise ValueError(
                "decoder-only prompts must be left-padded: every attention_mask row must be 0...0 1...1"
            )

    # ---- decoding ---------------------------------------------------------------------------------
    def start(self, prompt: PromptBatch) -> DecoderOnlyState:
        mask = prompt.attention_mask
        # the positions generate() derives from the padding mask
        position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = slotted_cache(self.config)
        output = self.base(
            input_ids=prompt.input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        prompt_logits = self.model.lm_head(output.last_hidden_state[:, -1, :])  # base output is already normed
        return DecoderOnlyState(cache, mask, position_ids[:, -1].clone(), prompt_logits)

    def prompt_logits(self, state: DecoderOnlyState) -> torch.Tensor:
        if state.prompt_logits is None:
            raise RuntimeError("the prompt logits are dropped at the first decoding step: read them before it")
        return state.prompt_logits

    def first_inputs(self, state: DecoderOnlyState) -> torch.Tensor:
        return state.prompt_logits.argmax(dim=-1)

    def begin_step(self, state: DecoderOnlyState, tokens: torch.Tensor) -> torch.Tensor:
        state.prompt_logits = None  # read for the first token only; not carried through row selections
        hidden = self.base.embed_tokens(tokens[:, None])
        ones = torch.ones_like(state.attention_mask[:, :1])
        state.attention_mask = torch.cat([state.attention_mask, ones], dim=-1)
        state.position_ids = (state.positions + 1)[:, None]
        state.position_embeddings = self.base.rotary_emb(hidden, state.position_ids)
        mask_arguments = dict(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=state.attention_mask,
            cache=state.cache,
            position_ids=state.position_ids,
        )
        state.masks = {"full_attention": create_causal_mask(**mask_arguments)}
        if "sliding_attention" in self.layer_types:
            state.masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_arguments)
        return hidden

    def run_layer(
        self, state: DecoderOnlyState, index: int, hidden: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        layer = self.layers[index]
        arguments = dict(
            attention_mask=state.masks[self.layer_types[index]],
            position_embeddings=state.position_embeddings,
            position_ids=state.position_ids,
            cache=state.cache,
            use_cache=True,
        )
        if rows is None or not self._split_layers:
            return layer(hidden, **arguments)
        # The layer's own sub-modules in its order (pre-norm attention, then pre-norm MLP, each with its
        # residual). Attention runs on every row: an exited row (propagating its copied state) needs this
        # position's K/V in the cache, which its attention call appends; its output is discarded. (Running
        # attention on the needed rows only would gather their caches out of the batch: no faster on the
        # CPU, docs/decoder.md, and more code.)
        # The MLP, the bulk of the layer's arithmetic, runs only on the rows whose output is needed.
        attended, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden), **arguments)
        output = hidden + attended
        running = output[rows]
        return hidden.index_copy(0, rows, running + layer.mlp(layer.post_attention_layernorm(running)))

    def _kv_projections(
        self, index: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s self-attention K (rotated by cos/sin) and V of hidden (B, 1, d): (B, kv_heads, 1, hd)."""
        layer = self.layers[index]
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden)
        shape = (hidden.shape[0], hidden.shape[1], -1, self.head_dim)
        keys = attention.k_proj(normed).view(shape).transpose(1, 2)
        values = attention.v_proj(normed).view(shape).transpose(1, 2)
        _, keys = self.apply_rotary(keys, keys, cos, sin)  # K rotated at the token's own position
        return keys, values

    def propagate_kv(self, state: DecoderOnlyState, index: int, hidden: torch.Tensor) -> None:
        keys, values = self._kv_projections(index, hidden, *state.position_embeddings)
        state.cache.update(keys, values, index)

    def overwrite_last_kv(self, state: DecoderOnlyState, index: int, rows: torch.Tensor, hidden: torch.Tensor) -> None:
        # state.positions holds each row's position of the token fed in the step that just ended
        cos, sin = self.base.rotary_emb(hidden, state.positions[rows][:, None])
        keys, values = self._kv_projections(index, hidden, cos, sin)
        layer = state.cache.layers[index]
        layer.keys[rows, :, -1:] = keys.to(layer.keys.dtype)
        layer.values[rows, :, -1:] = values.to(layer.values.dtype)

    def end_step(self, state: DecoderOnlyState) -> None:
        state.positions = state.positions + 1

    def head(
        self, hidden: torch.Tensor, ids: torch.Tensor | None = None, weights: HeadWeights | None = None
    ) -> torch.Tensor:
        return self.head_logits(self.head_input(hidden), ids, weights)

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.base.norm(hidden)

    def select_rows(self, state: DecoderOnlyState, keep: torch.Tensor) -> None:
        # the per-step fields (masks, position ids and embeddings) are rebuilt from these by begin_step
        select_cache_rows(state.cache, keep)
        state.attention_mask = state.attention_mask[keep]
        state.positions = state.positions[keep]
        if state.prompt_logits is not None:
            state.prompt_logits = state.prompt_logits[keep]

    # ---- cost model -------------------------------------------------------------------------------
    def layer_flops(self, context: int, source_length: int = 0) -> float:
        d = self.hidden_size
        projections = 2.0 * d * (2 * self.query_dim + 2 * self.key_value_dim)  # q, o and k, v
        attention = 4.0 * self.query_dim * context
        mlp = 2.0 * 3 * d * self.config.intermediate_size
        return projections + attention + mlp

    def kv_flops(self) -> float:
        return 2.0 * 2 * self.hidden_size * self.key_value_dim

    def prefill_flops(self, prompt_length: int) -> float:
        # the prompt positions before the last one (the last one is the first generated token's pass)
        return float(sum(self.num_layers * self.layer_flops(position + 1) for position in range(prompt_length - 1)))

    def describe(self) -> dict[str, Any]:
        facts = super().describe()
        facts["first_token"] = "full model (prompt prefill)"
        return facts
