"""The fast path's fused exit decision: the exit rule of :mod:`.exit_rule` for the built-in scorers and
prunings, written as one function of fixed shapes per layer so that ``torch.compile`` can fuse it and a
CUDA graph can capture it.

:func:`fused_consult` evaluates the head (or the layer's pruned rows), scores it and applies the rule's own
``exits_at`` / ``predicted_tokens`` / ``apply_exits``; :func:`consult_specs` unrolls a built-in pruning into
per-layer widths, and charges head rows as ``exit_rule.head_at_every_consult`` says. Scorers and prunings
outside ``FUSED_SCORERS`` / ``FUSED_PRUNINGS`` (and any exit adapters) take the eager ``exit_rule.consult``.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import exit_rule
from .pruning import DecayingPruning, FixedPruning, NoPruning, VocabPruning, keep_best
from .scorers import ConfidenceScorer, HiddenCosine, SoftmaxMargin, SoftmaxMax

__all__ = ["FUSED_SCORERS", "FUSED_PRUNINGS", "ConsultSpec", "consult_specs", "fused_consult"]

#: scorers and prunings whose exit decision has a fused (compilable) implementation here; anything else
#: (contrastive scorers, custom classes, exit adapters) runs the eager ``exit_rule.consult``
FUSED_SCORERS = (SoftmaxMax, SoftmaxMargin, HiddenCosine)
FUSED_PRUNINGS = (NoPruning, FixedPruning, DecayingPruning)


class ConsultSpec:
    """What the fused exit decision does at one consulted layer.

    full_head: evaluate all V rows of the head (else the previous layer's vocabulary set);
    keep: keep this many best-ranked ids afterwards (None: keep the set as it is);
    width: head rows charged per row; exits_only: charge only rows that exit (hidden-state scorer, no pruning).
    """

    __slots__ = ("full_head", "keep", "width", "exits_only")

    def __init__(self, full_head: bool, keep: int | None, width: int, exits_only: bool):
        self.full_head, self.keep, self.width, self.exits_only = full_head, keep, width, exits_only


def fused_consult(head: Callable, score: Callable, hidden, hidden_prev, ids, thresholds, may_exit, layer_value,
                  forced_now, tokens, exit_layers, confidences, undecided, head_rows,
                  full_head: bool, keep: int | None, width: int, exits_only: bool, forced: bool):
    """One exit decision for every row, on the device, updating the row state in place: the exit rule's
    own test and update (``exit_rule.exits_at`` / ``predicted_tokens`` / ``apply_exits``) behind a head and
    a scorer whose shapes are fixed per layer (so ``torch.compile`` can fuse them).

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
        exits = exit_rule.exits_at(confidence, thresholds, may_exit)
    charged = exits if exits_only else may_exit
    head_rows.add_(charged.to(head_rows.dtype) * width)
    predicted = exit_rule.predicted_tokens(logits, new_ids)
    new_tokens, new_exit_layers, new_confidences = exit_rule.apply_exits(exits, layer_value, predicted, confidence,
                                                                         tokens, exit_layers, confidences)
    tokens.copy_(new_tokens)
    exit_layers.copy_(new_exit_layers)
    confidences.copy_(new_confidences)
    still = ~exits
    undecided.logical_and_(still)
    may_exit.logical_and_(still)
    return new_ids


def consult_specs(scorer: ConfidenceScorer, pruning: VocabPruning, vocab: int, min_exit_layer: int,
                  num_layers: int) -> dict[int, ConsultSpec]:
    """The fused decision's plan for every consulted layer j..L-1: the built-in prunings' vocabulary sets
    as fixed widths (what ``pruning.select`` does, unrolled so that each layer's shapes are static)."""
    j = min_exit_layer
    exits_only = not exit_rule.head_at_every_consult(scorer, pruning)
    specs, previous = {}, None
    for layer in range(j, num_layers):
        if isinstance(pruning, NoPruning):
            spec = ConsultSpec(True, None, vocab, exits_only)
        elif isinstance(pruning, FixedPruning):
            kept = min(pruning.k, vocab)
            spec = ConsultSpec(True, kept, vocab, False) if layer == j else ConsultSpec(False, None, previous, False)
            previous = kept
        else:
            wanted = pruning.k_at(layer, num_layers)
            if layer == j:
                kept = min(wanted, vocab)
                spec = ConsultSpec(True, kept, vocab, False)
            else:
                kept = min(wanted, previous)
                spec = ConsultSpec(False, kept, previous, False)
            previous = kept
        specs[layer] = spec
    return specs
