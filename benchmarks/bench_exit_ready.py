"""Exit-ready model vs the frozen model: certified mean layers, FLOPs ratio and full-output quality.

For each model (a name load_model takes: the frozen base and an ltt-train-exits folder), runs the
ltt-calibrate sweep on the same calibration prompts (textual consistency), keeps the loss table, and
from it reports, for every δ: the certified λ̂ (fixed-sequence, Hoeffding–Bentkus, ε), the mean exit
layer and the FLOPs ratio (heads included) at λ̂; and the full output's ROUGE-L against the recipe's
references, plus the exit-ready model's full-output similarity to the frozen model's.

    python benchmarks/bench_exit_ready.py --models /tmp/smollm2/model.gguf /tmp/exit/smollm2-135m-exit \
        --recipe benchmarks/data/samsum_jsonl_recipe.yaml --data-files samsum_test.jsonl --size 500 \
        --max-new-tokens 32 --device cuda --dtype bfloat16 --out results.json

Each sweep is cached by ltt-calibrate (same configuration: reused), so a rerun after an interruption
skips the models already swept.

--summarise FILE [FILE ...] reports from saved sweeps instead (a loss table, or the ``.partial.jsonl`` of
an interrupted sweep from the ltt-exit cache), on the examples all of them share; the first is the frozen
model:

    python benchmarks/bench_exit_ready.py --summarise frozen.parquet exit.partial.jsonl \
        --recipe benchmarks/data/samsum_jsonl_recipe.yaml --data-files samsum_test.jsonl --size 500 --out r.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


class _Rows:
    """The columns _summarise reads, from a LossTable or from a partial sweep's JSON lines (``lambdas`` given)."""

    def __init__(self, path: Path, lambdas=None):
        from ltt_exit.loss_table import LossTable

        if str(path).endswith(".jsonl"):
            records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
            records = [r for r in records if r.get("kind") == "example"]
            data = [r["data"] for r in records]
            self.example_ids = [str(r["id"]) for r in records]
            self.lambdas = np.asarray(lambdas, dtype=float)
            self.losses = np.array([d["loss_textual"] for d in data], dtype=float)
            self.candidate_columns = {k: np.array([d[k] for d in data], dtype=float)
                                      for k in ("layers_total", "num_tokens", "flops")}
            self.example_columns = {"full_flops": np.array([d["full_flops"] for d in data], dtype=float),
                                    "full_text": np.array([d["full_text"] for d in data], dtype=object)}
            self.metadata = {}  # num_layers: taken from the frozen model's table by the caller
        else:
            table = LossTable.load(path)
            self.example_ids = [str(x) for x in table.example_ids]
            self.lambdas, self.losses = table.lambdas, table.losses
            self.candidate_columns, self.example_columns = table.candidate_columns, table.example_columns
            self.metadata = table.metadata

    @property
    def n(self) -> int:
        return len(self.example_ids)

    def subset(self, ids) -> "_Rows":
        index = [self.example_ids.index(i) for i in ids]
        rows = object.__new__(_Rows)
        rows.example_ids = list(ids)
        rows.lambdas, rows.losses, rows.metadata = self.lambdas, self.losses[index], self.metadata
        rows.candidate_columns = {k: v[index] for k, v in self.candidate_columns.items()}
        rows.example_columns = {k: v[index] for k, v in self.example_columns.items()}
        return rows


def _summarise(table, deltas, epsilon, references):
    from ltt_exit import metrics
    from ltt_exit.certify import certify

    cols, examples = table.candidate_columns, table.example_columns
    num_layers = int(table.metadata.get("num_layers", 0))
    full_flops = float(np.sum(examples["full_flops"]))
    result = {"n": table.n, "num_layers": num_layers, "certified": {}}
    for delta in deltas:
        cert = certify(table.losses, table.lambdas, delta, epsilon, pvalue="hoeffding-bentkus",
                       procedure="fixed-sequence")
        j = cert.chosen_index
        if j is None:
            entry = {"lambda_hat": cert.lambda_hat, "mean_layers": float(num_layers), "flops_ratio": 1.0}
        else:
            layers = cols["layers_total"][:, j].sum() / max(cols["num_tokens"][:, j].sum(), 1)
            entry = {"lambda_hat": cert.lambda_hat, "mean_layers": float(layers),
                     "flops_ratio": float(np.sum(cols["flops"][:, j]) / full_flops),
                     "empirical_risk": float(table.losses[:, j].mean())}
        result["certified"][str(delta)] = entry
    layers_all = cols["layers_total"].sum(axis=0) / np.maximum(cols["num_tokens"].sum(axis=0), 1)
    result["per_lambda"] = [{"lambda": float(lam), "risk": float(table.losses[:, j].mean()),
                             "mean_layers": float(layers_all[j]),
                             "flops_ratio": float(cols["flops"][:, j].sum() / full_flops)}
                            for j, lam in enumerate(table.lambdas)]
    ids = [str(x) for x in table.example_ids]
    full_texts = [str(t) for t in examples["full_text"]]
    if references:
        scores = [metrics.similarity("rouge-l", text, references[i]) for i, text in zip(ids, full_texts)]
        result["rouge_l_full_vs_reference"] = float(np.mean(scores))
    result["full_texts"] = dict(zip(ids, full_texts))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="frozen model first, then exit-ready ones")
    parser.add_argument("--summarise", nargs="+", type=Path, default=None, metavar="FILE",
                        help="report from saved sweeps (loss table, or an interrupted sweep's .partial.jsonl) instead")
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--data-files", nargs="+", default=None)
    parser.add_argument("--size", type=int, default=500)
    parser.add_argument("--sample-seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--deltas", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--min-exit-layer", type=int, nargs="+", default=[15])
    parser.add_argument("--scorer", default="softmax-margin")
    parser.add_argument("--pruning", default="decaying")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--batch-prompts", type=int, default=None)
    parser.add_argument("--tables", type=Path, default=Path("bench_exit_ready_tables"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from ltt_exit import metrics
    from ltt_exit.cli.calibrate import main as calibrate
    from ltt_exit.loss_table import LossTable
    from ltt_exit.recipes import load_recipe

    recipe = load_recipe(args.recipe)
    calibration = recipe.load(size=args.size, seed=args.sample_seed, data_files=args.data_files)
    references = {str(e.id): e.reference for e in calibration.examples} if calibration.has_references else None
    if args.summarise:
        return _report_saved(args, references)
    if not args.models:
        parser.error("--models or --summarise is required")
    args.tables.mkdir(parents=True, exist_ok=True)
    report = {"recipe": args.recipe, "size": args.size, "max_new_tokens": args.max_new_tokens,
              "epsilon": args.epsilon, "scorer": args.scorer, "pruning": args.pruning,
              "dtype": args.dtype, "runs": []}
    for model in args.models:
        for j in args.min_exit_layer:
            table_path = args.tables / f"{Path(model).name}.j{j}.parquet"
            started = time.perf_counter()
            if not table_path.exists():
                argv_cal = ["--model", model, "--recipe", args.recipe, "--size", str(args.size),
                            "--sample-seed", str(args.sample_seed), "--max-new-tokens", str(args.max_new_tokens),
                            "--scorer", args.scorer, "--pruning", args.pruning, "--min-exit-layer", str(j),
                            "--delta", str(args.deltas[0]), "--epsilon", str(args.epsilon), "--loss", "textual",
                            "--table-out", str(table_path), "--out", str(args.tables / f"{Path(model).name}.j{j}.cert.json")]
                for flag, value in (("--data-files", args.data_files), ("--device", args.device),
                                    ("--dtype", args.dtype), ("--batch-prompts", args.batch_prompts)):
                    if value:
                        argv_cal += [flag, *([str(v) for v in value] if isinstance(value, list) else [str(value)])]
                rc = calibrate(argv_cal)
                if rc != 0:
                    print(f"ltt-calibrate failed for {model} (rc {rc})", file=sys.stderr)
                    return rc
            table = LossTable.load(table_path)
            run = {"model": model, "min_exit_layer": j, "seconds": round(time.perf_counter() - started, 1),
                   **_summarise(table, args.deltas, args.epsilon, references)}
            report["runs"].append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "full_texts"}), flush=True)
    # the exit-ready models' full outputs against the frozen model's (same prompts)
    frozen = report["runs"][0]["full_texts"]
    for run in report["runs"]:
        shared = [i for i in run["full_texts"] if i in frozen]
        run["rouge_l_full_vs_frozen_full"] = float(np.mean(
            [metrics.similarity("rouge-l", run["full_texts"][i], frozen[i]) for i in shared])) if shared else None
    for run in report["runs"]:
        run.pop("full_texts")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


def _report_saved(args, references) -> int:
    from ltt_exit import metrics

    first = _Rows(args.summarise[0])
    runs = [first] + [_Rows(p, lambdas=first.lambdas) for p in args.summarise[1:]]
    for run in runs[1:]:
        run.metadata = first.metadata
    shared = [i for i in first.example_ids if all(i in r.example_ids for r in runs[1:])]
    report = {"recipe": args.recipe, "epsilon": args.epsilon, "shared_examples": len(shared), "runs": []}
    for path, rows in zip(args.summarise, runs):
        for subset_name, subset in (("all", rows), ("shared", rows.subset(shared))):
            if subset_name == "all" and rows.n == len(shared):
                continue
            entry = {"file": path.name, "examples": subset_name,
                     **_summarise(subset, args.deltas, args.epsilon, references)}
            report["runs"].append(entry)
    frozen = next(r for r in report["runs"] if r["examples"] == "shared")["full_texts"]
    for entry in report["runs"]:
        texts = entry.pop("full_texts")
        if entry["examples"] == "shared":
            entry["rouge_l_full_vs_frozen_full"] = float(np.mean([metrics.similarity("rouge-l", texts[i], frozen[i])
                                                                  for i in shared]))
            if references:
                diff = [metrics.similarity("rouge-l", texts[i], references[i])
                        - metrics.similarity("rouge-l", frozen[i], references[i]) for i in shared]
                entry["rouge_l_vs_reference_minus_frozen"] = {
                    "mean": float(np.mean(diff)), "standard_error": float(np.std(diff, ddof=1) / np.sqrt(len(diff)))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
