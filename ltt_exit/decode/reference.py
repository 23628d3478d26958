"""Slow, obviously-correct reference for the early-exit decoder (tests only; O(T²) per token).

For every new token it recomputes the whole decoder from scratch, with no cache, through the
library's own layer modules, one row at a time and without padding. State propagation is spelled out
literally: the state of a position after layer i is the layer's output if the position's token had
not exited below i, and otherwise the copied hidden state of its exit layer; the layers above an exit
therefore compute this position's K/V (inside their full-sequence attention) from the copied state.
The exit decision glue (pruning -> scorer -> ``confidence >= λ_t``) is written out again here rather
than shared with the fast path; only the backend's exit head, the scorer and the pruning objects
(tested on their own), the threshold schedule and the decoder's exit adapters (``apply(layer, h)``
before the head below the last layer) are shared.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .prompts import eos_ids
from .pruning import select_pruned
from .scorers import ExitView

__all__ = ["ReferenceResult", "reference_generate"]


@dataclass
class ReferenceResult:
    token_ids: list[int]
    exit_layers: list[int]
    confidences: list[float]


def _decide(decoder, layer: int, states: list[torch.Tensor], threshold: torch.Tensor, set_ids):
    """Exit decision for one row at ``layer``; states[a] is the row's (1, d) state after layer a.

    Returns (exited, token, confidence, vocabulary set)."""
    backend = decoder.backend

    def adapted(a):
        hidden = states[a]
        adapters = getattr(decoder, "exit_adapters", None)
        if adapters is not None and a < decoder.num_layers:  # exit adapters map h_a before the exit head
            hidden = adapters.apply(a, hidden)
        return hidden

    def head_at(a, ids):
        return backend.head(adapted(a), ids)

    pruned = select_pruned(
        decoder.pruning,
        layer,
        min_exit_layer=decoder.min_exit_layer,
        num_layers=decoder.num_layers,
        prev_ids=set_ids,
        head=lambda ids: head_at(layer, ids),
        head_input=lambda: backend.head_input(adapted(layer)),
    )
    view = ExitView(
        layer=layer,
        logits=pruned.logits,
        hidden=states[layer],
        hidden_prev=states[layer - 1],
        logits_at=lambda a: head_at(a, pruned.ids),
    )
    confidence = decoder.scorer.score(view)[0]
    position = int(pruned.logits[0].argmax())
    token = position if pruned.ids is None else int(pruned.ids[0, position])
    return bool(confidence >= threshold), token, float(confidence), pruned.ids


def _run_position(decoder, layer_fn, embeddings: torch.Tensor, exits_before: list[int], threshold: torch.Tensor):
    """Run all layers over a full sequence whose last position is being decided.

    embeddings: (1, T, d); exits_before: exit layer of positions 0..T-2; layer_fn(i, states (1, T, d)) runs
    library layer i over the whole sequence. Returns (token, exit layer, confidence) of the last position.
    """
    num_layers, min_exit = decoder.num_layers, decoder.min_exit_layer
    states = embeddings
    last_states = [states[:, -1]]
    exit_layer, token, confidence, set_ids = None, None, math.nan, None
    for index in range(num_layers):
        layer = index + 1
        output = layer_fn(index, states)
        exits = exits_before + [exit_layer if exit_layer is not None else num_layers]
        # positions whose token exited below this layer keep the copied state of their exit layer
        frozen = torch.tensor([e < layer for e in exits], device=states.device)
        states = torch.where(frozen[None, :, None], states, output)
        last_states.append(states[:, -1])
        if exit_layer is None and min_exit <= layer < num_layers:
            exited, candidate, conf, set_ids = _decide(decoder, layer, last_states, threshold, set_ids)
            if exited:
                exit_layer, token, confidence = layer, candidate, conf
    if exit_layer is None:
        exit_layer = num_layers
        token = int(decoder.backend.head(last_states[num_layers], None)[0].argmax())
    return token, exit_layer, confidence


@torch.inference_mode()
def reference_generate(decoder, prompt_ids: list[int], threshold: float, max_new_tokens: int, eos_token_id=None):
    """Decode one unpadded prompt with ``decoder``'s settings, the slow way."""
    backend = decoder.backend
    eos = eos_ids(backend, eos_token_id)
    device = backend.device
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    tokens, exit_layers, confidences = [], [], []

    def threshold_at(t):
        return decoder.schedule.at([threshold], t, max_new_tokens, device=device, dtype=decoder.compute_dtype)[0]

    if backend.family == "t5":
        model = backend.model
        stack = model.decoder
        encoder_hidden = model.encoder(input_ids=prompt).last_hidden_state
        decoder_inputs = [backend.decoder_start_token_id()]
        position_exits: list[int] = []
        for t in range(max_new_tokens):
            embeddings = stack.embed_tokens(torch.tensor([decoder_inputs], device=device))
            mask = create_causal_mask(config=stack.config, inputs_embeds=embeddings, attention_mask=None, cache=None)
            biases = {}

            def layer_fn(index, states):
                output, self_bias, cross_bias = stack.block[index](
                    states, mask, biases.get("self"), encoder_hidden, None, biases.get("cross")
                )
                if index == 0:
                    biases["self"], biases["cross"] = self_bias, cross_bias
                return output

            token, layer, conf = _run_position(decoder, layer_fn, embeddings, position_exits, threshold_at(t))
            tokens.append(token)
            exit_layers.append(layer)
            confidences.append(conf)
            position_exits.append(layer)
            decoder_inputs.append(token)
            if token in eos:
                break
    else:
        base = backend.base
        first = int(backend.model(input_ids=prompt).logits[0, -1].argmax())
        tokens, exit_layers, confidences = [first], [decoder.num_layers], [math.nan]
        sequence = list(prompt_ids) + [first]
        # prompt positions (the last one predicted token 0) went through every layer
        position_exits = [decoder.num_layers] * len(prompt_ids)
        for t in range(1, max_new_tokens):
            if tokens[-1] in eos:
                break
            ids = torch.tensor([sequence], device=device)
            embeddings = base.embed_tokens(ids)
            position_ids = torch.arange(ids.shape[1], device=device)[None]
            rotary = base.rotary_emb(embeddings, position_ids)
            mask_arguments = dict(
                config=backend.config,
                inputs_embeds=embeddings,
                attention_mask=None,
                cache=None,
                position_ids=position_ids,
            )
            masks = {"full_attention": create_causal_mask(**mask_arguments)}
            if "sliding_attention" in backend.layer_types:
                masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_arguments)

            def layer_fn(index, states):
                return backend.layers[index](
                    states,
                    attention_mask=masks[backend.layer_types[index]],
                    position_embeddings=rotary,
                    position_ids=position_ids,
                )

            token, layer, conf = _run_position(decoder, layer_fn, embeddings, position_exits, threshold_at(t))
            tokens.append(token)
            exit_layers.append(layer)
            confidences.append(conf)
            position_exits.append(layer)
            sequence.append(token)
    return ReferenceResult(tokens, exit_layers, confidences)
