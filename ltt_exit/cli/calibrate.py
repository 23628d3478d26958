"""``ltt-calibrate``: certify an early-exit threshold λ with Learn-Then-Test.

First form: certify from a loss table (``--table``). Model decoding (sweeping a model over a
calibration set to produce the table) plugs in later behind the same command: ``main`` builds
a :class:`~ltt_exit.loss_table.LossTable` one way or the other and hands it to
:func:`run_certification`.

This module does not import torch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ltt_exit.certificate import Certificate
from ltt_exit.cli._arguments import open_unit
from ltt_exit.cli._run import ArgumentParser, CLIError, run_cli
from ltt_exit.certify import PROCEDURES, PVALUES, certify, get_procedure
from ltt_exit.loss_table import LossTable

__all__ = ["build_parser", "run_certification", "main"]

PROG = "ltt-calibrate"
DEFAULT_COST_COLUMN = "mean_layers"

_DESCRIPTION = """\
Certify an early-exit threshold λ with Learn-Then-Test (LTT).

The result is a certificate (JSON) holding the chosen λ and the guarantee:
with probability at least 1 - ε over the calibration set, the expected loss
(e.g. 1 - ROUGE-L between early-exit and full-model outputs) at the chosen λ
is at most δ, for new inputs drawn like the calibration examples.

  δ (--delta)    risk tolerance: the largest average loss you accept, on the
                 loss table's [0, 1] scale. --delta 0.1 with a ROUGE-L loss:
                 early-exit outputs lose at most 0.1 ROUGE-L on average
                 against the full model.
  ε (--epsilon)  allowed failure probability: the chance that an unlucky
                 calibration set makes the certificate wrong (true average
                 loss above δ). --epsilon 0.05 means 95% confidence.

Smaller δ or ε is stricter and certifies fewer (more conservative) λ values.
When nothing can be certified, λ = 1.0 (the full model, no early exit) is
written, and the summary says why."""

_EPILOG = """\
examples:
  ltt-calibrate --delta 0.1 --epsilon 0.05          # the embedded default model, offline
  ltt-calibrate --delta 0.1 --epsilon 0.05 --model ./my-t5 --recipe samsum \\
      --data-files ../shared/data/samsum_validation.jsonl --size 500
  ltt-calibrate --delta 0.1 --epsilon 0.05 --table losses.parquet
  ltt-calibrate --delta 0.05 --epsilon 0.1 --table losses.csv --pvalue wsr --seed 1
  ltt-calibrate --delta 0.1 --epsilon 0.05 --table losses.parquet \\
      --procedure multi-start --starts 5 --out cert.json
  ltt-calibrate --epsilon 0.05 --risks textual=0.1,risk=0.05 --space space.yaml \\
      --recipe samsum --data-dir ../shared/data     # Pareto Testing over a configuration space

Loss tables: docs/loss_table.md. Methods and how to choose: docs/certification.md.
Exit status: 0 when a certificate was written (also when nothing was certified),
2 on bad input (one line on stderr; nothing is written), 1 on an internal error."""


def _whole(minimum: int, name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be at least {minimum}; got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``ltt-calibrate`` argument parser (later issues add model / decoding options to it)."""
    parser = ArgumentParser(
        prog=PROG,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    guarantee = parser.add_argument_group("the guarantee")
    guarantee.add_argument(
        "--delta", type=open_unit("--delta"), metavar="δ",
        help="risk tolerance δ in (0, 1): the largest acceptable average loss, e.g. 0.1 (required unless "
             "--risks gives one δ per risk)",
    )
    guarantee.add_argument(
        "--epsilon", required=True, type=open_unit("--epsilon"), metavar="ε",
        help="allowed failure probability ε in (0, 1), e.g. 0.05 for 95%% confidence",
    )
    data = parser.add_argument_group("calibration data")
    data.add_argument(
        "--table", metavar="PATH",
        help="loss table to certify from: ltt-exit Parquet, or a wide CSV (optional example_id "
             "column, every other column named by its λ, in grid order; see docs/loss_table.md)",
    )
    method = parser.add_argument_group("method")
    method.add_argument(
        "--pvalue", default="hoeffding-bentkus", choices=PVALUES.names(), metavar="NAME",
        help="p-value for 'risk of λ exceeds δ': " + ", ".join(PVALUES.names())
             + " (hb = hoeffding-bentkus, the default; binomial needs 0/1 losses)",
    )
    method.add_argument(
        "--procedure", default="fixed-sequence", choices=list(PROCEDURES), metavar="NAME",
        help="family-wise error procedure: " + ", ".join(PROCEDURES) + " (default fixed-sequence)",
    )
    method.add_argument(
        "--starts", type=_whole(1, "--starts"), default=3, metavar="S",
        help="number of evenly spaced starts for --procedure multi-start, each tested at ε/S (default 3)",
    )
    method.add_argument(
        "--seed", type=_whole(0, "--seed"), default=0,
        help="seed of the example shuffle used by --pvalue wsr (recorded in the certificate; default 0)",
    )
    method.add_argument(
        "--cost-column", default=None, metavar="NAME",
        help=f"candidate column whose per-candidate mean is the cost to minimise among certified λ "
             f"(default {DEFAULT_COST_COLUMN!r} when the table has it; 'none' to pick the certified λ "
             "furthest along the grid instead)",
    )
    from ltt_exit.pipeline import add_model_options  # torch is imported only when decoding runs

    add_model_options(parser)
    from ltt_exit.pareto_pipeline import add_pareto_options

    add_pareto_options(parser)
    output = parser.add_argument_group("output")
    output.add_argument("--out", default="certificate.json", metavar="PATH",
                        help="where to write the certificate JSON (default certificate.json)")
    output.add_argument("--quiet", action="store_true", help="print nothing on success")
    return parser


def _costs(table: LossTable, cost_column: str | None):
    if cost_column is None:
        if DEFAULT_COST_COLUMN in table.candidate_columns:
            return DEFAULT_COST_COLUMN, table.mean_per_candidate(DEFAULT_COST_COLUMN)
        return None, None
    if cost_column.lower() == "none":
        return None, None
    if cost_column not in table.candidate_columns:
        available = sorted(table.candidate_columns) or "none"
        raise CLIError(f"--cost-column {cost_column!r} is not a candidate column of the table (available: {available})")
    return cost_column, table.mean_per_candidate(cost_column)


def _check_output(args: argparse.Namespace) -> Path:
    out = Path(getattr(args, "out", "certificate.json"))
    if out.is_dir():
        raise CLIError(f"--out {str(out)!r} is a folder; give a file path for the certificate")
    if not out.parent.is_dir():
        raise CLIError(f"--out {str(out)!r}: the folder {str(out.parent)!r} does not exist")
    table = getattr(args, "table", None)
    if table is not None and Path(table).exists() and out.exists() and out.resolve() == Path(table).resolve():
        raise CLIError("--out must not be the loss table itself")
    return out


def run_certification(table: LossTable, args: argparse.Namespace) -> Certificate:
    """Certify from ``table`` with the options in ``args``, write the certificate, print a summary.

    ``args`` is a namespace from :func:`build_parser` (attributes delta, epsilon, pvalue,
    procedure, starts, seed, cost_column, out, quiet). The certificate's metadata is the table's
    metadata plus ``calibration_source`` (loss-table path and SHA-256 when loaded from a file,
    format version, metric, cost column). Raises ``ValueError`` / ``TypeError`` on bad input,
    before anything is written.
    """
    out = _check_output(args)
    procedure_name = getattr(args, "procedure", "fixed-sequence")
    procedure = get_procedure(procedure_name, starts=getattr(args, "starts", 3)) \
        if PROCEDURES.canonical(procedure_name) == "multi-start" else get_procedure(procedure_name)
    cost_name, costs = _costs(table, getattr(args, "cost_column", None))
    metadata = dict(table.metadata)
    metadata["calibration_source"] = {
        "loss_table": table.source,
        "loss_table_format_version": table.header()["format_version"],
        "metric": table.metric,
        "cost_column": cost_name,
    }
    certificate = certify(
        table.losses,
        table.lambdas,
        args.delta,
        args.epsilon,
        pvalue=getattr(args, "pvalue", "hoeffding-bentkus"),
        procedure=procedure,
        order=table.order,
        costs=costs,
        metadata=metadata,
        seed=getattr(args, "seed", 0),
    )
    certificate.save(out)
    if not getattr(args, "quiet", False):
        print(certificate.summary())
        print(f"certificate written to {out}")
    return certificate


def _calibrate_with_model(args: argparse.Namespace) -> int:
    """No --table: sweep the model over a calibration set (or reuse a cached sweep), then certify."""
    from ltt_exit.pipeline import describe_outcome, loss_table_from_model

    _check_output(args)
    table, info = loss_table_from_model(args)
    if table is None:  # a rank other than 0 of a distributed sweep: rank 0 certifies
        return 0
    certificate = run_certification(table, args)
    if not getattr(args, "quiet", False):
        print(describe_outcome(table, certificate, info))
        print(f"loss table: {info['table_path']}")
        print(f"apply it:   ltt-generate --certificate {args.out} \"Your prompt\"")
    return 0


def _calibrate_pareto(args: argparse.Namespace) -> int:
    """--space / --risks / a space table: Pareto Testing over the configurations."""
    from ltt_exit.pareto_pipeline import risks_of, run_pareto_certification, space_table_from_model
    from ltt_exit.space_table import SpaceTable

    out = _check_output(args)
    risks_of(args)
    if args.table is not None:
        table, info = SpaceTable.load(args.table), None
    else:
        table, info = space_table_from_model(args)
        if table is None:  # time budget reached: run again to resume
            return 0
    run_pareto_certification(table, args, out)
    if info is not None and not getattr(args, "quiet", False):
        print(f"space table: {info['table_path']}")
        print(f"apply it:   ltt-generate --certificate {args.out} \"Your prompt\"")
    return 0


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from ltt_exit.space_table import is_space_table

    if args.space or args.risks or (args.table is not None and is_space_table(args.table)):
        return _calibrate_pareto(args)
    if args.delta is None:
        raise CLIError("the following arguments are required: --delta (or --risks NAME=δ,… with --space)")
    if args.table is None:
        return _calibrate_with_model(args)
    _check_output(args)
    table = LossTable.load(args.table)
    run_certification(table, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ltt-calibrate``; returns the exit status (0 ok, 2 bad input, 1 internal error)."""
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
