"""Exit adapters (issue 7) on the real SmolLM2-135M-Instruct with SAMSum: raw exit heads vs closed-form
(affine, ridge) vs trained (low-rank, distillation) adapters, all with the same scorer and pruning.

    python3 benchmarks/bench_adapters.py                      # defaults below; ~45 min on 2 busy cores
    python3 benchmarks/bench_adapters.py --n 60 --fit-size 60 --eval-size 20   # a quicker look

1. Fitting prompts: the SAMSum *test* split (``../shared/data/samsum_test.jsonl``), greedy-decoded by the
   full model; the calibration sample (validation split) is passed as ``exclude`` and checked with
   ``check_disjoint`` (the two splits share no id or dialogue). Both adapter kinds are fitted from one
   pass over the prompts (``ExitFitData``); fitting times and file sizes are reported.
2. Per-layer top-1 agreement of each exit head (full vocabulary) with the full model's token, on
   held-out validation prompts that are not in the calibration sample.
3. The sweep (``run_sweep``: softmax-margin, decaying pruning, ``--min-exit-layer``, the default grid,
   textual-consistency ROUGE-L loss) on n validation prompts, then ``certify`` at δ ∈ {0.05, 0.1, 0.2},
   ε = 0.05 (Hoeffding–Bentkus, fixed sequence, cost = mean layers): λ̂, mean layers used per token,
   estimated speed-up L / mean layers, and the FLOPs ratio with the adapters' own multiply-adds added
   (the decoder's cost account does not count them).
4. Measured speed: ``decoder.generate`` per prompt (batch 1) at the certified λ̂ (δ = 0.1) against
   λ = 1 on held-out prompts, wall clock and process CPU time, whole call and per generated token after
   the prefill (a 1-token call is subtracted).

5. Kind ``affine+classifier`` (not in the default ``--kinds``): the affine adapters plus an exit classifier
   (scorer ``exit-classifier``, CALM's learned confidence) fitted by ``fit_exit_classifier`` on
   ``--classifier-size`` further test-split prompts (never the adapters' own), for ``--pruning``; it is swept
   and certified like the others with that scorer. ``--pruning`` applies to every kind's sweep.

    python3 benchmarks/bench_adapters.py --fit-size 200 --kinds affine,affine+classifier --skip-agreement

6. Kind ``affine-distill``: the affine maps fine-tuned by distillation (``--distill-steps``, ``--distill-lr``,
   ``--train-tokens``; full vocabulary on CUDA). ``--device cuda`` runs everything on a GPU (sweeps 16 prompts
   per batch unless ``--batch-prompts``); docs/benchmarks.md "More data, distilled maps, n = 400" has the runs.

Adapter files and loss tables are kept in ``--work-dir`` and reused when the settings match, so an
interrupted run resumes (sweeps resume per prompt). Prints markdown tables and writes a JSON file.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DELTAS = (0.05, 0.1, 0.2)
EPSILON = 0.05


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/ltt-bench-adapters"))
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the model, fitting, sweeps and speed runs)")
    parser.add_argument("--batch-prompts", type=int, default=None,
                        help="prompts per sweep batch (default 1 on the CPU, 16 on CUDA)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine two threads were ~10x slower)")
    parser.add_argument("--fit-size", type=int, default=120, help="fitting prompts (test split)")
    parser.add_argument("--fit-tokens", type=int, default=32, help="greedy tokens per fitting prompt")
    parser.add_argument("--eval-size", type=int, default=30, help="held-out validation prompts for agreement")
    parser.add_argument("--n", type=int, default=100, help="calibration prompts for the sweep")
    parser.add_argument("--tokens", type=int, default=24, help="max new tokens in the sweep")
    parser.add_argument("--min-exit-layer", type=int, default=12)
    parser.add_argument("--ridge", type=float, default=0.1)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--distill-steps", type=int, default=1000,
                        help="affine-distill: distillation steps that fine-tune the closed-form maps")
    parser.add_argument("--distill-lr", type=float, default=1e-5,
                        help="affine-distill: Adam learning rate (the maps' weights are O(1/sqrt(d)); 1e-3 diverged)")
    parser.add_argument("--train-tokens", type=int, default=16384,
                        help="tokens kept (reservoir) for low-rank and affine-distill training")
    parser.add_argument("--speed-prompts", type=int, default=12)
    parser.add_argument("--kinds", default="raw,affine,low-rank",
                        help="raw, affine, low-rank, affine-distill, and X+classifier for an adapter kind X (comma list)")
    parser.add_argument("--pruning", default="decaying", help="exit-head pruning of every sweep: none, fixed:K, decaying")
    parser.add_argument("--classifier-size", type=int, default=120,
                        help="affine+classifier: test-split prompts for the classifier, after the adapters' own")
    parser.add_argument("--skip-agreement", action="store_true", help="skip the per-layer agreement step")
    return parser.parse_args()


def collect_batch(args) -> int:
    """Prompts per batch when collecting fitting states (the runs in docs/benchmarks.md used 1)."""
    import torch

    from ltt_exit.pipeline import default_batch_prompts

    return args.batch_prompts or default_batch_prompts(torch.device(args.device).type)


def log(message: str) -> None:
    print(message, flush=True)


def fit_adapters(args, loaded, recipe, calibration, layers):
    """Both adapter kinds from one pass over the fitting prompts (or the files of an earlier run)."""
    from ltt_exit.decode.adapters import ExitAdapters, ExitFitData, check_disjoint, fitting_set

    wanted = {k.split("+")[0] for k in args.kinds.split(",")} - {"raw"}
    trained = bool(wanted & {"low-rank", "affine-distill"})
    settings = {"fit_size": args.fit_size, "fit_tokens": args.fit_tokens, "layers": layers, "ridge": args.ridge,
                "rank": args.rank, "steps": args.steps, "model": loaded.fingerprint}
    # (the calibration sample is not in the stamp: check_disjoint below refuses adapters that saw any of it)
    if "affine-distill" in wanted:  # (absent otherwise, so that earlier stamps still match)
        settings |= {"distill_steps": args.distill_steps, "train_tokens": args.train_tokens,
                     "distill_lr": args.distill_lr}
    stamp = args.work_dir / "adapters.json"
    paths = {kind: args.work_dir / f"{kind}.safetensors" for kind in sorted(wanted | {"affine"})}
    if stamp.exists() and json.loads(stamp.read_text())["settings"] == settings and all(p.exists() for p in paths.values()):
        log("reusing the adapter files of an earlier run with these settings")
        facts = json.loads(stamp.read_text())["facts"]
        adapters = {k: ExitAdapters.load(p, model_fingerprint=loaded.fingerprint) for k, p in paths.items()}
    else:
        examples, info = fitting_set(recipe, size=args.fit_size, seed=1, split="test",
                                     data_files=args.data_dir / "samsum_test.jsonl", family=loaded.family,
                                     tokenizer=loaded.tokenizer, exclude=calibration)
        log(f"collecting states: {len(examples)} test-split prompts x {args.fit_tokens} greedy tokens …")
        data = ExitFitData.collect(loaded, examples, info, max_new_tokens=args.fit_tokens, layers=layers,
                                   max_train_tokens=args.train_tokens if trained else 0, progress=True,
                                   batch_size=collect_batch(args))
        adapters = {"affine": data.affine(ridge=args.ridge)}
        log(f"  {data.info['n_tokens']} tokens in {data.collect_seconds:.0f}s")
        facts = {"n_prompts": data.info["n_prompts"], "n_tokens": data.info["n_tokens"],
                 "collect_seconds": data.collect_seconds,
                 "affine_fit_seconds": adapters["affine"].fit_info["method"]["fit_seconds"]}
        vocabulary = "full" if str(args.device).startswith("cuda") else "sampled"
        if "affine-distill" in wanted:
            log("  fine-tuning the affine maps (distillation) …")
            adapters["affine-distill"] = data.affine(ridge=args.ridge, distill={
                "steps": args.distill_steps, "batch_size": 256, "learning_rate": args.distill_lr, "vocabulary": vocabulary,
                "log_every": max(1, args.distill_steps // 10)})
            method = adapters["affine-distill"].fit_info["method"]["distill"]
            facts |= {"affine_distill_seconds": method["train_seconds"],
                      "affine_distill_loss": [method["first_loss"], method["final_loss"]]}
        if "low-rank" in wanted:
            log("  training low-rank …")
            adapters["low-rank"] = data.low_rank(rank=args.rank, steps=args.steps, batch_size=64, learning_rate=3e-3,
                                                 vocabulary=vocabulary, log_every=100)
            facts |= {"low_rank_train_seconds": adapters["low-rank"].fit_info["method"]["train_seconds"],
                      "low_rank_loss": [adapters["low-rank"].fit_info["method"]["first_loss"],
                                        adapters["low-rank"].fit_info["method"]["final_loss"]]}
        for kind, path in paths.items():
            adapters[kind].save(path)
            facts[f"{kind}_file_bytes"] = path.stat().st_size
            facts[f"{kind}_parameters"] = adapters[kind].num_parameters()
        stamp.write_text(json.dumps({"settings": settings, "facts": facts}, indent=2))
    for kind in adapters:
        check_disjoint(adapters[kind], calibration)  # raises if any calibration example was used to fit
    return adapters, facts


def agreement(args, loaded, eval_examples, adapters):
    """On the full model's greedy continuations of ``eval_examples`` (teacher-forced states):

    * top-1 agreement per layer of each exit head (full vocabulary) with the full model's token;
    * the mean earliest agreeing layer >= j;
    * the token-level trade-off of the decoder's own exit rule (decaying pruning + softmax-margin,
      exactly as the decoder computes them, on these states): for every λ of the default grid, the mean
      exit layer and the share of exited tokens whose prediction differs from the full model's.
    """
    import torch

    from ltt_exit.decode import resolve_pruning, resolve_scorer
    from ltt_exit.decode.adapters import collect_states
    from ltt_exit.decode.backends import backend_for
    from ltt_exit.decode.scorers import ExitView
    from ltt_exit.sweep import DEFAULT_GRID

    backend = backend_for(loaded.model)
    L = backend.num_layers
    j = args.min_exit_layer
    layers = list(range(j, L))  # the consulted layers (full-vocabulary heads cost ~1 GFLOP per prompt each)
    kinds = ["raw", *adapters]
    hits = {kind: np.zeros(L) for kind in kinds}
    earliest = {kind: [] for kind in kinds}
    confidences = {kind: [] for kind in kinds}  # per prompt: (len(layers), T)
    correct = {kind: [] for kind in kinds}
    pruning, scorer = resolve_pruning("decaying"), resolve_scorer("softmax-margin")
    tokens = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in collect_states(loaded.model, loaded.tokenizer, [e.prompt for e in eval_examples],
                                    max_new_tokens=args.fit_tokens, layers=layers):
            target = torch.tensor(batch.tokens, device=batch.final.device)
            tokens += len(target)
            for kind in kinds:
                agree = torch.ones(L, len(target), dtype=torch.bool, device=target.device)  # layer L agrees by definition
                agree[: j - 1] = False  # not measured below j
                set_ids = None
                conf_rows, correct_rows = [], []
                for layer in layers:
                    hidden = batch.hidden[layer]
                    if kind != "raw":
                        hidden = adapters[kind].apply(layer, hidden)
                    agree[layer - 1] = backend.head(hidden).argmax(-1) == target

                    def head(ids, hidden=hidden):
                        return backend.head(hidden, ids)

                    pruned = pruning.select(layer, min_exit_layer=j, num_layers=L, prev_ids=set_ids, head=head)
                    view = ExitView(layer=layer, logits=pruned.logits, hidden=batch.hidden[layer],
                                    hidden_prev=batch.hidden[layer])
                    conf_rows.append(scorer.score(view))
                    best = pruned.logits.argmax(-1)
                    predicted = best if pruned.ids is None else pruned.ids.gather(-1, best[:, None])[:, 0]
                    correct_rows.append(predicted == target)
                    set_ids = pruned.ids
                hits[kind] += agree.sum(dim=1).cpu().numpy()
                # first layer >= the minimum exit layer whose head agrees (L when none does)
                first = agree[j - 1:].float().argmax(dim=0) + j
                earliest[kind].extend(first.tolist())
                # the decoder-only first token comes from the prefill (no exit decision): drop it
                confidences[kind].append(torch.stack(conf_rows)[:, 1:].double().cpu().numpy())
                correct[kind].append(torch.stack(correct_rows)[:, 1:].cpu().numpy())
    seconds = time.perf_counter() - started
    tradeoff = {}
    for kind in kinds:
        conf, ok = np.concatenate(confidences[kind], axis=1), np.concatenate(correct[kind], axis=1)
        rows = []
        for lam in DEFAULT_GRID:
            passes = conf >= lam if lam < 1 else np.zeros_like(conf, dtype=bool)
            exited = passes.any(axis=0)
            first = passes.argmax(axis=0)
            exit_layer = np.where(exited, first + j, L)
            wrong = exited & ~ok[first, np.arange(conf.shape[1])]
            rows.append({"lambda": lam, "mean_exit_layer": float(exit_layer.mean()),
                         "exited": float(exited.mean()), "token_error": float(wrong.mean())})
        tradeoff[kind] = rows
    return ({kind: (h / tokens).tolist() for kind, h in hits.items()},
            {kind: float(np.mean(v)) for kind, v in earliest.items()}, tradeoff, tokens, seconds)


def pruning_spec(text: str):
    """'none' | 'decaying' | 'fixed:K' -> a pruning spec for the decoder."""
    if text.startswith("fixed:"):
        return ("fixed", {"k": int(text.split(":", 1)[1])})
    return text


def fit_classifier(args, loaded, recipe, calibration, affine, base="affine"):
    """Adapters ``base`` plus an exit classifier fitted on further test-split prompts (or an earlier file)."""
    from ltt_exit.decode.adapters import ExitAdapters, fit_exit_classifier, fitting_set

    path = args.work_dir / f"{base}+classifier-{args.pruning.replace(':', '')}.safetensors"
    settings = {"adapters": affine.fingerprint, "size": args.classifier_size, "pruning": args.pruning,
                "min_exit_layer": args.min_exit_layer, "tokens": args.fit_tokens}
    stamp = path.with_suffix(".json")
    if path.exists() and stamp.exists() and json.loads(stamp.read_text()) == settings:
        log(f"reusing {path}")
        return ExitAdapters.load(path, model_fingerprint=loaded.fingerprint)
    pool, info = fitting_set(recipe, size=None, seed=1, split="test", data_files=args.data_dir / "samsum_test.jsonl",
                             family=loaded.family, tokenizer=loaded.tokenizer, exclude=calibration)
    fresh = [e for e in pool if not affine.example_hashes.overlaps(e, recipe=info["recipe"], source=info["source"])]
    fresh = fresh[: args.classifier_size]
    log(f"fitting the exit classifier on {len(fresh)} further test-split prompts ({args.pruning}) …")
    started = time.perf_counter()
    adapters = fit_exit_classifier(loaded, affine, fresh, info | {"n_prompts": len(fresh)},
                                   max_new_tokens=args.fit_tokens, min_exit_layer=args.min_exit_layer,
                                   pruning=pruning_spec(args.pruning), progress=True,
                                   batch_size=collect_batch(args))
    log(f"  {time.perf_counter() - started:.0f}s: {json.dumps(adapters.fit_info['exit_classifier']['method'])}")
    adapters.save(path)
    stamp.write_text(json.dumps(settings))
    return adapters


def sweep(args, loaded, calibration, name, adapters):
    from ltt_exit.decode import EarlyExitDecoder
    from ltt_exit.loss_table import LossTable
    from ltt_exit.sweep import SweepSpec, run_sweep, sweep_config_key

    scorer = "exit-classifier" if name.endswith("+classifier") else "softmax-margin"
    decoder = EarlyExitDecoder(loaded.model, loaded.tokenizer, scorer=scorer, pruning=pruning_spec(args.pruning),
                               min_exit_layer=args.min_exit_layer, exit_adapters=adapters)
    batch = args.batch_prompts or (16 if str(args.device).startswith("cuda") else 1)
    spec = SweepSpec(max_new_tokens=args.tokens, metric=calibration.metric, loss="textual", prompts_per_batch=batch)
    key = sweep_config_key(loaded.fingerprint, decoder.config_dict(), calibration.fingerprint, spec)
    suffix = "" if args.pruning == "decaying" else "-" + args.pruning.replace(":", "")
    path = args.work_dir / f"sweep-{name}{suffix}.parquet"
    if path.exists():
        table = LossTable.load(path)
        if table.metadata.get("sweep_config_key") == key:
            log(f"  reusing {path}")
            return decoder, table, table.metadata.get("sweep_seconds")
    started = time.perf_counter()
    result = run_sweep(decoder, calibration, spec, out_path=path, model_fingerprint=loaded.fingerprint,
                       metadata={"bench": "adapters"}, progress=False)
    seconds = time.perf_counter() - started
    table = result.table
    table.metadata["sweep_seconds"] = seconds
    table.save(path)
    return decoder, table, seconds


def certify_table(table, num_layers: int, adapters, min_exit_layer: int, hidden_size: int, loss: str = "textual"):
    from ltt_exit.certify import certify

    cols = table.candidate_columns
    losses = table.losses if loss == "textual" else cols["loss_risk"]
    mean_layers_token = cols["layers_total"].sum(axis=0) / np.maximum(cols["num_tokens"].sum(axis=0), 1)
    per_layer = 0.0
    if adapters is not None:  # multiply-adds of one adapter application, x2 for FLOPs
        d = hidden_size
        per_layer = 2.0 * (d * d + d if adapters.kind == "affine" else 2 * d * adapters.maps[adapters.layers[0]].rank + d)
    # the exit classifier's "previous-*" features apply layer ℓ-1's adapter again at every consulted layer but
    # the first (ℓ-1 = j-1 has no adapter here); its head rows are in the cost account already
    rerun = adapters is not None and getattr(adapters, "exit_classifier", None) is not None
    out = {}
    for delta in DELTAS:
        certificate = certify(losses, table.lambdas, delta, EPSILON,
                              costs=table.mean_per_candidate("mean_layers"))
        j = certificate.chosen_index
        if j is None:
            out[delta] = {"lambda": 1.0, "mean_layers": float(num_layers), "speedup": 1.0, "flops_ratio": 1.0,
                          "flops_ratio_with_adapters": 1.0, "risk": 0.0, "certified": 0}
            continue
        flops = cols["flops"][:, j].sum()
        full = table.example_columns["full_flops"].sum()
        adapter_flops = 0.0
        # tables of cost model 2 and later already count the adapters in their flops column
        counted = int(table.metadata.get("cost_model", 1)) >= 2
        if per_layer and not counted and certificate.lambda_hat < 1:  # λ >= 1 consults no exit head
            # adapters run at every consulted layer: j .. min(exit, L-1) for every token but the prefill's
            consulted = 0
            for row in cols["exit_layers"][:, j]:
                exits = [int(x) for x in str(row).split()][1:]
                consulted += sum(min(e, num_layers - 1) - min_exit_layer + 1 for e in exits)
                if rerun:
                    consulted += sum(min(e, num_layers - 1) - min_exit_layer for e in exits)
            adapter_flops = per_layer * consulted
        out[delta] = {
            "lambda": float(certificate.lambda_hat),
            "mean_layers": float(mean_layers_token[j]),
            "speedup": float(num_layers / mean_layers_token[j]),
            "flops_ratio": float(flops / full),
            "flops_ratio_with_adapters": float((flops + adapter_flops) / full),
            "risk": float(losses[:, j].mean()),
            "certified": int(certificate.n_certified),
        }
    return out


def measure_speed(loaded, decoder, prompts, threshold, tokens):
    """Batch-1 generate at λ = 1 and at ``threshold``, alternating per prompt; also 1-token calls (prefill)."""
    totals = {"full_wall": 0.0, "full_cpu": 0.0, "early_wall": 0.0, "early_cpu": 0.0, "prefill_wall": 0.0,
              "prefill_cpu": 0.0, "tokens_full": 0, "tokens_early": 0}
    for prompt in prompts:
        for key, lam, budget in (("prefill", 1.0, 1), ("full", 1.0, tokens), ("early", threshold, tokens)):
            wall, cpu = time.perf_counter(), time.process_time()
            (seq,) = decoder.generate([prompt], threshold=lam, max_new_tokens=budget)
            totals[f"{key}_wall"] += time.perf_counter() - wall
            totals[f"{key}_cpu"] += time.process_time() - cpu
            if key != "prefill":
                totals[f"tokens_{key}"] += len(seq.token_ids)
    result = dict(totals)
    for clock in ("wall", "cpu"):
        result[f"speedup_{clock}"] = totals[f"full_{clock}"] / totals[f"early_{clock}"]
        per_full = (totals[f"full_{clock}"] - totals[f"prefill_{clock}"]) / max(totals["tokens_full"] - len(prompts), 1)
        per_early = (totals[f"early_{clock}"] - totals[f"prefill_{clock}"]) / max(totals["tokens_early"] - len(prompts), 1)
        result[f"decode_speedup_{clock}"] = per_full / per_early
    return result


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from ltt_exit.models import load_model
    from ltt_exit.recipes import load_recipe

    args.work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    loaded = load_model("smollm2-135m", device=args.device)
    L = loaded.num_layers
    hidden_size = int(loaded.model.config.hidden_size)
    recipe = load_recipe("samsum")
    # validation split: the first n of seed 0 calibrate, the next eval-size are held out for agreement/speed
    validation = recipe.load(data_dir=args.data_dir, size=args.n + args.eval_size, seed=0, family=loaded.family,
                             tokenizer=loaded.tokenizer)
    calibration = recipe.load(data_dir=args.data_dir, size=args.n, seed=0, family=loaded.family,
                              tokenizer=loaded.tokenizer)
    eval_examples = validation.examples[args.n:]
    layers = list(range(args.min_exit_layer, L))
    kinds = [k.strip() for k in args.kinds.split(",")]
    results: dict = {"settings": vars(args) | {"data_dir": str(args.data_dir), "work_dir": str(args.work_dir),
                                                "json_out": str(args.json_out)},
                     "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                 "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}}

    adapters, fit_facts = fit_adapters(args, loaded, recipe, calibration, layers)
    results["fit"] = fit_facts
    log(f"fit: {json.dumps(fit_facts)}")
    for kind in kinds:
        if kind.endswith("+classifier"):
            base = kind.split("+")[0]
            adapters[kind] = fit_classifier(args, loaded, recipe, calibration, adapters[base], base)
            adapters[kind].check_disjoint(calibration)
            results["fit"][f"classifier {base}"] = adapters[kind].fit_info["exit_classifier"]
    if args.skip_agreement:
        run_steps(args, loaded, calibration, eval_examples, adapters, kinds, L, hidden_size, results, started)
        return
    plain = {k: v for k, v in adapters.items() if not k.endswith("+classifier")}
    per_layer, earliest, tradeoff, eval_tokens, eval_seconds = agreement(args, loaded, eval_examples, plain)
    results["agreement"] = {"per_layer": per_layer, "earliest_agreeing_layer": earliest, "tokens": eval_tokens,
                            "token_tradeoff": tradeoff, "seconds": eval_seconds}
    show = [x for x in (12, 14, 16, 18, 20, 22, 24, 26, 28, 29) if x >= args.min_exit_layer]
    log(f"\nagreement on {eval_tokens} held-out tokens ({len(eval_examples)} validation prompts)")
    log("| exit head | " + " | ".join(f"ℓ={x}" for x in show) + f" | mean earliest agreeing ℓ ≥ {args.min_exit_layer} |")
    log("|---|" + "---|" * (len(show) + 1))
    for kind, values in per_layer.items():
        log(f"| {kind} | " + " | ".join(f"{values[x - 1]:.2f}" for x in show) + f" | {earliest[kind]:.1f} |")
    log("\nteacher-forced token level, decoder's exit rule (decaying pruning, softmax-margin): smallest mean exit "
        "layer with at most this share of wrong early exits (λ of the default grid)")
    budgets = (0.005, 0.01, 0.02, 0.05)
    log("| exit head | " + " | ".join(f"error ≤ {b:g}" for b in budgets) + " |")
    log("|---|" + "---|" * len(budgets))
    for kind, rows in tradeoff.items():
        cells = []
        for budget in budgets:
            ok = [r for r in rows if r["token_error"] <= budget]
            best = min(ok, key=lambda r: r["mean_exit_layer"])
            cells.append(f"{best['mean_exit_layer']:.1f} (λ {best['lambda']:g})")
        log(f"| {kind} | " + " | ".join(cells) + " |")
    run_steps(args, loaded, calibration, eval_examples, adapters, kinds, L, hidden_size, results, started)


def run_steps(args, loaded, calibration, eval_examples, adapters, kinds, L, hidden_size, results, started):
    """Sweeps, certification and speed measurements of ``kinds``; writes the JSON results."""

    results["sweeps"] = {}
    decoders = {}
    for name in kinds:
        log(f"\nsweep {name}: {args.n} prompts x {args.tokens} tokens …")
        decoder, table, seconds = sweep(args, loaded, calibration, name, adapters.get(name))
        decoders[name] = decoder
        certified = certify_table(table, L, adapters.get(name), args.min_exit_layer, hidden_size)
        risk = certify_table(table, L, adapters.get(name), args.min_exit_layer, hidden_size, loss="risk")
        cols = table.candidate_columns
        curve = [{"lambda": float(lam), "mean_layers": float(cols["layers_total"][:, i].sum() / cols["num_tokens"][:, i].sum()),
                  "risk_textual": float(table.losses[:, i].mean()), "risk_risk": float(cols["loss_risk"][:, i].mean())}
                 for i, lam in enumerate(table.lambdas)]
        results["sweeps"][name] = {"seconds": seconds, "certified": {str(k): v for k, v in certified.items()},
                                   "certified_risk_consistency": {str(k): v for k, v in risk.items()},
                                   "curve": curve}
        log(f"  sweep {seconds:.0f}s" if seconds else "  (reused)")
    log(f"\ncertified (n = {args.n}, ε = {EPSILON}; mean layers per generated token, of {L})")
    log("| exit head | δ | λ̂ | mean layers | est. speed-up | FLOPs ratio (+adapters) | empirical risk |")
    log("|---|---|---|---|---|---|---|")
    for name in kinds:
        for delta, c in results["sweeps"][name]["certified"].items():
            log(f"| {name} | {delta} | {c['lambda']:g} | {c['mean_layers']:.2f} | {c['speedup']:.2f}× | "
                f"{c['flops_ratio']:.3f} ({c['flops_ratio_with_adapters']:.3f}) | {c['risk']:.3f} |")

    log("\nthe same tables, risk-consistency loss (excess ROUGE-L loss against the reference summary)")
    log("| exit head | " + " | ".join(f"δ = {d}: λ̂ / mean layers" for d in DELTAS) + " |")
    log("|---|" + "---|" * len(DELTAS))
    for name in kinds:
        cells = [f"{c['lambda']:g} / {c['mean_layers']:.2f}"
                 for c in results["sweeps"][name]["certified_risk_consistency"].values()]
        log(f"| {name} | " + " | ".join(cells) + " |")
    log("\nrisk (textual) against mean layers along the grid")
    log("| λ | " + " | ".join(kinds) + " |")
    log("|---|" + "---|" * len(kinds))
    for i, lam in enumerate(results["sweeps"][kinds[0]]["curve"]):
        cells = [f"{results['sweeps'][k]['curve'][i]['mean_layers']:.1f} / {results['sweeps'][k]['curve'][i]['risk_textual']:.3f}"
                 for k in kinds]
        log(f"| {lam['lambda']:g} | " + " | ".join(cells) + " |")

    results["speed"] = {}
    speed_prompts = [e.prompt for e in eval_examples[:args.speed_prompts]]
    log(f"\nmeasured at the certified λ̂ (δ = 0.1), {len(speed_prompts)} held-out prompts, batch 1, "
        f"{args.threads} thread(s)")
    log("| exit head | λ̂ | generate speed-up (wall / CPU) | per decoded token (wall / CPU) |")
    log("|---|---|---|---|")
    for name in kinds if speed_prompts else []:  # --speed-prompts 0 skips the speed measurements
        threshold = results["sweeps"][name]["certified"]["0.1"]["lambda"]
        speed = measure_speed(loaded, decoders[name], speed_prompts, threshold, args.tokens)
        results["speed"][name] = speed | {"lambda": threshold}
        log(f"| {name} | {threshold:g} | {speed['speedup_wall']:.2f}× / {speed['speedup_cpu']:.2f}× | "
            f"{speed['decode_speedup_wall']:.2f}× / {speed['decode_speedup_cpu']:.2f}× |")
    results["total_seconds"] = time.perf_counter() - started
    log(f"\ntotal {results['total_seconds']:.0f}s")
    out = args.json_out or args.work_dir / "results.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    log(f"results: {out}")


if __name__ == "__main__":
    main()
