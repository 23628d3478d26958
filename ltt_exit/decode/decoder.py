"""EarlyExitDecoder: greedy decoding where each generated token leaves the decoder at the first layer
ℓ >= min_exit_layer whose confidence clears the per-token threshold λ_t.

This module owns the public decoder object: its settings and their validation, its description
(``config_dict``, which certificates and loss-table keys record) and the batch loop of ``generate``
(rows leave the batch at EOS or at the budget). The per-position work — exit heads, scorer, pruning,
the threshold test, state propagation, the cost account — is the exit rule in :mod:`.exit_rule`;
prompt preparation is :mod:`.prompts`; the sweep's shared-history decode is :mod:`.grid`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import exit_rule
from .backends import PromptBatch, backend_for
from .backends.slotted_cache import fill_holes
from .exit_rule import EXIT_RULE, STATE_PROPAGATION, THRESHOLD_SCHEDULE, RowRecord
from .grid import decode_grid
from .outputs import DecodedSequence
from .prompts import check_budget, eos_ids, prepare_prompt, resolve_device
from .pruning import VocabPruning, resolve_pruning
from .schedule import ThresholdSchedule, check_thresholds
from .scorers import ConfidenceScorer, resolve_scorer

__all__ = ["EarlyExitDecoder", "CONFIG_SCHEMA_VERSION"]

#: version of the :meth:`EarlyExitDecoder.config_dict` layout
CONFIG_SCHEMA_VERSION = 1


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
            model.to(resolve_device(device))
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
        # what the pruning precomputes from the weights (the shortlist's low-rank head), once per decoder
        self.pruning = self.pruning.bind(self.backend)
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
        #: while some rows of a batch have exited and others not, the feed-forward blocks run only for the
        #: undecided rows; every row runs the attention blocks, which append the exited rows' K/V of their
        #: copied state (False: full layers for every row; same results up to float rounding, used by
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
            "state_propagation": STATE_PROPAGATION,
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
        check_budget(max_new_tokens)
        prompt = prepare_prompt(self.backend, self.tokenizer, prompts, input_ids, attention_mask)
        batch_size = prompt.input_ids.shape[0]
        thresholds = check_thresholds(threshold, batch_size)
        eos = eos_ids(self.backend, eos_token_id)
        records = self._decode(prompt, thresholds, max_new_tokens, eos)
        return [exit_rule.finish_sequence(self, record, prompt.lengths[row], thresholds[row])
                for row, record in enumerate(records)]

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
        check_budget(max_new_tokens)
        prompt = prepare_prompt(self.backend, self.tokenizer, prompts, input_ids, attention_mask)
        full, early, stats = decode_grid(self, prompt, lambdas, max_new_tokens, eos_ids(self.backend, eos_token_id))
        self.last_grid_stats = stats
        return full, early

    def _decode(
        self, prompt: PromptBatch, thresholds: list[float], max_new_tokens: int, eos: set[int]
    ) -> list[RowRecord]:
        """The batch loop: one :func:`exit_rule.decode_position` per generated position; rows that
        finished (EOS or budget) leave the batch."""
        backend = self.backend
        device = backend.device
        records = [RowRecord() for _ in thresholds]
        rows = list(range(len(thresholds)))  # original row index of each row still in the batch
        state = backend.start(prompt)

        def keep_unfinished() -> torch.Tensor | None:
            """Drop the rows that just finished, each hole filled by the batch's last row (rows stay in their
            cache slots). Returns the kept positions (None: all)."""
            keep = fill_holes([None if records[row].is_finished(eos, max_new_tokens) else position
                               for position, row in enumerate(rows)])
            if len(keep) == len(rows):
                return None
            rows[:] = [rows[p] for p in keep]
            return torch.tensor(keep, dtype=torch.long, device=device)

        if backend.first_token_from_prompt:
            # the prefill ran every layer for the prompt; its last position predicts token 0 with the full model
            tokens = backend.prompt_logits(state).argmax(dim=-1)
            exit_rule.record_prefill_tokens(records, tokens.tolist(), self.num_layers, backend.vocab_size)
            keep = keep_unfinished()
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
            tokens, exits, confidences, head_rows = exit_rule.decode_position(self, state, tokens, step_thresholds)
            values = zip(tokens.tolist(), exits.tolist(), confidences.tolist(), head_rows.tolist())
            for row, (token, layer, confidence, rows_charged) in zip(rows, values):
                records[row].append(token, layer, confidence, rows_charged)
            keep = keep_unfinished()
            if keep is not None and keep.numel() == 0:
                break
        return records
