"""The threshold sweep's candidates decoded together: one batch row per group of candidates whose
histories agree (``EarlyExitDecoder.generate_grid``).

The sweep needs, for every calibration prompt, the full model's output and the output at each of K
candidate thresholds. Decoding K + 1 rows per prompt repeats work wherever candidates agree:
candidates of one prompt whose histories (tokens and exit layers so far) are identical have
identical decoder states. Such a group shares one batch row, its *representative*:

* The representative goes up the decoder with the group's largest λ_t, so it exits last and the
  confidence of every consulted layer below any member's exit is computed on exactly that member's
  state. It consults the exit heads until the group's largest *finite* λ_t is cleared; a group that
  also holds λ >= 1 (never exits: the full model) then stops consulting and runs on to layer L.
  Every consulted layer's confidence, prediction and head-row count is recorded (:class:`StepTrace`).
* Each member exits at the first consulted layer whose confidence clears its own λ_t, with that
  layer's prediction (thresholds are compared in the decoder's compute dtype, as ``generate`` does).
* After the step the group splits by exit layer. The subgroup with the highest exit layer keeps the
  representative's row; every other subgroup gets a copy (``backend.select_rows`` with a repeated
  index) whose K/V at this position, in every layer above its exit layer ℓ, are replaced by the
  projections of the frozen h_ℓ (``backend.overwrite_last_kv``) — what state propagation would have
  appended had the subgroup been decoded on its own.
* Subgroups that produced EOS or reached the budget leave the batch, as in ``generate``.

Candidates never merge again once split (their caches differ), so the saving is largest when the
candidates agree for long: high thresholds that rarely exit share the full model's row.

Costs are charged to each candidate exactly as ``generate`` charges the row decoded on its own: the
same exit layers and, per token, the head rows of the consultations up to its exit (the
representative's running count when the member exits, plus the exit-only head of a scorer that does
not read the head), or the full consultation count plus the final head when it reaches layer L
(λ >= 1: the final head only).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
import torch

from .backends import PromptBatch
from .backends.slotted_cache import fill_holes
from . import exit_rule
from .exit_rule import ExitSettings, RowRecord, finish_sequence, record_prefill_tokens
from .outputs import DecodedSequence
from .schedule import check_thresholds

__all__ = ["GridStats", "StepTrace", "decode_grid"]


@dataclass
class GridStats:
    """How much work ``generate_grid`` shared.

    prompts, candidates:     n prompts and K + 1 candidates per prompt (the full model and K thresholds)
    rows_per_step:           batch rows decoded at each step (step 0 of a decoder-only model is the prompt
                             prefill: one row per prompt)
    candidate_rows_per_step: unfinished (prompt, candidate) pairs at each step — the rows the naive sweep
                             (one row per candidate) decodes
    rows_split:              rows created by copying a representative for candidates that exited lower
    """

    prompts: int
    candidates: int
    rows_per_step: list[int] = field(default_factory=list)
    candidate_rows_per_step: list[int] = field(default_factory=list)
    rows_split: int = 0

    @property
    def rows_decoded(self) -> int:
        """Σ over steps of the batch rows decoded."""
        return sum(self.rows_per_step)

    @property
    def candidate_rows(self) -> int:
        """Σ over steps of the rows the naive sweep decodes."""
        return sum(self.candidate_rows_per_step)

    @property
    def sharing(self) -> float:
        """candidate_rows / rows_decoded: how many candidates a decoded row stands for on average."""
        return self.candidate_rows / self.rows_decoded if self.rows_decoded else float("nan")


class StepTrace:
    """What the representative rows saw during one step (filled by ``exit_rule.decode_position``).

    hiddens: list of (B, d) states after each layer run (index 0: the input embedding); a row's entries
    above its exit layer are its frozen copy. Per consulted layer: the layer number, which rows were
    consulting (B,) bool, their confidence (B,), predicted token (B,), head rows charged so far (B,)
    (before any exit-only charge) and the exit-only head rows of that layer (int).
    """

    def __init__(self) -> None:
        self.hiddens: list[torch.Tensor] = []
        self.layers: list[int] = []
        self.consulting: list[torch.Tensor] = []
        self.confidences: list[torch.Tensor] = []
        self.predicted: list[torch.Tensor] = []
        self.head_rows: list[torch.Tensor] = []
        self.exit_head_rows: list[int] = []

    def consulted(
        self,
        layer: int,
        consulting: torch.Tensor,
        confidence: torch.Tensor,
        predicted: torch.Tensor,
        head_rows: torch.Tensor,
        exit_head_rows: int,
    ) -> None:
        self.layers.append(layer)
        self.consulting.append(consulting)
        self.confidences.append(confidence)
        self.predicted.append(predicted)
        self.head_rows.append(head_rows.clone())  # the decoder keeps counting into the same tensor
        self.exit_head_rows.append(exit_head_rows)

    def resolve(
        self,
        group: torch.Tensor,
        thresholds: torch.Tensor,
        row_tokens: torch.Tensor,
        row_head_rows: torch.Tensor,
        num_layers: int,
        vocab_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each member's token, exit layer, confidence and head rows for this step.

        group: (M,) the row of each member; thresholds: (M,) its λ_t (compute dtype, +inf: never exits);
        row_tokens, row_head_rows: (B,) what the step returned for the representative rows (a member that
        reaches layer L shares its representative's final token; a finite-λ member reaching L consulted
        every layer, as its representative did).
        Returns tokens (M,), exit layers (M,), confidences (M,) (NaN at L), head rows (M,).
        """
        finite = torch.isfinite(thresholds)
        full_head = torch.full_like(row_head_rows[group], vocab_size)
        at_last_layer_head = torch.where(finite, row_head_rows[group], full_head)
        members = group.shape[0]
        if not self.layers:
            nan = torch.full((members,), math.nan, dtype=thresholds.dtype, device=thresholds.device)
            return row_tokens[group], torch.full_like(group, num_layers), nan, at_last_layer_head
        device = group.device
        confidences = torch.stack(self.confidences)[:, group]  # (C, M)
        passes = exit_rule.exits_at(confidences, thresholds[None, :], torch.stack(self.consulting)[:, group])
        consulted = len(self.layers)
        order = torch.arange(consulted, device=device)[:, None]
        first = torch.where(passes, order, consulted).amin(dim=0)  # first consulted layer cleared, else C
        exited = first < consulted
        first = first.clamp(max=consulted - 1)
        layers = torch.tensor(self.layers, device=device)
        exit_only = torch.tensor(self.exit_head_rows, device=device)
        member_index = torch.arange(members, device=device)
        tokens = torch.where(exited, torch.stack(self.predicted)[first, group], row_tokens[group])
        exit_layers = torch.where(exited, layers[first], num_layers)
        confidence = torch.where(exited, confidences[first, member_index], math.nan)
        head_rows = torch.where(
            exited, torch.stack(self.head_rows)[first, group] + exit_only[first], at_last_layer_head
        )
        return tokens, exit_layers, confidence, head_rows


@dataclass
class _Group:
    """Candidates of one prompt that share a batch row; ``token`` is the token fed at the next step."""

    prompt: int
    members: list[int]
    token: int = -1


@dataclass
class _Row:
    """A row of the next step's batch: its group, the row of this step it continues (its cache source) and,
    for a subgroup that exited below its representative, that exit layer (its copied K/V are overwritten)."""

    group: _Group
    source: int
    overwrite: int | None


def check_grid(lambdas: Sequence[float]) -> list[float]:
    """The candidate thresholds as floats (>= 0, not NaN, at least one)."""
    if isinstance(lambdas, (str, bytes)):
        raise TypeError(f"lambdas must be a sequence of floats, got {lambdas!r}")
    try:
        values = list(lambdas)
    except TypeError:
        raise TypeError(f"lambdas must be a sequence of floats, got {lambdas!r}") from None
    if not values:
        raise ValueError("lambdas is empty: give at least one candidate threshold")
    return check_thresholds(values, len(values))


def decode_grid(
    decoder: ExitSettings,
    prompt: PromptBatch,
    lambdas: Sequence[float],
    max_new_tokens: int,
    eos: set[int],
) -> tuple[list[DecodedSequence], list[list[DecodedSequence]], GridStats]:
    """Decode the full model and every candidate of ``lambdas`` for each prompt row of ``prompt``.

    Returns (full, early, stats): full[i] is prompt i's full-model sequence (threshold +inf), early[i][j]
    its sequence at lambdas[j]; every sequence (tokens, exit layers, confidences, cost account) is what
    ``decoder.generate`` gives that candidate decoded alone.
    """
    grid = check_grid(lambdas)
    backend = decoder.backend
    device, compute_dtype = backend.device, decoder.compute_dtype
    num_layers, vocab_size = decoder.num_layers, backend.vocab_size
    base = [math.inf, *grid]  # candidate 0 is the full model
    prompts = prompt.input_ids.shape[0]
    records = [[RowRecord() for _ in base] for _ in range(prompts)]
    stats = GridStats(prompts=prompts, candidates=len(base))
    state = backend.start(prompt)
    rows = [_Group(p, list(range(len(base)))) for p in range(prompts)]

    def finished(group: _Group) -> bool:
        """Whether the group's members (one history) stop after the token just recorded."""
        return records[group.prompt][group.members[0]].is_finished(eos, max_new_tokens)

    if backend.first_token_from_prompt:
        # the prefill ran every layer for the prompt; its last position predicts token 0 with the full model
        first = backend.prompt_logits(state).argmax(dim=-1).tolist()
        stats.rows_per_step.append(prompts)
        stats.candidate_rows_per_step.append(prompts * len(base))
        for group in rows:
            group.token = int(first[group.prompt])
            record_prefill_tokens([records[group.prompt][m] for m in group.members],
                                  [group.token] * len(group.members), num_layers, vocab_size)
        kept = [r for r, group in enumerate(rows) if not finished(group)]
        if len(kept) < len(rows):
            rows = [rows[r] for r in kept]
            if rows:
                backend.select_rows(state, torch.tensor(kept, dtype=torch.long, device=device))
        inputs = torch.tensor([group.token for group in rows], dtype=torch.long, device=device)
        first_step = 1
    else:
        inputs = backend.first_inputs(state)
        first_step = 0

    for step in range(first_step, max_new_tokens):
        if not rows:
            break
        member_row = [r for r, group in enumerate(rows) for _ in group.members]
        member_base = [base[m] for group in rows for m in group.members]
        stats.rows_per_step.append(len(rows))
        stats.candidate_rows_per_step.append(len(member_row))
        thresholds = decoder.schedule.at(member_base, step, max_new_tokens, device=device, dtype=compute_dtype)
        group_index = torch.tensor(member_row, dtype=torch.long, device=device)
        exit_thresholds, consult_thresholds = _row_thresholds(group_index, thresholds, len(rows))
        trace = StepTrace()
        row_tokens, _, _, row_head_rows = exit_rule.decode_position(
            decoder, state, inputs, exit_thresholds, consult_thresholds=consult_thresholds, trace=trace
        )
        tokens, exit_layers, confidences, head_rows = trace.resolve(
            group_index, thresholds, row_tokens, row_head_rows, num_layers, vocab_size
        )
        values = torch.stack((tokens, exit_layers, head_rows)).tolist()
        member_confidences = confidences.tolist()

        # record every member; split each group by exit layer. The subgroup that keeps the representative's
        # state stays in its row's slot; the other subgroups are new rows (copies), appended; finished
        # subgroups leave holes, filled from the end of the batch. So the cache copies only the rows that
        # are new or move (``backends.slotted_cache``), not the whole batch.
        kept: list[_Row | None] = [None] * len(rows)
        split: list[_Row] = []
        position = 0
        for r, group in enumerate(rows):
            by_exit: dict[int, _Group] = {}
            for member in group.members:
                token, layer, rows_charged = values[0][position], values[1][position], values[2][position]
                records[group.prompt][member].append(token, layer, member_confidences[position], rows_charged)
                position += 1
                if layer not in by_exit:
                    by_exit[layer] = _Group(group.prompt, [], int(token))
                by_exit[layer].members.append(member)
            top = max(by_exit)  # this subgroup's state is the representative's own
            for layer, subgroup in by_exit.items():
                if finished(subgroup):
                    continue
                if layer == top:
                    kept[r] = _Row(subgroup, r, None)
                else:
                    split.append(_Row(subgroup, r, layer))
        placed = fill_holes([*kept, *split])
        new_rows = [row.group for row in placed]
        sources = [row.source for row in placed]
        overwrites = [(index, row.overwrite, row.source) for index, row in enumerate(placed)
                      if row.overwrite is not None]  # (new row, exit layer, source row)
        stats.rows_split += len(overwrites)
        if not new_rows:
            break
        if sources != list(range(len(rows))):
            backend.select_rows(state, torch.tensor(sources, dtype=torch.long, device=device))
        if overwrites:
            _overwrite_frozen(backend, state, trace.hiddens, overwrites, num_layers, device)
        rows = new_rows
        inputs = torch.tensor([group.token for group in rows], dtype=torch.long, device=device)

    full, early = [], []
    for p in range(prompts):
        length = prompt.lengths[p]
        sequences = [finish_sequence(decoder, records[p][c], length, base[c]) for c in range(len(base))]
        full.append(sequences[0])
        early.append(sequences[1:])
    return full, early, stats


def _row_thresholds(group: torch.Tensor, thresholds: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per representative row: the exit threshold (its members' largest λ_t) and the consult threshold
    (their largest finite λ_t; +inf when every member has λ >= 1, i.e. nothing to consult)."""
    lowest = torch.full((batch,), -math.inf, dtype=thresholds.dtype, device=thresholds.device)
    exit_thresholds = lowest.scatter_reduce(0, group, thresholds, reduce="amax")
    finite = torch.where(torch.isfinite(thresholds), thresholds, -math.inf)
    consult_thresholds = lowest.scatter_reduce(0, group, finite, reduce="amax")
    consult_thresholds = torch.where(consult_thresholds == -math.inf, math.inf, consult_thresholds)
    return exit_thresholds, consult_thresholds


def _overwrite_frozen(backend, state, hiddens, overwrites, num_layers, device) -> None:
    """Give each copied row the K/V its subgroup's frozen state propagates: at every layer index i >= ℓ
    (layers ℓ+1..L), the projections of h_ℓ of its source row.

    overwrites: (new row, exit layer ℓ, source row) triples, new rows indexing the already rebuilt batch.
    """
    overwrites = sorted(overwrites, key=lambda item: item[1])
    rows = torch.tensor([row for row, _, _ in overwrites], dtype=torch.long, device=device)
    frozen = torch.stack([hiddens[layer][source] for _, layer, source in overwrites])[:, None, :]  # (R, 1, d)
    exit_layers = [layer for _, layer, _ in overwrites]
    count = 0
    for index in range(exit_layers[0], num_layers):
        while count < len(exit_layers) and exit_layers[count] <= index:
            count += 1
        backend.overwrite_last_kv(state, index, rows[:count], frozen[:count])
