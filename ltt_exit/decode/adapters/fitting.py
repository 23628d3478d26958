"""Fitting the per-layer maps: the closed-form ridge fit, the trained low-rank (distillation) fit, and
:class:`ExitFitData`, which streams the fitting prompts through the model once for both.

* :class:`RidgeStatistics` accumulates per-layer second moments of (h_ℓ, h_L) (memory O(L d²),
  independent of the number of prompts) and solves the ridge regression of h_L on h_ℓ, shrunk
  towards the identity, for ``affine`` maps.
* :class:`TokenReservoir` keeps a bounded uniform sample of positions; :func:`train_low_rank` trains
  ``low-rank`` maps on it with the KL from the final layer's distribution to the adapted exit head's.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .file import ExitAdapters
from .maps import AffineMap, LayerMap, LowRankMap
from .overlap import ExampleHashes
from .states import StateBatch, collect_states, final_norm, head_logits

__all__ = ["RidgeStatistics", "TokenReservoir", "train_low_rank", "ExitFitData"]


class RidgeStatistics:
    """Running sums for the per-layer ridge fit of the final state on h_ℓ (float64, O(L d²) memory).

    For each layer: n, Σx, Σy, Σxxᵀ, Σxyᵀ over tokens, x = h_ℓ and y = the regression target (see
    ``target``). Statistics are merged with Chan's pairwise update (means and centred sums), which keeps
    float64 accurate over many batches.

    target: "final" (the default) regresses the pre-norm final state h_L itself; "final-normalized"
            regresses h_L / rms(h_L). The head's RMS/layer norm ignores the scale of its input, so both
            targets describe the same exit prediction; the normalised one weighs every token equally
            instead of by the size of its final state. On SmolLM2-135M / SAMSum the two gave held-out
            top-1 agreements within 0.02 of each other, "final" slightly ahead.
    """

    TARGETS = ("final", "final-normalized")

    def __init__(self, layers: Sequence[int], hidden_size: int, *, target: str = "final"):
        if target not in self.TARGETS:
            raise ValueError(f"unknown ridge target {target!r}; expected one of {list(self.TARGETS)}")
        self.layers = [int(x) for x in layers]
        self.hidden_size = hidden_size
        self.target = target
        d = hidden_size
        self.count = 0
        self.mean_y = torch.zeros(d, dtype=torch.float64)
        self.mean_x = {layer: torch.zeros(d, dtype=torch.float64) for layer in self.layers}
        self.cxx = {layer: torch.zeros(d, d, dtype=torch.float64) for layer in self.layers}
        self.cxy = {layer: torch.zeros(d, d, dtype=torch.float64) for layer in self.layers}

    def _target(self, final: torch.Tensor) -> torch.Tensor:
        if self.target == "final":
            return final
        return final / final.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)

    def _to(self, device: torch.device) -> None:
        """Keep the sums where the states are (a GPU makes the per-prompt d × d products cheap)."""
        if self.mean_y.device == device:
            return
        self.mean_y = self.mean_y.to(device)
        for sums in (self.mean_x, self.cxx, self.cxy):
            for layer in self.layers:
                sums[layer] = sums[layer].to(device)

    def update(self, batch: StateBatch) -> None:
        """Add the tokens of one :class:`StateBatch` (on the batch's device; float64)."""
        self._to(batch.final.device)
        y = self._target(batch.final.double())
        m = y.shape[0]
        if m == 0:
            return
        n = self.count
        total = n + m
        mean_y_batch = y.mean(dim=0)
        delta_y = mean_y_batch - self.mean_y
        yc = y - mean_y_batch
        for layer in self.layers:
            x = batch.hidden[layer].double().to(y.device)
            mean_x_batch = x.mean(dim=0)
            xc = x - mean_x_batch
            delta_x = mean_x_batch - self.mean_x[layer]
            factor = n * m / total
            self.cxx[layer] += xc.T @ xc + factor * torch.outer(delta_x, delta_x)
            self.cxy[layer] += xc.T @ yc + factor * torch.outer(delta_x, delta_y)
            self.mean_x[layer] += delta_x * (m / total)
        self.mean_y += delta_y * (m / total)
        self.count = total

    def solve(self, ridge: float = 0.1) -> dict[int, AffineMap]:
        """Per layer, W and b minimising Σ‖W x + b − y‖² + α‖W − s·I‖²_F, α = ridge · tr(Cxx)/d.

        Cxx, Cxy are the centred sums; s = tr(Cxy)/tr(Cxx) is the best multiple of the identity. The
        penalty shrinks towards s·I, i.e. towards the raw exit head (whose norm ignores the scale s), so a
        large ``ridge`` gives back the raw head up to the mean shift b, and ``ridge`` = 0 is plain least
        squares. Solved as (Cxx + αI) Wᵀ = Cxy + α s I. Returns {layer: AffineMap}.
        """
        if not ridge >= 0 or not math.isfinite(ridge):
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
        if self.count < 2:
            raise ValueError(f"the ridge fit needs at least 2 tokens, got {self.count}")
        d = self.hidden_size
        eye = torch.eye(d, dtype=torch.float64, device=self.mean_y.device)
        maps = {}
        for layer in self.layers:
            cxx, cxy = self.cxx[layer], self.cxy[layer]
            scale_x2 = float(torch.trace(cxx)) / d
            alpha = ridge * scale_x2
            # s: least-squares scale of y ≈ s x (through the centred sums), the identity's best multiple
            s = float(torch.trace(cxy)) / max(float(torch.trace(cxx)), 1e-300)
            # (Cxx + αI) Wᵀ = Cxy + α s I
            weight_t = torch.linalg.solve(cxx + alpha * eye, cxy + alpha * s * eye)
            weight = weight_t.T
            bias = self.mean_y - weight @ self.mean_x[layer]
            weight, bias = weight.cpu(), bias.cpu()
            layer_map = AffineMap(d)
            with torch.no_grad():
                layer_map.weight.copy_(weight.float())
                layer_map.bias.copy_(bias.float())
            maps[layer] = layer_map.requires_grad_(False)
        return maps


# ------------------------------------------------------------------------------ trained low-rank fit


class TokenReservoir:
    """A uniform random sample of at most ``capacity`` tokens (reservoir sampling, seeded), so training
    data stays bounded however many prompts stream past.

    hidden: {layer: (capacity, d)} float32; final: (capacity, d); teacher_top: (capacity, k) long.
    Only the first ``size`` rows are filled.
    """

    def __init__(self, layers: Sequence[int], hidden_size: int, capacity: int, *, teacher_top_k: int = 64,
                 seed: int = 0):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        self.layers = [int(x) for x in layers]
        self.capacity = capacity
        self.hidden = {layer: torch.empty(capacity, hidden_size) for layer in self.layers}
        self.final = torch.empty(capacity, hidden_size)
        self.teacher_top = torch.empty(capacity, teacher_top_k, dtype=torch.long)
        self.size = 0
        self.seen = 0
        self._rng = np.random.default_rng(seed)

    def update(self, batch: StateBatch) -> None:
        m = batch.final.shape[0]
        rows, slots = [], []
        for i in range(m):
            index = self.seen + i
            slot = index if index < self.capacity else int(self._rng.integers(0, index + 1))
            if slot < self.capacity:
                rows.append(i)
                slots.append(slot)
        self.seen += m
        self.size = min(self.seen, self.capacity)
        if not rows:
            return
        rows_t, slots_t = torch.tensor(rows), torch.tensor(slots)
        self.final[slots_t] = batch.final.cpu()[rows_t]
        k = min(self.teacher_top.shape[1], batch.teacher_top.shape[1])
        self.teacher_top[slots_t, :k] = batch.teacher_top.cpu()[rows_t, :k]
        self.teacher_top[slots_t, k:] = batch.teacher_top.cpu()[rows_t, :1]  # pad with the top id
        for layer in self.layers:
            self.hidden[layer][slots_t] = batch.hidden[layer].cpu()[rows_t]


class _FrozenHead:
    """Within the block, the exit head's parameters (final norm, LM head) do not require gradients."""

    def __init__(self, backend):
        self.backend = backend
        self._flags: list[tuple[torch.nn.Parameter, bool]] = []

    def __enter__(self):
        for module in (self.backend.model.lm_head, final_norm(self.backend)):
            for parameter in module.parameters():
                self._flags.append((parameter, parameter.requires_grad))
                parameter.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for parameter, flag in self._flags:
            parameter.requires_grad_(flag)
        return False

    def logits(self, hidden: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (N, d) float32 -> (N, V) or (N, K) float32 logits (ids (K,) shared by all rows)."""
        return head_logits(self.backend, hidden.to(self.backend.dtype), ids).float()


def train_low_rank(
    model: torch.nn.Module,
    reservoir: TokenReservoir,
    *,
    rank: int = 32,
    steps: int = 300,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    weight_decay: float = 0.0,
    vocabulary: str = "sampled",
    teacher_top_k: int = 64,
    negatives: int = 1024,
    seed: int = 0,
    log_every: int = 0,
    start: dict[int, LayerMap] | None = None,
) -> tuple[dict[int, LayerMap], dict[str, Any]]:
    """Train one low-rank map per layer of ``reservoir`` with a distillation loss; backbone and head frozen.

    Loss per token and layer: KL(p_L ‖ p_ℓ), with p_L = softmax(head(h_L)) the full model's distribution
    and p_ℓ = softmax(head(A_ℓ(h_ℓ))) the adapted exit head's, summed over layers (the maps are
    independent) and averaged over a batch of ``batch_size`` reservoir tokens; AdamW (``weight_decay``
    pulls U, D and c towards 0, i.e. the map towards the identity) with a cosine-decayed learning rate
    for ``steps`` steps. Training runs on the model's device (a GPU when the model is on one).

    vocabulary: "full" — both distributions over the whole vocabulary (exact; 2·N·d·V multiply-adds per
                layer and step forward, as much again backward; comfortable on a GPU).
                "sampled" — both restricted to one vocabulary set per step and renormalised: the union of
                the batch's teacher top-``teacher_top_k`` ids (recorded while collecting) and ``negatives``
                uniformly drawn ids. The set holds nearly all of the teacher's mass, and the random ids keep
                the student from raising tokens the teacher never ranks; it costs a few percent of "full",
                which is what makes CPU training practical.
    start:      {layer: map} to train instead of fresh identity-initialised low-rank maps (copies are
                trained; ``rank`` is then ignored). With the ridge solution as the start this fine-tunes the
                closed-form maps on the head's own objective (as the "tuned lens" does); ``weight_decay``
                then pulls every parameter towards 0, not towards the start, so leave it at 0 there.
    Returns ({layer: map on the CPU}, training facts for the file's provenance).
    """
    from ..backends import backend_for

    if vocabulary not in ("full", "sampled"):
        raise ValueError(f"vocabulary must be 'full' or 'sampled', got {vocabulary!r}")
    if reservoir.size < 1:
        raise ValueError("the reservoir holds no tokens to train on")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("teacher_top_k", teacher_top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(negatives, bool) or not isinstance(negatives, int) or negatives < 0:
        raise ValueError(f"negatives must be an int >= 0, got {negatives!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
    backend = backend_for(model)
    device = backend.device
    layers = reservoir.layers
    d = reservoir.final.shape[1]
    vocab = backend.vocab_size
    if start is None:
        maps = {layer: LowRankMap(d, rank, seed=seed + layer).to(device) for layer in layers}
    else:
        if sorted(start) != sorted(layers):
            raise ValueError(f"start maps cover layers {sorted(start)}, the reservoir layers {sorted(layers)}")
        maps = {layer: copy.deepcopy(start[layer]).float().to(device).requires_grad_(True) for layer in layers}
    optimizer = torch.optim.AdamW([p for m in maps.values() for p in m.parameters()], lr=learning_rate,
                                  weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    n = reservoir.size
    top_k = min(teacher_top_k, reservoir.teacher_top.shape[1])
    started = time.perf_counter()
    losses: list[float] = []
    with _FrozenHead(backend) as head, torch.enable_grad():
        for step in range(steps):
            rows = torch.randint(0, n, (min(batch_size, n),), generator=generator)
            final = reservoir.final[rows].to(device)
            ids = None
            if vocabulary == "sampled":
                random_ids = torch.randint(0, vocab, (negatives,), generator=generator)
                ids = torch.unique(torch.cat([reservoir.teacher_top[rows, :top_k].reshape(-1), random_ids])).to(device)
            with torch.no_grad():
                teacher = torch.log_softmax(head.logits(final, ids), dim=-1)
                teacher_p = teacher.exp()
            loss = torch.zeros((), device=device)
            for layer in layers:
                adapted = maps[layer](reservoir.hidden[layer][rows].to(device))
                student = torch.log_softmax(head.logits(adapted, ids), dim=-1)
                loss = loss + (teacher_p * (teacher - student)).sum(dim=-1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()) / len(layers))
            if log_every and (step + 1) % log_every == 0:
                print(f"  step {step + 1}/{steps}: mean KL per layer {np.mean(losses[-log_every:]):.4f}", flush=True)
    facts = {
        "name": "distill",
        "start": "identity" if start is None else "given",
        "rank": rank if start is None else None,
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "optimizer": "adamw, cosine decay",
        "weight_decay": weight_decay,
        "vocabulary": vocabulary,
        "teacher_top_k": top_k if vocabulary == "sampled" else None,
        "negatives": negatives if vocabulary == "sampled" else None,
        "seed": seed,
        "train_tokens": n,
        "first_loss": losses[0],
        "final_loss": float(np.mean(losses[-max(1, steps // 10):])),
        "device": str(device),
        "train_seconds": time.perf_counter() - started,
    }
    return {layer: m.cpu().requires_grad_(False) for layer, m in maps.items()}, facts


class ExitFitData:
    """Streams fitting prompts through the model once and keeps what both fits need: ridge statistics
    (closed form, O(L d²)) and a bounded token reservoir (distillation, O(capacity · L · d)).

        examples, info = fitting_set("samsum", split="test", data_files=..., size=200, tokenizer=lm.tokenizer)
        data = ExitFitData.collect(lm, examples, info, max_new_tokens=32, layers=range(10, 30))
        affine = data.affine(ridge=0.1)                # ExitAdapters, kind "affine"
        low_rank = data.low_rank(rank=32, steps=300)   # ExitAdapters, kind "low-rank"
        affine.save("smollm2-samsum.affine.safetensors")
    """

    def __init__(self, loaded, layers: Sequence[int], *, max_train_tokens: int = 8192,
                 target: str = "final", teacher_top_k: int = 64, seed: int = 0):
        self.loaded = loaded
        self.layers = [int(x) for x in layers]
        config = loaded.model.config
        self.hidden_size = int(config.d_model if loaded.family == "t5" else config.hidden_size)
        self.statistics = RidgeStatistics(self.layers, self.hidden_size, target=target)
        self.reservoir = None
        if max_train_tokens > 0:
            self.reservoir = TokenReservoir(self.layers, self.hidden_size, max_train_tokens,
                                            teacher_top_k=teacher_top_k, seed=seed)
        self.info: dict[str, Any] = {}
        self.hashes = ExampleHashes()
        self.collect_seconds = 0.0

    @classmethod
    def collect(
        cls,
        loaded,
        examples: Sequence,
        info: dict[str, Any],
        *,
        max_new_tokens: int,
        layers: Sequence[int] | None = None,
        max_train_tokens: int = 8192,
        target: str = "final",
        teacher_top_k: int = 64,
        seed: int = 0,
        progress: bool = False,
        batch_size: int = 1,
    ) -> "ExitFitData":
        """Decode every example (greedy, full model) and accumulate its states.

        loaded:   a LoadedModel (model, tokenizer, fingerprint, family, num_layers)
        examples: recipe examples (``id``, ``prompt``, ``fields``), e.g. from :func:`fitting_set`
        info:     provenance for the file (recipe, split, source, ...; :func:`fitting_set` returns it)
        layers:   the layers to adapt (default 1..L-1); only layers >= the decoder's min_exit_layer matter
        batch_size: prompts decoded together (see :func:`collect_states`)
        """
        num_layers = loaded.num_layers
        layers = list(range(1, num_layers)) if layers is None else [int(x) for x in layers]
        data = cls(loaded, layers, max_train_tokens=max_train_tokens, target=target,
                   teacher_top_k=teacher_top_k, seed=seed)
        started = time.perf_counter()
        tokens = 0
        prompts = [example.prompt for example in examples]
        states = collect_states(loaded.model, loaded.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                layers=layers, teacher_top_k=teacher_top_k, batch_size=batch_size)
        for index, batch in enumerate(states):
            data.statistics.update(batch)
            if data.reservoir is not None:
                data.reservoir.update(batch)
            tokens += len(batch.tokens)
            if progress and (index + 1) % 25 == 0:
                print(f"  collected {index + 1}/{len(prompts)} prompts, {tokens} tokens "
                      f"({time.perf_counter() - started:.0f}s)", flush=True)
        data.collect_seconds = time.perf_counter() - started
        data.info = dict(info) | {"n_prompts": len(prompts), "n_tokens": tokens, "max_new_tokens": max_new_tokens,
                                  "collect_seconds": round(data.collect_seconds, 3)}
        data.hashes = ExampleHashes.of(examples, recipe=info.get("recipe", ""), source=info.get("source", ""))
        return data

    def _adapters(self, maps, method: dict[str, Any]) -> ExitAdapters:
        return ExitAdapters(
            maps,
            num_layers=self.loaded.num_layers,
            hidden_size=self.hidden_size,
            model_fingerprint=self.loaded.fingerprint,
            fit_info=self.info | {"method": method},
            example_hashes=self.hashes,
        )

    def affine(self, ridge: float = 0.1, distill: dict[str, Any] | None = None) -> ExitAdapters:
        """Closed-form affine adapters (ridge towards the scaled identity; see RidgeStatistics.solve).

        distill: options of :func:`train_low_rank` (steps, learning_rate, vocabulary, ...) to fine-tune the
        closed-form maps with the distillation loss afterwards (needs the token reservoir); None keeps the
        closed form."""
        started = time.perf_counter()
        maps = self.statistics.solve(ridge)
        method = {"name": "ridge", "ridge": ridge, "target": self.statistics.target,
                  "fit_seconds": round(time.perf_counter() - started, 3)}
        if distill is not None:
            if self.reservoir is None:
                raise ValueError("no token reservoir was kept (max_train_tokens=0): cannot distil the affine maps")
            maps, facts = train_low_rank(self.loaded.model, self.reservoir, start=maps, **distill)
            facts["train_seconds"] = round(facts["train_seconds"], 3)
            method = method | {"name": "ridge+distill", "distill": facts}
        return self._adapters(maps, method)

    def low_rank(self, **train_options: Any) -> ExitAdapters:
        """Trained low-rank adapters (options: see :func:`train_low_rank`)."""
        if self.reservoir is None:
            raise ValueError("no token reservoir was kept (max_train_tokens=0): cannot train low-rank adapters")
        maps, facts = train_low_rank(self.loaded.model, self.reservoir, **train_options)
        facts["train_seconds"] = round(facts["train_seconds"], 3)
        return self._adapters(maps, facts)
