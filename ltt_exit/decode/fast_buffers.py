"""Static buffers of the CUDA fast path (``fast.FastEarlyExitDecoder``): what a decoding step reads and writes.

* :class:`Session`: every tensor of one batch shape, allocated once — the self-attention K/V as the
  library's ``StaticLayer`` objects over one stacked (L, B, H, M, d_head) buffer, T5's cross-attention
  K/V, attention masks, rotary positions, the per-row exit state, the per-step history and the pinned
  host copies of the device flags — plus the CUDA graphs captured on them.
* :class:`StackedKV`: the K/V projections of every layer stacked for one batched product (the K/V tail
  once every row exited).
* :class:`StepContext`: the Python objects one step's pieces share (the exit-head memo of eager
  decisions, the vocabulary set handed from one consulted layer to the next).

Nothing here decides an exit; the rule is :mod:`.exit_rule`.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from transformers.cache_utils import Cache, EncoderDecoderCache, StaticLayer

from .backends import ExitBackend, T5Backend
from .backends.decoder_only import DecoderOnlyState
from .backends.t5 import T5State
from .exit_rule import StepHeads

__all__ = ["Session", "StackedKV", "StepContext"]


class StackedKV:
    """The self-attention K/V projections of every decoder layer, stacked for one batched product.

    For a state h (B, 1, d) copied up from an exit layer, the K/V of layers start..L-1 are
    proj_ℓ(norm_ℓ(h)): the norm's weight-free part is shared by all layers, the weight and the K/V
    matrices are per layer. Same arithmetic as each layer's own modules (tested against them).
    """

    def __init__(self, backend):
        if isinstance(backend, T5Backend):
            blocks = [block.layer[0] for block in backend.decoder.block]
            norms = [b.layer_norm for b in blocks]
            projections = [(b.SelfAttention.k, b.SelfAttention.v) for b in blocks]
            self.head_dim = backend.key_value_dim
            self.rotary = None
            self.t5_norm = True
        else:
            norms = [layer.input_layernorm for layer in backend.layers]
            projections = [(layer.self_attn.k_proj, layer.self_attn.v_proj) for layer in backend.layers]
            self.head_dim = backend.head_dim
            self.rotary = backend.apply_rotary
            self.t5_norm = False
        epsilons = {float(getattr(n, "variance_epsilon", getattr(n, "eps", float("nan")))) for n in norms}
        if len(epsilons) != 1 or math.isnan(next(iter(epsilons))):
            raise TypeError("the fast path needs RMS norms with one shared epsilon before every self-attention")
        self.eps = epsilons.pop()
        self.norm_weight = torch.stack([n.weight.detach() for n in norms])  # (L, d)
        self.kv_dim = projections[0][0].out_features
        self.weight_t = torch.stack(
            [torch.cat([k.weight.detach(), v.weight.detach()]).t() for k, v in projections]
        ).contiguous()  # (L, d, 2 kv)
        biases = [(k.bias, v.bias) for k, v in projections]
        self.bias = None
        if biases[0][0] is not None:
            self.bias = torch.stack([torch.cat([kb.detach(), vb.detach()]) for kb, vb in biases])  # (L, 2 kv)

    def project(self, hidden: torch.Tensor, start: int, cos=None, sin=None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (B, 1, d) -> keys, values (L - start, B, H_kv, 1, d_head) of layers start..L-1."""
        variance = hidden.to(torch.float32).pow(2).mean(-1, keepdim=True)
        if self.t5_norm:  # T5LayerNorm: scale in float32, cast only for half-precision weights
            scaled = hidden * torch.rsqrt(variance + self.eps)
            if self.norm_weight.dtype in (torch.float16, torch.bfloat16):
                scaled = scaled.to(self.norm_weight.dtype)
        else:  # Llama-family RMSNorm: scale in float32, cast back to the input dtype
            scaled = (hidden.to(torch.float32) * torch.rsqrt(variance + self.eps)).to(hidden.dtype)
        weight = self.norm_weight[start:]  # (n, d)
        normed = weight[:, None, :] * scaled[:, 0][None]  # (n, B, d)
        projected = torch.bmm(normed.to(self.weight_t.dtype), self.weight_t[start:])  # (n, B, 2 kv)
        if self.bias is not None:
            projected = projected + self.bias[start:, None, :]
        n, batch = projected.shape[:2]
        keys = projected[..., : self.kv_dim].reshape(n, batch, -1, 1, self.head_dim)
        values = projected[..., self.kv_dim :].reshape(n, batch, -1, 1, self.head_dim)
        if self.rotary is not None:
            _, keys = self.rotary(keys, keys, cos, sin)  # K rotated at the token's own position
        return keys, values


class Session:
    """Static buffers and captured graphs for one batch shape (batch size, cache length, source length)."""

    def __init__(self, backend: ExitBackend, num_layers: int, compute_dtype: torch.dtype, batch: int, cache_len: int,
                 source_len: int, eos_slots: int, forced: bool):
        device, dtype, cdtype = backend.device, backend.dtype, compute_dtype
        self.batch, self.cache_len, self.source_len, self.forced = batch, cache_len, source_len, forced
        self.device = device
        self.cuda = device.type == "cuda"
        L, d = num_layers, backend.hidden_size
        long = dict(dtype=torch.long, device=device)
        # row state of the current step
        self.tokens_in = torch.zeros(batch, **long)
        self.tokens = torch.zeros(batch, **long)
        self.exit_layers = torch.zeros(batch, **long)
        self.confidences = torch.zeros(batch, dtype=cdtype, device=device)
        self.head_rows = torch.zeros(batch, **long)
        self.undecided = torch.zeros(batch, dtype=torch.bool, device=device)
        self.may_exit = torch.zeros(batch, dtype=torch.bool, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.flag = torch.zeros((), dtype=torch.bool, device=device)
        self.thresholds = torch.zeros(batch, dtype=cdtype, device=device)
        self.forced_now = torch.zeros(batch, **long)
        # per-step tables and history (indexed by the generated-token index t)
        self.step = torch.zeros((), **long)
        self.budget = torch.zeros((), **long)
        self.threshold_table = torch.zeros(cache_len + 1, batch, dtype=cdtype, device=device)
        self.forced_table = torch.zeros(cache_len + 1, batch, **long)
        self.eos = torch.full((eos_slots,), -1, **long)
        self.hist_tokens = torch.zeros(cache_len + 1, batch, **long)
        self.hist_exits = torch.zeros(cache_len + 1, batch, **long)
        self.hist_conf = torch.zeros(cache_len + 1, batch, dtype=cdtype, device=device)
        self.hist_rows = torch.zeros(cache_len + 1, batch, **long)
        self.layer_values = [torch.tensor(layer, **long) for layer in range(L + 1)]
        # hidden state after each layer (h_0 = embedding); rows that exited keep their copied state
        self.hs = [torch.zeros(batch, 1, d, dtype=dtype, device=device) for _ in range(L + 1)]
        # host copies of the device flags, read behind events
        pin = self.cuda
        self.host_flags = torch.zeros(L + 1, dtype=torch.bool, pin_memory=pin)
        self.host_done = torch.zeros(2, batch, dtype=torch.bool, pin_memory=pin)
        self.flag_events = [torch.cuda.Event() for _ in range(L + 1)] if self.cuda else None
        self.done_events = [torch.cuda.Event() for _ in range(2)] if self.cuda else None
        # self-attention cache: the library's StaticLayer objects over one stacked buffer
        self.slot = torch.zeros((), **long)
        self.slot_range = torch.arange(cache_len, **long)
        if isinstance(backend, T5Backend):
            heads, head_dim = backend.model.config.num_heads, backend.key_value_dim
        else:
            heads, head_dim = backend.config.num_key_value_heads, backend.head_dim
        shape = (L, batch, heads, cache_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(L, **long)
        self.self_cache = Cache(layers=[self._static_layer(i, self.keys, self.values, self.lengths, cache_len)
                                        for i in range(L)])
        self.mask = torch.zeros(batch, 1, 1, cache_len, dtype=torch.bool, device=device)
        if isinstance(backend, T5Backend):
            self.family = "t5"
            kv_heads = backend.model.config.num_heads
            cross_shape = (L, batch, kv_heads, source_len, head_dim)
            self.cross_keys = torch.zeros(cross_shape, dtype=dtype, device=device)
            self.cross_values = torch.zeros(cross_shape, dtype=dtype, device=device)
            self.cross_lengths = torch.full((L,), source_len, **long)
            cross = Cache(layers=[self._static_layer(i, self.cross_keys, self.cross_values, self.cross_lengths,
                                                     source_len) for i in range(L)])
            cache = EncoderDecoderCache(self.self_cache, cross)
            for i in range(L):
                cache.is_updated[i] = True  # cross-attention K/V are loaded once per call
            self.encoder_mask = torch.zeros(batch, 1, 1, source_len, dtype=torch.bool, device=device)
            self.encoder_hidden = torch.zeros(batch, source_len, d, dtype=dtype, device=device)  # only its shape is read
            self.state = T5State(self.encoder_hidden, self.encoder_mask, cache, batch, self_mask=self.mask)
            self.self_bias = None  # static copies of layer 0's position biases (allocated on first use)
            self.cross_bias = None
        else:
            self.family = "decoder-only"
            self.positions = torch.zeros(batch, **long)
            self.position_ids = torch.zeros(batch, 1, **long)
            rotary_dim = backend.head_dim
            self.cos = torch.zeros(batch, 1, rotary_dim, dtype=dtype, device=device)
            self.sin = torch.zeros(batch, 1, rotary_dim, dtype=dtype, device=device)
            masks = {"full_attention": self.mask}
            self.window = None
            if "sliding_attention" in backend.layer_types:
                self.window = int(backend.config.sliding_window)
                self.sliding_mask = torch.zeros_like(self.mask)
                masks["sliding_attention"] = self.sliding_mask
            self.state = DecoderOnlyState(self.self_cache, None, self.positions, None, position_ids=self.position_ids,
                                          position_embeddings=(self.cos, self.sin), masks=masks)
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.capture_ctx = None

    @staticmethod
    def _static_layer(index, keys, values, lengths, cache_len) -> StaticLayer:
        layer = StaticLayer(max_cache_len=cache_len)
        layer.keys, layer.values = keys[index], values[index]
        layer.cumulative_length = lengths[index]  # a 0-d view: every layer advances its own entry in place
        layer.device = keys.device
        layer.batch_size, layer.num_heads = keys.shape[1], keys.shape[2]
        layer.k_head_dim = layer.v_head_dim = keys.shape[-1]
        layer.is_initialized = True
        return layer


class StepContext:
    """Python-side objects one step's pieces share: the exit-head memo (generic decisions) and the
    vocabulary set handed from one consulted layer to the next. A captured step keeps its context."""

    def __init__(self, session: Session, backend: ExitBackend, exit_adapters: Any, *, eager_heads: bool):
        self.set_ids = None
        self.heads = None
        if eager_heads:  # decisions through exit_rule.consult read the heads through the step's memo
            hiddens = [h[:, 0] for h in session.hs]
            self.heads = StepHeads(backend, hiddens, session.head_rows, exit_adapters)
