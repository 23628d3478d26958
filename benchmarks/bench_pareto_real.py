"""Pareto Testing on the real model (issue 16's measurement): SmolLM2-135M on SAMSum, a space of
3 minimum exit layers × 3 pruning settings × 3 scorers × the λ grid (540 configurations).

Certified cost (mean exit layer, FLOPs ratio, and wall clock on the device) of

* Pareto Testing over the whole space (``certify_pareto``, split 0.5, seed 0),
* today's default configuration (ltt-calibrate's defaults: min exit layer 15, decaying pruning,
  softmax-margin), fixed-sequence testing over λ on all n examples,
* the best single configuration chosen in hindsight: every setting certified that way on all n,
  the cheapest result kept (no honest user could pick it in advance),
* (for reference) the hindsight oracle: the cheapest configuration whose empirical risks on the
  whole table are within δ (no guarantee at all),

and the validity check of ``ltt-report`` (random 80/20 splits, Pareto Testing on the 80 %).

The sweep is resumable and runs in chunks: each call sweeps for at most ``--time-budget`` seconds
and exits; call again with the same arguments until it prints ``sweep complete``, which then runs
the analysis and writes ``results-<cost>.json`` and ``results-<cost>.md`` under ``--out-dir``
(``--cost mean_layers`` or ``flops``: what every method minimises; once the table is complete a
call only re-analyses). With ``--analyse-partial`` a call that leaves the sweep incomplete (``--time-budget 0``
sweeps nothing more) analyses the prompts swept so far instead: the same analysis and result files, marked
partial (``n_swept`` / ``n_planned``), the table saved as ``space.partial-<k>.parquet``; the partial file is
kept, so the next call still resumes the sweep. On the H200:

    python benchmarks/bench_pareto_real.py --model /tmp/smollm2/model.gguf \
        --data samsum_validation.jsonl --size 200 --max-new-tokens 32 --device cuda --dtype bfloat16 \
        --batch-prompts 16 --time-budget 480 --out-dir $OUT/pareto_real --wall-prompts 32

CPU smoke run (a small space, a few prompts; proves the script works end to end):

    python benchmarks/bench_pareto_real.py --smoke --data ../shared/data/samsum_validation.jsonl \
        --out-dir /tmp/pareto_smoke
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "benchmarks" / "data" / "samsum_jsonl_recipe.yaml"

SPACE = """
min_exit_layer: [10, 15, 20]
pruning: [none, {name: fixed, k: 1000}, decaying]
scorer: [softmax-margin, softmax-max, {name: weighted-contrastive, alpha: 0.1}]
"""
SMOKE_SPACE = """
lambdas: [1.0, 0.999, 0.99, 0.9, 0.5]
min_exit_layer: [15, 20]
pruning: [none, decaying]
scorer: [softmax-margin, softmax-max]
"""
DEFAULT_SETTING = {"min_exit_layer": 15, "pruning": "decaying", "scorer": "softmax-margin"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="alias, folder or .gguf file (default smollm2-135m)")
    parser.add_argument("--data", required=True, help="SAMSum JSON Lines (e.g. ../shared/data/samsum_validation.jsonl)")
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--space", default=None, help="space YAML file or text (default: the 3 × 3 × 3 × grid space)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--batch-prompts", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--time-budget", type=float, default=480.0, help="seconds of sweeping per call (default 480)")
    parser.add_argument("--risks", default="textual=0.1,risk=0.05")
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--trials", type=int, default=200, help="random splits of the validity check")
    parser.add_argument("--cost", choices=["mean_layers", "flops"], default="mean_layers",
                        help="what every method minimises among certified configurations (default mean_layers)")
    parser.add_argument("--wall-prompts", type=int, default=0, help="prompts timed per configuration at batch 1 (0: skip)")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="small space, 8 prompts, 8 tokens, CPU-sized")
    parser.add_argument("--analyse-partial", action="store_true",
                        help="if the sweep is still incomplete after this call, analyse the prompts swept so far "
                             "(results marked partial; the sweep stays resumable)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.space = args.space or SMOKE_SPACE
        args.size, args.max_new_tokens, args.trials = min(args.size, 8), min(args.max_new_tokens, 8), min(args.trials, 50)
        args.wall_prompts = args.wall_prompts or 2
    args.space = args.space or SPACE
    return args


def load_everything(args):
    from ltt_exit.models import load_model
    from ltt_exit.recipes import load_recipe
    from ltt_exit.sweep.run import DEFAULT_GRID
    from ltt_exit.sweep.space import load_space

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    calibration_set = load_recipe(RECIPE).load(size=args.size, seed=0, data_files=[args.data], family=loaded.family,
                                               tokenizer=loaded.tokenizer)
    space = load_space(args.space, {"lambdas": DEFAULT_GRID, "tau": 0.0, **DEFAULT_SETTING})
    return loaded, calibration_set, space


def _sweep_arguments(args, loaded, calibration_set) -> dict:
    """What run_space_sweep and assemble_partial_space_table share (so both open the same partial file)."""
    return dict(max_new_tokens=args.max_new_tokens, metric=calibration_set.metric,
                out_path=args.out_dir / "space.parquet", model_fingerprint=loaded.fingerprint,
                metadata={"model": {"name": args.model, "source": loaded.source},
                          "calibration_set": calibration_set.describe()})


def sweep(args, loaded, calibration_set, space):
    from ltt_exit.pipeline import default_batch_prompts
    from ltt_exit.sweep.space import run_space_sweep

    device_type = next(loaded.model.parameters()).device.type
    args.out_dir.mkdir(parents=True, exist_ok=True)
    return run_space_sweep(
        loaded.model, loaded.tokenizer, calibration_set, space, **_sweep_arguments(args, loaded, calibration_set),
        prompts_per_batch=args.batch_prompts or default_batch_prompts(device_type), time_budget_s=args.time_budget)


def partial_table(args, loaded, calibration_set, space):
    """The space table of the prompts swept so far (None if none), saved as space.partial-<k>.parquet;
    the partial file stays, and space.parquet is not written, so the sweep can still be resumed."""
    from ltt_exit.sweep.space import assemble_partial_space_table

    table = assemble_partial_space_table(loaded.model, loaded.tokenizer, calibration_set, space,
                                         **_sweep_arguments(args, loaded, calibration_set))
    if table is not None:
        table.save(args.out_dir / f"space.partial-{table.n}.parquet")
    return table


def fixed_sequence_per_setting(losses, costs, deltas, epsilon, configurations):
    """For every setting: fixed-sequence testing over its λ grid on all n, max over risks of HB p-values.

    Returns {setting: chosen configuration index}; nothing certified gives the setting's first (λ = 1)
    configuration, the full model."""
    from ltt_exit.certify import get_pvalue

    hb = get_pvalue("hoeffding-bentkus")
    n = losses.shape[0]
    risk = losses.mean(axis=0)                               # (K, R)
    p = np.max(np.stack([hb.from_risk(risk[:, r], n, deltas[r]) for r in range(len(deltas))], -1), -1)
    mean_cost = costs.mean(axis=0)
    chosen = {}
    for s in sorted({c["setting"] for c in configurations}):
        columns = [j for j, c in enumerate(configurations) if c["setting"] == s]  # in grid order
        passed = np.logical_and.accumulate(p[columns] <= epsilon)
        certified = [j for j, ok in zip(columns, passed) if ok]
        chosen[s] = min(certified, key=lambda j: mean_cost[j]) if certified else columns[0]
    return chosen


def analyse(args, table, loaded=None, space=None, calibration_set=None) -> dict:
    from ltt_exit.certify import certify_pareto
    from ltt_exit.pareto_pipeline import parse_risks
    from ltt_exit.report import pareto_split_trials

    risks = parse_risks(args.risks)
    names, deltas = list(risks), np.array(list(risks.values()))
    names = [r for r in names if r in table.risks]
    if len(names) < len(risks):
        print(f"note: the table has no {set(risks) - set(names)} losses; using {names}", file=sys.stderr)
        deltas = np.array([risks[r] for r in names])
        risks = {r: risks[r] for r in names}
    losses = table.losses(names)
    layers = table.cost(args.cost)  # what every method minimises
    configs = table.configurations
    safe = next(j for j, c in enumerate(configs) if c["lambda"] >= 1.0)

    def cost_of(j):
        if j is None:
            j = safe
        return {
            "configuration": j, "knobs": {k: v for k, v in configs[j].items()},
            "mean_layers": float(table.values["mean_layers"][:, j].mean()),
            "flops_ratio": float(table.values["flops"][:, j].sum() / table.values["full_flops"][:, j].sum()),
            "empirical_risk": {r: float(losses[:, j, i].mean()) for i, r in enumerate(names)},
        }

    start = time.perf_counter()
    cert = certify_pareto(losses, layers, deltas, args.epsilon, split=0.5, seed=0, safe_index=safe, risk_names=names)
    pareto_seconds = time.perf_counter() - start
    per_setting = fixed_sequence_per_setting(losses, layers, deltas, args.epsilon, configs)
    default = next((s for s in per_setting if _is_default(configs, s)), None)
    if default is None:
        raise SystemExit("the space does not contain the default setting (min exit layer 15, decaying, softmax-margin)")
    setting_costs = {s: layers[:, j].mean() for s, j in per_setting.items()}
    hindsight_setting = min(setting_costs, key=setting_costs.get)
    within = [j for j in range(table.K) if all(losses[:, j, i].mean() <= deltas[i] for i in range(len(names)))]
    oracle = min(within, key=lambda j: layers[:, j].mean())
    result = {
        "n": table.n, "K": table.K, "settings": len(per_setting), "risks": risks, "epsilon": args.epsilon,
        "num_layers": table.metadata.get("num_layers"),
        "pareto_testing": cost_of(cert.chosen_index) | {"certified_any": cert.certified_any,
                                                          "tested": len(cert.pareto["tested_order"]),
                                                          "seconds": pareto_seconds},
        "default_configuration": cost_of(per_setting[default]),
        "hindsight_best_single_configuration": cost_of(per_setting[hindsight_setting]),
        "hindsight_oracle_no_guarantee": cost_of(oracle),
    }
    measure = "flops_ratio" if args.cost == "flops" else "mean_layers"
    p, d, h = (result[k][measure] for k in ("pareto_testing", "default_configuration",
                                             "hindsight_best_single_configuration"))
    result["cost"] = args.cost
    result["pareto_over_default"] = p / d
    result["pareto_over_hindsight_best"] = p / h
    trials = pareto_split_trials(table, risks, args.epsilon, trials=args.trials, seed=0, cost=args.cost)
    result["validity"] = {"trials": trials.trials, "violation_rate": trials.violation_rate,
                          "violation_se": trials.violation_se, "certified_rate": trials.certified_rate,
                          "mean_layers": trials.mean_cost, "flops_ratio": trials.mean_flops_ratio}
    if args.wall_prompts and loaded is not None:
        result["wall_clock"] = wall_clock(args, loaded, space, calibration_set, table, {
            "full model": safe, "pareto_testing": result["pareto_testing"]["configuration"],
            "default_configuration": result["default_configuration"]["configuration"],
            "hindsight_best_single_configuration": result["hindsight_best_single_configuration"]["configuration"],
        })
    return result


def _is_default(configs, setting) -> bool:
    c = next(c for c in configs if c["setting"] == setting)
    return (c["min_exit_layer"] == DEFAULT_SETTING["min_exit_layer"] and c["pruning"]["name"] == DEFAULT_SETTING["pruning"]
            and not c["pruning"]["params"] and c["scorer"]["name"] == DEFAULT_SETTING["scorer"] and not c["scorer"]["params"])


def wall_clock(args, loaded, space, calibration_set, table, chosen: dict) -> dict:
    """Milliseconds per generated token at batch 1 for each chosen configuration, over the first prompts.

    On CUDA the decoder is the fast path (CUDA graphs, compiled decision where the device allows: what one
    serves with); elsewhere the reference decoder. Every prompt runs once untimed first, so no graph
    capture, compilation or lazy initialisation lands in the timed pass (the first H200 run timed the
    reference decoder without that and its full-model row, timed first, read 58 ms/token against 26-30
    in the next run)."""

    from _common import make_fast, per_token  # this script's folder is on sys.path
    from ltt_exit.decode import EarlyExitDecoder

    prompts = [ex.prompt for ex in calibration_set.examples[: args.wall_prompts]]
    cuda = next(loaded.model.parameters()).device.type == "cuda"
    out = {}
    for name, j in chosen.items():
        config = table.configurations[j]
        kwargs = space.settings[config["setting"]].decoder_kwargs()
        notes = []
        if cuda:
            decoder, notes = make_fast(loaded.model, loaded.tokenizer, **kwargs)
        else:
            decoder = EarlyExitDecoder(loaded.model, loaded.tokenizer, **kwargs)
        run = lambda prompt, d=decoder, lam=config["lambda"]: d.generate(  # noqa: E731
            [prompt], threshold=lam, max_new_tokens=args.max_new_tokens)
        ms, tokens, _ = per_token(run, prompts, lambda out: len(out[0].token_ids))
        out[name] = {"configuration": j, "tokens": tokens, "ms_per_token": ms,
                     "decoder": type(decoder).__name__, "fast_path_fallbacks": notes}
    full = out["full model"]["ms_per_token"]
    for row in out.values():
        row["speedup_vs_full"] = full / row["ms_per_token"]
    return out


def markdown(result: dict) -> str:
    head = []
    if "n_swept" in result:
        head = [f"partial: {result['n_swept']} of {result['n_planned']} prompts (the first {result['n_swept']} of the "
                "seed-0 sample in sweep order, chosen by the time budget, not by their losses)", ""]
    rows = [("Pareto Testing", "pareto_testing"), ("default configuration", "default_configuration"),
            ("best single configuration (hindsight)", "hindsight_best_single_configuration"),
            ("hindsight oracle (no guarantee)", "hindsight_oracle_no_guarantee")]
    wall = result.get("wall_clock", {})
    lines = ["| method | configuration (λ, j, pruning, scorer) | mean layers | FLOPs ratio | ms/token (speed-up) | risks |",
             "|---|---|---|---|---|---|"]
    for label, key in rows:
        r = result[key]
        c = r["knobs"]
        knobs = f"{c['lambda']:g}, {c['min_exit_layer']}, {c['pruning']['name']}, {c['scorer']['name']}"
        w = wall.get(key)
        timing = f"{w['ms_per_token']:.2f} ({w['speedup_vs_full']:.2f}×)" if w else "–"
        risks = ", ".join(f"{k} {v:.4f}" for k, v in r["empirical_risk"].items())
        lines.append(f"| {label} | {knobs} | {r['mean_layers']:.2f} | {r['flops_ratio']:.3f} | {timing} | {risks} |")
    v = result["validity"]
    lines.append("")
    lines.append(f"Cost minimised: {result['cost']}. Pareto / default: {result['pareto_over_default']:.3f}; Pareto / hindsight best: "
                 f"{result['pareto_over_hindsight_best']:.3f}. Validity (ltt-report protocol, {v['trials']} random "
                 f"80/20 splits): violation rate {v['violation_rate']:.3f} ± {v['violation_se']:.3f} (ε = {result['epsilon']}).")
    return "\n".join(head + lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    from ltt_exit.space_table import SpaceTable

    table_path = args.out_dir / "space.parquet"
    loaded = space = calibration_set = None
    if not table_path.exists():
        loaded, calibration_set, space = load_everything(args)
        result = sweep(args, loaded, calibration_set, space)
        print(f"swept {result.decoded_examples} prompts in {result.seconds:.0f} s "
              f"({result.resumed_examples} resumed, {result.remaining_examples} left)", flush=True)
        if result.table is None:
            print("sweep incomplete: run the same command again to continue")
            if not args.analyse_partial:
                return 0
            table = partial_table(args, loaded, calibration_set, space)
            if table is None:
                print("nothing swept yet: no partial analysis")
                return 0
            n_planned = table.metadata["partial"]["n_planned"]
            print(f"analysing the partial table: {table.n} of {n_planned} prompts "
                  f"(saved as space.partial-{table.n}.parquet)", flush=True)
            result = {"n_swept": table.n, "n_planned": n_planned} | analyse(args, table, loaded, space, calibration_set)
            write_results(args, result)
            return 0
    print("sweep complete", flush=True)
    table = SpaceTable.load(table_path)
    if args.wall_prompts and loaded is None:
        loaded, calibration_set, space = load_everything(args)
    write_results(args, analyse(args, table, loaded, space, calibration_set))
    return 0


def write_results(args, result: dict) -> None:
    (args.out_dir / f"results-{args.cost}.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    text = markdown(result)
    (args.out_dir / f"results-{args.cost}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
