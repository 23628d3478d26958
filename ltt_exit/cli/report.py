"""ltt-report: check a loss table with the CALM protocol (many random calibration/test splits)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ltt_exit.cli._run import ArgumentParser, CLIError, run_cli

PROG = "ltt-report"

DESCRIPTION = """\
Check what a certificate would buy on a loss table, the way CALM validates its guarantee.

For each of --trials random splits of the table's examples (--calibration-fraction for
calibration, the rest for testing) and for each δ in --deltas, ltt-report certifies λ on the
calibration part and measures on the test part: the certified λ, mean layers used, estimated
speed-up (layers / mean layers used), the test risk, and whether the test risk exceeded δ.
The violation rate over trials should stay near or below ε (up to the noise of a finite test
split). Writes report.md and PNG plots to --out.

A configuration-space table (ltt-calibrate --space) is checked the same way with Pareto Testing:
--risks gives δ per risk (default textual at each of --deltas' first value), each trial runs
certify_pareto on the calibration part and counts a violation when any risk's test risk exceeds
its δ; the plot is the risk–cost plane with the Pareto front, the tested order and the certified
configuration.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", type=Path, help="loss table (.parquet written by ltt-calibrate, or a wide CSV)")
    parser.add_argument("--deltas", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2],
                        help="risk tolerances δ to evaluate (default: 0.05 0.1 0.15 0.2)")
    parser.add_argument("--epsilon", type=float, default=0.05,
                        help="allowed failure probability ε (default 0.05)")
    parser.add_argument("--trials", type=int, default=200, help="random splits (default 200)")
    parser.add_argument("--calibration-fraction", type=float, default=0.8,
                        help="share of examples used to calibrate in each split (default 0.8)")
    parser.add_argument("--pvalue", default="hoeffding-bentkus", help="p-value method (default hoeffding-bentkus)")
    parser.add_argument("--procedure", default="fixed-sequence", help="family-wise error procedure")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random splits")
    parser.add_argument("--out", type=Path, default=Path("ltt-report"), help="output folder (default ./ltt-report)")
    parser.add_argument("--no-plots", action="store_true", help="write only report.md")
    pareto = parser.add_argument_group("configuration-space tables (Pareto Testing)")
    pareto.add_argument("--risks", default=None, metavar="NAME=δ,…",
                        help="δ per risk, e.g. textual=0.1,risk=0.05 (default: textual at the first --deltas value)")
    pareto.add_argument("--split", type=float, default=0.5,
                        help="optimisation fraction inside each calibration part (default 0.5)")
    pareto.add_argument("--cost", choices=["mean_layers", "flops"], default="mean_layers",
                        help="cost Pareto Testing minimises (default mean_layers)")
    return parser


def _pareto_report(args) -> int:
    from ltt_exit.certify import certify_pareto
    from ltt_exit.pareto_pipeline import parse_risks
    from ltt_exit.report import pareto_markdown, pareto_split_trials, plot_pareto_plane
    from ltt_exit.space_table import SpaceTable

    risks = parse_risks(args.risks) if args.risks else {"textual": args.deltas[0]}
    if not 0.0 < args.epsilon < 1.0:
        raise CLIError(f"--epsilon: ε must be in (0, 1), got {args.epsilon}")
    if not 0.0 < args.split < 1.0:
        raise CLIError(f"--split must be in (0, 1), got {args.split}")
    table = SpaceTable.load(args.table)
    summary = pareto_split_trials(table, risks, args.epsilon, trials=args.trials,
                                  calibration_fraction=args.calibration_fraction, split=args.split,
                                  pvalue=args.pvalue, cost=args.cost, seed=args.seed)
    safe = next(j for j, c in enumerate(table.configurations) if c["lambda"] >= 1.0)
    whole = certify_pareto(table.losses(list(risks)), table.cost(args.cost), list(risks.values()), args.epsilon,
                           split=args.split, seed=args.seed, pvalue=args.pvalue, safe_index=safe,
                           risk_names=list(risks))
    md = pareto_markdown(summary, table, args.cost)
    meta = table.metadata
    header = (f"# ltt-report (Pareto Testing): {args.table}\n\n"
              f"{table.n} examples × {table.K} configurations; metric {meta.get('metric', '?')}, "
              f"layers {meta.get('num_layers', '?')}; p-value {args.pvalue}; {args.trials} random "
              f"{args.calibration_fraction:.0%}/{1 - args.calibration_fraction:.0%} splits, each calibration part "
              f"split {args.split:.0%}/{1 - args.split:.0%} into optimisation/testing parts.\n\n")
    args.out.mkdir(parents=True, exist_ok=True)
    plots = [] if args.no_plots else [plot_pareto_plane(table, whole, args.out, cost=args.cost)]
    return _write_report(args.out, header, md, plots)


def _write_report(out: Path, header: str, md: str, plots: list) -> int:
    """report.md in ``out``: the header, the markdown table and the plots; the table is printed too."""
    from ltt_exit._atomic import atomic_write_text

    body = header + md + "".join(f"\n![{p.stem}]({p.name})\n" for p in plots)
    atomic_write_text(out / "report.md", body)
    print(md)
    print(f"wrote {out / 'report.md'}" + (f" and {len(plots)} plots" if plots else ""))
    return 0


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    from ltt_exit.space_table import is_space_table

    if is_space_table(args.table):
        return _pareto_report(args)
    from ltt_exit.loss_table import LossTable
    from ltt_exit.report import markdown_table, plot_report, split_trials

    for delta in args.deltas:
        if not 0.0 < delta < 1.0:
            raise CLIError(f"--deltas: δ must be in (0, 1), got {delta}")
    if not 0.0 < args.epsilon < 1.0:
        raise CLIError(f"--epsilon: ε must be in (0, 1), got {args.epsilon}")
    if args.seed < 0:
        raise CLIError(f"--seed must be a non-negative integer, got {args.seed}")
    if args.out.exists() and not args.out.is_dir():
        raise CLIError(f"--out {str(args.out)!r} is a file; give a folder for the report")
    table = LossTable.load(args.table)
    summaries = split_trials(table, args.deltas, args.epsilon, trials=args.trials,
                             calibration_fraction=args.calibration_fraction,
                             pvalue=args.pvalue, procedure=args.procedure, seed=args.seed)
    md = markdown_table(summaries)
    meta = table.metadata
    header = (f"# ltt-report: {args.table}\n\n"
              f"{table.n} examples × {table.K} candidates; metric {meta.get('metric', '?')}, "
              f"loss {meta.get('loss', '?')}, layers {meta.get('num_layers', '?')}; "
              f"p-value {args.pvalue}, procedure {args.procedure}; "
              f"{args.trials} random {args.calibration_fraction:.0%}/{1 - args.calibration_fraction:.0%} splits.\n\n")
    args.out.mkdir(parents=True, exist_ok=True)
    plots = [] if args.no_plots else plot_report(table, summaries, args.out, epsilon=args.epsilon,
                                                 pvalue=args.pvalue)
    return _write_report(args.out, header, md, plots)


def main(argv=None) -> int:
    """Entry point of ``ltt-report``: 0 ok, 2 bad input (one line on stderr), 1 internal error."""
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
