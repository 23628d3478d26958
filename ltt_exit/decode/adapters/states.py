"""State collection: the hidden states a fit reads, gathered by running the model's own greedy decoding.

:func:`collect_states` returns one :class:`StateBatch` per prompt (h_ℓ at every generated position, the
pre-norm final state, the greedy tokens, the teacher's top ids); :func:`head_logits` is the exit head
on such states (the final norm and LM head of the model, as the decoder's backends apply them).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["StateBatch", "collect_states", "head_logits", "final_norm"]


@dataclass
class StateBatch:
    """The states of the generated positions of one prompt.

    hidden: {layer ℓ: (T, d)} the residual stream after layer ℓ at the T positions that predict the
            T greedy tokens; final: (T, d) the *pre-norm* state after the last layer there (the exit
            head of layer L reads ``head(final)``); tokens: the T greedy tokens; teacher_top: (T, k) the
            ids of the k most probable tokens of the full model's distribution at each position.
    """

    hidden: dict[int, torch.Tensor]
    final: torch.Tensor
    tokens: list[int]
    teacher_top: torch.Tensor


class _PreNormCapture:
    """Forward pre-hook on the final norm: its input is the pre-norm state after the last layer.

    (In transformers 5 the last entry of ``hidden_states`` is already normed, for Llama and for T5.)"""

    def __init__(self, norm: torch.nn.Module):
        self.value: torch.Tensor | None = None
        self.handle = norm.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.value = args[0]

    def close(self):
        self.handle.remove()


def final_norm(backend) -> torch.nn.Module:
    return backend.model.decoder.final_layer_norm if backend.family == "t5" else backend.base.norm


def head_logits(backend, hidden: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """The exit head on hidden (N, d): (N, V) logits, or (N, K) for vocabulary rows ``ids`` (K,) shared by
    all rows (unlike ``backend.head``, whose ids are per row, this never materialises (N, K, d))."""
    if ids is None:
        return backend.head(hidden)
    if backend.family == "t5":
        normed = backend.decoder.dropout(backend.decoder.final_layer_norm(hidden))
        if backend.rescale_head_input:
            normed = normed * (backend.hidden_size**-0.5)
    else:
        normed = backend.base.norm(hidden)
    lm_head = backend.model.lm_head
    bias = None if lm_head.bias is None else lm_head.bias[ids]
    return torch.nn.functional.linear(normed, lm_head.weight[ids], bias)


@torch.inference_mode()
def collect_states(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    layers: Sequence[int] | None = None,
    teacher_top_k: int = 64,
    eos_token_id: int | Sequence[int] | None = None,
    batch_size: int = 1,
) -> Iterator[StateBatch]:
    """Greedy decoding of each prompt with the full model (the library's own forward, with its cache),
    recording at every generated position the states after the chosen layers, the pre-norm final state
    and the full model's top-``teacher_top_k`` ids. Yields one :class:`StateBatch` per prompt, in order;
    nothing is kept between batches.

    The tokens are the full model's greedy output Y_full (plain arg-max, as the early-exit decoder at
    λ = 1); prompts are tokenized as the decoder tokenizes them (``add_special_tokens=True``); EOS ids
    default to the model's generation config.

    batch_size: prompts decoded together (padded as the decoder pads them: left for decoder-only models,
    the encoder's mask for T5). One forward serves the whole batch at every step, which on a GPU is most
    of the collection time; states agree with one-prompt batches to rounding (padding changes the order
    of some sums), and a row stops being recorded at its EOS.
    """
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    from ..backends import backend_for
    from ..prompts import pad_token_rows

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    backend = backend_for(model)
    model.eval()
    num_layers = backend.num_layers
    layers = list(range(1, num_layers)) if layers is None else [int(x) for x in layers]
    if any(not 1 <= x < num_layers for x in layers):
        raise ValueError(f"layers must lie in [1, {num_layers - 1}], got {layers}")
    if eos_token_id is None:
        eos = set(backend.default_eos_token_ids())
    else:
        eos = {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id}
    top_k = min(int(teacher_top_k), backend.vocab_size)
    device = backend.device
    capture = _PreNormCapture(final_norm(backend))
    try:
        for first in range(0, len(prompts), batch_size):
            rows = [list(tokenizer(str(prompt), add_special_tokens=True)["input_ids"])
                    for prompt in prompts[first:first + batch_size]]
            ids, mask = pad_token_rows(rows, tokenizer, backend)
            ids, mask, batch = ids.to(device), mask.to(device), len(rows)
            if backend.family == "t5":
                config = model.decoder.config
                cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
                encoder_outputs = model.encoder(input_ids=ids, attention_mask=mask)

                def step(token_ids):
                    result = model(encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=token_ids,
                                   cache=cache, use_cache=True, output_hidden_states=True)
                    return result.decoder_hidden_states, result.logits

                inputs = torch.full((batch, 1), backend.decoder_start_token_id(), device=device)
            else:
                cache = DynamicCache(config=model.config)
                seen = mask
                positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate() derives them

                def step(token_ids):
                    nonlocal seen, positions
                    if token_ids.shape[1] == 1:  # a generated token: one more position for every row
                        seen = torch.cat([seen, torch.ones_like(seen[:, :1])], dim=-1)
                        positions = positions[:, -1:] + 1
                    result = model(input_ids=token_ids, attention_mask=seen, position_ids=positions, cache=cache,
                                   use_cache=True, output_hidden_states=True, logits_to_keep=1)
                    return result.hidden_states, result.logits

                inputs = ids
            hidden = [{layer: [] for layer in layers} for _ in range(batch)]
            finals, tops, tokens = ([[] for _ in range(batch)] for _ in range(3))
            live = [True] * batch
            for t in range(max_new_tokens):
                states, logits = step(inputs)
                scores = logits[:, -1].float()
                best = scores.argmax(dim=-1)
                top = scores.topk(top_k, dim=-1).indices
                for i in (i for i in range(batch) if live[i]):
                    for layer in layers:
                        hidden[i][layer].append(states[layer][i, -1].float())
                    finals[i].append(capture.value[i, -1].float())
                    tops[i].append(top[i])
                    token = int(best[i])
                    tokens[i].append(token)
                    live[i] = token not in eos
                if not any(live):
                    break
                inputs = best[:, None]  # finished rows keep decoding; nothing of theirs is recorded
            for i in range(batch):
                yield StateBatch(
                    hidden={layer: torch.stack(values) for layer, values in hidden[i].items()},
                    final=torch.stack(finals[i]),
                    tokens=tokens[i],
                    teacher_top=torch.stack(tops[i]),
                )
    finally:
        capture.close()
