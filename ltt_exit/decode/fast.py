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
  in the layer's graph; ``fused_decision.py``); other scorers and exit adapters use the eager ``exit_rule.consult``.

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

from . import exit_rule
from .backends import PromptBatch
from .decoder import EarlyExitDecoder
from .exit_rule import RowRecord
from .fast_buffers import Session, StackedKV, StepContext
from .fused_decision import FUSED_PRUNINGS, FUSED_SCORERS, consult_specs, fused_consult
from .outputs import DecodedSequence
from .prompts import check_budget, eos_ids, prepare_prompt
from .schedule import check_thresholds
from .scorers import ExitView

__all__ = ["FastEarlyExitDecoder"]

def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


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
        self._sessions: OrderedDict[tuple, Session] = OrderedDict()
        self._stacked = StackedKV(self.backend)
        self._fused = (
            self.exit_adapters is None
            and type(self.scorer) in FUSED_SCORERS
            and type(self.pruning) in FUSED_PRUNINGS
        )
        self._specs = consult_specs(self.scorer, self.pruning, self.backend.vocab_size, self.min_exit_layer,
                                     self.num_layers) if self._fused else {}
        scorer = self.scorer
        self._head = self.backend.head

        def score(logits, hidden, hidden_prev):
            # the fused scorers read neither the layer number nor an amateur layer
            return scorer.score(ExitView(layer=0, logits=logits, hidden=hidden, hidden_prev=hidden_prev))

        self._score = score
        self._consult_fn = fused_consult
        self.compile_backend = None
        if compile and self._fused:
            self.compile_backend = "inductor" if compile is True else compile
            self._consult_fn = torch.compile(fused_consult, backend=self.compile_backend, fullgraph=True,
                                             dynamic=False)
        #: after each generate(): host reads of decision flags and of EOS flags, graph replays, steps run,
        #: and ``head_consults``, the consulted layers whose exit decision (head, scorer) ran, summed over steps
        self.last_stats: dict[str, int] = {}

    # ---- plan -------------------------------------------------------------------------------------
    @property
    def uses_fused_decision(self) -> bool:
        """Whether exit decisions use the fused (compilable) implementation rather than ``exit_rule.consult``."""
        return self._fused

    def _step_context(self, session: Session) -> StepContext:
        return StepContext(session, self.backend, self.exit_adapters, eager_heads=not self._fused)

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether steps replay captured CUDA graphs (``cuda_graphs``, or by default: the model is on CUDA)."""
        return self._graphs_on()

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
        check_budget(max_new_tokens)
        prompt = prepare_prompt(self.backend, self.tokenizer, prompts, input_ids, attention_mask)
        batch = prompt.input_ids.shape[0]
        thresholds = check_thresholds(threshold, batch)
        eos = eos_ids(self.backend, eos_token_id)
        forced = self._check_forced(force_exit_layers, batch, max_new_tokens, thresholds)
        records = self._fast_decode(prompt, thresholds, max_new_tokens, eos, forced)
        return [exit_rule.finish_sequence(self, record, prompt.lengths[row], thresholds[row])
                for row, record in enumerate(records)]

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
    def _session(self, batch: int, cache_len: int, source_len: int, eos_slots: int, forced: bool) -> Session:
        key = (batch, cache_len, source_len, eos_slots, forced)
        session = self._sessions.get(key)
        if session is not None:
            self._sessions.move_to_end(key)
            return session
        while len(self._sessions) >= self.max_sessions:
            self._sessions.popitem(last=False)
        session = Session(self.backend, self.num_layers, self.compute_dtype, batch, cache_len, source_len,
                          eos_slots, forced)
        if self._graphs_on():
            self._capture(session)
        self._sessions[key] = session
        return session

    def _pieces(self, session: Session, ctx_of: Callable[[], StepContext]) -> list[tuple[str, str, Callable]]:
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

    def _capture(self, session: Session) -> None:
        """Warm every piece up once (compiles, library lazy set-up), then capture each as a CUDA graph.

        The layer pieces share one memory pool and one step context, captured in step order, so a tensor one
        of them keeps (a vocabulary set, a memoised head) is read by the later ones at a fixed address."""
        warm_ctx = self._step_context(session)
        side = torch.cuda.Stream(device=session.device)
        side.wait_stream(torch.cuda.current_stream(session.device))
        with torch.cuda.stream(side), _recompile_room():
            for _, _, piece in self._pieces(session, lambda: warm_ctx):
                self._reset_for_warmup(session)
                piece()
        torch.cuda.current_stream(session.device).wait_stream(side)
        torch.cuda.synchronize(session.device)
        session.capture_ctx = self._step_context(session)
        pools = {name: torch.cuda.graph_pool_handle() for name in ("layers", "aux", "full")}
        for name, pool, piece in self._pieces(session, lambda: session.capture_ctx):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pools[pool]):
                piece()
            session.graphs[name] = graph
        torch.cuda.synchronize(session.device)

    def _reset_for_warmup(self, session: Session) -> None:
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
    def _begin(self, s: Session) -> None:
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

    def _layer(self, s: Session, ctx: StepContext | None, index: int, consult: bool = True) -> None:
        """Decoder layer ``index`` through the library module; exited rows keep their state; then the exit
        decision at layer index + 1 when it is consulted."""
        state = s.state
        if s.family == "t5" and index == 0:
            state.self_bias = state.cross_bias = None  # layer 0 computes the position biases of the step
        output = self.backend.run_layer(state, index, s.hs[index])  # every row: static shapes
        if s.family == "t5" and index == 0:
            if s.self_bias is None:
                s.self_bias = torch.empty_like(state.self_bias)
                s.cross_bias = torch.empty_like(state.cross_bias)
            s.self_bias.copy_(state.self_bias)
            s.cross_bias.copy_(state.cross_bias)
            state.self_bias, state.cross_bias = s.self_bias, s.cross_bias
        exit_rule.keep_exited_state(s.undecided, output, s.hs[index], out=s.hs[index + 1])
        layer = index + 1
        if consult and exit_rule.is_consulted(layer, self.min_exit_layer, self.num_layers):
            if self._fused:
                self._decide_fused(s, ctx, layer)
            else:
                self._decide_generic(s, ctx, layer)
            torch.logical_not(s.undecided.any(), out=s.flag)

    def _decide_fused(self, s: Session, ctx: StepContext, layer: int) -> None:
        spec = self._specs[layer]
        ctx.set_ids = self._consult_fn(
            self._head, self._score, s.hs[layer][:, 0], s.hs[layer - 1][:, 0], ctx.set_ids, s.thresholds, s.may_exit,
            s.layer_values[layer], s.forced_now if s.forced else None, s.tokens, s.exit_layers, s.confidences,
            s.undecided, s.head_rows, spec.full_head, spec.keep, spec.width, spec.exits_only, s.forced,
        )

    def _decide_generic(self, s: Session, ctx: StepContext, layer: int) -> None:
        exits, predicted, confidence, ctx.set_ids = exit_rule.consult(self, layer, ctx.heads, s.may_exit,
                                                                      s.thresholds, ctx.set_ids)
        tokens, exit_layers, confidences = exit_rule.apply_exits(exits, s.layer_values[layer], predicted, confidence,
                                                       s.tokens, s.exit_layers, s.confidences)
        s.tokens.copy_(tokens)
        s.exit_layers.copy_(exit_layers)
        s.confidences.copy_(confidences)
        still = ~exits
        s.undecided.logical_and_(still)
        s.may_exit.logical_and_(still)

    def _kv_tail(self, s: Session, start: int) -> None:
        """Every row has exited: the K/V of layers start..L-1 from the copied states, one batched product."""
        cos, sin = (s.cos, s.sin) if s.family == "decoder-only" else (None, None)
        keys, values = self._stacked.project(s.hs[start], start, cos, sin)
        position = s.lengths[start:start + 1]  # every layer's next slot (they advance together)
        s.keys[start:].index_copy_(3, position, keys.to(s.keys.dtype))
        s.values[start:].index_copy_(3, position, values.to(s.values.dtype))
        s.lengths[start:].add_(1)

    def _finish_step(self, s: Session, final_head: bool) -> None:
        """Final full-vocabulary head for rows still undecided; record the step; feed the tokens back."""
        if final_head:
            s.tokens.copy_(exit_rule.final_head(self.backend, s.hs[self.num_layers][:, 0], s.undecided, s.tokens,
                                                s.head_rows, only_undecided_rows=False))
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
    def _run(self, s: Session, name: str, piece: Callable[[], None]) -> None:
        graph = s.graphs.get(name)
        if graph is not None:
            graph.replay()
        else:
            piece()
        self._stats["launches"] += 1

    def _post(self, s: Session, index: int) -> None:
        """Queue the copy of the device flag for consulted layer index + 1 to the host."""
        s.host_flags[index].copy_(s.flag, non_blocking=s.cuda)
        if s.cuda:
            s.flag_events[index].record()

    def _all_exited(self, s: Session, index: int) -> bool:
        if s.cuda:
            s.flag_events[index].synchronize()
        self._stats["flag_reads"] += 1
        return bool(s.host_flags[index])

    def _fast_decode(self, prompt: PromptBatch, thresholds: list[float], max_new_tokens: int, eos: set[int],
                     forced: list[list[int]] | None) -> list[RowRecord]:
        backend, L = self.backend, self.num_layers
        self._stats = {"launches": 0, "flag_reads": 0, "done_reads": 0, "steps": 0, "head_consults": 0}
        batch = len(thresholds)
        records = [RowRecord() for _ in thresholds]
        state0 = backend.start(prompt)
        if backend.first_token_from_prompt:
            first = backend.prompt_logits(state0).argmax(dim=-1)
            exit_rule.record_prefill_tokens(records, first.tolist(), L, backend.vocab_size)
            if all(record.is_finished(eos, max_new_tokens) for record in records):
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
        # a batch in which no row can exit (λ >= 1: λ_t = inf for every t) runs the full-model step: no exit
        # head is evaluated, as the cost account (no head rows below L) says
        consult = self.min_exit_layer < L and any(self.schedule.can_exit(t) for t in thresholds)
        finished_steps = 0
        with _recompile_room() if self.compile_backend else _nothing():
            for step in range(first_step, max_new_tokens):
                ctx = s.capture_ctx if s.graphs else self._step_context(s)
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

    def _pieces_full(self, s: Session) -> None:
        self._begin(s)
        for index in range(self.num_layers):
            self._layer(s, None, index, consult=False)
        self._finish_step(s, True)

    def _consulting_step(self, s: Session, ctx: StepContext) -> None:
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
            if exit_rule.is_consulted(index + 1, j, L):  # its decision is read back, lookahead layers later
                self._stats["head_consults"] += 1
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

    def _post_done(self, s: Session, step: int) -> None:
        slot = step % 2
        s.host_done[slot].copy_(s.done, non_blocking=s.cuda)
        if s.cuda:
            s.done_events[slot].record()

    def _finished(self, s: Session, step: int) -> bool:
        """Whether every row had finished after ``step`` (waits for that step)."""
        slot = step % 2
        if s.cuda:
            s.done_events[slot].synchronize()
        self._stats["done_reads"] += 1
        return bool(s.host_done[slot].all())

    def _load(self, s: Session, prompt: PromptBatch, state0: Any, first: torch.Tensor, thresholds: list[float],
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

    def _collect(self, s: Session, records: list[RowRecord], first_step: int, completed: int, max_new_tokens: int,
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
            if record.is_finished(eos, max_new_tokens):
                continue
            for token, layer, confidence, head_rows in zip(tokens[row], exits[row], confidences[row], rows[row]):
                record.append(token, layer, confidence, head_rows)
                if record.is_finished(eos, max_new_tokens):
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
