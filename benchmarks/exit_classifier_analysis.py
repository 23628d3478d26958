"""Analysis half of ``exit_classifier_features.py``: logistic exit classifiers vs the softmax margin."""
from __future__ import annotations

import json

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit

from exit_classifier_setup import ADAPTERS, FEATURES, MIN_EXIT, WORK

GRID = (1.0, 0.9999, 0.9995, 0.999, 0.998, 0.995, 0.99, 0.98, 0.97, 0.95, 0.93, 0.9, 0.88, 0.85, 0.8, 0.75, 0.7,
        0.65, 0.6, 0.5)
BUDGETS = (0.005, 0.01, 0.02, 0.05)
L = 30


def load(name, kind):
    data = np.load(WORK / f"{name}-features.npz")
    keep = data["position"] > 0  # the decoder-only first token comes from the prefill: no exit decision
    return data[f"{kind}_x"][keep], data[f"{kind}_y"][keep], keep


def hidden_design(name, kind, keep):
    """(N, layers, d) rms-normalised exit-head inputs (adapted for ``affine``) at layers 12..29."""
    import torch

    from ltt_exit.decode.adapters import ExitAdapters

    h = torch.from_numpy(np.load(WORK / f"{name}-states.npz")["hidden"][keep][:, 1:]).float()  # drop h_11
    if kind == "affine":
        adapters = ExitAdapters.load(ADAPTERS)
        h = torch.stack([adapters.apply(MIN_EXIT + i, h[:, i]) for i in range(h.shape[1])], 1)
    h = h / h.pow(2).mean(-1, keepdim=True).sqrt()
    return h.numpy().astype(np.float64)


def design(x, which):
    """(N, layers, F) raw features -> (N, layers, G) model inputs."""
    f = {name: x[..., i] for i, name in enumerate(FEATURES)}
    eps = 1e-6
    cols = []
    if "p" in which:
        p1 = np.clip(f["p1"], eps, 1 - eps)
        cols += [np.log(p1 / (1 - p1)), f["margin"], f["entropy"]]
    if "stab" in which:
        cols += [f["eq_prev_chain"], np.minimum(f["run_chain"], 8) / 8]
    if "view" in which:
        q = np.clip(f["prev_p_top"], eps, 1 - eps)
        cols += [f["eq_prev_view"], np.log(q / (1 - q)), f["prev_margin_view"]]
    if "cos" in which:
        cols += [f["cos_raw"], f["cos_adapted"]]
    layers = x.shape[1]
    onehot = np.broadcast_to(np.eye(layers), (x.shape[0], layers, layers))
    return np.concatenate([np.stack(cols, -1), onehot], -1)


def fit_logistic(X, y, l2=1e-3):
    """L2-penalised logistic regression (intercept via the layer one-hots). Returns (w, mean, scale)."""
    mean, scale = X.mean(0), X.std(0)
    scale[scale == 0] = 1.0
    Z = (X - mean) / scale
    n = len(y)
    s = 2.0 * y - 1.0

    def loss(w):
        z = Z @ w[1:] + w[0]
        value = -log_expit(s * z).sum() / n + 0.5 * l2 * (w[1:] ** 2).sum()
        g = -s * expit(-s * z) / n
        return value, np.concatenate([[g.sum()], Z.T @ g + l2 * w[1:]])

    w = minimize(loss, np.zeros(Z.shape[1] + 1), jac=True, method="L-BFGS-B", options={"maxiter": 2000}).x
    return w, mean, scale


def predict(model, X):
    w, mean, scale = model
    return expit(((X - mean) / scale) @ w[1:] + w[0])


def tradeoff(conf, ok, thresholds):
    """conf, ok: (N, layers). Per threshold: mean exit layer, share of tokens exiting wrong."""
    rows = []
    n = conf.shape[0]
    for lam in thresholds:
        passes = conf >= lam if lam < 1 else np.zeros_like(conf, dtype=bool)
        exited = passes.any(1)
        first = passes.argmax(1)
        exit_layer = np.where(exited, first + MIN_EXIT, L)
        wrong = exited & ~ok[np.arange(n), first]
        rows.append((float(lam), float(exit_layer.mean()), float(wrong.mean())))
    return rows


def best(rows, budget):
    ok = [r for r in rows if r[2] <= budget]
    return min(ok, key=lambda r: r[1])


def analyse(args):
    fine = sorted(set(GRID) | {1 - 10 ** -e for e in np.arange(0.3, 5.01, 0.05)}, reverse=True)
    results = {}
    lines = ["| exit head | confidence | " + " | ".join(f"wrong ≤ {b * 100:g} %" for b in BUDGETS) + " |",
             "|---|---|" + "---|" * len(BUDGETS)]
    for kind, pruning in [(k, p) for p in args.prunings.split(",") for k in ("raw", "affine")]:
        hidden_kind = kind
        kind = f"{kind}_{pruning}"
        xh, yh, kh = load("heldout", kind)
        xc, yc, kc = load("clf", kind)
        xa, ya, _ = load("adapt", kind)
        first_ok = np.where(yh.any(1), yh.argmax(1) + MIN_EXIT, L)
        results[f"{kind} oracle"] = float(first_ok.mean())
        confs = {"margin": xh[..., FEATURES.index("margin")]}
        for which in (("p",), ("p", "stab"), ("p", "view"), ("p", "view", "cos"), ("p", "stab", "view", "cos")):
            Xc = design(xc, which)
            model = fit_logistic(Xc.reshape(-1, Xc.shape[-1]), yc.reshape(-1).astype(float))
            Xh = design(xh, which)
            confs["classifier[" + "+".join(which) + "]"] = predict(model, Xh.reshape(-1, Xh.shape[-1])).reshape(yh.shape)
            if which == ("p", "view", "cos") and hidden_kind == "affine":  # fitted on the adapters' own prompts instead
                Xa = design(xa, which)
                m2 = fit_logistic(Xa.reshape(-1, Xa.shape[-1]), ya.reshape(-1).astype(float))
                confs["classifier[p+view+cos] fitted on adapter prompts"] = predict(
                    m2, Xh.reshape(-1, Xh.shape[-1])).reshape(yh.shape)
        if getattr(args, "hidden", False):  # CALM's classifier reads the hidden state itself
            which = ("p", "view", "cos")
            Xc = np.concatenate([design(xc, which), hidden_design("clf", hidden_kind, kc)], -1)
            Xh = np.concatenate([design(xh, which), hidden_design("heldout", hidden_kind, kh)], -1)
            for l2 in (1e-3, 1e-2):
                model = fit_logistic(Xc.reshape(-1, Xc.shape[-1]), yc.reshape(-1).astype(float), l2=l2)
                confs[f"classifier[p+view+cos+hidden, l2 {l2:g}]"] = predict(
                    model, Xh.reshape(-1, Xh.shape[-1])).reshape(yh.shape)
        for name, conf in confs.items():
            for grid_name, grid in (("grid", GRID), ("fine", fine)):
                rows = tradeoff(conf, yh, grid)
                cells = [best(rows, b) for b in BUDGETS]
                results[f"{kind} {name} {grid_name}"] = cells
                lines.append(f"| {kind} | {name} ({grid_name}) | " + " | ".join(
                    f"{c[1]:.1f} (λ {c[0]:.4g})" for c in cells) + " |")
        print(f"{kind}: held-out tokens {len(yh)}, clf tokens {len(yc)}; agreement per layer (held-out) "
              + " ".join(f"{v:.2f}" for v in yh.mean(0)) + f"; oracle {results[f'{kind} oracle']:.2f}")
        print(f"{kind}: agreement per layer (clf) " + " ".join(f"{v:.2f}" for v in yc.mean(0)))
        print(f"{kind}: agreement per layer (adapt, in-sample) " + " ".join(f"{v:.2f}" for v in ya.mean(0)))
    print("\n".join(lines))
    (WORK / "analysis.json").write_text(json.dumps(results, indent=1))
