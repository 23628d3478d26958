"""Early-exit backend for Hugging Face ``T5ForConditionalGeneration``.

Wraps the library's own modules: the encoder stack (run once), the decoder's ``T5Block`` layers,
its ``final_layer_norm`` and ``lm_head``, and the ``EncoderDecoderCache`` of two ``DynamicCache``
objects (with slotted layers, ``slotted_cache``). Nothing is copied from modeling_t5.py and nothing is written into the model config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import T5ForConditionalGeneration
from transformers.cache_utils import EncoderDecoderCache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from .base import ExitBackend, HeadWeights, PromptBatch
from .slotted_cache import select_cache_rows, slotted_cache

__all__ = ["T5Backend"]


@dataclass
class T5State:
    """encoder_hidden: (B, S, d); encoder_mask: the library's 4-D cross-attention mask or None;
    cache: self- and cross-attention caches; the remaining fields are per-step."""

    encoder_hidden: torch.Tensor
    encoder_mask: Any
    cache: EncoderDecoderCache
    batch_size: int
    self_mask: Any = None
    self_bias: torch.Tensor | None = None
    cross_bias: torch.Tensor | None = None


class T5Backend(ExitBackend):
    family = "t5"
    first_token_from_prompt = False
    padding_side = "right"

    def __init__(self, model: torch.nn.Module):
        if not self.supports(model):
            raise TypeError(
                f"the T5 backend needs a transformers T5ForConditionalGeneration, got {type(model).__name__}"
            )
        self.model = model
        self.decoder = model.decoder
        self.decoder_config = model.decoder.config
        self.num_layers = len(self.decoder.block)
        self.hidden_size = int(model.config.d_model)
        self.vocab_size = int(model.lm_head.out_features)
        # transformers 5 names the rescale flag; 4.x used tie_word_embeddings for the same decision
        self.rescale_head_input = bool(
            getattr(model.config, "scale_decoder_outputs", getattr(model.config, "tie_word_embeddings", True))
        )
        self.inner_dim = int(model.config.num_heads * model.config.d_kv)
        self.key_value_dim = int(model.config.d_kv)

    @classmethod
    def supports(cls, model: torch.nn.Module) -> bool:
        return isinstance(model, T5ForConditionalGeneration)

    def pad_token_id(self) -> int:
        pad = self.model.config.pad_token_id
        return int(pad) if pad is not None else 0

    def decoder_start_token_id(self) -> int:
        start = getattr(self.model.generation_config, "decoder_start_token_id", None)
        if start is None:
            start = self.model.config.decoder_start_token_id
        if start is None:
            start = self.model.config.pad_token_id
        if start is None:
            raise ValueError("the T5 model defines neither decoder_start_token_id nor pad_token_id")
        return int(start)

    # ---- decoding ---------------------------------------------------------------------------------
    def start(self, prompt: PromptBatch) -> T5State:
        encoder_hidden = self.model.encoder(
            input_ids=prompt.input_ids, attention_mask=prompt.attention_mask
        ).last_hidden_state
        batch, source_length, _ = encoder_hidden.shape
        # slotted layers: appends in place, row selections copy only the rows that move
        cache = EncoderDecoderCache(slotted_cache(self.decoder_config), slotted_cache(self.decoder_config))
        # Cross-attention K/V of every layer from the first step on: a token exiting at ℓ must not leave a
        # higher layer without them. Computed with each layer's own projections, stored in the library cache.
        for index, block in enumerate(self.decoder.block):
            attention = block.layer[1].EncDecAttention
            shape = (batch, source_length, -1, self.key_value_dim)
            keys = attention.k(encoder_hidden).view(shape).transpose(1, 2)
            values = attention.v(encoder_hidden).view(shape).transpose(1, 2)
            cache.cross_attention_cache.update(keys, values, index)
            cache.is_updated[index] = True
        probe = encoder_hidden[:, :1, :]  # only batch, dtype and device are read
        encoder_mask = create_bidirectional_mask(
            config=self.decoder_config,
            inputs_embeds=probe,
            attention_mask=prompt.attention_mask,
            encoder_hidden_states=encoder_hidden,
        )
        return T5State(encoder_hidden, encoder_mask, cache, batch)

    def first_inputs(self, state: T5State) -> torch.Tensor:
        return torch.full(
            (state.batch_size,), self.decoder_start_token_id(), dtype=torch.long, device=state.encoder_hidden.device
        )

    def begin_step(self, state: T5State, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.decoder.dropout(self.decoder.embed_tokens(tokens[:, None]))
        state.self_mask = create_causal_mask(
            config=self.decoder_config,
            inputs_embeds=hidden,
            attention_mask=None,
            cache=state.cache.self_attention_cache,
        )
        state.self_bias = None
        state.cross_bias = None
        return hidden

    def run_layer(
        self, state: T5State, index: int, hidden: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        if index > 0 and state.self_bias is None:
            raise RuntimeError("T5 layer 0 must run before the others in every step (it owns the position bias)")
        block = self.decoder.block[index]
        if rows is None or hidden.dtype == torch.float16:
            # (float16: T5Block clamps by a batch-wide inf check, so frozen rows must stay in its batch)
            output, self_bias, cross_bias = block(
                hidden,
                state.self_mask,
                state.self_bias,
                state.encoder_hidden,
                state.encoder_mask,
                state.cross_bias,
                cache=state.cache,
            )
        else:
            # T5Block's own sub-layers in its order; the feed-forward block only for the rows that need it
            output, self_bias, _ = block.layer[0](
                hidden, attention_mask=state.self_mask, position_bias=state.self_bias, cache=state.cache
            )
            output, cross_bias, _ = block.layer[1](
                output,
                key_value_states=state.encoder_hidden,
                attention_mask=state.encoder_mask,
                position_bias=state.cross_bias,
                cache=state.cache,
            )
            output = output.index_copy(0, rows, block.layer[-1](output[rows]))
        if index == 0:  # the stack shares layer 0's relative position biases with every later layer
            state.self_bias, state.cross_bias = self_bias, cross_bias
        return output

    def _self_attention_kv(self, index: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s self-attention K and V of hidden (B, 1, d): (B, heads, 1, d_kv) each."""
        self_attention_layer = self.decoder.block[index].layer[0]
        attention = self_attention_layer.SelfAttention
        normed = self_attention_layer.layer_norm(hidden)
        shape = (hidden.shape[0], hidden.shape[1], -1, self.key_value_dim)
        keys = attention.k(normed).view(shape).transpose(1, 2)
        values = attention.v(normed).view(shape).transpose(1, 2)
        return keys, values

    def propagate_kv(self, state: T5State, index: int, hidden: torch.Tensor) -> None:
        keys, values = self._self_attention_kv(index, hidden)
        state.cache.self_attention_cache.update(keys, values, index)

    def overwrite_last_kv(self, state: T5State, index: int, rows: torch.Tensor, hidden: torch.Tensor) -> None:
        keys, values = self._self_attention_kv(index, hidden)
        layer = state.cache.self_attention_cache.layers[index]
        layer.keys[rows, :, -1:] = keys.to(layer.keys.dtype)
        layer.values[rows, :, -1:] = values.to(layer.values.dtype)

    def head(
        self, hidden: torch.Tensor, ids: torch.Tensor | None = None, weights: HeadWeights | None = None
    ) -> torch.Tensor:
        return self.head_logits(self.head_input(hidden), ids, weights)

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        normed = self.decoder.dropout(self.decoder.final_layer_norm(hidden))
        if self.rescale_head_input:
            normed = normed * (self.hidden_size**-0.5)
        return normed

    def select_rows(self, state: T5State, keep: torch.Tensor) -> None:
        # self- and cross-attention caches; the self-attention mask and position biases are rebuilt every step
        select_cache_rows(state.cache, keep)
        state.encoder_hidden = state.encoder_hidden[keep]
        if isinstance(state.encoder_mask, torch.Tensor):
            state.encoder_mask = state.encoder_mask[keep]
        state.batch_size = int(keep.numel())

    # ---- cost model -------------------------------------------------------------------------------
    def _ffn_flops(self) -> float:
        matrices = 3 if self.model.config.is_gated_act else 2
        return 2.0 * matrices * self.hidden_size * self.model.config.d_ff

    def layer_flops(self, context: int, source_length: int) -> float:
        d, inner = self.hidden_size, self.inner_dim
        self_attention = 2.0 * 4 * d * inner + 4.0 * inner * context
        cross_attention = 2.0 * 2 * d * inner + 4.0 * inner * source_length  # K/V of the source: prefill
        return self_attention + cross_attention + self._ffn_flops()

    def kv_flops(self) -> float:
        return 2.0 * 2 * self.hidden_size * self.inner_dim

    def prefill_flops(self, prompt_length: int) -> float:
        d, inner, s = self.hidden_size, self.inner_dim, prompt_length
        encoder_layer = 2.0 * 4 * d * inner + 4.0 * inner * s + self._ffn_flops()
        encoder = len(self.model.encoder.block) * s * encoder_layer
        cross_kv = self.num_layers * s * 2.0 * 2 * d * inner
        return encoder + cross_kv

    def describe(self) -> dict[str, Any]:
        facts = super().describe()
        facts["rescale_head_input"] = self.rescale_head_input
        facts["decoder_start_token_id"] = self.decoder_start_token_id()
        return facts

