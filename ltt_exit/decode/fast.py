"""FastEarlyExitDecoder: the early-exit decoder with static buffers, CUDA graphs and few host reads.

Same API, same exit rule and the same outputs (tokens, exit layers, confidences, cost account) as
:class:`~ltt_exit.decode.decoder.EarlyExitDecoder`, whose ``config_dict()`` it shares, so a certificate
computed with either applies to both. What changes is how the work reaches the device:

* **Static state.** Every tensor a decoding step reads or writes lives in a buffer allocated once per
  batch shape (a *session*): the self-attention K/V in the library's ``StaticLayer`` objects (views of
  one (L, B, H, M, d_head) tensor per K and V; M = prompt + budget rounded up to ``length_bucket``),
  the attention masks, rotary positions, per-row exit state, and a per-step history of tokens, exit
  layers, confidences and head rows. Nothing is allocated per layer on the Python side.
* **CUDA graphs.** On CUDA each piece of a step is captured once per session and replayed: the step's
  start plus the layers below ``min_exit_layer``; every later layer together with its exit decision;
  the K/V tail (below); the final head. When no row of the batch can exit (λ >= 1 everywhere) a whole
  step is one graph.
* **Decisions on the device, read with a lag.** After a consulted layer the "every row has exited"
  flag is copied to pinned host memory behind an event, and the host only waits for it after it has
  queued ``lookahead`` more layers (default 1), so the device never idles on the read. A layer queued
  after the batch already exited runs on the frozen states (CALM's propagation, exactly as a batch row
  that exited earlier does), so the speculation changes no output; it only costs a full layer where the
  K/V projections would have done. EOS is read the same way, one step behind.
* **K/V tail in one batched product.** Once every row has exited at ℓ, the K/V projections of all
  layers above are computed from the copied state with one batched matrix product over the stacked
  (norm-weight, K, V) parameters of those layers (plus RoPE for rotary models), and written into every
  layer's cache with one indexed copy.
* **Exit head only where it can matter.** Heads run only at consulted layers and only for batches in
  which some row can still exit; pruned heads compute k rows. For the softmax and hidden-state scorers
  with the built-in prunings, the whole exit decision (norm, head rows, scorer, threshold test, state
  update) is one function that ``compile=`` hands to ``torch.compile`` (its kernels are then captured
  in the layer's graph); other scorers and exit adapters use the reference decoder's own decision code.

Batches: every row keeps its own exit layer (the outputs of each row equal decoding it alone). A layer
runs in full while any live row of the batch is undecided; once all have exited, only the batched K/V
tail runs. Rows that finished (EOS or budget) stay in the static batch as exited rows until the whole
batch finishes (no compaction; one set of graphs per batch shape).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Callable

import torch
from transformers.cache_utils import Cache, EncoderDecoderCache, StaticLayer

from .backends import PromptBatch, T5Backend
from .backends.decoder_only import DecoderOnlyState
from .backends.t5 import T5State
from .decoder import EarlyExitDecoder, _RowRecord, _StepHeads
from .outputs import DecodedSequence
from .pruning import DecayingPruning, FixedPruning, NoPruning, keep_best
from .schedule import check_thresholds
from .scorers import ExitView, HiddenCosine, SoftmaxMargin, SoftmaxMax

__all__ = ["FastEarlyExitDecoder"]

#: scorers and prunings whose exit decision has a fused (compilable) implementation here; anything else
#: (contrastive scorers, custom classes, exit adapters) runs the reference decoder's ``_consult``
FUSED_SCORERS = (SoftmaxMax, SoftmaxMargin, HiddenCosine)
FUSED_PRUNINGS = (NoPruning, FixedPruning, DecayingPruning)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class _ConsultSpec:
    """What the fused exit decision does at one consulted layer.

    full_head: evaluate all V rows of the head (else the previous layer's vocabulary set);
    keep: keep this many best-ranked ids afterwards (None: keep the set as it is);
    width: head rows charged per row; exits_only: charge only rows that exit (hidden-state scorer, no pruning).
    """

    __slots__ = ("full_head", "keep", "width", "exits_only")

    def __init__(self, full_head: bool, keep: int | None, width: int, exits_only: bool):
        self.full_head, self.keep, self.width, self.exits_only = full_head, keep, width, exits_only


def _fused_consult(head: Callable, score: Callable, hidden, hidden_prev, ids, thresholds, may_exit, layer_value,
                   forced_now, tokens, exit_layers, confidences, undecided, head_rows,
                   full_head: bool, keep: int | None, width: int, exits_only: bool, forced: bool):
    """One exit decision for every row, on the device, updating the row state in place.

    hidden, hidden_prev: (B, d) states after layers ℓ and ℓ-1; ids: (B, k) vocabulary set of the previous
    consulted layer or None; thresholds: (B,) λ_t; may_exit: (B,) bool, undecided rows with a finite λ;
    layer_value: () long tensor ℓ; forced_now: (B,) forced exit layers (benchmarks) or None.
    tokens, exit_layers, confidences, undecided, head_rows: (B,) row state, updated in place.
    Returns the vocabulary set (B, k) the next consulted layer starts from (None: full vocabulary).
    """
    logits = head(hidden, None if full_head else ids)
    new_ids = None if full_head else ids
    if keep is not None:
        new_ids, logits = keep_best(logits, new_ids, keep)
    confidence = score(logits, hidden, hidden_prev)
    if forced:
        exits = may_exit & (forced_now == layer_value)
    else:
        exits = may_exit & (confidence >= thresholds)
    charged = exits if exits_only else may_exit
    head_rows.add_(charged.to(head_rows.dtype) * width)
    best = logits.argmax(dim=-1)
    predicted = best if new_ids is None else new_ids.gather(-1, best[:, None]).squeeze(-1)
    tokens.copy_(torch.where(exits, predicted, tokens))
    exit_layers.copy_(torch.where(exits, layer_value, exit_layers))
    confidences.copy_(torch.where(exits, confidence.to(confidences.dtype), confidences))
    still = ~exits
    undecided.logical_and_(still)
    may_exit.logical_and_(still)
    return new_ids


class _StackedKV:
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
            self.rotary = backend._apply_rotary
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


class _Session:
    """Static buffers and captured graphs for one batch shape (batch size, cache length, source length)."""

    def __init__(self, decoder: "FastEarlyExitDecoder", batch: int, cache_len: int, source_len: int,
                 eos_slots: int, forced: bool):
        backend = decoder.backend
        device, dtype, cdtype = backend.device, backend.dtype, decoder.compute_dtype
        self.batch, self.cache_len, self.source_len, self.forced = batch, cache_len, source_len, forced
        self.device = device
        self.cuda = device.type == "cuda"
        L, d = decoder.num_layers, backend.hidden_size
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


class _StepContext:
    """Python-side objects one step's pieces share: the exit-head memo (generic decisions) and the
    vocabulary set handed from one consulted layer to the next. A captured step keeps its context."""

    def __init__(self, decoder: "FastEarlyExitDecoder", session: _Session):
        self.set_ids = None
        self.heads = None
        if not decoder._fused:
            hiddens = [h[:, 0] for h in session.hs]
            self.heads = _StepHeads(decoder.backend, hiddens, session.head_rows, decoder.exit_adapters)


class FastEarlyExitDecoder(EarlyExitDecoder):
    """:class:`EarlyExitDecoder` with static buffers, CUDA graphs and lagged host reads (see the module
    docstring). Same constructor arguments, plus:

    cuda_graphs:   capture and replay CUDA graphs (None: when the model is on CUDA). Off, the same
                   pieces run eagerly (this is how the CPU tests exercise them).
    lookahead:     layers queued past a consulted layer before the host waits for its decision (>= 0).
    compile:       False, True (inductor) or a ``torch.compile`` backend name for the fused exit decision.
    length_bucket: cache lengths (and T5 source lengths) are rounded up to a multiple of this, so prompts of
                   similar length share one set of graphs.
    max_sessions:  batch shapes whose buffers and graphs are kept (least recently used dropped).
    """

    def __init__(self, model, tokenizer=None, *, cuda_graphs: bool | None = None, lookahead: int = 1,
                 compile: bool | str = False, length_bucket: int = 64, max_sessions: int = 2, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
            raise ValueError(f"lookahead must be an int >= 0, got {lookahead!r}")
        if isinstance(length_bucket, bool) or not isinstance(length_bucket, int) or length_bucket < 1:
            raise ValueError(f"length_bucket must be a positive int, got {length_bucket!r}")
        if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1:
            raise ValueError(f"max_sessions must be a positive int, got {max_sessions!r}")
        if not (isinstance(compile, bool) or isinstance(compile, str)):
            raise TypeError(f"compile must be a bool or a torch.compile backend name, got {compile!r}")
        if cuda_graphs and self.backend.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, it is on {self.backend.device}")
        self.cuda_graphs = cuda_graphs
        self.lookahead = lookahead
        self.length_bucket = length_bucket
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[tuple, _Session] = OrderedDict()
        self._stacked = _StackedKV(self.backend)
        self._fused = (
            self.exit_adapters is None
            and type(self.scorer) in FUSED_SCORERS
            and type(self.pruning) in FUSED_PRUNINGS
        )
        self._specs = self._consult_specs() if self._fused else {}
        scorer = self.scorer
        self._head = self.backend.head

        def score(logits, hidden, hidden_prev):
            # the fused scorers read neither the layer number nor an amateur layer
            return scorer.score(ExitView(layer=0, logits=logits, hidden=hidden, hidden_prev=hidden_prev))

        self._score = score
        self._consult_fn = _fused_consult
        self.compile_backend = None
        if compile and self._fused:
            self.compile_backend = "inductor" if compile is True else compile
            self._consult_fn = torch.compile(_fused_consult, backend=self.compile_backend, fullgraph=True,
                                             dynamic=False)
        #: after each generate(): host reads of decision flags and of EOS flags, graph replays, steps run
        self.last_stats: dict[str, int] = {}

    # ---- plan -------------------------------------------------------------------------------------
    @property
    def uses_fused_decision(self) -> bool:
        """Whether exit decisions use the fused (compilable) implementation rather than ``_consult``."""
        return self._fused

    def _consulted(self, layer: int) -> bool:
        return self.min_exit_layer <= layer < self.num_layers

    def _consult_specs(self) -> dict[int, _ConsultSpec]:
        vocab, j = self.backend.vocab_size, self.min_exit_layer
        exits_only = (not self.scorer.needs_logits) and isinstance(self.pruning, NoPruning)
        specs, previous = {}, None
        for layer in range(j, self.num_layers):
            if isinstance(self.pruning, NoPruning):
                spec = _ConsultSpec(True, None, vocab, exits_only)
            elif isinstance(self.pruning, FixedPruning):
                kept = min(self.pruning.k, vocab)
                spec = _ConsultSpec(True, kept, vocab, False) if layer == j else _ConsultSpec(False, None, previous, False)
                previous = kept
            else:
                wanted = self.pruning.k_at(layer, self.num_layers)
                if layer == j:
                    kept = min(wanted, vocab)
                    spec = _ConsultSpec(True, kept, vocab, False)
                else:
                    kept = min(wanted, previous)
                    spec = _ConsultSpec(False, kept, previous, False)
                previous = kept
            specs[layer] = spec
        return specs

    def _graphs_on(self) -> bool:
        on = self.backend.device.type == "cuda" if self.cuda_graphs is None else self.cuda_graphs
        return bool(on)

    # ---- generation -------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str] | None = None,
        *,
        input_ids: torch.Tensor | Sequence[Sequence[int]] | None = None,
        attention_mask: torch.Tensor | None = None,
        threshold: float | Sequence[float] = 1.0,
        max_new_tokens: int = 32,
        eos_token_id: int | Sequence[int] | None = None,
        force_exit_layers: Sequence[Sequence[int]] | None = None,
    ) -> list[DecodedSequence]:
        """Same as :meth:`EarlyExitDecoder.generate`.

        force_exit_layers: for speed measurements only (random-weight models have no meaningful
            confidences): per row, per generated token, the layer in [min_exit_layer, L] at which the
            token exits (L: no exit) instead of the threshold test; rows need a finite threshold. The
            head and the scorer still run at every consulted layer, so the work done is the real one.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        prompt = self._prepare_prompt(prompts, input_ids, attention_mask)
        batch = prompt.input_ids.shape[0]
        thresholds = check_thresholds(threshold, batch)
        eos = self._eos_ids(eos_token_id)
        forced = self._check_forced(force_exit_layers, batch, max_new_tokens, thresholds)
        records = self._fast_decode(prompt, thresholds, max_new_tokens, eos, forced)
        return [self._finish(record, prompt.lengths[row], thresholds[row]) for row, record in enumerate(records)]

    def _check_forced(self, forced, batch, max_new_tokens, thresholds):
        if forced is None:
            return None
        if not self._fused:
            raise ValueError("force_exit_layers needs a fused exit decision (softmax or hidden-cosine scorer, "
                             "built-in pruning, no exit adapters)")
        rows = [[int(x) for x in row] for row in forced]
        if len(rows) != batch or any(len(row) < max_new_tokens for row in rows):
            raise ValueError(f"force_exit_layers needs {batch} rows of at least max_new_tokens={max_new_tokens} layers")
        if any(not self.min_exit_layer <= x <= self.num_layers for row in rows for x in row):
            raise ValueError(f"forced exit layers must lie in [{self.min_exit_layer}, {self.num_layers}]")
        if any(math.isinf(self.schedule.value(t, 0, max_new_tokens)) for t in thresholds):
            raise ValueError("rows with forced exit layers need a threshold below 1 (λ >= 1 never consults a head)")
        return [row[:max_new_tokens] for row in rows]

    # ---- sessions -----------------------------------------------------------------------------------
    def _session(self, batch: int, cache_len: int, source_len: int, eos_slots: int, forced: bool) -> _Session:
        key = (batch, cache_len, source_len, eos_slots, forced)
        session = self._sessions.get(key)
        if session is not None:
            self._sessions.move_to_end(key)
            return session
        while len(self._sessions) >= self.max_sessions:
            self._sessions.popitem(last=False)
        session = _Session(self, batch, cache_len, source_len, eos_slots, forced)
        if self._graphs_on():
            self._capture(session)
        self._sessions[key] = session
        return session

    def _pieces(self, session: _Session, ctx_of: Callable[[], _StepContext]) -> list[tuple[str, str, Callable]]:
        """(name, pool, function) of every piece of a step, in capture order."""
        L, j = self.num_layers, self.min_exit_layer
        first_consulted_index = j - 1
        pieces = []

        def prefix():
            self._begin(session)
            for index in range(first_consulted_index):
                self._layer(session, ctx_of(), index)

        pieces.append(("prefix", "layers", prefix))
        for index in range(first_consulted_index, L):
            pieces.append((f"layer{index}", "layers", lambda i=index: self._layer(session, ctx_of(), i)))
        for start in range(j, L):
            pieces.append((f"kv{start}", "aux", lambda s=start: self._kv_tail(session, s)))
        pieces.append(("finish_head", "aux", lambda: self._finish_step(session, True)))
        pieces.append(("finish_nohead", "aux", lambda: self._finish_step(session, False)))

        def full():
            self._begin(session)
            for index in range(L):
                self._layer(session, None, index, consult=False)
            self._finish_step(session, True)

        pieces.append(("full", "full", full))
        return pieces

    def _capture(self, session: _Session) -> None:
        """Warm every piece up once (compiles, library lazy set-up), then capture each as a CUDA graph.

        The layer pieces share one memory pool and one step context, captured in step order, so a tensor one
        of them keeps (a vocabulary set, a memoised head) is read by the later ones at a fixed address."""
        warm_ctx = _StepContext(self, session)
        side = torch.cuda.Stream(device=session.device)
        side.wait_stream(torch.cuda.current_stream(session.device))
        with torch.cuda.stream(side), _recompile_room():
            for _, _, piece in self._pieces(session, lambda: warm_ctx):
                self._reset_for_warmup(session)
                piece()
        torch.cuda.current_stream(session.device).wait_stream(side)
        torch.cuda.synchronize(session.device)
        session.capture_ctx = _StepContext(self, session)
        pools = {name: torch.cuda.graph_pool_handle() for name in ("layers", "aux", "full")}
        for name, pool, piece in self._pieces(session, lambda: session.capture_ctx):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pools[pool]):
                piece()
            session.graphs[name] = graph
        torch.cuda.synchronize(session.device)

    def _reset_for_warmup(self, session: _Session) -> None:
        """Harmless values for the warm-up pass (the real ones are loaded by every generate call)."""
        session.mask.fill_(True)
        session.lengths.zero_()
        session.slot.zero_()
        session.step.zero_()
        session.budget.fill_(1 << 30)
        session.done.zero_()
        session.threshold_table.fill_(2.0)
        session.forced_table.fill_(self.num_layers)
        if session.family == "t5":
            session.encoder_mask.fill_(True)

    # ---- pieces of a step -------------------------------------------------------------------------
    def _begin(self, s: _Session) -> None:
        """Embed the fed tokens into h_0, open the next cache slot, set this step's thresholds and row state."""
        backend = self.backend
        if s.family == "t5":
            hidden = backend.decoder.dropout(backend.decoder.embed_tokens(s.tokens_in[:, None]))
            s.hs[0].copy_(hidden)
            s.mask.index_fill_(-1, s.slot.view(1), True)
        else:
            hidden = backend.base.embed_tokens(s.tokens_in[:, None])
            s.hs[0].copy_(hidden)
            s.mask.index_fill_(-1, s.slot.view(1), True)
            if s.window is not None:
                torch.logical_and(s.mask, s.slot_range > s.slot - s.window, out=s.sliding_mask)
            torch.add(s.positions, 1, out=s.position_ids[:, 0])
            cos, sin = backend.base.rotary_emb(hidden, s.position_ids)
            s.cos.copy_(cos)
            s.sin.copy_(sin)
        s.thresholds.copy_(s.threshold_table.index_select(0, s.step.view(1))[0])
        if s.forced:
            s.forced_now.copy_(s.forced_table.index_select(0, s.step.view(1))[0])
        torch.logical_not(s.done, out=s.undecided)
        torch.logical_and(s.undecided, torch.isfinite(s.thresholds), out=s.may_exit)
        s.tokens.zero_()
        s.exit_layers.fill_(self.num_layers)
        s.confidences.fill_(math.nan)
        s.head_rows.zero_()

    def _layer(self, s: _Session, ctx: _StepContext | None, index: int, consult: bool = True) -> None:
        """Decoder layer ``index`` through the library module; exited rows keep their state; then the exit
        decision at layer index + 1 when it is consulted."""
        state = s.state
        if s.family == "t5" and index == 0:
            state.self_bias = state.cross_bias = None  # layer 0 computes the position biases of the step
        output = self.backend.run_layer(state, index, s.hs[index])
        if s.family == "t5" and index == 0:
            if s.self_bias is None:
                s.self_bias = torch.empty_like(state.self_bias)
                s.cross_bias = torch.empty_like(state.cross_bias)
            s.self_bias.copy_(state.self_bias)
            s.cross_bias.copy_(state.cross_bias)
            state.self_bias, state.cross_bias = s.self_bias, s.cross_bias
        torch.where(s.undecided[:, None, None], output, s.hs[index], out=s.hs[index + 1])
        layer = index + 1
        if consult and self._consulted(layer):
            if self._fused:
                self._decide_fused(s, ctx, layer)
            else:
                self._decide_generic(s, ctx, layer)
            torch.logical_not(s.undecided.any(), out=s.flag)

    def _decide_fused(self, s: _Session, ctx: _StepContext, layer: int) -> None:
        spec = self._specs[layer]
        ctx.set_ids = self._consult_fn(
            self._head, self._score, s.hs[layer][:, 0], s.hs[layer - 1][:, 0], ctx.set_ids, s.thresholds, s.may_exit,
            s.layer_values[layer], s.forced_now if s.forced else None, s.tokens, s.exit_layers, s.confidences,
            s.undecided, s.head_rows, spec.full_head, spec.keep, spec.width, spec.exits_only, s.forced,
        )

    def _decide_generic(self, s: _Session, ctx: _StepContext, layer: int) -> None:
        exits, predicted, confidence, ctx.set_ids = self._consult(layer, ctx.heads, s.may_exit, s.thresholds,
                                                                  ctx.set_ids)
        s.tokens.copy_(torch.where(exits, predicted, s.tokens))
        s.exit_layers.copy_(torch.where(exits, s.layer_values[layer], s.exit_layers))
        s.confidences.copy_(torch.where(exits, confidence.to(s.confidences.dtype), s.confidences))
        still = ~exits
        s.undecided.logical_and_(still)
        s.may_exit.logical_and_(still)

    def _kv_tail(self, s: _Session, start: int) -> None:
        """Every row has exited: the K/V of layers start..L-1 from the copied states, one batched product."""
        cos, sin = (s.cos, s.sin) if s.family == "decoder-only" else (None, None)
        keys, values = self._stacked.project(s.hs[start], start, cos, sin)
        position = s.lengths[start:start + 1]  # every layer's next slot (they advance together)
        s.keys[start:].index_copy_(3, position, keys.to(s.keys.dtype))
        s.values[start:].index_copy_(3, position, values.to(s.values.dtype))
        s.lengths[start:].add_(1)

    def _finish_step(self, s: _Session, final_head: bool) -> None:
        """Final full-vocabulary head for rows still undecided; record the step; feed the tokens back."""
        if final_head:
            logits = self.backend.head(s.hs[self.num_layers][:, 0], None)
            s.head_rows.add_(s.undecided.to(s.head_rows.dtype) * self.backend.vocab_size)
            s.tokens.copy_(torch.where(s.undecided, logits.argmax(dim=-1), s.tokens))
        at = s.step.view(1)
        s.hist_tokens.index_copy_(0, at, s.tokens[None])
        s.hist_exits.index_copy_(0, at, s.exit_layers[None])
        s.hist_conf.index_copy_(0, at, s.confidences[None])
        s.hist_rows.index_copy_(0, at, s.head_rows[None])
        finished = (s.tokens[:, None] == s.eos[None, :]).any(dim=-1) | (s.step + 1 >= s.budget)
        s.done.logical_or_(finished)
        s.tokens_in.copy_(s.tokens)
        s.step.add_(1)
        s.slot.add_(1)
        if s.family == "decoder-only":
            s.positions.add_(1)

    # ---- the step loop ----------------------------------------------------------------------------
    def _run(self, s: _Session, name: str, piece: Callable[[], None]) -> None:
        graph = s.graphs.get(name)
        if graph is not None:
            graph.replay()
        else:
            piece()
        self._stats["launches"] += 1

    def _post(self, s: _Session, index: int) -> None:
        """Queue the copy of the device flag for consulted layer index + 1 to the host."""
        s.host_flags[index].copy_(s.flag, non_blocking=s.cuda)
        if s.cuda:
            s.flag_events[index].record()

    def _all_exited(self, s: _Session, index: int) -> bool:
        if s.cuda:
            s.flag_events[index].synchronize()
        self._stats["flag_reads"] += 1
        return bool(s.host_flags[index])

    def _fast_decode(self, prompt: PromptBatch, thresholds: list[float], max_new_tokens: int, eos: set[int],
                     forced: list[list[int]] | None) -> list[_RowRecord]:
        backend, L = self.backend, self.num_layers
        self._stats = {"launches": 0, "flag_reads": 0, "done_reads": 0, "steps": 0}
        batch = len(thresholds)
        records = [_RowRecord() for _ in thresholds]
        state0 = backend.start(prompt)
        if backend.first_token_from_prompt:
            first = backend.prompt_logits(state0).argmax(dim=-1)
            first_host = first.tolist()
            for row, token in enumerate(first_host):
                records[row].token_ids.append(int(token))
                records[row].exit_layers.append(L)
                records[row].confidences.append(math.nan)
                records[row].head_rows.append(backend.vocab_size)
            if max_new_tokens == 1 or all(token in eos for token in first_host):
                self.last_stats = dict(self._stats)
                return records
            first_step = 1
            prompt_width = prompt.input_ids.shape[1]
            cache_len = _round_up(prompt_width + max_new_tokens - 1, self.length_bucket)
            source_len = 0
        else:
            first = backend.first_inputs(state0)
            first_step = 0
            cache_len = _round_up(max_new_tokens, self.length_bucket)
            source_len = _round_up(prompt.input_ids.shape[1], self.length_bucket)
        s = self._session(batch, cache_len, source_len, max(1, len(eos)), forced is not None)
        self._load(s, prompt, state0, first, thresholds, max_new_tokens, eos, forced, first_step)
        consult = self.min_exit_layer < L and any(math.isfinite(self.schedule.value(t, 0, max_new_tokens))
                                                  for t in thresholds)
        finished_steps = 0
        with _recompile_room() if self.compile_backend else _nothing():
            for step in range(first_step, max_new_tokens):
                ctx = s.capture_ctx if s.graphs else _StepContext(self, s)
                if consult:
                    self._consulting_step(s, ctx)
                else:
                    self._run(s, "full", lambda: self._pieces_full(s))
                self._post_done(s, step)
                finished_steps += 1
                self._stats["steps"] += 1
                # EOS is read one step late: the device already works on this step meanwhile
                if step > first_step and self._finished(s, step - 1):
                    break
        if s.cuda:
            torch.cuda.synchronize(s.device)
        self._collect(s, records, first_step, first_step + finished_steps, max_new_tokens, eos)
        self.last_stats = dict(self._stats)
        return records

    def _pieces_full(self, s: _Session) -> None:
        self._begin(s)
        for index in range(self.num_layers):
            self._layer(s, None, index, consult=False)
        self._finish_step(s, True)

    def _consulting_step(self, s: _Session, ctx: _StepContext) -> None:
        """Queue one step layer by layer, reading each decision ``lookahead`` layers late."""
        L, j = self.num_layers, self.min_exit_layer

        def prefix():
            self._begin(s)
            for index in range(j - 1):
                self._layer(s, ctx, index)

        self._run(s, "prefix", prefix)
        pending: list[int] = []
        exited = False
        index = j - 1
        while index < L:
            self._run(s, f"layer{index}", lambda i=index: self._layer(s, ctx, i))
            if index < L - 1:  # layer index + 1 is consulted
                self._post(s, index)
                pending.append(index)
            index += 1
            if index == L:
                break  # every layer is queued; the final head serves whichever rows are still undecided
            while len(pending) > self.lookahead:
                if self._all_exited(s, pending.pop(0)):
                    exited = True
                    break
            if exited:
                break
        if exited:
            self._run(s, f"kv{index}", lambda i=index: self._kv_tail(s, i))
            self._run(s, "finish_nohead", lambda: self._finish_step(s, False))
        else:
            self._run(s, "finish_head", lambda: self._finish_step(s, True))

    def _post_done(self, s: _Session, step: int) -> None:
        slot = step % 2
        s.host_done[slot].copy_(s.done, non_blocking=s.cuda)
        if s.cuda:
            s.done_events[slot].record()

    def _finished(self, s: _Session, step: int) -> bool:
        """Whether every row had finished after ``step`` (waits for that step)."""
        slot = step % 2
        if s.cuda:
            s.done_events[slot].synchronize()
        self._stats["done_reads"] += 1
        return bool(s.host_done[slot].all())

    def _load(self, s: _Session, prompt: PromptBatch, state0: Any, first: torch.Tensor, thresholds: list[float],
              max_new_tokens: int, eos: set[int], forced, first_step: int) -> None:
        """Copy this call's prompt state, thresholds and settings into the session's buffers."""
        L = self.num_layers
        dtype = self.compute_dtype
        table = torch.stack([
            self.schedule.at(thresholds, t, max_new_tokens, device=s.device, dtype=dtype)
            for t in range(max_new_tokens)
        ])
        s.threshold_table.zero_()
        s.threshold_table[:max_new_tokens] = table
        if forced is not None:
            s.forced_table.fill_(L)
            s.forced_table[:max_new_tokens] = torch.tensor(forced, dtype=torch.long).t().to(s.device)
        s.eos.fill_(-1)
        if eos:
            s.eos[: len(eos)] = torch.tensor(sorted(eos), dtype=torch.long)
        s.budget.fill_(max_new_tokens)
        s.step.fill_(first_step)
        s.done.zero_()
        s.tokens_in.copy_(first)
        s.keys.zero_()
        s.values.zero_()
        s.mask.zero_()
        if s.family == "t5":
            s.lengths.zero_()
            s.slot.zero_()
            cross = state0.cache.cross_attention_cache
            source = prompt.input_ids.shape[1]
            s.cross_keys.zero_()
            s.cross_values.zero_()
            for i in range(L):
                s.cross_keys[i, :, :, :source] = cross.layers[i].keys
                s.cross_values[i, :, :, :source] = cross.layers[i].values
            s.encoder_mask.zero_()
            s.encoder_mask[:, 0, 0, :source] = prompt.attention_mask.bool()
        else:
            width = prompt.input_ids.shape[1]
            for i in range(L):
                stored = state0.cache.layers[i]
                kept = stored.keys.shape[-2]  # a sliding-window layer keeps only the most recent positions
                s.keys[i, :, :, width - kept:width] = stored.keys
                s.values[i, :, :, width - kept:width] = stored.values
            s.lengths.fill_(width)
            s.slot.fill_(width)
            s.mask[:, 0, 0, :width] = prompt.attention_mask.bool()
            s.positions.copy_(state0.positions)
        if s.family == "t5" or s.window is None:
            return
        s.sliding_mask.zero_()

    def _collect(self, s: _Session, records: list[_RowRecord], first_step: int, completed: int, max_new_tokens: int,
                 eos: set[int]) -> None:
        """Rows' tokens from the history, each cut at its first EOS or at the budget (as the reference does)."""
        if completed <= first_step:
            return
        span = slice(first_step, completed)
        tokens = s.hist_tokens[span].t().tolist()
        exits = s.hist_exits[span].t().tolist()
        confidences = s.hist_conf[span].t().tolist()
        rows = s.hist_rows[span].t().tolist()
        for row, record in enumerate(records):
            if record.token_ids and (record.token_ids[-1] in eos or len(record.token_ids) >= max_new_tokens):
                continue
            for token, layer, confidence, head_rows in zip(tokens[row], exits[row], confidences[row], rows[row]):
                record.token_ids.append(int(token))
                record.exit_layers.append(int(layer))
                record.confidences.append(float(confidence))
                record.head_rows.append(int(head_rows))
                if token in eos or len(record.token_ids) >= max_new_tokens:
                    break


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _recompile_room:
    """Raise dynamo's recompile limit while the fused decision is compiled (one entry per distinct head width)."""

    def __enter__(self):
        config = torch._dynamo.config
        self._name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        self._old = getattr(config, self._name)
        setattr(config, self._name, max(self._old, 256))
        return self

    def __exit__(self, *exc):
        setattr(torch._dynamo.config, self._name, self._old)
        return False
