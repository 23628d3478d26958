"""Result objects of early-exit decoding."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["CostAccount", "DecodedSequence"]


@dataclass
class CostAccount:
    """Estimated decoding cost of one sequence, as if the row were decoded on its own (rows that share a
    batch do not pay for each other). The formulas are in docs/decoder.md.

    layers_run:      Σ over generated tokens of the exit layer (decoder layers the token's state went through)
    head_rows:       exit-head output rows computed (full vocabulary = V rows, a pruned head = k rows),
                     including the final full head, heads below j needed by contrastive amateurs, and the
                     head a hidden-state scorer evaluates when the row exits
    kv_propagations: skipped (layer, token) pairs whose self-attention K/V were computed from the copied state
    flops:           estimated FLOPs of the decoding passes (layers + K/V propagation + heads + exit adapters)
    adapter_flops:   the exit adapters' part of ``flops``: one application of each adapted layer's map whose
                     head a token read (the consulted layers, and the layers their scorer reads)
    shortlist_flops: the low-rank vocabulary ranking's part of ``flops`` (``shortlist`` pruning: 2·(d·r + r·V)
                     per token that consulted its first exit layer; its k exact head rows are in head_rows)
    full_flops:      the same estimate for the full model (L layers and a full head for every token)
    prefill_flops:   prompt work that early exit does not change (T5: encoder + cross-attention K/V;
                     decoder-only: the prompt positions before the last one)
    """

    tokens: int = 0
    layers_run: int = 0
    head_rows: int = 0
    kv_propagations: int = 0
    flops: float = 0.0
    full_flops: float = 0.0
    prefill_flops: float = 0.0
    adapter_flops: float = 0.0
    shortlist_flops: float = 0.0

    @property
    def mean_layers(self) -> float:
        """Average exit layer per generated token (NaN for an empty sequence)."""
        return self.layers_run / self.tokens if self.tokens else float("nan")

    @property
    def flops_ratio(self) -> float:
        """flops / full_flops (1.0 = no saving; NaN for an empty sequence)."""
        return self.flops / self.full_flops if self.full_flops else float("nan")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DecodedSequence:
    """One decoded row.

    token_ids:   generated tokens only (no prompt, no decoder start token); ends with EOS when one was
                 produced (as ``generate`` does)
    text:        ``tokenizer.decode(token_ids, skip_special_tokens=True)``; "" without a tokenizer
    exit_layers: per token, the 1-based exit layer ℓ (L when the token did not exit early)
    confidences: per token, the confidence that cleared the threshold at the exit layer; NaN for tokens
                 that reached the last layer (no exit decision is taken there)
    threshold:   the base threshold λ this row was decoded with
    cost:        the row's :class:`CostAccount`
    """

    token_ids: list[int]
    text: str
    exit_layers: list[int]
    confidences: list[float]
    cost: CostAccount
    threshold: float = float("nan")
    num_layers: int = field(default=0, repr=False)

    @property
    def mean_layers(self) -> float:
        return self.cost.mean_layers
