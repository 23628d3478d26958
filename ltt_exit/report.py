"""The CALM validation protocol on a loss table: many random calibration/test splits.

For each trial the table's examples are split at random (by default 80 % calibration, 20 % test);
λ is certified on the calibration part for each δ and evaluated on the test part. Over many trials
this shows what the guarantee buys: the mean certified λ, the layers used, the speed-up, the test
risk, and how often the test risk exceeded δ (the violation rate, to be compared with ε). The test
risk of a finite test split is itself an estimate, so the violation rate is a noisy check, not a
proof — the proof is the p-value bound.

For a configuration-space table (``ltt_exit.space_table``), :func:`pareto_split_trials` runs the same
protocol with Pareto Testing (several risks at once) and :func:`plot_pareto_plane` draws the
risk–cost plane with the Pareto front, the tested order and the certified configuration.

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


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (plots are files, never windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` and release it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_report(table: LossTable, summaries: list[DeltaSummary], out_dir: Path, *,
                epsilon: float, pvalue: str = "hoeffding-bentkus") -> list[Path]:
    """Write PNG plots: risk and p-value vs λ, exit-layer histogram, quality/speed frontier."""
    plt = _pyplot()

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
    certificates = [certify(table.losses, lambdas, s.delta, epsilon, pvalue=pvalue) for s in summaries]
    for s, cert in zip(summaries, certificates):
        ax_p.semilogy(lambdas, np.maximum(cert.pvalues, 1e-300), "o-", label=f"δ = {s.delta:g}")
    ax_p.axhline(epsilon, color="red", ls="--", lw=1, label=f"ε = {epsilon:g}")
    ax_p.set_xlabel("λ")
    ax_p.set_ylabel(f"p-value ({pvalue})")
    ax_p.set_title("p-values vs threshold")
    ax_p.invert_xaxis()
    ax_p.legend(fontsize=8)
    written.append(_save(fig, out_dir / "risk_pvalues.png"))

    if "exit_layers" in table.candidate_columns:
        fig, ax = plt.subplots(figsize=(6, 4))
        columns = table.candidate_columns["exit_layers"]
        num_layers = table.metadata.get("num_layers")
        for s, cert in zip(summaries, certificates):
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
        written.append(_save(fig, out_dir / "exit_layers.png"))

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
        written.append(_save(fig, out_dir / "frontier.png"))
    return written


# --------------------------------------------------------------------------- Pareto Testing
@dataclass(frozen=True)
class ParetoSummary:
    """The random-split protocol for Pareto Testing on a configuration-space table."""

    risks: dict                  # risk name -> δ_r
    epsilon: float
    trials: int
    certified_rate: float        # share of trials certifying some configuration (else: the safe one)
    mean_cost: float             # mean per-example cost on the test split of the configuration decoded with
    mean_flops_ratio: float      # its FLOPs relative to the full model's, on the test split
    mean_test_risk: dict         # risk name -> mean test risk
    violation_rate: float        # share of trials where some risk's test risk > its δ_r
    violation_se: float
    chosen_counts: dict          # configuration index -> how many trials chose it


def pareto_split_trials(table, risks: dict, epsilon: float, *, trials: int = 200, calibration_fraction: float = 0.8,
                        split: float = 0.5, pvalue: str = "hoeffding-bentkus", cost: str = "mean_layers",
                        seed: int = 0) -> ParetoSummary:
    """CALM's random-split check for Pareto Testing: certify on a random calibration part (itself split
    into optimisation / testing parts by ``certify_pareto``), measure every risk on the held-out rest."""
    from ltt_exit.certify import certify_pareto

    if not 0.0 < calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction must be in (0, 1), got {calibration_fraction}")
    if trials < 1:
        raise ValueError(f"trials must be ≥ 1, got {trials}")
    names = list(risks)
    deltas = np.array([risks[r] for r in names])
    losses = table.losses(names)                   # (n, K, R)
    costs = table.cost(cost)                       # (n, K)
    flops, full_flops = table.values["flops"], table.values["full_flops"]
    n = table.n
    n_cal = int(round(calibration_fraction * n))
    if n_cal < 2 or n - n_cal < 1:
        raise ValueError(f"a table of {n} examples cannot be split {calibration_fraction:.0%} / "
                         f"{1 - calibration_fraction:.0%} with two calibration parts and a test part")
    safe = next((j for j, c in enumerate(table.configurations) if c["lambda"] >= 1.0), None)
    if safe is None:
        raise ValueError("the space has no λ ≥ 1 configuration (the full model) to fall back to")
    rng = np.random.default_rng(seed)
    chosen, certified, test_risk, test_cost, test_flops = [], [], [], [], []
    for trial in range(trials):
        perm = rng.permutation(n)
        cal, test = perm[:n_cal], perm[n_cal:]
        cert = certify_pareto(losses[cal], costs[cal], deltas, epsilon, split=split, seed=seed + trial,
                              pvalue=pvalue, safe_index=safe)
        j = cert.chosen_index if cert.certified_any else safe
        chosen.append(j)
        certified.append(cert.certified_any)
        test_risk.append(losses[test, j].mean(axis=0))
        test_cost.append(costs[test, j].mean())
        test_flops.append(flops[test, j].sum() / full_flops[test, j].sum())
    test_risk = np.array(test_risk)
    violations = (test_risk > deltas).any(axis=1)
    counts = {}
    for j in chosen:
        counts[int(j)] = counts.get(int(j), 0) + 1
    return ParetoSummary(
        risks=dict(risks), epsilon=float(epsilon), trials=trials, certified_rate=float(np.mean(certified)),
        mean_cost=float(np.mean(test_cost)), mean_flops_ratio=float(np.mean(test_flops)),
        mean_test_risk={r: float(test_risk[:, i].mean()) for i, r in enumerate(names)},
        violation_rate=float(violations.mean()),
        violation_se=float(np.sqrt(violations.mean() * (1 - violations.mean()) / trials)),
        chosen_counts=dict(sorted(counts.items(), key=lambda item: -item[1])),
    )


def pareto_markdown(summary: ParetoSummary, table, cost: str = "mean_layers") -> str:
    risks = ", ".join(f"{r} δ = {d:g}" for r, d in summary.risks.items())
    test_risks = ", ".join(f"{r} {v:.4f}" for r, v in summary.mean_test_risk.items())
    top = "; ".join(f"{j} ({_describe_configuration(table.configurations[j])}) × {c}"
                    for j, c in list(summary.chosen_counts.items())[:3])
    return (
        "| risks | ε | trials | certified | mean cost | FLOPs ratio | mean test risk | violation rate (± se) |\n"
        "|---|---|---|---|---|---|---|---|\n"
        f"| {risks} | {summary.epsilon:g} | {summary.trials} | {summary.certified_rate:.0%} | "
        f"{summary.mean_cost:.2f} ({cost}) | {summary.mean_flops_ratio:.3f} | {test_risks} | "
        f"{summary.violation_rate:.3f} (± {summary.violation_se:.3f}) |\n\n"
        f"Most often chosen: {top}\n"
    )


def _describe_configuration(config: dict) -> str:
    def knob(value):
        if isinstance(value, dict):
            params = ",".join(f"{k}={v}" for k, v in value.get("params", {}).items())
            return value["name"] + (f"({params})" if params else "")
        return str(value)

    return (f"λ={config['lambda']:g}, j={config.get('min_exit_layer')}, {knob(config.get('pruning'))}, "
            f"{knob(config.get('scorer'))}")


def plot_pareto_plane(table, certificate, out_dir: Path, *, cost: str = "mean_layers") -> Path:
    """The risk–cost plane: every configuration (whole table), the certificate's Pareto front and tested
    order (estimated on its optimisation part), the certified configurations and the chosen one."""
    plt = _pyplot()

    out_dir.mkdir(parents=True, exist_ok=True)
    pareto = certificate.pareto
    deltas = np.array([r["delta"] for r in pareto["risks"]])
    opt = np.array([r["optimisation_risk"] for r in pareto["risks"]]).T   # (K, R)
    score = (opt / deltas).max(axis=1)
    costs = np.asarray(certificate.costs)
    order = pareto["tested_order"]
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter(costs, score, s=10, color="lightgrey", label="configurations (optimisation part)")
    ax.plot(costs[order], score[order], "-o", ms=4, color="tab:blue", label="Pareto front, tested from lowest risk")
    for rank, j in enumerate(order[:25]):
        ax.annotate(str(rank + 1), (costs[j], score[j]), fontsize=6, textcoords="offset points", xytext=(3, 3))
    certified = np.flatnonzero(certificate.certified)
    ax.scatter(costs[certified], score[certified], s=30, color="tab:green", label="certified (testing part)", zorder=3)
    j = certificate.chosen_index if certificate.certified_any else pareto["safe_index"]
    ax.scatter([costs[j]], [score[j]], s=160, marker="*", color="tab:red", zorder=4,
               label=("certified configuration" if certificate.certified_any else "nothing certified: safe configuration"))
    ax.axhline(1.0, ls="--", lw=0.8, color="grey")
    ax.set_xlabel(f"cost ({cost}, optimisation part)")
    ax.set_ylabel("max over risks of risk / δ (optimisation part)")
    ax.set_title("Pareto Testing: risk–cost plane (dashed: δ)")
    ax.legend(fontsize=7)
    return _save(fig, out_dir / "pareto_plane.png")
