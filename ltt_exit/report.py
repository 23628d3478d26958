"""The CALM validation protocol on a loss table: many random calibration/test splits.

For each trial the table's examples are split at random (by default 80 % calibration, 20 % test);
λ is certified on the calibration part for each δ and evaluated on the test part. Over many trials
this shows what the guarantee buys: the mean certified λ, the layers used, the speed-up, the test
risk, and how often the test risk exceeded δ (the violation rate, to be compared with ε). The test
risk of a finite test split is itself an estimate, so the violation rate is a noisy check, not a
proof — the proof is the p-value bound.

No torch: works on any loss table.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ltt_exit.certify import certify
from ltt_exit.loss_table import LossTable


@dataclass(frozen=True)
class DeltaSummary:
    delta: float
    epsilon: float
    trials: int
    mean_lambda: float
    std_lambda: float
    certified_rate: float        # share of trials where some candidate other than "always safe" passed
    mean_layers: float           # token-weighted mean exit layer on the test split
    speedup: float               # num_layers / mean_layers
    mean_test_risk: float
    violation_rate: float        # share of trials whose test risk > δ
    violation_se: float          # Monte-Carlo standard error of the violation rate


def _layer_stats(table: LossTable):
    """Per-(example, candidate) layer totals and token counts, if the table has them."""
    cols = table.candidate_columns
    if "layers_total" in cols and "num_tokens" in cols:
        return np.asarray(cols["layers_total"], float), np.asarray(cols["num_tokens"], float)
    if "mean_layers" in cols:
        return np.asarray(cols["mean_layers"], float), np.ones_like(np.asarray(cols["mean_layers"], float))
    return None, None


def split_trials(table: LossTable, deltas, epsilon: float, *, trials: int = 200,
                 calibration_fraction: float = 0.8, pvalue: str = "hoeffding-bentkus",
                 procedure: str = "fixed-sequence", seed: int = 0) -> list[DeltaSummary]:
    """Run the random-split protocol; one summary per δ."""
    if not 0.0 < calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction must be in (0, 1), got {calibration_fraction}")
    if trials < 1:
        raise ValueError(f"trials must be ≥ 1, got {trials}")
    n = table.n
    n_cal = int(round(calibration_fraction * n))
    if n_cal < 1 or n - n_cal < 1:
        raise ValueError(f"a table of {n} examples cannot be split {calibration_fraction:.0%} / "
                         f"{1 - calibration_fraction:.0%}: both parts need at least one example")
    losses = table.losses
    lambdas = np.asarray(table.lambdas, float)
    layers, tokens = _layer_stats(table)
    num_layers = table.metadata.get("num_layers")
    rng = np.random.default_rng(seed)
    summaries = []
    perms = [rng.permutation(n) for _ in range(trials)]
    for delta in deltas:
        lam, risk, used, certified = [], [], [], []
        for perm in perms:
            cal, test = perm[:n_cal], perm[n_cal:]
            costs = None
            if layers is not None:
                costs = layers[cal].sum(0) / np.maximum(tokens[cal].sum(0), 1)
            cert = certify(losses[cal], lambdas, delta, epsilon, pvalue=pvalue,
                           procedure=procedure, costs=costs, seed=seed)
            j = cert.chosen_index
            certified.append(cert.certified_any)
            lam.append(cert.lambda_hat)
            if j is None:  # nothing certified: the full model, zero risk, every layer
                risk.append(0.0)
                used.append(float(num_layers) if num_layers else np.nan)
            else:
                risk.append(float(losses[test, j].mean()))
                if layers is not None:
                    used.append(float(layers[test, j].sum() / max(tokens[test, j].sum(), 1)))
                else:
                    used.append(np.nan)
        risk_arr = np.array(risk)
        violations = risk_arr > delta
        mean_used = float(np.nanmean(used)) if not np.all(np.isnan(used)) else float("nan")
        summaries.append(DeltaSummary(
            delta=float(delta), epsilon=float(epsilon), trials=trials,
            mean_lambda=float(np.mean(lam)), std_lambda=float(np.std(lam)),
            certified_rate=float(np.mean(certified)),
            mean_layers=mean_used,
            speedup=float(num_layers / mean_used) if num_layers and mean_used > 0 else float("nan"),
            mean_test_risk=float(risk_arr.mean()),
            violation_rate=float(violations.mean()),
            violation_se=float(np.sqrt(violations.mean() * (1 - violations.mean()) / trials)),
        ))
    return summaries


def markdown_table(summaries: list[DeltaSummary]) -> str:
    head = ("| δ | ε | trials | mean λ̂ (sd) | certified | mean layers | est. speed-up | "
            "mean test risk | violation rate (± se) |\n|---|---|---|---|---|---|---|---|---|\n")
    rows = "".join(
        f"| {s.delta:g} | {s.epsilon:g} | {s.trials} | {s.mean_lambda:.3f} ({s.std_lambda:.3f}) | "
        f"{s.certified_rate:.0%} | {s.mean_layers:.2f} | {s.speedup:.2f}× | {s.mean_test_risk:.4f} | "
        f"{s.violation_rate:.3f} (± {s.violation_se:.3f}) |\n"
        for s in summaries
    )
    return head + rows


def plot_report(table: LossTable, summaries: list[DeltaSummary], out_dir: Path, *,
                epsilon: float, pvalue: str = "hoeffding-bentkus") -> list[Path]:
    """Write PNG plots: risk and p-value vs λ, exit-layer histogram, quality/speed frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    lambdas = np.asarray(table.lambdas, float)
    risk = table.losses.mean(0)
    written = []

    fig, (ax_risk, ax_p) = plt.subplots(1, 2, figsize=(11, 4))
    ax_risk.plot(lambdas, risk, "o-", label="empirical risk (all examples)")
    for s in summaries:
        ax_risk.axhline(s.delta, ls="--", lw=0.8, color="grey")
    ax_risk.set_xlabel("λ")
    ax_risk.set_ylabel("mean loss")
    ax_risk.set_title("Risk vs threshold (dashed: δ values)")
    ax_risk.invert_xaxis()
    for s in summaries:
        cert = certify(table.losses, lambdas, s.delta, epsilon, pvalue=pvalue)
        ax_p.semilogy(lambdas, np.maximum(cert.pvalues, 1e-300), "o-", label=f"δ = {s.delta:g}")
    ax_p.axhline(epsilon, color="red", ls="--", lw=1, label=f"ε = {epsilon:g}")
    ax_p.set_xlabel("λ")
    ax_p.set_ylabel(f"p-value ({pvalue})")
    ax_p.set_title("p-values vs threshold")
    ax_p.invert_xaxis()
    ax_p.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "risk_pvalues.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    if "exit_layers" in table.candidate_columns:
        fig, ax = plt.subplots(figsize=(6, 4))
        columns = table.candidate_columns["exit_layers"]
        num_layers = table.metadata.get("num_layers")
        for s in summaries:
            cert = certify(table.losses, lambdas, s.delta, epsilon, pvalue=pvalue)
            if cert.chosen_index is None:
                continue
            values = [int(x) for cell in columns[:, cert.chosen_index] for x in str(cell).split()]
            if values:
                bins = np.arange(0.5, (num_layers or max(values)) + 1.5)
                ax.hist(values, bins=bins, alpha=0.5, label=f"δ = {s.delta:g}, λ̂ = {cert.lambda_hat:g}")
        ax.set_xlabel("exit layer")
        ax.set_ylabel("tokens")
        ax.set_title("Exit layers at the certified λ (whole table)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "exit_layers.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    layers, tokens = _layer_stats(table)
    num_layers = table.metadata.get("num_layers")
    if layers is not None and num_layers:
        mean_layers = layers.sum(0) / np.maximum(tokens.sum(0), 1)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(num_layers / mean_layers, risk, "o-")
        for lam, x, y in zip(lambdas, num_layers / mean_layers, risk):
            ax.annotate(f"{lam:g}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("estimated speed-up (L / mean layers)")
        ax.set_ylabel("mean loss")
        ax.set_title("Quality / speed frontier (labels: λ)")
        fig.tight_layout()
        path = out_dir / "frontier.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
