"""The exit rule: where each generated token leaves the decoder, and what that costs.

This module is the one place that decides, for one generated position of every batch row,

* which layers consult an exit head (:func:`is_consulted`: min_exit_layer <= ℓ < L),
* the head a consulted layer reads (pruning, exit adapters, memoised per step: :class:`StepHeads`),
* the confidence and the predicted token there (scorer: :func:`exit_decision`),
* whether the row exits (:func:`exits_at`: ``confidence >= λ_t``, λ_t from the threshold schedule),
* the state an exited row carries up (:func:`keep_exited_state`: the copied h_ℓ, CALM's propagation),
* the last layer's full-vocabulary head for rows that did not exit (:func:`final_head`),
* when a row is finished (:meth:`RowRecord.is_finished`: EOS or the budget), and
* the cost account of a decoded row (:func:`finish_sequence`).

The reference decoder (``decoder.EarlyExitDecoder``) runs a step with :func:`decode_position`; the
sweep's shared-history grid decode (``grid.decode_grid``) calls the same :func:`decode_position` with a
trace; the CUDA fast path (``fast.FastEarlyExitDecoder``) keeps its own static-buffer layer loop but makes
every decision with these functions (its fused decision calls :func:`exits_at`, :func:`predicted_tokens`
and :func:`apply_exits` inside the compiled region). So the three paths cannot disagree on the rule.

The functions read their settings from a *decoder* argument (:class:`ExitSettings`: backend, scorer,
pruning, min_exit_layer, schedule, exit_adapters, …) rather than copying them, so a test that flips a
decoder attribute changes every path at once.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .backends import ExitBackend
from .outputs import CostAccount, DecodedSequence
from .pruning import NoPruning, VocabPruning, select_pruned
from .schedule import ThresholdSchedule
from .scorers import ConfidenceScorer, ExitView

__all__ = [
    "EXIT_RULE",
    "THRESHOLD_SCHEDULE",
    "STATE_PROPAGATION",
    "ExitSettings",
    "StepHeads",
    "LayerDecision",
    "RowRecord",
    "is_consulted",
    "head_at_every_consult",
    "exits_at",
    "predicted_tokens",
    "apply_exits",
    "keep_exited_state",
    "exit_decision",
    "consult",
    "final_head",
    "decode_position",
    "record_prefill_tokens",
    "adapter_flops",
    "finish_sequence",
]

#: the rule, as recorded in every decoder description (and so in certificates and loss-table keys)
EXIT_RULE = "exit at the first layer l in [min_exit_layer, L-1] with confidence >= lambda_t; lambda >= 1 never exits"
THRESHOLD_SCHEDULE = "lambda_t = 0.9*lambda + 0.1*lambda*exp(-tau*t/N); t = 0-based token index, N = max_new_tokens"
STATE_PROPAGATION = "copied hidden state; each skipped layer's own K/V projections (K rotated for RoPE)"


class ExitSettings(Protocol):
    """What the exit rule reads from a decoder (``EarlyExitDecoder`` and its subclasses)."""

    backend: ExitBackend
    tokenizer: Any
    scorer: ConfidenceScorer
    pruning: VocabPruning
    min_exit_layer: int
    schedule: ThresholdSchedule
    exit_adapters: Any
    kv_only_when_all_exited: bool
    frozen_rows_skip_feed_forward: bool

    @property
    def num_layers(self) -> int: ...

    @property
    def compute_dtype(self) -> torch.dtype: ...


class StepHeads:
    """Exit-head evaluations of one decoding step, memoised per (layer, vocabulary set) and counted per row.

    hiddens[a]: (B, d) state after layer a (a = 0: the input embedding). head_rows: (B,) long counter.
    """

    def __init__(self, backend: ExitBackend, hiddens: list[torch.Tensor], head_rows: torch.Tensor,
                 exit_adapters: Any = None):
        self.backend = backend
        self.hiddens = hiddens
        self.head_rows = head_rows
        self.exit_adapters = exit_adapters
        # (layer, id of the vocabulary set or None) -> (the set, logits); the entry keeps the set alive, so
        # its id names it for the whole step (a dict: the JSD search looks up every lower layer per layer)
        self._memo: dict[tuple[int, int | None], tuple[torch.Tensor | None, torch.Tensor]] = {}
        self._adapted: dict[int, torch.Tensor] = {}  # layer -> adapted state (B, d) of this step
        # LM-head rows of the last vocabulary set asked for: a fixed set (and the amateurs' heads) is
        # evaluated at many layers of a step, gathered once
        self._weights_ids: torch.Tensor | None = None
        self._weights = None

    def __call__(self, layer: int, ids: torch.Tensor | None, count_for: torch.Tensor | None) -> torch.Tensor:
        logits = self._memoised(layer, ids)
        if logits is None:
            logits = self._evaluate(self._head_state(layer), ids, count_for, 1)
            self._remember(layer, ids, logits)
        return logits

    def many(self, layers: Sequence[int], ids: torch.Tensor | None, count_for: torch.Tensor | None) -> torch.Tensor:
        """(A, B, k) the exit heads of ``layers`` (A of them) over one vocabulary set: the values and head-row
        charges of one call per layer, but the layers not memoised yet go through the head together, one norm
        and one product for all of them (an amateur search reads every lower layer: per-layer calls made it
        hundreds of small kernels per token)."""
        found = {layer: self._memoised(layer, ids) for layer in layers}
        missing = [layer for layer in layers if found[layer] is None]
        if missing:
            states = torch.stack([self._head_state(layer) for layer in missing])  # (M, B, d)
            logits = self._evaluate(states, ids, count_for, len(missing))  # (M, B, k)
            if len(missing) == len(layers):
                for layer, row in zip(missing, logits):
                    self._remember(layer, ids, row)
                return logits
            for layer, row in zip(missing, logits):
                found[layer] = row
                self._remember(layer, ids, row)
        return torch.stack([found[layer] for layer in layers])

    def _memoised(self, layer: int, ids: torch.Tensor | None) -> torch.Tensor | None:
        """This step's head of ``layer`` over ``ids`` if already known (a subset of a known full head costs
        nothing but the gather), else None."""
        known = self._memo.get((layer, None if ids is None else id(ids)))
        if known is not None:
            return known[1]
        full = self._memo.get((layer, None))
        if full is None:
            return None
        logits = full[1].gather(-1, ids)
        self._remember(layer, ids, logits)
        return logits

    def _remember(self, layer: int, ids: torch.Tensor | None, logits: torch.Tensor) -> None:
        self._memo[(layer, None if ids is None else id(ids))] = (ids, logits)

    def _evaluate(self, states: torch.Tensor, ids: torch.Tensor | None, count_for: torch.Tensor | None,
                  layers: int) -> torch.Tensor:
        """The head on states (..., B, d) holding ``layers`` layers' states; charges their head rows."""
        if ids is not None and ids is not self._weights_ids:
            self._weights_ids, self._weights = ids, self.backend.head_weights(ids)
        logits = self.backend.head(states, ids, self._weights if ids is not None else None)
        if count_for is not None:
            self.count(count_for, logits.shape[-1] * layers)
        return logits

    def _head_state(self, layer: int) -> torch.Tensor:
        """(B, d) the state the exit head of ``layer`` reads: h_ℓ, or its exit adapter's map of it."""
        hidden = self.hiddens[layer]
        if self.exit_adapters is not None and layer < self.backend.num_layers:
            # exit adapters map h_ℓ towards the final hidden state before the model's own head; the
            # last layer never goes through one, so the full model's predictions are unchanged. Each
            # layer's map runs once per step, however many vocabulary sets read its head.
            if layer not in self._adapted:
                self._adapted[layer] = self.exit_adapters.apply(layer, hidden)
            hidden = self._adapted[layer]
        return hidden

    def head_input(self, layer: int) -> torch.Tensor:
        """(B, d) what the LM head multiplies at ``layer`` (the final norm of the head's state)."""
        return self.backend.head_input(self._head_state(layer))

    def count(self, rows: torch.Tensor, width: int) -> None:
        """Charge ``width`` head rows to every row where ``rows`` (B,) bool is true."""
        self.head_rows += rows.to(self.head_rows.dtype) * width


@dataclass
class LayerDecision:
    """The exit head's verdict at one consulted layer, for every row of the batch.

    confidence (B,), predicted (B,) token ids, set_ids (B, k) the rows' vocabulary set (None: full), and
    exit_head_rows: head rows charged only to rows that exit here (a scorer that does not read the head
    needs it only for the emitted token; 0 when the head was charged to every consulting row).
    """

    confidence: torch.Tensor
    predicted: torch.Tensor
    set_ids: torch.Tensor | None
    exit_head_rows: int


@dataclass
class RowRecord:
    """One row's decoded tokens so far, with each token's exit layer, confidence and head rows."""

    token_ids: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    head_rows: list[int] = field(default_factory=list)

    def append(self, token: int, exit_layer: int, confidence: float, head_rows: int) -> None:
        self.token_ids.append(int(token))
        self.exit_layers.append(int(exit_layer))
        self.confidences.append(float(confidence))
        self.head_rows.append(int(head_rows))

    def is_finished(self, eos: set[int], max_new_tokens: int) -> bool:
        """Whether the row stops here: its last token is a stop id, or it holds the whole budget."""
        return bool(self.token_ids) and (self.token_ids[-1] in eos or len(self.token_ids) >= max_new_tokens)


# ---- the rule, one tensor operation each (shared by the eager and the fused/compiled decisions) ---------
def is_consulted(layer: int, min_exit_layer: int, num_layers: int) -> bool:
    """Whether layer ℓ (1..L) consults an exit head: j <= ℓ < L (the last layer is the full model's)."""
    return min_exit_layer <= layer < num_layers


def head_at_every_consult(scorer: ConfidenceScorer, pruning: VocabPruning) -> bool:
    """Whether every consulted layer evaluates the exit head: a scorer that does not read the head
    (hidden-cosine) without pruning needs it only for rows that exit."""
    return scorer.needs_logits or not isinstance(pruning, NoPruning)


def exits_at(confidence: torch.Tensor, thresholds: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the eligible rows whose confidence clears λ_t (an infinite λ_t is never cleared)."""
    return eligible & (confidence >= thresholds)


def predicted_tokens(logits: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """(B,) token ids of the best logit: logits (B, k) over vocabulary set ids (B, k), or (B, V) when None."""
    best = logits.argmax(dim=-1)
    return best if ids is None else ids.gather(-1, best[:, None]).squeeze(-1)


def apply_exits(
    exits: torch.Tensor,
    layer: int | torch.Tensor,
    predicted: torch.Tensor,
    confidence: torch.Tensor,
    tokens: torch.Tensor,
    exit_layers: torch.Tensor,
    confidences: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The row state after the rows where ``exits`` (B,) leave at ``layer`` (an int or a 0-d long tensor):
    new (tokens, exit_layers, confidences), each (B,)."""
    if not isinstance(layer, torch.Tensor):
        layer = torch.full_like(exit_layers, layer)
    return (
        torch.where(exits, predicted, tokens),
        torch.where(exits, layer, exit_layers),
        torch.where(exits, confidence.to(confidences.dtype), confidences),
    )


def keep_exited_state(undecided: torch.Tensor, output: torch.Tensor, hidden: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """State propagation: the state after a layer is its output for undecided rows (B,) and the copied
    h_ℓ of the rows that already exited. output, hidden: (B, 1, d)."""
    if out is None:
        return torch.where(undecided[:, None, None], output, hidden)
    return torch.where(undecided[:, None, None], output, hidden, out=out)


# ---- one consulted layer, eager --------------------------------------------------------------------------
def exit_decision(
    decoder: ExitSettings,
    layer: int,
    heads: StepHeads,
    consulting: torch.Tensor,
    set_ids: torch.Tensor | None,
) -> LayerDecision:
    """Confidence and prediction at consulted layer ``layer`` for every row; head rows are charged to the
    rows where ``consulting`` (B,) is true (other rows' results are ignored by the caller), except the head
    a scorer that does not read it needs only where a row exits (``exit_head_rows``)."""
    head_always = head_at_every_consult(decoder.scorer, decoder.pruning)
    pruned = select_pruned(
        decoder.pruning,
        layer,
        min_exit_layer=decoder.min_exit_layer,
        num_layers=decoder.num_layers,
        prev_ids=set_ids,
        head=lambda ids: heads(layer, ids, consulting if head_always else None),
        head_input=lambda: heads.head_input(layer),
    )
    view = ExitView(
        layer=layer,
        logits=pruned.logits,
        hidden=heads.hiddens[layer],
        hidden_prev=heads.hiddens[layer - 1],
        logits_at=lambda amateur: heads(amateur, pruned.ids, consulting),
        logits_for=lambda amateurs: heads.many(amateurs, pruned.ids, consulting),
    )
    confidence = decoder.scorer.score(view)
    predicted = predicted_tokens(pruned.logits, pruned.ids)
    return LayerDecision(confidence, predicted, pruned.ids, 0 if head_always else pruned.logits.shape[-1])


def consult(
    decoder: ExitSettings,
    layer: int,
    heads: StepHeads,
    undecided: torch.Tensor,
    thresholds: torch.Tensor,
    set_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Exit decision at consulted layer ``layer`` for the rows where ``undecided`` (B,) is true
    (still going up, and with a finite threshold); other rows' results are ignored by the caller.

    Returns exits (B,) bool, predicted token (B,), confidence (B,), the rows' vocabulary set (B, k) or None.
    """
    decision = exit_decision(decoder, layer, heads, undecided, set_ids)
    exits = exits_at(decision.confidence, thresholds, undecided)
    if decision.exit_head_rows:
        heads.count(exits, decision.exit_head_rows)
    return exits, decision.predicted, decision.confidence, decision.set_ids


def final_head(backend: ExitBackend, hidden_last: torch.Tensor, undecided: torch.Tensor, tokens: torch.Tensor,
               head_rows: torch.Tensor, *, only_undecided_rows: bool) -> torch.Tensor:
    """The last layer always uses the full vocabulary: tokens (B,) with the undecided rows' argmax of the
    full head on hidden_last (B, d); V head rows charged to each undecided row (``head_rows`` in place).

    only_undecided_rows: evaluate the head on those rows only (the eager path, once some rows exited)
    rather than on every row (static shapes: the fast path, and any batch where no row exited)."""
    if only_undecided_rows:
        rows = undecided.nonzero()[:, 0]
        logits = backend.head(hidden_last[rows], None)
        tokens = tokens.index_put((rows,), logits.argmax(dim=-1))
    else:
        logits = backend.head(hidden_last, None)
        tokens = torch.where(undecided, logits.argmax(dim=-1), tokens)
    head_rows.add_(undecided.to(head_rows.dtype) * logits.shape[-1])
    return tokens


# ---- one generated position, eager ------------------------------------------------------------------------
def decode_position(
    decoder: ExitSettings,
    state: Any,
    inputs: torch.Tensor,
    thresholds: torch.Tensor,
    *,
    consult_thresholds: torch.Tensor | None = None,
    trace: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One new token for every row of the batch: one pass of every row up the decoder.

    inputs:             (B,) token ids fed at this position
    thresholds:         (B,) λ_t (compute dtype); a row exits at the first consulted layer whose
                        confidence clears it (+inf: never)
    consult_thresholds: (B,) λ_t up to which a row consults the exit heads (default: ``thresholds``;
                        never above them). A row that clears its consult threshold but not its exit
                        threshold stops consulting and runs on to layer L — a shared row of the sweep
                        (``ltt_exit.decode.grid``) holding the full model beside candidates that exit.
    trace:              optional recorder (``ltt_exit.decode.grid.StepTrace``): gets ``hiddens`` (the
                        list of (B, d) states after each layer, filled as the step goes up) and one
                        ``consulted(...)`` call per consulted layer.

    Rows exit independently; exit decisions are tensor operations (one host read per consulted layer,
    to learn whether every row has exited). A row that exited at ℓ keeps a frozen copy of h_ℓ, and each
    higher layer puts its own K/V projections of the copied state in the cache. With
    ``decoder.frozen_rows_skip_feed_forward`` layers compute outputs only for the rows still going up;
    with ``decoder.kv_only_when_all_exited`` a batch whose rows all exited runs only the K/V projections
    of the remaining layers.

    Returns tokens (B,), exit layers (B,) in [j, L], confidences (B,) (NaN where the row reached L),
    and exit-head rows computed per row (B,).
    """
    backend, num_layers, min_exit = decoder.backend, decoder.num_layers, decoder.min_exit_layer
    batch, device = inputs.shape[0], inputs.device
    if consult_thresholds is None:
        consult_thresholds = thresholds
    hidden = backend.begin_step(state, inputs)  # (B, 1, d) = h_0
    hiddens = [hidden[:, 0]]
    if trace is not None:
        trace.hiddens = hiddens
    undecided = torch.ones(batch, dtype=torch.bool, device=device)
    tokens = torch.zeros(batch, dtype=torch.long, device=device)
    exit_layers = torch.full((batch,), num_layers, dtype=torch.long, device=device)
    confidences = torch.full((batch,), math.nan, dtype=decoder.compute_dtype, device=device)
    head_rows = torch.zeros(batch, dtype=torch.long, device=device)
    heads = StepHeads(backend, hiddens, head_rows, decoder.exit_adapters)
    # rows with λ >= 1 (threshold inf) can never exit: their exit heads are neither computed nor charged
    consulting = torch.isfinite(consult_thresholds)
    consult_any = bool(consulting.any())
    all_undecided = True
    running_rows = None  # rows whose layer outputs are needed (None: all)
    set_ids = None
    everyone_exited = False
    for index in range(num_layers):
        layer = index + 1
        if everyone_exited:
            if decoder.kv_only_when_all_exited:
                backend.propagate_kv(state, index, hidden)
            else:
                backend.run_layer(state, index, hidden)  # same K/V; output discarded
            continue
        output = backend.run_layer(state, index, hidden, running_rows)
        hidden = keep_exited_state(undecided, output, hidden)
        hiddens.append(hidden[:, 0])
        if consult_any and is_consulted(layer, min_exit, num_layers):
            decision = exit_decision(decoder, layer, heads, consulting, set_ids)
            set_ids, confidence = decision.set_ids, decision.confidence
            passed = exits_at(confidence, consult_thresholds, consulting)
            exits = passed if consult_thresholds is thresholds else exits_at(confidence, thresholds, passed)
            if trace is not None:
                trace.consulted(layer, consulting, confidence, decision.predicted, head_rows,
                                decision.exit_head_rows)
            if decision.exit_head_rows:
                heads.count(exits, decision.exit_head_rows)
            tokens, exit_layers, confidences = apply_exits(exits, layer, decision.predicted, confidence,
                                                           tokens, exit_layers, confidences)
            undecided = undecided & ~exits
            consulting = consulting & ~passed
            # one host read per consulted layer
            flags = torch.stack((undecided.any(), undecided.all(), consulting.any())).tolist()
            everyone_exited, all_undecided, consult_any = not flags[0], flags[1], flags[2]
            if not all_undecided and decoder.frozen_rows_skip_feed_forward:
                running_rows = undecided.nonzero()[:, 0]
    if not everyone_exited:
        tokens = final_head(backend, hiddens[num_layers], undecided, tokens, head_rows,
                            only_undecided_rows=not all_undecided)
    backend.end_step(state)
    return tokens, exit_layers, confidences, head_rows


# ---- records and the cost account ---------------------------------------------------------------------------
def record_prefill_tokens(records: list[RowRecord], tokens: list[int], num_layers: int, vocab_size: int) -> None:
    """Token 0 of a decoder-only model comes from the prompt prefill, which ran every layer: the full
    model's token, exit layer L, no confidence, the full head."""
    for record, token in zip(records, tokens):
        record.append(token, num_layers, math.nan, vocab_size)


def adapter_flops(decoder: ExitSettings, exit_layer: int) -> float:
    """FLOPs of the exit adapters for one token that consulted layers j..min(exit_layer, L-1): each
    layer whose head the step read (the consulted layers and the layers their scorer reads, e.g. a
    contrastive amateur) runs its map once."""
    flops = getattr(decoder.exit_adapters, "flops", None)
    if flops is None:
        return 0.0
    num_layers = decoder.num_layers
    if head_at_every_consult(decoder.scorer, decoder.pruning):
        consulted = range(decoder.min_exit_layer, min(exit_layer, num_layers - 1) + 1)
    else:  # a scorer that does not read the head evaluates it only where the token exits
        consulted = range(exit_layer, exit_layer + 1) if exit_layer < num_layers else range(0)
    read = set(consulted).union(*(decoder.scorer.other_head_layers(layer) for layer in consulted))
    return float(sum(flops(layer) for layer in read if 0 < layer < num_layers))


def finish_sequence(decoder: ExitSettings, record: RowRecord, prompt_length: int, threshold: float) -> DecodedSequence:
    """The :class:`DecodedSequence` of a decoded row, with its cost account (FLOPs per token: the layers
    run, the K/V projections of the skipped layers, the exit heads computed, the adapters)."""
    backend, num_layers = decoder.backend, decoder.num_layers
    cost = CostAccount(prefill_flops=backend.prefill_flops(prompt_length))
    kv = backend.kv_flops()
    full_head = backend.head_flops(backend.vocab_size)
    # λ >= 1 never consults an exit head; the adapters' cost depends only on the exit layer
    consults = threshold < 1.0 and decoder.min_exit_layer < num_layers
    adapter_cost = {layer: adapter_flops(decoder, layer) for layer in set(record.exit_layers)} \
        if consults else {}
    # a pruning's own work at the first consulted layer (the low-rank ranking of the shortlist), once per
    # generated token that consulted it (every token but a decoder-only model's first, from the prompt)
    shortlist_cost = decoder.pruning.extra_flops_per_token() if consults else 0.0
    for t, (layer, rows) in enumerate(zip(record.exit_layers, record.head_rows)):
        from_prompt = backend.first_token_from_prompt and t == 0
        if adapter_cost and not from_prompt:
            cost.adapter_flops += adapter_cost[layer]
        if not from_prompt:
            cost.shortlist_flops += shortlist_cost
        if backend.first_token_from_prompt:
            context, source = prompt_length + t, 0  # token t comes from the pass of position P-1+t
        else:
            context, source = t + 1, prompt_length
        per_layer = backend.layer_flops(context, source)
        cost.tokens += 1
        cost.layers_run += layer
        cost.head_rows += rows
        cost.kv_propagations += num_layers - layer
        cost.flops += layer * per_layer + (num_layers - layer) * kv + backend.head_flops(rows)
        cost.full_flops += num_layers * per_layer + full_head
    cost.flops += cost.adapter_flops + cost.shortlist_flops
    text = ""
    if decoder.tokenizer is not None:
        text = decoder.tokenizer.decode(record.token_ids, skip_special_tokens=True)
    return DecodedSequence(
        token_ids=record.token_ids,
        text=text,
        exit_layers=record.exit_layers,
        confidences=record.confidences,
        cost=cost,
        threshold=threshold,
        num_layers=num_layers,
    )
