"""The exit classifier: a logistic model of "the layer's prediction equals the full model's", over features
of the exit head (``ltt_exit.decode.scorers.EXIT_FEATURES``), fitted on fitting prompts and stored in the
adapter file for the ``exit-classifier`` scorer.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .file import ExitAdapters
from .overlap import ExampleHashes, fit_set_digest
from .states import StateBatch, collect_states

__all__ = ["DEFAULT_CLASSIFIER_FEATURES", "exit_classifier_samples", "fit_logistic_exit_model",
           "fit_exit_classifier"]


#: features of the default exit classifier (see ltt_exit.decode.scorers.EXIT_FEATURES)
DEFAULT_CLASSIFIER_FEATURES: tuple[str, ...] = (
    "top1-log-odds", "margin", "entropy", "previous-agrees", "previous-top1-log-odds", "previous-margin",
    "hidden-cosine",
)


@torch.inference_mode()
def exit_classifier_samples(
    backend,
    batch: StateBatch,
    adapters: Any,
    *,
    pruning: Any,
    min_exit_layer: int,
    features: Sequence[str] = DEFAULT_CLASSIFIER_FEATURES,
    skip_first: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced training samples of an exit classifier from one prompt's states.

    At every position of ``batch`` and consulted layer ℓ (``min_exit_layer`` <= ℓ < L), the exit decision's
    inputs are built as the decoder builds them: the exit head on ``adapters.apply(ℓ, h_ℓ)`` (adapters None:
    the raw head), ``pruning`` chained over the consulted layers, an :class:`ExitView` with ``logits_at`` over
    the layer's vocabulary set, and :func:`exit_features` of it. The label is whether the layer's prediction
    (arg-max over its set) equals the full model's token. ``batch.hidden`` must hold layers
    ``min_exit_layer - 1`` .. L-1. ``skip_first`` (default: decoder-only models) drops position 0, whose token
    the decoder-only decoder takes from the prompt's prefill without an exit decision.

    Returns features (T, L - min_exit_layer, G) float64 and labels (T, L - min_exit_layer) bool.
    """
    from ..pruning import resolve_pruning, select_pruned
    from ..scorers import ExitView, exit_features

    pruning = resolve_pruning(pruning).bind(backend)
    num_layers = backend.num_layers
    if not 2 <= min_exit_layer < num_layers:
        raise ValueError(f"fitting an exit classifier needs min_exit_layer in [2, {num_layers - 1}] (states are "
                         f"collected from layer 1 up), got {min_exit_layer}")
    missing = [a for a in range(min_exit_layer - 1, num_layers) if a not in batch.hidden]
    if missing:
        raise ValueError(f"the states lack layers {missing}; collect layers {max(1, min_exit_layer - 1)}..{num_layers - 1}")
    if skip_first is None:
        skip_first = backend.first_token_from_prompt
    target = torch.tensor(batch.tokens, device=backend.device)
    adapted: dict[int, torch.Tensor] = {}

    def state(layer: int) -> torch.Tensor:
        if layer not in adapted:
            hidden = batch.hidden[layer].to(backend.device, backend.dtype)
            adapted[layer] = hidden if adapters is None else adapters.apply(layer, hidden)
        return adapted[layer]

    def head(layer: int, ids: torch.Tensor | None) -> torch.Tensor:
        return backend.head(state(layer), ids)

    rows, labels = [], []
    set_ids = None
    for layer in range(min_exit_layer, num_layers):
        pruned = select_pruned(pruning, layer, min_exit_layer=min_exit_layer, num_layers=num_layers,
                               prev_ids=set_ids, head=lambda ids, layer=layer: head(layer, ids),
                               head_input=lambda layer=layer: backend.head_input(state(layer)))
        view = ExitView(layer=layer, logits=pruned.logits,
                        hidden=batch.hidden[layer].to(backend.device, backend.dtype),
                        hidden_prev=batch.hidden[layer - 1].to(backend.device, backend.dtype),
                        logits_at=lambda a, ids=pruned.ids: head(a, ids))
        rows.append(exit_features(view, tuple(features)).double().cpu())
        best = pruned.logits.argmax(dim=-1)
        predicted = best if pruned.ids is None else pruned.ids.gather(-1, best[:, None])[:, 0]
        labels.append((predicted == target).cpu())
        set_ids = pruned.ids
    x, y = torch.stack(rows, dim=1).numpy(), torch.stack(labels, dim=1).numpy()
    return (x[1:], y[1:]) if skip_first else (x, y)


def fit_logistic_exit_model(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    layers: Sequence[int],
    names: Sequence[str],
    l2: float = 1e-3,
    per_layer: bool = False,
    max_iterations: int = 5000,
):
    """L2-penalised logistic regression of ``labels`` on ``features``, one intercept per layer.

    features: (N, n, G) for N positions at the n consulted ``layers``; labels: (N, n) bool
    l2:       penalty (on standardised features) on the weights, not on the intercepts; the mean log-loss
              is minimised, so l2 does not depend on N
    per_layer: one weight vector per layer (False: one shared by all layers)
    Minimised with scipy's L-BFGS-B (exact gradient); the standardisation is folded into the returned
    coefficients. Returns (LogisticExitModel, facts).
    """
    from scipy.optimize import minimize
    from scipy.special import expit, log_expit

    from ..scorers import LogisticExitModel

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if x.ndim != 3 or y.shape != x.shape[:2]:
        raise ValueError(f"features must be (N, layers, G) and labels (N, layers); got {x.shape} and {y.shape}")
    n_layers, n_features = x.shape[1], x.shape[2]
    if len(layers) != n_layers or len(names) != n_features:
        raise ValueError(f"{n_layers} layers and {n_features} features in the data, but {len(layers)} layer numbers "
                         f"and {len(names)} feature names")
    if x.shape[0] < 1:
        raise ValueError("no samples to fit the exit classifier on")
    if not np.isfinite(x).all():
        raise ValueError("exit-classifier features contain NaN or infinity")
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0 (separable data has no finite unpenalised fit), got {l2!r}")
    mean = x.reshape(-1, n_features).mean(axis=0)
    scale = x.reshape(-1, n_features).std(axis=0)
    scale[scale == 0] = 1.0  # a constant feature carries nothing beyond the intercepts
    z = (x - mean) / scale
    sign = np.where(y, 1.0, -1.0)
    count = y.size
    rows = n_layers if per_layer else 1

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        bias, weight = theta[:n_layers], theta[n_layers:].reshape(rows, n_features)
        logit = bias + np.einsum("nlg,lg->nl", z, np.broadcast_to(weight, (n_layers, n_features)))
        value = -log_expit(sign * logit).sum() / count + 0.5 * l2 * (weight**2).sum()
        residual = -sign * expit(-sign * logit) / count  # d loss / d logit
        grad_weight = np.einsum("nlg,nl->lg", z, residual)
        if not per_layer:
            grad_weight = grad_weight.sum(axis=0, keepdims=True)
        return value, np.concatenate([residual.sum(axis=0), (grad_weight + l2 * weight).ravel()])

    started = time.perf_counter()
    result = minimize(loss, np.zeros(n_layers + rows * n_features), jac=True, method="L-BFGS-B",
                      options={"maxiter": max_iterations, "gtol": 1e-9})
    bias, weight = result.x[:n_layers], np.broadcast_to(result.x[n_layers:].reshape(rows, n_features),
                                                        (n_layers, n_features))
    raw_weight = weight / scale
    raw_bias = bias - raw_weight @ mean
    model = LogisticExitModel(names, layers, torch.from_numpy(raw_weight.copy()), torch.from_numpy(raw_bias.copy()))
    facts = {"l2": l2, "per_layer": per_layer, "samples": int(count), "positive_share": float(y.mean()),
             "log_loss": float(result.fun), "converged": bool(result.success), "iterations": int(result.nit),
             "fit_seconds": round(time.perf_counter() - started, 3)}
    return model, facts


def fit_exit_classifier(
    loaded,
    adapters: ExitAdapters,
    examples: Sequence,
    info: dict[str, Any],
    *,
    max_new_tokens: int,
    min_exit_layer: int,
    pruning: Any = "decaying",
    features: Sequence[str] = DEFAULT_CLASSIFIER_FEATURES,
    l2: float = 1e-3,
    per_layer: bool = False,
    progress: bool = False,
    batch_size: int = 1,
) -> ExitAdapters:
    """Fit an exit classifier for ``adapters`` and return a copy of them that holds it.

    loaded:   a LoadedModel; examples / info: fitting prompts and their provenance (:func:`fitting_set`). Use
              prompts the adapters were *not* fitted on: on their own fitting prompts the adapted heads agree
              more often than on new prompts, and the classifier would learn that optimism.
    The full model greedy-decodes every prompt (``collect_states``); the samples are
    :func:`exit_classifier_samples` with the decoder's ``pruning`` and ``min_exit_layer`` (a classifier is
    fitted for one pruning: it sees the pruned softmax). The fit is :func:`fit_logistic_exit_model`.
    """
    from ..backends import backend_for
    from ..pruning import resolve_pruning

    backend = backend_for(loaded.model)
    pruning = resolve_pruning(pruning)
    layers = list(range(min_exit_layer - 1, backend.num_layers))
    started = time.perf_counter()
    xs, ys = [], []
    if not examples:
        raise ValueError("no prompts to fit the exit classifier on (an empty fitting set)")
    prompts = [example.prompt for example in examples]
    for index, batch in enumerate(collect_states(loaded.model, loaded.tokenizer, prompts, batch_size=batch_size,
                                                 max_new_tokens=max_new_tokens, layers=layers)):
        x, y = exit_classifier_samples(backend, batch, adapters, pruning=pruning, min_exit_layer=min_exit_layer,
                                       features=features)
        xs.append(x)
        ys.append(y)
        if progress and (index + 1) % 25 == 0:
            print(f"  classifier samples: {index + 1}/{len(prompts)} prompts ({time.perf_counter() - started:.0f}s)",
                  flush=True)
    collect_seconds = time.perf_counter() - started
    x, y = np.concatenate(xs), np.concatenate(ys)
    model, facts = fit_logistic_exit_model(x, y, layers=list(range(min_exit_layer, backend.num_layers)),
                                           names=tuple(features), l2=l2, per_layer=per_layer)
    record = {key: info.get(key) for key in ("recipe", "split", "source", "family", "sample_seed")} | {
        "n_prompts": len(prompts),
        "n_tokens": int(x.shape[0]),
        "fit_set_sha256": fit_set_digest(examples),
        "max_new_tokens": max_new_tokens,
        "min_exit_layer": min_exit_layer,
        "pruning": {"name": pruning.name, "params": pruning.params()},
        "features": list(features),
        "method": {"name": "logistic"} | facts,
        "collect_seconds": round(collect_seconds, 3),
    }
    hashes = ExampleHashes.of(examples, recipe=info.get("recipe", ""), source=info.get("source", ""))
    return adapters.with_exit_classifier(model, record, hashes)
