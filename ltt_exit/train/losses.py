"""The early-exit training objective: per-layer losses through the shared exit head, their weights,
the LayerSkip curricula and depth-scaled layer dropout.

Every intermediate layer ℓ predicts through the model's own exit head — the decoder's
``backend.head`` (decoder-only: final norm + lm_head; T5: final layer norm, the tied-embedding
d_model^-0.5 rescale, lm_head) — so the trained model exits exactly the way ``EarlyExitDecoder``
reads it. The last layer L is the model's ordinary output.

With H_ℓ the exit head's log-distribution at layer ℓ on a target position, the loss of one batch is

    Σ_{ℓ ∈ active(t), ℓ < L} w_ℓ · (α_ce · CE(y, H_ℓ) + α_kl · KL(P_teacher ‖ H_ℓ))
      + anchor · (α_ce · CE(y, H_L) + α_kl · KL(P_teacher ‖ H_L))

* y: the target tokens (the original model's own greedy continuation, or a reference);
  P_teacher: the *original* (frozen) model's final distribution at the same position
  (self-distillation; with LoRA the base model with its adapters disabled, no second copy);
* w_ℓ (``layer_weights``) sum to 1 over the layers active at step t: ``linear`` w_ℓ ∝ ℓ (CALM),
  ``layerskip`` w_ℓ ∝ Σ_{i ≤ ℓ} i (LayerSkip's scale, later layers weigh much more), ``uniform``;
* active(t) (``curriculum``): all layers ≥ ``min_layer``; ``rotational`` (LayerSkip C_rot,R): at
  step t the layers with (ℓ + t) mod R = 0; ``gradual`` (C_grad): from the last layer down, one
  more layer every ``total_steps / (L − min_layer)`` steps;
* every loss is a mean over each sequence's target positions, then over the sequences (so a
  batch split over processes gives the same gradient as the whole batch on one).

Layer dropout (LayerSkip): during training, layer ℓ (1-based, of L) skips — passes its input
through — for a random subset of the batch rows with rate p_ℓ = p_max · (exp(ℓ' ln 2 / (L−1)) − 1),
ℓ' = ℓ − 1 (0 for the first layer, p_max for the last). Applied by forward hooks on the library's
own layer modules, with torch's seeded generator.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "LAYER_WEIGHTS",
    "CURRICULA",
    "ExitLossConfig",
    "layer_weights",
    "active_layers",
    "layer_dropout_rates",
    "LayerDropout",
    "exit_hidden_states",
    "ExitLoss",
]

LAYER_WEIGHTS = ("linear", "layerskip", "uniform")
CURRICULA = ("none", "rotational", "gradual")


@dataclass
class ExitLossConfig:
    """What the objective mixes; see the module docstring for the formula.

    ce / kl: α_ce, α_kl (≥ 0, not both 0); anchor: weight of the last layer's terms; min_layer: the
    first layer with an exit loss (1-based); weights: a name of :data:`LAYER_WEIGHTS`; curriculum: a
    name of :data:`CURRICULA`, rotation: R of the rotational curriculum; layer_dropout: p_max in [0, 1).
    """

    ce: float = 0.0
    kl: float = 1.0
    anchor: float = 1.0
    min_layer: int = 1
    weights: str = "linear"
    curriculum: str = "none"
    rotation: int = 2
    layer_dropout: float = 0.0
    temperature: float = 1.0

    def validate(self, num_layers: int) -> None:
        """ValueError naming the bad field."""
        if self.ce < 0 or self.kl < 0 or self.anchor < 0:
            raise ValueError(f"loss weights must be >= 0; got ce={self.ce}, kl={self.kl}, anchor={self.anchor}")
        if self.ce == 0 and self.kl == 0:
            raise ValueError("at least one of the cross-entropy (--ce) and distillation (--kl) weights must be > 0")
        if not 1 <= self.min_layer <= num_layers - 1:
            raise ValueError(f"--min-layer must be in [1, {num_layers - 1}] for a model of {num_layers} layers; "
                             f"got {self.min_layer}")
        if self.weights not in LAYER_WEIGHTS:
            raise ValueError(f"--layer-weights must be one of {list(LAYER_WEIGHTS)}; got {self.weights!r}")
        if self.curriculum not in CURRICULA:
            raise ValueError(f"--curriculum must be one of {list(CURRICULA)}; got {self.curriculum!r}")
        if self.rotation < 1:
            raise ValueError(f"--rotation must be >= 1; got {self.rotation}")
        if not 0.0 <= self.layer_dropout < 1.0:
            raise ValueError(f"--layer-dropout must be in [0, 1); got {self.layer_dropout}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0; got {self.temperature}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def layer_weights(scheme: str, layers: list[int]) -> torch.Tensor:
    """(len(layers),) weights summing to 1 for the 1-based ``layers``."""
    values = torch.tensor(layers, dtype=torch.float64)
    if scheme == "linear":
        raw = values
    elif scheme == "layerskip":
        raw = values * (values + 1) / 2  # Σ_{i ≤ ℓ} i
    elif scheme == "uniform":
        raw = torch.ones_like(values)
    else:
        raise ValueError(f"unknown layer weights {scheme!r}; expected one of {list(LAYER_WEIGHTS)}")
    return raw / raw.sum()


def active_layers(config: ExitLossConfig, num_layers: int, step: int, total_steps: int) -> list[int]:
    """The intermediate layers (1-based, < L) whose exit loss counts at optimiser step ``step``."""
    candidates = list(range(config.min_layer, num_layers))
    if config.curriculum == "rotational":
        return [layer for layer in candidates if (layer + step) % config.rotation == 0]
    if config.curriculum == "gradual":
        period = max(1, total_steps) / len(candidates)
        count = min(len(candidates), int(step // period) + 1)
        return candidates[-count:]
    return candidates


def layer_dropout_rates(p_max: float, num_layers: int) -> list[float]:
    """LayerSkip's depth-scaled rates for layers 1..L: 0 for the first, p_max for the last."""
    if num_layers == 1:
        return [0.0]
    return [p_max * (math.exp(i * math.log(2) / (num_layers - 1)) - 1) for i in range(num_layers)]


class LayerDropout:
    """Forward hooks that make layer i pass its input through for a random subset of rows (training only).

    The layer still runs (its parameters stay in the graph, so DDP sees every parameter used); the
    dropped rows take the layer's input instead of its output.
    """

    def __init__(self, layers: list[torch.nn.Module], p_max: float):
        self.rates = layer_dropout_rates(p_max, len(layers))
        self.enabled = True
        self.handles = []
        for layer, rate in zip(layers, self.rates):
            if rate > 0:
                self.handles.append(layer.register_forward_hook(self._hook(rate), with_kwargs=True))

    @contextlib.contextmanager
    def paused(self):
        """No layer dropout inside (the teacher's forward runs the whole model)."""
        self.enabled, before = False, self.enabled
        try:
            yield
        finally:
            self.enabled = before

    def _hook(self, rate: float):
        def hook(module, args, kwargs, output):
            if not module.training or not self.enabled:
                return output
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            keep = torch.rand(hidden_in.shape[0], device=hidden_in.device) >= rate
            mixed = torch.where(keep.view(-1, *([1] * (hidden_in.dim() - 1))), hidden_out, hidden_in)
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def exit_hidden_states(outputs: Any, family: str) -> tuple[torch.Tensor, ...]:
    """The per-layer hidden states of a forward with output_hidden_states=True: entry ℓ (1..L−1) is the
    residual stream after decoder layer ℓ (the last entry is already normed by the library; layer L's
    prediction is the model's own logits)."""
    return outputs.decoder_hidden_states if family == "t5" else outputs.hidden_states


def _per_sequence_mean(values: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """values (N,) of positions belonging to sequence ``rows`` (N,) -> mean over sequences of their means."""
    sums = torch.zeros(num_rows, dtype=values.dtype, device=values.device).index_add_(0, rows, values)
    counts = torch.zeros(num_rows, dtype=values.dtype, device=values.device).index_add_(
        0, rows, torch.ones_like(values))
    present = counts > 0
    return (sums[present] / counts[present]).mean()


class ExitLoss:
    """Computes the objective for one batch from a model forward; keeps running agreement statistics.

    ``head``: callable hidden (N, d) -> logits (N, V), the decoder's exit head of the *trained* model.
    """

    def __init__(self, config: ExitLossConfig, num_layers: int, family: str, head):
        config.validate(num_layers)
        self.config = config
        self.num_layers = num_layers
        self.family = family
        self.head = head
        self.reset_stats()

    def reset_stats(self) -> None:
        # per layer 1..L: [agreeing positions, positions]; per term: running sums for logging
        self.agree = torch.zeros(self.num_layers, dtype=torch.float64)
        self.counted = torch.zeros(self.num_layers, dtype=torch.float64)
        self.terms: dict[str, float] = {}
        self.batches = 0

    def __call__(self, outputs: Any, target_mask: torch.Tensor, targets: torch.Tensor,
                 teacher_logits: torch.Tensor | None, *, step: int, total_steps: int) -> torch.Tensor:
        """Loss of one batch.

        outputs: the model forward (hidden states included); target_mask (B, T) bool: positions whose
        next-token prediction is trained (aligned with ``outputs.logits``); targets (B, T): the token each
        position predicts; teacher_logits (N, V) at the masked positions (row-major order) or None when
        α_kl = 0.
        """
        cfg = self.config
        rows = target_mask.nonzero(as_tuple=True)[0]
        num_rows = target_mask.shape[0]
        y = targets[target_mask]
        hidden = exit_hidden_states(outputs, self.family)
        teacher_logp = None
        if teacher_logits is not None:
            teacher_logp = F.log_softmax(teacher_logits.float() / cfg.temperature, dim=-1)

        def layer_loss(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logp = F.log_softmax(logits.float(), dim=-1)
            total = torch.zeros((), device=logits.device)
            if cfg.ce:
                total = total + cfg.ce * _per_sequence_mean(F.nll_loss(logp, y, reduction="none"), rows, num_rows)
            if cfg.kl:
                student = F.log_softmax(logits.float() / cfg.temperature, dim=-1)
                kl = (teacher_logp.exp() * (teacher_logp - student)).sum(-1) * cfg.temperature**2
                total = total + cfg.kl * _per_sequence_mean(kl, rows, num_rows)
            return total, logp.argmax(-1)

        final_logits = outputs.logits[target_mask]
        final_loss, final_top = layer_loss(final_logits)
        loss = cfg.anchor * final_loss
        terms = {"loss_final": float(final_loss.detach())}
        layers = active_layers(cfg, self.num_layers, step, total_steps)
        if layers:
            weights = layer_weights(cfg.weights, layers).to(final_logits.device, torch.float32)
            exit_total = torch.zeros((), device=final_logits.device)
            for weight, layer in zip(weights, layers):
                layer_term, top = layer_loss(self.head(hidden[layer][target_mask]))
                exit_total = exit_total + weight * layer_term
                self.agree[layer - 1] += float((top == final_top).sum())
                self.counted[layer - 1] += top.numel()
            loss = loss + exit_total
            terms["loss_exits"] = float(exit_total.detach())
        for name, value in terms.items():
            self.terms[name] = self.terms.get(name, 0.0) + value
        self.batches += 1
        return loss

    def take_stats(self) -> dict[str, float]:
        """Mean terms and per-layer teacher-forced top-1 agreement with the last layer since the last call."""
        stats = {name: value / max(1, self.batches) for name, value in self.terms.items()}
        for index in range(self.num_layers - 1):
            if self.counted[index] > 0:
                stats[f"agreement_{index + 1}"] = float(self.agree[index] / self.counted[index])
        self.reset_stats()
        return stats
