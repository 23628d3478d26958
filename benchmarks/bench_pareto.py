"""Power of Pareto Testing on synthetic configuration spaces (a benchmark, not a test).

    python3 benchmarks/bench_pareto.py                       # default: 1,000 draws, n ∈ {500, 1000, 2000}
    python3 benchmarks/bench_pareto.py --draws 2000 --n 1000

Space: 20 λ × minimum exit layer {6, 10, 15, 20} × pruning {none, fixed k, decaying} × scorer
{softmax, margin, contrastive} = 720 configurations of a 30-layer model, two risks (textual
consistency δ₀ = 0.1, reference risk δ₁ = 0.05), cost = expected layers per token. True risks
are smooth in λ and non-monotone in the other knobs, so the cheapest safe configuration is not
the default one. Bernoulli losses with one latent uniform per example and risk (nested thresholds).

Compared at the same (δ, ε), on the same draws, cost of the configuration each method decodes with
(the full model, 30 layers, when a method certifies nothing):

* Pareto Testing (``certify_pareto``'s rule; optimisation fraction ``--split``),
* the default configuration fixed in advance (min layer 15, decaying pruning, margin: ltt-calibrate's defaults), fixed-sequence
  testing over λ on all n examples — what ``certify`` does today,
* the best single-knob certificate: every (min layer, pruning, scorer) fixed in advance, fixed
  sequence over λ on all n; the row reports the one whose mean cost is lowest (an optimistic
  reference: no user knows in advance which one that is),
* Bonferroni over the whole space on all n (p ≤ ε / K), cheapest certified,
* the hindsight oracle: the cheapest configuration whose *true* risks are all ≤ δ_r.
"""
from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

from ltt_exit.certify.pareto_rule import normalised_scores, pareto_decide
from ltt_exit.certify.pvalues import get_pvalue
from ltt_exit.certify.simulate import bernoulli_part_risks

N_LAYERS = 30
LAMBDAS = np.round(np.linspace(1.0, 0.62, 20), 3)
MIN_LAYERS = (6, 10, 15, 20)
PRUNING = ("none", "fixed", "decaying")
SCORERS = ("softmax", "margin", "contrastive")
DEFAULT = (15, "decaying", "margin")  # ltt-calibrate's defaults (ltt_exit.pipeline.DEFAULTS)
DELTAS = np.array([0.1, 0.05])


def space() -> tuple[np.ndarray, np.ndarray, list[tuple]]:
    """(true risks (K, 2), costs (K,), knob tuples (K,)) with λ the innermost axis."""
    risks, costs, knobs = [], [], []
    for layer, prune, scorer, lam in itertools.product(MIN_LAYERS, PRUNING, SCORERS, LAMBDAS):
        aggressiveness = (1.0 - lam) / (1.0 - LAMBDAS[-1])  # 0 (full model) .. 1
        # Earlier minimum layers exit more and err more; the scorer's quality differs by layer
        # (contrastive helps early, hurts late), pruning adds error except decaying at late layers.
        layer_factor = {6: 1.6, 10: 1.0, 15: 0.75, 20: 0.6}[layer]
        scorer_factor = {"softmax": 1.2, "margin": 1.0, "contrastive": 0.8 if layer <= 10 else 1.15}[scorer]
        prune_factor = {"none": 1.0, "fixed": 1.25, "decaying": 1.1 if layer <= 10 else 0.95}[prune]
        r0 = 0.22 * aggressiveness ** 1.5 * layer_factor * scorer_factor * prune_factor
        r1 = 0.5 * r0 * (1.1 if scorer == "softmax" else 0.9)
        # Expected exit layer: the minimum layer plus a share of the rest that shrinks with λ.
        exit_layer = layer + (N_LAYERS - layer) * (1.0 - 0.85 * aggressiveness ** 0.7)
        head = {"none": 1.0, "fixed": 0.93, "decaying": 0.95}[prune] * {"softmax": 1.0, "margin": 1.0, "contrastive": 1.03}[scorer]
        risks.append([min(r0, 1.0), min(r1, 1.0)])
        costs.append(exit_layer * head)
        knobs.append((layer, prune, scorer, float(lam)))
    return np.array(risks), np.array(costs), knobs


def run(n: int, draws: int, epsilon: float, seed: int, split: float = 0.5) -> list[tuple[str, float, float, float]]:
    risks, costs, knobs = space()
    k = len(knobs)
    groups = k // LAMBDAS.size
    safe_cost = float(N_LAYERS)
    pvalue = get_pvalue("hoeffding-bentkus")
    rng = np.random.default_rng(seed)
    n_opt = int(round(split * n))
    opt = bernoulli_part_risks(risks, n_opt, draws, rng)
    test = bernoulli_part_risks(risks, n - n_opt, draws, rng)
    full = (n_opt * opt + (n - n_opt) * test) / n  # the same examples, all n of them

    def combined_p(part_risks, size):
        return np.max(np.stack([pvalue.from_risk(part_risks[..., r], size, DELTAS[r]) for r in range(2)], -1), -1)

    violates = (risks > DELTAS).any(axis=1)
    rows = []

    def record(name, chosen):
        decoded_cost = np.where(chosen >= 0, costs[np.maximum(chosen, 0)], safe_cost)
        violation = np.where(chosen >= 0, violates[np.maximum(chosen, 0)], False)
        rows.append((name, float(decoded_cost.mean()), float(violation.mean()), float(np.mean(chosen < 0))))

    # Pareto Testing
    chosen, _, _ = pareto_decide(normalised_scores(opt, DELTAS), costs, combined_p(test, n - n_opt), epsilon)
    record(f"Pareto Testing (split {split})", chosen)

    # Fixed sequence over λ for every a-priori (layer, pruning, scorer) group, on all n examples.
    p_full = combined_p(full, n).reshape(draws, groups, LAMBDAS.size)
    prefix = np.logical_and.accumulate(p_full <= epsilon, axis=-1)
    group_costs = costs.reshape(groups, LAMBDAS.size)
    masked = np.where(prefix, group_costs, np.inf)
    best_in_group = np.argmin(masked, axis=-1)
    group_chosen = np.where(prefix.any(-1), np.arange(groups) * LAMBDAS.size + best_in_group, -1)  # (draws, groups)
    default_group = [i for i in range(groups) if knobs[i * LAMBDAS.size][:3] == DEFAULT][0]
    record(f"default configuration {DEFAULT}, fixed sequence over λ", group_chosen[:, default_group])
    mean_group_cost = np.where(group_chosen >= 0, costs[np.maximum(group_chosen, 0)], safe_cost).mean(axis=0)
    best_group = int(np.argmin(mean_group_cost))
    record(f"best single-knob certificate {knobs[best_group * LAMBDAS.size][:3]}", group_chosen[:, best_group])

    # Bonferroni over the whole space
    bonferroni = combined_p(full, n) <= epsilon / k
    chosen = np.where(bonferroni.any(-1), np.argmin(np.where(bonferroni, costs, np.inf), axis=-1), -1)
    record(f"Bonferroni over all {k} configurations", chosen)

    safe_true = ~violates
    oracle = int(np.flatnonzero(safe_true)[np.argmin(costs[safe_true])])
    rows.append((f"hindsight oracle {knobs[oracle]}", float(costs[oracle]), 0.0, 0.0))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--n", type=int, nargs="+", default=[500, 1000, 2000])
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", type=float, default=0.5, help="optimisation fraction of Pareto Testing")
    args = parser.parse_args()
    print(f"720 configurations, δ = {DELTAS.tolist()}, ε = {args.epsilon}, {args.draws} draws, HB p-values")
    for n in args.n:
        start = time.perf_counter()
        rows = run(n, args.draws, args.epsilon, args.seed, args.split)
        print(f"\nn = {n} ({time.perf_counter() - start:.1f} s)")
        print("| method | mean layers decoded with | violation rate | nothing certified |")
        print("|---|---|---|---|")
        for name, cost, violation, none in rows:
            print(f"| {name} | {cost:.2f} | {violation:.4f} | {none:.3f} |")


if __name__ == "__main__":
    main()
