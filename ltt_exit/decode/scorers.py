"""Confidence scorers for the exit head: small objects behind one interface, chosen by name.

Every scorer maps what the decoder knows about one position at layer ℓ (an :class:`ExitView`) to one
confidence per row in [0, 1]. The decoder exits a row at the first consulted layer where
``confidence >= λ_t``. Scorers only *score*; the token a row emits when it exits is always the
arg-max of the exit head at that layer (see docs/decoder.md).

All arithmetic stays on the input's device; half-precision inputs are promoted to float32 (never to
float64, never to the CPU).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

__all__ = [
    "ExitView",
    "ConfidenceScorer",
    "SoftmaxMax",
    "SoftmaxMargin",
    "HiddenCosine",
    "WeightedContrastive",
    "JSDContrastive",
    "EXIT_FEATURES",
    "exit_features",
    "LogisticExitModel",
    "ExitClassifier",
    "SCORERS",
    "FITTED_SCORERS",
    "resolve_scorer",
    "top1_minus_top2",
    "contrast_distribution",
    "jensen_shannon",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 -> float32; float32/float64 unchanged."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class ExitView:
    """What a scorer may look at for a batch of rows at decoder layer ``layer`` (1-based).

    logits:      (B, k) exit-head logits over the rows' current vocabulary set (k = V when unpruned)
    hidden:      (B, d) hidden state h_ℓ after layer ``layer``
    hidden_prev: (B, d) hidden state h_{ℓ-1} (h_0 = the decoder input embedding)
    logits_at:   callable a -> (B, k) logits of the exit head applied to h_a (0 <= a <= layer) over the
                 *same* vocabulary set as ``logits``; used by the contrastive scorers for the amateur.
    logits_for:  optional callable (a_1, …, a_A) -> (A, B, k), the same as stacking ``logits_at`` of each
                 but free to evaluate them together (the decoders' heads do); the JSD amateur search uses it.
    """

    layer: int
    logits: torch.Tensor | None
    hidden: torch.Tensor
    hidden_prev: torch.Tensor
    logits_at: Callable[[int], torch.Tensor] | None = None
    logits_for: Callable[[Sequence[int]], torch.Tensor] | None = None

    def logits_of(self, layers: Sequence[int]) -> torch.Tensor:
        """(A, B, k) exit-head logits of ``layers`` over the rows' vocabulary set (``logits_for`` when given)."""
        if self.logits_for is not None:
            return self.logits_for(layers)
        return torch.stack([self.logits_at(a) for a in layers])


def top1_minus_top2(probs: torch.Tensor) -> torch.Tensor:
    """(B, k) probabilities -> (B,) top-1 minus top-2 (top-1 itself when k == 1)."""
    if probs.shape[-1] == 1:
        return probs[..., 0]
    top2 = torch.topk(probs, 2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def contrast_distribution(
    log_p_expert: torch.Tensor, log_p_amateur: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Auto-contrastive redistribution of the expert's head mass (after Gera et al. 2023).

    log_p_expert, log_p_amateur: (B, k) log-probabilities over the same vocabulary set.
    Head set V = {x : p_E(x) >= alpha * max p_E}. On V the mass Σ_V p_E is redistributed as
    softmax(log p_E - log p_A) restricted to V; off V, p_E is kept. Returns (B, k) probabilities.
    """
    p_expert = log_p_expert.exp()
    head = p_expert >= alpha * p_expert.max(dim=-1, keepdim=True).values
    head_mass = torch.where(head, p_expert, torch.zeros_like(p_expert)).sum(dim=-1, keepdim=True)
    contrast = torch.where(head, log_p_expert - log_p_amateur, torch.full_like(p_expert, -torch.inf))
    redistributed = torch.softmax(contrast, dim=-1) * head_mass
    return torch.where(head, redistributed, p_expert)


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) between distributions along the last axis. (..., k) -> (...)."""
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # 0 * log(0 / b) = 0; b > 0 wherever a > 0 because b is a mixture containing a
        ratio = torch.where(a > 0, a / torch.where(b > 0, b, torch.ones_like(b)), torch.ones_like(a))
        return (a * ratio.log()).sum(dim=-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


class ConfidenceScorer(ABC):
    """Interface: ``score(view) -> (B,)`` confidences in [0, 1]."""

    name: ClassVar[str]
    #: whether ``score`` reads ``view.logits`` (False: the head is only evaluated when a row exits)
    needs_logits: ClassVar[bool] = True

    @abstractmethod
    def score(self, view: ExitView) -> torch.Tensor:
        """(B,) confidence per row, in [0, 1], on the device of the inputs."""

    def params(self) -> dict[str, Any]:
        """JSON-able parameters that, with ``name``, fully describe this scorer."""
        return {}

    def validate(self, num_layers: int, min_exit_layer: int) -> None:
        """Raise ValueError when the scorer cannot work with this decoder depth / min exit layer."""

    def other_head_layers(self, layer: int) -> tuple[int, ...]:
        """Layers besides ``layer`` whose exit heads ``score`` reads at consulted layer ``layer`` (through
        ``view.logits_at``); the cost account charges their exit adapters."""
        return ()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class SoftmaxMax(ConfidenceScorer):
    """Largest softmax probability of the exit head."""

    name = "softmax-max"

    def score(self, view: ExitView) -> torch.Tensor:
        logits = view.logits.to(_compute_dtype(view.logits.dtype))
        return torch.softmax(logits, dim=-1).max(dim=-1).values


class SoftmaxMargin(ConfidenceScorer):
    """Top-1 minus top-2 softmax probability of the exit head (the seed study's default)."""

    name = "softmax-margin"

    def score(self, view: ExitView) -> torch.Tensor:
        logits = view.logits.to(_compute_dtype(view.logits.dtype))
        return top1_minus_top2(torch.softmax(logits, dim=-1))


class HiddenCosine(ConfidenceScorer):
    """Hidden-state saturation: cosine similarity of h_ℓ and h_{ℓ-1}, clipped below at 0.

    Clipping (instead of mapping (1 + cos) / 2) keeps thresholds on the cosine scale CALM reports;
    a negative cosine can only ever clear λ = 0, where every row exits anyway.
    """

    name = "hidden-cosine"
    needs_logits = False

    def score(self, view: ExitView) -> torch.Tensor:
        dtype = _compute_dtype(view.hidden.dtype)
        cos = torch.nn.functional.cosine_similarity(
            view.hidden.to(dtype), view.hidden_prev.to(dtype), dim=-1, eps=1e-12
        )
        return cos.clamp(min=0.0, max=1.0)


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a number in (0, 1], got {alpha!r}")
    return float(alpha)


class WeightedContrastive(ConfidenceScorer):
    """Expert = layer ℓ, amateur = layer ``amateur_layer`` (default ⌊ℓ/2⌋; 0 is the embedding output).

    Confidence = top-1 minus top-2 of :func:`contrast_distribution` (head set threshold ``alpha``).
    """

    name = "weighted-contrastive"

    def __init__(self, amateur_layer: int | None = None, alpha: float = 0.1):
        if amateur_layer is not None and (
            isinstance(amateur_layer, bool) or not isinstance(amateur_layer, int) or amateur_layer < 0
        ):
            raise ValueError(f"amateur_layer must be None (⌊ℓ/2⌋) or an int >= 0, got {amateur_layer!r}")
        self.amateur_layer = amateur_layer
        self.alpha = _check_alpha(alpha)

    def params(self) -> dict[str, Any]:
        return {"amateur_layer": self.amateur_layer, "alpha": self.alpha}

    def validate(self, num_layers: int, min_exit_layer: int) -> None:
        if self.amateur_layer is not None and self.amateur_layer >= min_exit_layer:
            raise ValueError(
                f"amateur_layer={self.amateur_layer} must be below min_exit_layer={min_exit_layer} "
                "(the amateur must be an earlier layer than every expert layer)"
            )

    def amateur_for(self, layer: int) -> int:
        return layer // 2 if self.amateur_layer is None else self.amateur_layer

    def other_head_layers(self, layer: int) -> tuple[int, ...]:
        return (self.amateur_for(layer),)

    def score(self, view: ExitView) -> torch.Tensor:
        dtype = _compute_dtype(view.logits.dtype)
        log_p_expert = torch.log_softmax(view.logits.to(dtype), dim=-1)
        log_p_amateur = torch.log_softmax(view.logits_at(self.amateur_for(view.layer)).to(dtype), dim=-1)
        return top1_minus_top2(contrast_distribution(log_p_expert, log_p_amateur, self.alpha))


class JSDContrastive(ConfidenceScorer):
    """Amateur chosen per row among layers 0..ℓ-1 by the largest Jensen-Shannon divergence from the
    expert, both restricted to the expert's head set V and renormalised (after DoLa); with
    ``distance_discount`` the divergence to layer a is divided by (ℓ - a), as the seed study does.
    Confidence = top-1 minus top-2 of :func:`contrast_distribution` with that amateur.
    """

    name = "jsd-contrastive"

    def __init__(self, alpha: float = 0.1, distance_discount: bool = True, revision: int = 2):
        if not isinstance(distance_discount, bool):
            raise ValueError(f"distance_discount must be a bool, got {distance_discount!r}")
        if revision != 2:
            raise ValueError(f"jsd-contrastive revision {revision!r} is not available: revision 2 (the only one) "
                             "restricts the candidates to the head set in log space; revision 1 lost, in float32, "
                             "every candidate whose head-set probabilities underflow. Calibrate again")
        self.alpha = _check_alpha(alpha)
        self.distance_discount = distance_discount
        self.revision = revision

    def params(self) -> dict[str, Any]:
        # the revision is part of every decoder description, loss-table key and certificate: a certificate
        # of revision 1 (recorded without it) does not apply to this scorer
        return {"alpha": self.alpha, "distance_discount": self.distance_discount, "revision": self.revision}

    def other_head_layers(self, layer: int) -> tuple[int, ...]:
        return tuple(range(layer))  # every lower layer is a candidate amateur

    def choose_amateur(
        self, log_p_expert: torch.Tensor, log_p_candidates: Iterable[torch.Tensor], layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log_p_expert (B, k); log_p_candidates: the log-probabilities of layers 0, 1, …, ℓ-1 in that order,
        in chunks of consecutive layers, each (c, B, k) -> ((B,) chosen layer, (B, k) its log-probabilities).
        Ties go to the lower layer (as argmax).

        Only one chunk and the best candidate so far are alive at a time: over the full vocabulary a stack
        of all ℓ would be ℓ·B·|V| floats per consulted layer, which ran a 320-row sweep batch with reduction
        "none" out of an H100's 80 GB inside its CUDA-graph pools (``score`` sizes the chunks).
        """
        p_expert = log_p_expert.exp()
        head = p_expert >= self.alpha * p_expert.max(dim=-1, keepdim=True).values

        def restricted(log_p: torch.Tensor) -> torch.Tensor:
            # renormalised on the head set in log space: exponentiating first lost every candidate whose
            # head-set probabilities underflow (float32: below e^-103; the embedding layer's head spans
            # some 240 nats), which then scored as all-zero and got the divergence of no distribution
            return torch.softmax(torch.where(head, log_p, torch.full_like(log_p, -torch.inf)), dim=-1)

        expert = restricted(log_p_expert)
        best_layer = best_divergence = best = None
        first = 0  # layer of the chunk's first candidate
        for chunk in log_p_candidates:
            divergence = jensen_shannon(expert, restricted(chunk))  # (c, B)
            if self.distance_discount:
                distance = layer - torch.arange(first, first + chunk.shape[0], device=divergence.device)
                divergence = divergence / distance.to(divergence.dtype).unsqueeze(-1)
            chunk_divergence, chunk_index = divergence.max(dim=0)  # (B,) each: the first maximum in the chunk
            chunk_best = chunk.gather(0, chunk_index.view(1, -1, 1).expand(1, *chunk.shape[1:])).squeeze(0)
            chunk_layer = chunk_index + first
            first += chunk.shape[0]
            if best is None:
                best_layer, best_divergence, best = chunk_layer, chunk_divergence, chunk_best
                continue
            better = chunk_divergence > best_divergence  # strict: an equal later layer does not replace
            best_divergence = torch.where(better, chunk_divergence, best_divergence)
            best_layer = torch.where(better, chunk_layer, best_layer)
            best = torch.where(better.unsqueeze(-1), chunk_best, best)
        if best is None:
            raise ValueError(f"jsd-contrastive needs an amateur below layer {layer}; none was given")
        return best_layer, best

    def score(self, view: ExitView) -> torch.Tensor:
        dtype = _compute_dtype(view.logits.dtype)
        log_p_expert = torch.log_softmax(view.logits.to(dtype), dim=-1)
        rows, width = view.logits.shape
        per_chunk = max(1, JSD_CHUNK_ELEMENTS // max(1, rows * width))
        columns = self._head_columns(log_p_expert) if _may_read_host(view.logits) else None

        def chunks():
            for start in range(0, view.layer, per_chunk):
                layers = range(start, min(view.layer, start + per_chunk))
                logits = view.logits_of(layers)
                if columns is not None:  # (c, B, k) -> (c, B, h + 1)
                    logits = logits.gather(-1, columns.unsqueeze(0).expand(logits.shape[0], -1, -1))
                yield torch.log_softmax(logits.to(dtype), dim=-1)

        if columns is not None:
            log_p_expert = log_p_expert.gather(-1, columns)
        _, log_p_amateur = self.choose_amateur(log_p_expert, chunks(), view.layer)
        return top1_minus_top2(contrast_distribution(log_p_expert, log_p_amateur, self.alpha))

    def _head_columns(self, log_p_expert: torch.Tensor) -> torch.Tensor | None:
        """(B, h + 1) the columns of the expert's h most probable tokens plus one, h the widest head set of the
        batch (None when that is every column, or when ``JSD_HEAD_SET_COLUMNS`` is off).

        Every quantity of the score depends on the candidates only through their logits on the expert's head
        set: restricted and renormalised there, a candidate's distribution is the softmax of those logits, and
        in the contrast its log-normaliser cancels. The head set holds the most probable tokens, and the one
        more column carries the largest probability off it (the runner-up the margin may need), so the score
        over these columns is the score over the whole set, up to rounding, at (h + 1) / k of the
        arithmetic per candidate. The width h is read on the host, which CUDA-graph capture does not allow
        (there every column is read, as before)."""
        if not JSD_HEAD_SET_COLUMNS:
            return None
        p_expert = log_p_expert.exp()
        head = p_expert >= self.alpha * p_expert.max(dim=-1, keepdim=True).values
        width = int(head.sum(dim=-1).max()) + 1
        if width >= log_p_expert.shape[-1]:
            return None
        return torch.topk(log_p_expert, width, dim=-1).indices


def _may_read_host(tensor: torch.Tensor) -> bool:
    """Whether a value of ``tensor`` may be read on the host now (not while a CUDA graph is captured)."""
    return not (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


#: whether the JSD search reads its candidates only on the expert's head-set columns where it can
#: (``JSDContrastive._head_columns``); off, every column is read (what CUDA-graph capture always does)
JSD_HEAD_SET_COLUMNS = True


#: how many candidate log-probabilities (layers × rows × vocabulary) the JSD amateur search holds at once:
#: every lower layer together at batch 1 or with a pruned set (few kernels per consulted layer, which is
#: what batch-1 decoding pays for), a few layers at a time over a wide batch's full vocabulary (2^24 floats
#: = 64 MiB in float32 per chunk tensor)
JSD_CHUNK_ELEMENTS = 1 << 24


# ------------------------------------------------------------------------------ learned exit classifier

#: features an exit classifier may read, each computed from an :class:`ExitView` exactly as the decoder
#: sees the position at layer ℓ (pruned vocabulary set S_ℓ, adapted head). "previous-*" features read the
#: exit head of layer ℓ-1 over the *same* set S_ℓ (``view.logits_at(ℓ - 1)``), so they cost k head rows
#: (and, with exit adapters, one more adapter application) per consulted layer.
EXIT_FEATURES: tuple[str, ...] = (
    "top1-log-odds",            # log(p1 / (1 - p1)) of the softmax over S_ℓ (clipped to ±_LOG_ODDS_CLIP)
    "margin",                   # p1 - p2
    "entropy",                  # entropy (nats) of the softmax over S_ℓ
    "previous-agrees",          # 1 when layer ℓ-1's head over S_ℓ has the same top-1, else 0
    "previous-top1-log-odds",   # log-odds of layer ℓ's top-1 token under layer ℓ-1's softmax over S_ℓ
    "previous-margin",          # p1 - p2 of layer ℓ-1's softmax over S_ℓ
    "hidden-cosine",            # cos(h_ℓ, h_{ℓ-1}) of the raw (unadapted) states
)
_PREVIOUS_FEATURES = frozenset(name for name in EXIT_FEATURES if name.startswith("previous-"))
_LOG_ODDS_CLIP = 30.0


def _log_odds(p: torch.Tensor) -> torch.Tensor:
    # log p - log(1 - p), computed from the distribution's own mass so that p near 1 keeps its precision
    return (p.log() - (-p).log1p()).clamp(-_LOG_ODDS_CLIP, _LOG_ODDS_CLIP)


def exit_features(view: ExitView, names: tuple[str, ...] | list[str]) -> torch.Tensor:
    """(B, len(names)) features of the rows in ``view`` (names from :data:`EXIT_FEATURES`), in the compute
    dtype (half precisions promoted to float32)."""
    unknown = [name for name in names if name not in EXIT_FEATURES]
    if unknown:
        raise ValueError(f"unknown exit-classifier features {unknown}; known: {list(EXIT_FEATURES)}")
    dtype = _compute_dtype(view.logits.dtype)
    probs = torch.softmax(view.logits.to(dtype), dim=-1)
    if probs.shape[-1] == 1:
        top, top_index = probs, torch.zeros(probs.shape[:-1] + (1,), dtype=torch.long, device=probs.device)
        second = torch.zeros_like(top)
    else:
        best = torch.topk(probs, 2, dim=-1)
        top, top_index, second = best.values[..., :1], best.indices[..., :1], best.values[..., 1:]
    columns: dict[str, Callable[[], torch.Tensor]] = {
        "top1-log-odds": lambda: _log_odds(top[..., 0]),
        "margin": lambda: (top - second)[..., 0],
        "entropy": lambda: -torch.special.xlogy(probs, probs).sum(dim=-1),
        "hidden-cosine": lambda: torch.nn.functional.cosine_similarity(
            view.hidden.to(dtype), view.hidden_prev.to(dtype), dim=-1, eps=1e-12),
    }
    if _PREVIOUS_FEATURES.intersection(names):
        if view.logits_at is None:
            raise ValueError("the previous-layer features need view.logits_at (the exit head at layer ℓ-1)")
        previous = torch.softmax(view.logits_at(view.layer - 1).to(dtype), dim=-1)
        columns["previous-agrees"] = lambda: (previous.argmax(dim=-1) == top_index[..., 0]).to(dtype)
        columns["previous-top1-log-odds"] = lambda: _log_odds(previous.gather(-1, top_index)[..., 0])
        columns["previous-margin"] = lambda: top1_minus_top2(previous)
    return torch.stack([columns[name]() for name in names], dim=-1)


class LogisticExitModel:
    """A fitted exit classifier: P(layer ℓ's prediction equals the final layer's) = σ(b_ℓ + w_ℓ · f).

    features: names from :data:`EXIT_FEATURES` (the order of the columns of ``weight``)
    layers:   the consulted layers it was fitted for (1-based), ascending
    weight:   (len(layers), len(features)) coefficients on the raw features (standardisation folded in)
    bias:     (len(layers),) intercepts
    A model fitted with one shared weight vector has identical rows.
    """

    def __init__(self, features, layers, weight: torch.Tensor, bias: torch.Tensor):
        self.features = tuple(str(name) for name in features)
        unknown = [name for name in self.features if name not in EXIT_FEATURES]
        if unknown or not self.features:
            raise ValueError(f"exit-classifier features must be names from {list(EXIT_FEATURES)}; got {list(features)}")
        self.layers = [int(layer) for layer in layers]
        if not self.layers or self.layers != sorted(set(self.layers)) or self.layers[0] < 1:
            raise ValueError(f"layers must be distinct ascending ints >= 1, got {list(layers)}")
        weight = torch.as_tensor(weight, dtype=torch.float64)
        bias = torch.as_tensor(bias, dtype=torch.float64)
        if tuple(weight.shape) != (len(self.layers), len(self.features)) or tuple(bias.shape) != (len(self.layers),):
            raise ValueError(
                f"weight must be ({len(self.layers)}, {len(self.features)}) and bias ({len(self.layers)},) for "
                f"{len(self.layers)} layers and {len(self.features)} features; got {tuple(weight.shape)} and "
                f"{tuple(bias.shape)}"
            )
        if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
            raise ValueError("exit-classifier weights must be finite")
        self.weight, self.bias = weight, bias
        self._row = {layer: i for i, layer in enumerate(self.layers)}
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def logit(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """features (B, G) at ``layer`` -> (B,) log-odds, in the features' dtype and device."""
        row = self._row.get(layer)
        if row is None:
            raise ValueError(
                f"the exit classifier was fitted for layers {self.layers[0]}..{self.layers[-1]}, not layer {layer}; "
                "use a min exit layer it covers or refit it (ltt-fit-exits --exit-classifier)"
            )
        key = (features.device, features.dtype)
        if key not in self._cache:
            self._cache[key] = (self.weight.to(features.device, features.dtype),
                                self.bias.to(features.device, features.dtype))
        weight, bias = self._cache[key]
        return features @ weight[row] + bias[row]

    def probability(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """features (B, G) -> (B,) σ(b_ℓ + w_ℓ · f)."""
        return torch.sigmoid(self.logit(layer, features))

    def to_json(self) -> dict[str, Any]:
        return {"features": list(self.features), "layers": list(self.layers)}


class ExitClassifier(ConfidenceScorer):
    """CALM's learned early-exit classifier: confidence = the fitted probability that layer ℓ's prediction
    equals the full model's, from features of the exit head and the states (:data:`EXIT_FEATURES`).

    The parameters are fitted by ``ltt-fit-exits --exit-classifier`` and live in the exit-adapter file, so
    the adapter fingerprint that sweeps and certificates record covers them. Built by name, the scorer is
    unfitted; the decoder binds it to its exit adapters (:meth:`bind_exit_adapters`) and refuses adapters
    that hold no classifier. An unfitted scorer refuses to score.
    """

    name = "exit-classifier"

    def __init__(self, model: LogisticExitModel | None = None):
        if model is not None and not isinstance(model, LogisticExitModel):
            raise TypeError(f"model must be a LogisticExitModel or None, got {type(model).__name__}")
        self.model = model

    def bind_exit_adapters(self, exit_adapters: Any) -> "ExitClassifier":
        """The scorer with the classifier held by ``exit_adapters`` (ValueError when there is none)."""
        model = getattr(exit_adapters, "exit_classifier", None)
        if model is None:
            path = getattr(exit_adapters, "path", None)
            where = ("no exit adapters were given" if exit_adapters is None
                     else f"the exit adapters{f' {path}' if path else ''} hold no fitted classifier")
            raise ValueError(
                f"the exit-classifier scorer needs its fitted parameters, and {where}. Fit them into the adapter "
                "file with `ltt-fit-exits --exit-classifier` (or ExitAdapters.with_exit_classifier)."
            )
        return ExitClassifier(model)

    def other_head_layers(self, layer: int) -> tuple[int, ...]:
        # the previous-layer features read layer ℓ-1's head
        if self.model is not None and _PREVIOUS_FEATURES.intersection(self.model.features):
            return (layer - 1,)
        return ()

    def validate(self, num_layers: int, min_exit_layer: int) -> None:
        if self.model is not None:
            missing = [layer for layer in range(min_exit_layer, num_layers) if layer not in self.model.layers]
            if missing:
                raise ValueError(
                    f"the exit classifier covers layers {self.model.layers[0]}..{self.model.layers[-1]}; the "
                    f"decoder consults layers {min_exit_layer}..{num_layers - 1} ({missing} missing)"
                )

    def score(self, view: ExitView) -> torch.Tensor:
        if self.model is None:
            raise ValueError(
                "the exit-classifier scorer has no fitted parameters: build the decoder with exit adapters whose "
                "file holds a classifier (ltt-fit-exits --exit-classifier); the decoder binds it"
            )
        return self.model.probability(view.layer, exit_features(view, self.model.features))


SCORERS: dict[str, type[ConfidenceScorer]] = {
    cls.name: cls for cls in (SoftmaxMax, SoftmaxMargin, HiddenCosine, WeightedContrastive, JSDContrastive)
}

#: scorers whose parameters are fitted and stored in the exit-adapter file: resolved by name like the others,
#: but kept apart from ``SCORERS`` (the scorers that work on any decoder as they are), because a decoder can
#: use them only together with adapters that hold their fit
FITTED_SCORERS: dict[str, type[ConfidenceScorer]] = {ExitClassifier.name: ExitClassifier}


def resolve_scorer(spec: str | ConfidenceScorer | tuple[str, dict[str, Any]]) -> ConfidenceScorer:
    """A scorer from a registry name, an instance, or a ``(name, kwargs)`` pair."""
    if isinstance(spec, ConfidenceScorer):
        return spec
    name, kwargs = split_spec(spec, "scorer")
    known = SCORERS | FITTED_SCORERS
    if name not in known:
        raise ValueError(f"unknown scorer {name!r}; known scorers: {sorted(known)}")
    try:
        return known[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad parameters for scorer {name!r}: {err}") from None


def split_spec(spec: Any, kind: str) -> tuple[str, dict[str, Any]]:
    """A component given by name or as a ``(name, kwargs)`` pair -> (name, kwargs); ``kind`` names the
    argument in the error (scorers and prunings are both given this way)."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict):
        return spec[0], dict(spec[1])
    raise TypeError(f"{kind} must be a name, an instance, or a (name, kwargs) pair; got {spec!r}")
