"""The study's results table (issue 17) from one command: for each model × task × reduction × scorer, sweep a
calibration split and a disjoint test split at every λ of the grid, certify λ̂ (ε = 0.05, δ ∈ {0.1, 0.2},
textual and risk consistency), look up the test split's risk, FLOPs ratio, mean exit layer and task metric at
λ̂, time batch-1 decoding (fast path) at λ̂ and at λ = 1, then write the raw JSON, the markdown section of
docs/benchmarks.md and one frontier PNG per task under docs/.

    python benchmarks/study_table.py --data-dir ../shared/data                     # everything, resumable
    python benchmarks/study_table.py --tasks squad,samsum --scorers softmax-margin \\
        --reductions fixed --n-cal 400 --n-test 100 --time-budget 520 --device cuda
    python benchmarks/study_table.py --report-only                                 # rebuild the doc and plots

Every finished prompt of a sweep, every finished configuration and every timing is kept under --out, so a
call stopped by --time-budget (exit status 3) resumes where it stopped when run again with the same
arguments. docs/study_table.md says how to chain ≤ 10-minute H200 runs. The computation is in
study_table_core.py, the table, answers and plots in study_table_report.py.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import study_table_core as core  # noqa: E402
import study_table_report as report  # noqa: E402

INCOMPLETE = 3  # exit status of a call stopped by --time-budget
PENDING = 4  # exit status of --check when some selected work is still to do
DEFAULT_SCORERS = ("softmax-margin", "weighted-contrastive", "jsd-contrastive")
DEFAULT_REDUCTIONS = ("none", "fixed", "decaying")


class _WorkPending(Exception):
    """Raised by --check's loader: the first configuration that needs a model needs work."""


def _names(text: str, known, what: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if known is not None and x not in known]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"{what}: unknown or empty {unknown or text!r}; choose from {sorted(known)}")
    return names


def _per_task(text: str) -> dict[str, int] | int:
    """``N`` (every task) or ``task=N,task=N``."""
    try:
        if "=" not in text:
            value = int(text)
            if value < 1:
                raise ValueError
            return value
        out = {}
        for part in text.split(","):
            name, _, value = part.partition("=")
            out[name.strip()] = int(value)
            if out[name.strip()] < 1 or name.strip() not in core.TASKS:
                raise ValueError
        return out
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or task=N pairs over {sorted(core.TASKS)}, got {text!r}") from None


def _pair(text: str) -> tuple[int, int]:
    try:
        k_max, k_min = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--decaying takes K_MAX,K_MIN, got {text!r}") from None
    if not 1 <= k_min <= k_max:
        raise argparse.ArgumentTypeError(f"--decaying needs 1 ≤ K_MIN ≤ K_MAX, got {text!r}")
    return k_max, k_min


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    return values


def _adapter(text: str) -> tuple[str, str]:
    label, _, path = text.partition("=")
    if not label or not path:
        raise argparse.ArgumentTypeError(f"--exit-adapters takes LABEL=PATH, got {text!r}")
    return label, path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=lambda t: _names(t, core.TASKS, "--tasks"), default=list(core.TASKS),
                   help="comma-separated tasks (default all: " + ",".join(core.TASKS) + ")")
    p.add_argument("--models", nargs="+", default=["smollm2-135m"], metavar="[LABEL=]SOURCE",
                   help="models: an alias, a folder or a .gguf file, optionally labelled (default smollm2-135m)")
    p.add_argument("--exit-adapters", type=_adapter, action="append", default=[], metavar="LABEL=PATH",
                   help="exit-adapter file of the model LABEL, used by all its configurations; a fitted classifier "
                        "in it adds the exit-classifier scorer (it must not have seen the task's splits)")
    p.add_argument("--scorers", type=lambda t: _names(t, set(DEFAULT_SCORERS) | {"softmax-max", "hidden-cosine"},
                                                      "--scorers"),
                   default=list(DEFAULT_SCORERS),
                   help="comma-separated scorers (default " + ",".join(DEFAULT_SCORERS) + ")")
    p.add_argument("--reductions", type=lambda t: _names(t, DEFAULT_REDUCTIONS, "--reductions"),
                   default=list(DEFAULT_REDUCTIONS), help="comma-separated: none, fixed, decaying (default all)")
    p.add_argument("--fixed-k", type=int, default=1000, help="k of fixed pruning (default 1000)")
    p.add_argument("--decaying", type=_pair, default=(1000, 10), metavar="K_MAX,K_MIN",
                   help="k_max,k_min of decaying pruning (default 1000,10)")
    p.add_argument("--min-exit-layer", type=int, default=15,
                   help="first layer whose exit head is consulted, for every configuration (default 15 of 30)")
    p.add_argument("--n-cal", type=_per_task, default=None, metavar="N|task=N,…",
                   help="calibration examples (default 400; cnn-dailymail 150 of its 250)")
    p.add_argument("--n-test", type=_per_task, default=None, metavar="N|task=N,…",
                   help="test examples, disjoint from calibration (default 200; cnn-dailymail 100)")
    p.add_argument("--max-new-tokens", type=_per_task, default=None, metavar="N|task=N,…",
                   help="generation budget per task, the same for all its configurations (default: squad 24, "
                        "samsum 64, cnn-dailymail 128, iwslt2017-en-de 128, xsum 64)")
    p.add_argument("--n-time", type=int, default=20,
                   help="test prompts timed at batch 1 at each certified λ and at λ = 1 (default 20; 0: no timing)")
    p.add_argument("--deltas", type=_floats, default=core.DELTAS, metavar="δ,δ",
                   help="risk tolerances certified (default 0.1,0.2, the issue's)")
    p.add_argument("--grid", type=_floats, default=core.DEFAULT_GRID, metavar="λ,λ,…",
                   help="candidate thresholds, most conservative first (default: the sweep's default grid of 20)")
    p.add_argument("--cost", choices=core.COSTS, default="layers",
                   help="λ̂ is the certified λ of least calibration mean exit layer (layers, default, as "
                        "ltt-calibrate) or least FLOPs (flops: then λ = 1 whenever the exit heads cost more than "
                        "they skip)")
    p.add_argument("--device", default=None, help="cpu, cuda, … (default: CUDA when present)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 … (default: the model's)")
    p.add_argument("--batch-prompts", type=int, default=None,
                   help="prompts swept together (default on CUDA: 64, 32 for cnn-dailymail and xsum; 8 on the CPU)")
    p.add_argument("--sweep-decoding", choices=("grid", "rows"), default="grid",
                   help="grid: candidates that agree share a batch row (eager; least arithmetic, the CPU's choice); "
                        "rows: K + 1 rows per prompt on the fast path (static buffers, CUDA graphs on CUDA). The "
                        "same outputs in exact arithmetic, so cached tables and finished configurations are reused "
                        "across it; in bf16 the batch shapes round differently and can move even the full output "
                        "(the table's ‖ note names where)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the fused exit decision of the timed fast path (CUDA; slow first call)")
    p.add_argument("--time-passes", type=int, default=3,
                   help="timed passes over the --n-time prompts per timing, after an untimed warm-up; the runtime "
                        "is their median (default 3; a stored timing with fewer passes is timed again)")
    p.add_argument("--retime", action="store_true",
                   help="sweep nothing; revisit the finished configurations whose batch-1 timings were not all "
                        "made on one machine (a λ = 1 timing kept from another GPU) or were made here with fewer "
                        "than --time-passes passes, and time those again here, so that each row's runtimes at λ̂ "
                        "and at λ = 1 compare (sweeps and certificates stay)")
    p.add_argument("--retime-any-machine", action="store_true",
                   help="with --retime: also revisit configurations timed with fewer than --time-passes passes on "
                        "another GPU model, and time all their timings again here (so each row still compares one "
                        "machine); for when the GPU that made them is not lent")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop cleanly before this many seconds from the start (exit status 3); run again to resume")
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data",
                   help="folder of the task files (default ../shared/data)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "study_table",
                   help="raw JSON results and caches (default benchmarks/results/study_table)")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md",
                   help="markdown file whose study-table section is (re)written (default docs/benchmarks.md)")
    p.add_argument("--docs-dir", type=Path, default=ROOT / "docs", help="where the frontier PNGs go (default docs/)")
    p.add_argument("--no-report", action="store_true",
                   help="compute (and write rows.json) only; leave the doc and the plots alone")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild rows.json, the doc and the plots from the results under --out (no model loaded)")
    p.add_argument("--check", action="store_true",
                   help="compute and write nothing, load no model: exit 0 when every selected configuration is "
                        "finished (with --retime: nothing to time again), else 4; study_table_pending.py checks "
                        "many selections in one process")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def settings_from(args, command: str | None = None) -> core.StudySettings:
    def per_task(value):
        return {} if value is None else ({"*": value} if isinstance(value, int) else value)

    return core.StudySettings(out=args.out, data_dir=args.data_dir, n_cal=per_task(args.n_cal),
                              n_test=per_task(args.n_test), max_new_tokens=per_task(args.max_new_tokens),
                              n_time=args.n_time, grid=args.grid, deltas=args.deltas, cost=args.cost,
                              batch_prompts=args.batch_prompts, compile_decision=args.compile,
                              sweep_decoding=args.sweep_decoding, retime=args.retime,
                              retime_any_machine=args.retime_any_machine,
                              time_passes=args.time_passes,
                              progress=not args.quiet, command=command)


def configurations(args) -> list[core.Configuration]:
    reductions = core.reductions(args.reductions, args.fixed_k, args.decaying)
    return [core.Configuration(scorer, reduction, args.min_exit_layer)
            for reduction in reductions for scorer in args.scorers]


def model_specs(args) -> list[core.ModelSpec]:
    specs = [core.parse_model_spec(text) for text in args.models]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--models: two models share a label ({labels}); write LABEL=SOURCE")
    adapters = dict(args.exit_adapters)
    unknown = sorted(set(adapters) - set(labels))
    if unknown:
        raise ValueError(f"--exit-adapters names {unknown}, which are not --models labels ({labels})")
    for label, path in adapters.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"--exit-adapters {label}={path}: no such file")
    return [core.ModelSpec(s.label, s.source, adapters.get(s.label)) for s in specs]


def default_loader(device: str | None, dtype: str | None):
    def load(spec: core.ModelSpec):
        from ltt_exit.models import load_model

        started = time.perf_counter()
        loaded = load_model(spec.source, device=device, dtype=dtype)
        core._log(f"loaded {spec.label} ({loaded.source}; {loaded.num_layers} layers; {loaded.dtype}) in "
                  f"{time.perf_counter() - started:.1f}s")
        return loaded

    return load


def write_rows(args, complete: bool, command: str) -> list[dict]:
    """rows.json under --out: the table's rows, the command that computed them and whether it finished."""
    rows = report.rows_from_results(core.Store(args.out).config_results())
    core.Store.write(args.out / "rows.json", {"rows": rows, "command": command, "complete": complete})
    return rows


def write_report(args, complete: bool, command: str) -> None:
    """The doc section (between its markers) and the frontier plots, from the results under --out."""
    results = core.Store(args.out).config_results()
    plots = report.frontier_plots(results, args.docs_dir) if results else []
    state = "complete for the command's selection" if complete else "partial (a chained run is still to finish it)"
    report.write_section(args.doc, report.section(results, command, plots, args.doc, state))
    core._log(f"wrote {len(results)} configurations' rows to {args.doc} and {len(plots)} plots to {args.docs_dir}")


def _check(specs, chosen, configs, settings) -> int:
    """--check: walk the selection as a run would, with a loader that stops at the first configuration that
    would need the model (a sweep or a timing to make)."""
    def refuse(spec):
        raise _WorkPending(spec.label)

    try:
        counts = core.run_study(specs, chosen, configs, settings, core.Budget(None), refuse)
    except _WorkPending as pending:
        print(f"study_table: work to do for model {pending}", file=sys.stderr)
        return PENDING
    print(f"study_table: nothing to do ({counts['done_before']} configurations finished)", file=sys.stderr)
    return 0


def main(argv=None, *, loader=None, tasks: dict | None = None, clock=time.monotonic) -> int:
    """``loader`` and ``tasks`` replace the model loader and the task list (tests); ``clock`` the budget's."""
    args = parser().parse_args(argv)
    budget = core.Budget(args.time_budget, clock=clock)
    command = "python benchmarks/study_table.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.report_only:  # keep the command and state of the call that computed the results
        previous = core.Store.read(args.out / "rows.json") or {}
        complete, command = previous.get("complete", True), previous.get("command", command)
        # rows.json too: configurations copied in from another machine's run must not leave it stale
        write_rows(args, complete, command)
        write_report(args, complete, command)
        return 0
    try:
        if any(not 0 < d < 1 for d in args.deltas):
            raise ValueError(f"--deltas must lie in (0, 1), got {args.deltas}")
        if list(args.grid) != sorted(set(args.grid), reverse=True):
            raise ValueError(f"--grid must be strictly decreasing (most conservative first), got {args.grid}")
        if args.n_time < 0:
            raise ValueError(f"--n-time must be ≥ 0, got {args.n_time}")
        if args.time_passes < 1:
            raise ValueError(f"--time-passes must be ≥ 1, got {args.time_passes}")
        if args.retime_any_machine and not args.retime:
            raise ValueError("--retime-any-machine only widens --retime: give both")
        if args.batch_prompts is not None and args.batch_prompts < 1:
            raise ValueError(f"--batch-prompts must be ≥ 1, got {args.batch_prompts}")
        specs = model_specs(args)
        task_table = tasks or core.TASKS
        chosen = [task_table[name] for name in args.tasks] if tasks is None else list(task_table.values())
        configs = configurations(args)
        for task in chosen:
            core.task_data_path(task, args.data_dir)
    except (ValueError, FileNotFoundError) as error:
        print(f"study_table: error: {error}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = settings_from(args, command)
    if args.check:
        return _check(specs, chosen, configs, settings)
    complete = True
    try:
        counts = core.run_study(specs, chosen, configs, settings, budget,
                                loader or default_loader(args.device, args.dtype))
        core._log(f"done: {counts['done_now']} configurations now, {counts['done_before']} from earlier calls"
                  + (f" ({counts['retimed']} timings made again here)" if "retimed" in counts else ""))
    except core.OutOfTime as stop:
        core._log(f"INCOMPLETE: {stop}")
        complete = False
    rows = write_rows(args, complete, command)
    core._log(f"{len(rows)} rows in {args.out / 'rows.json'}")
    if not args.no_report:
        write_report(args, complete, command)
    return 0 if complete else INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
