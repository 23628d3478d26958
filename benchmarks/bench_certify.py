"""Benchmark of the certification core (not a test): certify a large loss table with every p-value.

    python3 benchmarks/bench_certify.py                 # 100,000 × 1,000, every p-value kind
    python3 benchmarks/bench_certify.py --n 20000 --k 200 --procedure holm
    python3 benchmarks/bench_certify.py --power         # power / validity table (simulation)

Target (issue 2): < 1 s per p-value kind for a 100,000 × 1,000 table on the 2-core build machine,
WSR included. The time is the whole ``certify`` call: input checks (finite, in [0, 1]), empirical
risks, p-values, the procedure, and building the certificate. Results go to docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from ltt_exit.certify import PROCEDURES, PVALUES, certify
from ltt_exit.certify.simulate import simulate


def timed(function, repeats: int) -> tuple[float, float, object]:
    times = []
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), float(np.median(times)), result


def bench_speed(n: int, k: int, repeats: int, procedure: str) -> None:
    rng = np.random.default_rng(0)
    # Losses that grow along the grid, like a real sweep: candidate j has mean ≈ 0.3 j / K.
    risks = 0.3 * np.arange(k) / k
    print(f"building tables {n:,} × {k:,} ...", flush=True)
    u = rng.random((n, 1))
    binary = (u < risks).astype(np.float64)
    continuous = np.minimum(1.0, rng.random((n, k)) * (2 * risks))
    lambdas = np.linspace(1.0, 0.0, k, endpoint=False)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"numpy {np.__version__}; procedure {procedure}; best / median of {repeats}")
    print("| p-value | table | best (s) | median (s) | certified | λ̂ |")
    print("|---|---|---|---|---|---|")
    for name in PVALUES:
        table, label = (binary, "binary") if PVALUES[name].binary_only else (continuous, "continuous")
        best, median, cert = timed(
            lambda: certify(table, lambdas, 0.1, 0.05, pvalue=name, procedure=procedure), repeats
        )
        print(f"| {name} | {label} | {best:.3f} | {median:.3f} | {cert.n_certified} | {cert.lambda_hat:.4f} |", flush=True)


def bench_power(draws: int, n_values: list[int]) -> None:
    # A smooth risk curve over 20 candidates (risk rises quadratically to 0.3); δ = 0.1 is crossed
    # between candidates 11 (0.0975) and 12 (0.1064), so the oracle is candidate 11.
    risks = 0.3 * (np.arange(20) / 19) ** 2
    delta, epsilon = 0.1, 0.05
    oracle = int(np.flatnonzero(risks <= delta)[-1])
    print(f"risks: {np.round(risks, 4).tolist()}; oracle index {oracle}; δ = {delta}, ε = {epsilon}, {draws} draws")
    print("| losses | n | p-value | procedure | violation rate | oracle rate | mean gap (steps) |")
    print("|---|---|---|---|---|---|---|")
    for family in ("bernoulli", "continuous"):
        names = [p for p in PVALUES if family == "bernoulli" or not PVALUES[p].binary_only]
        for n in n_values:
            for r in simulate(risks, delta, epsilon, n=n, draws=draws, family=family,
                              pvalues=names, procedures=list(PROCEDURES), seed=1):
                print(f"| {family} | {n} | {r.pvalue} | {r.procedure} | {r.violation_rate:.4f} | "
                      f"{r.oracle_rate:.3f} | {r.mean_gap:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--k", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--procedure", default="fixed-sequence", choices=list(PROCEDURES))
    parser.add_argument("--power", action="store_true", help="print the power table instead")
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--power-n", type=int, nargs="+", default=[500, 2000])
    args = parser.parse_args()
    if args.power:
        bench_power(args.draws, args.power_n)
    else:
        bench_speed(args.n, args.k, args.repeats, args.procedure)


if __name__ == "__main__":
    main()
