"""EarlyExitDecoder: greedy decoding where each generated token leaves the decoder at the first layer
ℓ >= min_exit_layer whose confidence clears the per-token threshold λ_t.

The per-token work is :meth:`EarlyExitDecoder._decode_position`: one pass of every row of the batch
up the decoder. Rows exit independently; exit decisions are tensor operations (one host read per
consulted layer, to learn whether every row has exited). A row that exited at ℓ keeps a frozen copy of
h_ℓ, and each higher layer puts its own K/V projections of the copied state in the cache (CALM's state
propagation). Decoder-only layers compute only those projections for exited rows, and attention and
feed-forward only for the rows still going up; T5 layers run attention on every row and the
feed-forward block only on the rows going up. Once every row of the batch has exited, the remaining
layers only compute the K/V projections.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ltt_exit.validation import check_attention_mask, check_eos_token_ids, check_token_id_rows, check_token_id_tensor

from .backends import ExitBackend, PromptBatch, backend_for
from .outputs import CostAccount, DecodedSequence
from .pruning import NoPruning, VocabPruning, resolve_pruning
from .schedule import ThresholdSchedule, check_thresholds
from .scorers import ConfidenceScorer, ExitView, resolve_scorer

__all__ = ["EarlyExitDecoder", "CONFIG_SCHEMA_VERSION"]

#: version of the :meth:`EarlyExitDecoder.config_dict` layout
CONFIG_SCHEMA_VERSION = 1

EXIT_RULE = "exit at the first layer l in [min_exit_layer, L-1] with confidence >= lambda_t; lambda >= 1 never exits"
THRESHOLD_SCHEDULE = "lambda_t = 0.9*lambda + 0.1*lambda*exp(-tau*t/N); t = 0-based token index, N = max_new_tokens"


def _resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_budget(max_new_tokens: Any) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")


class _StepHeads:
    """Exit-head evaluations of one decoding step, memoised per (layer, vocabulary set) and counted per row.

    hiddens[a]: (B, d) state after layer a (a = 0: the input embedding). head_rows: (B,) long counter.
    """

    def __init__(self, backend: ExitBackend, hiddens: list[torch.Tensor], head_rows: torch.Tensor,
                 exit_adapters: Any = None):
        self.backend = backend
        self.hiddens = hiddens
        self.head_rows = head_rows
        self.exit_adapters = exit_adapters
        self._memo: list[tuple[int, torch.Tensor | None, torch.Tensor]] = []
        self._adapted: dict[int, torch.Tensor] = {}  # layer -> adapted state (B, d) of this step
        # LM-head rows of the last vocabulary set asked for: a fixed set (and the amateurs' heads) is
        # evaluated at many layers of a step, gathered once
        self._weights_ids: torch.Tensor | None = None
        self._weights = None

    def __call__(self, layer: int, ids: torch.Tensor | None, count_for: torch.Tensor | None) -> torch.Tensor:
        full = None
        for memo_layer, memo_ids, logits in self._memo:
            if memo_layer == layer and memo_ids is ids:
                return logits
            if memo_layer == layer and memo_ids is None:
                full = logits
        if full is not None:  # this layer's full head is known: a subset costs nothing
            logits = full.gather(-1, ids)
            self._memo.append((layer, ids, logits))
            return logits
        hidden = self.hiddens[layer]
        if self.exit_adapters is not None and layer < self.backend.num_layers:
            # exit adapters map h_ℓ towards the final hidden state before the model's own head; the
            # last layer never goes through one, so the full model's predictions are unchanged. Each
            # layer's map runs once per step, however many vocabulary sets read its head.
            if layer not in self._adapted:
                self._adapted[layer] = self.exit_adapters.apply(layer, hidden)
            hidden = self._adapted[layer]
        if ids is not None and ids is not self._weights_ids:
            self._weights_ids, self._weights = ids, self.backend.head_weights(ids)
        logits = self.backend.head(hidden, ids, self._weights if ids is not None else None)
        if count_for is not None:
            self.count(count_for, logits.shape[-1])
        self._memo.append((layer, ids, logits))
        return logits

    def count(self, rows: torch.Tensor, width: int) -> None:
        """Charge ``width`` head rows to every row where ``rows`` (B,) bool is true."""
        self.head_rows += rows.to(self.head_rows.dtype) * width


@dataclass
class _LayerDecision:
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
class _RowRecord:
    token_ids: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    head_rows: list[int] = field(default_factory=list)


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


class EarlyExitDecoder:
    """Greedy early-exit decoding of a Hugging Face model, wrapping the library's own modules.

    model:          ``T5ForConditionalGeneration`` (T5 backend) or ``LlamaForCausalLM`` /
                    ``Qwen2ForCausalLM`` / ``MistralForCausalLM`` (decoder-only backend)
    tokenizer:      needed only to pass prompts as strings and to fill ``DecodedSequence.text``
    scorer:         name in ``SCORERS``, an instance, or ``(name, kwargs)``
    pruning:        name in ``PRUNINGS``, an instance, or ``(name, kwargs)``
    min_exit_layer: j in [1, L], the first layer whose exit head is consulted (j = L: no early exit)
    tau:            decay τ >= 0 of the per-token threshold (0: constant λ)
    device:         None keeps the model where it is; a device (or "auto": CUDA when present) moves it

    The model is put in eval mode.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any = None,
        *,
        scorer: str | ConfidenceScorer | tuple[str, dict[str, Any]] = "softmax-margin",
        pruning: str | VocabPruning | tuple[str, dict[str, Any]] = "none",
        min_exit_layer: int = 1,
        tau: float = 0.0,
        device: str | torch.device | None = None,
        exit_adapters: Any = None,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a transformers model (torch.nn.Module), got {type(model).__name__}")
        self.backend = backend_for(model)
        if device is not None:
            model.to(_resolve_device(device))
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        if isinstance(min_exit_layer, bool) or not isinstance(min_exit_layer, int):
            raise TypeError(f"min_exit_layer must be an int, got {min_exit_layer!r}")
        if not 1 <= min_exit_layer <= self.num_layers:
            raise ValueError(
                f"min_exit_layer must be in [1, {self.num_layers}] for this {self.num_layers}-layer decoder, "
                f"got {min_exit_layer}"
            )
        self.min_exit_layer = min_exit_layer
        self.scorer = resolve_scorer(scorer)
        self.scorer.validate(self.num_layers, min_exit_layer)
        self.pruning = resolve_pruning(pruning)
        self.pruning.validate(self.backend.vocab_size, self.num_layers, min_exit_layer)
        self.schedule = ThresholdSchedule(tau)
        #: optional per-layer maps applied to h_ℓ before the exit head (ltt_exit.decode.adapters);
        #: an object with ``apply(layer, hidden (B, d)) -> (B, d)`` and ``describe() -> dict``
        self.exit_adapters = exit_adapters
        bind = getattr(self.scorer, "bind_exit_adapters", None)
        if bind is not None:  # a scorer whose fitted parameters live in the adapter file (exit-classifier)
            self.scorer = bind(exit_adapters)
            self.scorer.validate(self.num_layers, min_exit_layer)
        #: once every row of a batch has exited, compute only the K/V projections of the remaining layers
        #: (False: run the full layers and discard their outputs; same results, used by the tests)
        self.kv_only_when_all_exited = True
        #: while some rows of a batch have exited and others not, the layers' outputs are computed only for
        #: the undecided rows; exited rows get their K/V (decoder-only: only the K/V projections; T5: the
        #: attention block) (False: full layers for every row; same results up to float rounding, used by
        #: the tests)
        self.frozen_rows_skip_feed_forward = True
        #: what the last ``generate_grid`` call shared (``ltt_exit.decode.grid.GridStats``); None before one
        self.last_grid_stats = None

    # ---- description ------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """L, the number of decoder layers."""
        return self.backend.num_layers

    @property
    def tau(self) -> float:
        return self.schedule.tau

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype of confidences and thresholds: the model dtype, half precisions promoted to float32."""
        return torch.promote_types(self.backend.dtype, torch.float32)

    def config_dict(self) -> dict[str, Any]:
        """JSON-able description of everything that changes this decoder's outputs (besides the weights,
        the tokenizer and ``max_new_tokens``, which a certificate records separately)."""
        return {
            "schema_version": CONFIG_SCHEMA_VERSION,
            **self.backend.describe(),
            "num_layers": self.num_layers,
            "vocab_size": self.backend.vocab_size,
            "scorer": {"name": self.scorer.name, "params": self.scorer.params()},
            "pruning": {"name": self.pruning.name, "params": self.pruning.params()},
            "min_exit_layer": self.min_exit_layer,
            "tau": self.tau,
            "exit_rule": EXIT_RULE,
            "threshold_schedule": THRESHOLD_SCHEDULE,
            "state_propagation": "copied hidden state; each skipped layer's own K/V projections (K rotated for RoPE)",
            "final_layer_vocabulary": "full",
            "exit_adapters": None if self.exit_adapters is None else self.exit_adapters.describe(),
            "decoding": "greedy",
        }

    def __repr__(self) -> str:
        return (
            f"EarlyExitDecoder(backend={self.backend.family!r}, num_layers={self.num_layers}, scorer={self.scorer!r}, "
            f"pruning={self.pruning!r}, min_exit_layer={self.min_exit_layer}, tau={self.tau})"
        )

    @staticmethod
    def mean_layers(sequences: Sequence[DecodedSequence]) -> float:
        """Average exit layer over all tokens of ``sequences`` (NaN when there are none)."""
        tokens = sum(s.cost.tokens for s in sequences)
        return sum(s.cost.layers_run for s in sequences) / tokens if tokens else float("nan")

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
    ) -> list[DecodedSequence]:
        """Decode every row greedily with early exit; one :class:`DecodedSequence` per row.

        prompts:        strings, tokenized by the decoder's tokenizer (T5: right padding;
                        decoder-only: left padding); or
        input_ids:      (B, P) tensor (with ``attention_mask``; decoder-only rows left-padded) or a list
                        of token-id lists (padded here)
        threshold:      λ for every row, or one λ per row (rows of a batch may differ); λ >= 1: full model
        max_new_tokens: N, the token budget (also the N of the threshold decay)
        eos_token_id:   stop ids (default: the model's generation config); [] never stops early
        """
        _check_budget(max_new_tokens)
        prompt = self._prepare_prompt(prompts, input_ids, attention_mask)
        batch_size = prompt.input_ids.shape[0]
        thresholds = check_thresholds(threshold, batch_size)
        eos = self._eos_ids(eos_token_id)
        records = self._decode(prompt, thresholds, max_new_tokens, eos)
        return [self._finish(record, prompt.lengths[row], thresholds[row]) for row, record in enumerate(records)]

    @torch.inference_mode()
    def generate_grid(
        self,
        prompts: Sequence[str] | None = None,
        *,
        input_ids: torch.Tensor | Sequence[Sequence[int]] | None = None,
        attention_mask: torch.Tensor | None = None,
        lambdas: Sequence[float],
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None = None,
    ) -> tuple[list[DecodedSequence], list[list[DecodedSequence]]]:
        """The threshold sweep's decoding: for every prompt the full model and each candidate λ of ``lambdas``.

        Returns ``(full, early)``: ``full[i]`` is prompt i's full-model sequence (threshold +inf) and
        ``early[i][j]`` its sequence at ``lambdas[j]`` — each what ``generate([prompt i], threshold=λ)`` gives
        (tokens, exit layers, confidences, cost account). Candidates whose histories agree share one batch
        row (``ltt_exit.decode.grid``); ``self.last_grid_stats`` (a ``GridStats``) says how many rows each
        step decoded. Prompt arguments, ``max_new_tokens`` and ``eos_token_id`` are as for :meth:`generate`.
        """
        from .grid import decode_grid

        _check_budget(max_new_tokens)
        prompt = self._prepare_prompt(prompts, input_ids, attention_mask)
        full, early, stats = decode_grid(self, prompt, lambdas, max_new_tokens, self._eos_ids(eos_token_id))
        self.last_grid_stats = stats
        return full, early

    def _eos_ids(self, eos_token_id: int | Sequence[int] | None) -> set[int]:
        eos = check_eos_token_ids(eos_token_id)
        return set(self.backend.default_eos_token_ids()) if eos is None else eos

    def _prepare_prompt(self, prompts, input_ids, attention_mask) -> PromptBatch:
        if (prompts is None) == (input_ids is None):
            raise ValueError("give exactly one of prompts (strings) or input_ids")
        device = self.backend.device
        if prompts is not None:
            if isinstance(prompts, str):
                prompts = [prompts]
            if self.tokenizer is None:
                raise ValueError("prompts given as strings need a tokenizer; pass tokenizer=... or input_ids=...")
            if attention_mask is not None:
                raise ValueError("attention_mask goes with input_ids, not with string prompts")
            rows = [list(self.tokenizer(str(p), add_special_tokens=True)["input_ids"]) for p in prompts]
            ids, mask = self._pad(rows)
        elif isinstance(input_ids, torch.Tensor):
            ids = check_token_id_tensor(input_ids)
            if ids.ndim == 1:
                ids = ids.unsqueeze(0)
            if ids.ndim != 2:
                raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
            if attention_mask is None:
                mask = torch.ones_like(ids)
            else:
                mask = check_attention_mask(attention_mask)
                mask = mask if mask.ndim == 2 else mask.unsqueeze(0)
                if mask.shape != ids.shape:
                    raise ValueError(
                        f"attention_mask shape {tuple(attention_mask.shape)} does not match "
                        f"input_ids {tuple(ids.shape)}"
                    )
        else:
            if attention_mask is not None:
                raise ValueError("attention_mask goes with an input_ids tensor; token-id lists are padded here")
            rows = check_token_id_rows(input_ids)
            ids, mask = self._pad(rows)
        if ids.shape[0] == 0:
            raise ValueError("nothing to decode: the batch is empty")
        ids = ids.to(device=device, dtype=torch.long)
        mask = mask.to(device=device, dtype=torch.long)
        if bool((mask.sum(dim=-1) == 0).any()):
            raise ValueError("every prompt needs at least one real (unmasked) token")
        if bool(((ids < 0) | (ids >= self.backend.vocab_size))[mask.bool()].any()):
            raise ValueError(f"input_ids contain ids outside the vocabulary [0, {self.backend.vocab_size})")
        self.backend.check_prompt(ids, mask)
        return PromptBatch(ids, mask)

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_token_rows(rows, self.tokenizer, self.backend)

    def _decode(
        self, prompt: PromptBatch, thresholds: list[float], max_new_tokens: int, eos: set[int]
    ) -> list[_RowRecord]:
        backend = self.backend
        device = backend.device
        records = [_RowRecord() for _ in thresholds]
        rows = list(range(len(thresholds)))  # original row index of each row still in the batch
        state = backend.start(prompt)

        def record(step_tokens, step_exits, step_confidences, step_head_rows) -> torch.Tensor | None:
            """Append one token per batch row; drop finished rows. Returns the kept positions (None: all)."""
            keep = []
            values = zip(step_tokens.tolist(), step_exits.tolist(), step_confidences.tolist(), step_head_rows.tolist())
            for position, (token, layer, confidence, head_rows) in enumerate(values):
                rec = records[rows[position]]
                rec.token_ids.append(int(token))
                rec.exit_layers.append(int(layer))
                rec.confidences.append(float(confidence))
                rec.head_rows.append(int(head_rows))
                if token not in eos and len(rec.token_ids) < max_new_tokens:
                    keep.append(position)
            if len(keep) == len(rows):
                return None
            rows[:] = [rows[p] for p in keep]
            return torch.tensor(keep, dtype=torch.long, device=device)

        if backend.first_token_from_prompt:
            # the prefill ran every layer for the prompt; its last position predicts token 0 with the full model
            logits = backend.prompt_logits(state)
            batch = logits.shape[0]
            tokens = logits.argmax(dim=-1)
            keep = record(
                tokens,
                torch.full((batch,), self.num_layers),
                torch.full((batch,), math.nan),
                torch.full((batch,), backend.vocab_size),
            )
            first_step = 1
        else:
            tokens = backend.first_inputs(state)
            keep = None
            first_step = 0

        for step in range(first_step, max_new_tokens):
            if keep is not None:
                if keep.numel() == 0:
                    break
                backend.select_rows(state, keep)
                tokens = tokens[keep]
            step_thresholds = self.schedule.at(
                [thresholds[r] for r in rows], step, max_new_tokens, device=device, dtype=self.compute_dtype
            )
            tokens, exits, confidences, head_rows = self._decode_position(state, tokens, step_thresholds)
            keep = record(tokens, exits, confidences, head_rows)
            if keep is not None and keep.numel() == 0:
                break
        return records

    def _decode_position(
        self,
        state: Any,
        inputs: torch.Tensor,
        thresholds: torch.Tensor,
        *,
        consult_thresholds: torch.Tensor | None = None,
        trace: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One new token for every row of the batch.

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

        Returns tokens (B,), exit layers (B,) in [j, L], confidences (B,) (NaN where the row reached L),
        and exit-head rows computed per row (B,).
        """
        backend, num_layers, min_exit = self.backend, self.num_layers, self.min_exit_layer
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
        confidences = torch.full((batch,), math.nan, dtype=self.compute_dtype, device=device)
        head_rows = torch.zeros(batch, dtype=torch.long, device=device)
        heads = _StepHeads(backend, hiddens, head_rows, self.exit_adapters)
        # rows with λ >= 1 (threshold inf) can never exit: their exit heads are neither computed nor charged
        consulting = torch.isfinite(consult_thresholds)
        consult = bool(consulting.any())
        all_undecided = True
        running_rows = None  # rows whose layer outputs are needed (None: all)
        set_ids = None
        everyone_exited = False
        for index in range(num_layers):
            layer = index + 1
            if everyone_exited:
                if self.kv_only_when_all_exited:
                    backend.propagate_kv(state, index, hidden)
                else:
                    backend.run_layer(state, index, hidden)  # same K/V; output discarded
                continue
            output = backend.run_layer(state, index, hidden, running_rows)
            hidden = torch.where(undecided[:, None, None], output, hidden)  # exited rows keep their copied h_ℓ
            hiddens.append(hidden[:, 0])
            if consult and min_exit <= layer < num_layers:
                decision = self._exit_decision(layer, heads, consulting, set_ids)
                set_ids, confidence = decision.set_ids, decision.confidence
                passed = consulting & (confidence >= consult_thresholds)
                exits = passed if consult_thresholds is thresholds else passed & (confidence >= thresholds)
                if trace is not None:
                    trace.consulted(layer, consulting, confidence, decision.predicted, head_rows,
                                    decision.exit_head_rows)
                if decision.exit_head_rows:
                    heads.count(exits, decision.exit_head_rows)
                tokens = torch.where(exits, decision.predicted, tokens)
                exit_layers = torch.where(exits, torch.full_like(exit_layers, layer), exit_layers)
                confidences = torch.where(exits, confidence.to(confidences.dtype), confidences)
                undecided = undecided & ~exits
                consulting = consulting & ~passed
                # one host read per consulted layer
                flags = torch.stack((undecided.any(), undecided.all(), consulting.any())).tolist()
                everyone_exited, all_undecided, consult = not flags[0], flags[1], flags[2]
                if not all_undecided and self.frozen_rows_skip_feed_forward:
                    running_rows = undecided.nonzero()[:, 0]
        if not everyone_exited:
            # the last layer always uses the full vocabulary; computed only for the rows that reached it
            if all_undecided:
                tokens = heads(num_layers, None, undecided).argmax(dim=-1)
            else:
                rows = undecided.nonzero()[:, 0]
                final = backend.head(hiddens[num_layers][rows], None)
                heads.count(undecided, final.shape[-1])
                tokens = tokens.index_put((rows,), final.argmax(dim=-1))
        backend.end_step(state)
        return tokens, exit_layers, confidences, head_rows

    def _exit_decision(
        self,
        layer: int,
        heads: _StepHeads,
        consulting: torch.Tensor,
        set_ids: torch.Tensor | None,
    ) -> _LayerDecision:
        """Confidence and prediction at consulted layer ``layer`` for every row; head rows are charged to
        the rows where ``consulting`` (B,) is true (other rows' results are ignored by the caller), except
        the head a scorer that does not read it needs only where a row exits (``exit_head_rows``)."""
        head_always = self._head_at_every_consult
        pruned = self.pruning.select(
            layer,
            min_exit_layer=self.min_exit_layer,
            num_layers=self.num_layers,
            prev_ids=set_ids,
            head=lambda ids: heads(layer, ids, consulting if head_always else None),
        )
        view = ExitView(
            layer=layer,
            logits=pruned.logits,
            hidden=heads.hiddens[layer],
            hidden_prev=heads.hiddens[layer - 1],
            logits_at=lambda amateur: heads(amateur, pruned.ids, consulting),
        )
        confidence = self.scorer.score(view)
        best = pruned.logits.argmax(dim=-1)
        predicted = best if pruned.ids is None else pruned.ids.gather(-1, best[:, None]).squeeze(-1)
        return _LayerDecision(confidence, predicted, pruned.ids, 0 if head_always else pruned.logits.shape[-1])

    def _consult(
        self,
        layer: int,
        heads: _StepHeads,
        undecided: torch.Tensor,
        thresholds: torch.Tensor,
        set_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Exit decision at consulted layer ``layer`` for the rows where ``undecided`` (B,) is true
        (still going up, and with a finite threshold); other rows' results are ignored by the caller.

        Returns exits (B,) bool, predicted token (B,), confidence (B,), the rows' vocabulary set (B, k) or None.
        """
        decision = self._exit_decision(layer, heads, undecided, set_ids)
        exits = undecided & (decision.confidence >= thresholds)
        if decision.exit_head_rows:
            heads.count(exits, decision.exit_head_rows)
        return exits, decision.predicted, decision.confidence, decision.set_ids

    @property
    def _head_at_every_consult(self) -> bool:
        """Whether every consulted layer evaluates the exit head: a scorer that does not read the head
        (hidden-cosine) without pruning needs it only for rows that exit."""
        return self.scorer.needs_logits or not isinstance(self.pruning, NoPruning)

    def _adapter_flops(self, exit_layer: int) -> float:
        """FLOPs of the exit adapters for one token that consulted layers j..min(exit_layer, L-1): each
        layer whose head the step read (the consulted layers and the layers their scorer reads, e.g. a
        contrastive amateur) runs its map once."""
        flops = getattr(self.exit_adapters, "flops", None)
        if flops is None:
            return 0.0
        if self._head_at_every_consult:
            consulted = range(self.min_exit_layer, min(exit_layer, self.num_layers - 1) + 1)
        else:  # a scorer that does not read the head evaluates it only where the token exits
            consulted = range(exit_layer, exit_layer + 1) if exit_layer < self.num_layers else range(0)
        read = set(consulted).union(*(self.scorer.other_head_layers(layer) for layer in consulted))
        return float(sum(flops(layer) for layer in read if 0 < layer < self.num_layers))

    def _finish(self, record: _RowRecord, prompt_length: int, threshold: float) -> DecodedSequence:
        backend, num_layers = self.backend, self.num_layers
        cost = CostAccount(prefill_flops=backend.prefill_flops(prompt_length))
        kv = backend.kv_flops()
        full_head = backend.head_flops(backend.vocab_size)
        # λ >= 1 never consults an exit head; the adapters' cost depends only on the exit layer
        adapter_flops = {layer: self._adapter_flops(layer) for layer in set(record.exit_layers)} \
            if threshold < 1.0 else {}
        for t, (layer, rows) in enumerate(zip(record.exit_layers, record.head_rows)):
            if adapter_flops and not (backend.first_token_from_prompt and t == 0):
                cost.adapter_flops += adapter_flops[layer]
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
        cost.flops += cost.adapter_flops
        text = ""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(record.token_ids, skip_special_tokens=True)
        return DecodedSequence(
            token_ids=record.token_ids,
            text=text,
            exit_layers=record.exit_layers,
            confidences=record.confidences,
            cost=cost,
            threshold=threshold,
            num_layers=num_layers,
        )
