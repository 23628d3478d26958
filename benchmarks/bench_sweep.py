"""Cost of the threshold sweep's decoding (issue 5): the whole candidate grid against one full-model pass.

    python3 benchmarks/bench_sweep.py                          # n = 3 prompts, 32 tokens, both prunings, 2 threads
    python3 benchmarks/bench_sweep.py --n 4 --pruning decaying --skip-naive

Real SmolLM2-135M-Instruct (from the local GGUF cache) on the CPU, prompts of the gensim-lee-continue
recipe. For one decoder setting (softmax-margin scorer, min_exit_layer 15, decaying or fixed-k pruning)
it times, on the same n prompts decoded as one batch:

* full:  one full-model pass — ``decoder.generate(threshold=1.0)`` and the library's greedy
         ``model.generate`` (left padding, same budget and EOS);
* naive: the sweep without sharing — ``decoder.generate`` with K + 1 rows per prompt (λ = ∞ and the grid),
         timed once;
* grid:  ``decoder.generate_grid`` (candidates with identical histories share a row).

with K = 20 (``ltt_exit.sweep.run.DEFAULT_GRID``), and reports grid / full, in wall time and in process
CPU time (all threads; on a shared machine less disturbed by other processes). It counts the
candidates whose outputs (tokens, exit layers, cost accounts) equal the naive sweep's. Prints a JSON
object and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time

from _common import best_time  # this script's folder is on sys.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3, help="prompts (decoded as one batch)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--pruning", choices=["decaying", "fixed", "both"], default="both")
    parser.add_argument("--k", type=int, default=100, help="k of the fixed pruning")
    parser.add_argument("--min-exit-layer", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs (the naive sweep runs once)")
    parser.add_argument("--skip-naive", action="store_true", help="do not time the naive K + 1 rows sweep")
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, ...)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from ltt_exit.decode import EarlyExitDecoder
    from ltt_exit.models import load_model
    from ltt_exit.recipes import load_recipe
    from ltt_exit.sweep.run import DEFAULT_GRID

    lm = load_model("smollm2-135m", device=args.device)
    tokenizer = lm.tokenizer
    calibration = load_recipe("gensim-lee-continue").load(size=args.n, family="decoder-only", tokenizer=tokenizer)
    prompts = [example.prompt for example in calibration.examples]
    budget = args.max_new_tokens
    grid = list(DEFAULT_GRID)
    prunings = ["decaying", "fixed"] if args.pruning == "both" else [args.pruning]
    specs = {"decaying": "decaying", "fixed": ("fixed", {"k": args.k})}

    # the library's greedy generate on the same left-padded batch
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(args.device)
    tokenizer.padding_side = side
    eos = lm.model.generation_config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def library_full():
        with torch.inference_mode():
            return lm.model.generate(**batch, do_sample=False, num_beams=1, max_new_tokens=budget,
                                     pad_token_id=pad)

    library_s, library_cpu, _ = best_time(library_full, args.repeats)
    report = {
        "model": "smollm2-135m", "n_prompts": args.n, "max_new_tokens": budget, "K": len(grid),
        "threads": args.threads, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "prompt_tokens": [int(n) for n in batch["attention_mask"].sum(dim=-1).tolist()],
        "library_generate_s": library_s, "library_generate_cpu_s": library_cpu, "settings": {},
    }
    for name in prunings:
        decoder = EarlyExitDecoder(lm.model, tokenizer, scorer="softmax-margin", pruning=specs[name],
                                   min_exit_layer=args.min_exit_layer, device=args.device)
        full_s, full_cpu, full = best_time(lambda: decoder.generate(prompts, threshold=1.0, max_new_tokens=budget),
                                 args.repeats)
        grid_s, grid_cpu, (grid_full, grid_early) = best_time(
            lambda: decoder.generate_grid(prompts, lambdas=grid, max_new_tokens=budget), args.repeats)
        stats = decoder.last_grid_stats
        assert [s.token_ids for s in grid_full] == [s.token_ids for s in full], "grid full != full model"
        entry = {
            "pruning": decoder.config_dict()["pruning"],
            "full_decoder_s": full_s,
            "full_decoder_cpu_s": full_cpu,
            "grid_s": grid_s,
            "grid_cpu_s": grid_cpu,
            "grid_over_full": grid_s / full_s,
            "grid_over_library_full": grid_s / library_s,
            "grid_over_full_cpu": grid_cpu / full_cpu,
            "grid_rows_decoded": stats.rows_decoded,
            "naive_rows": stats.candidate_rows,
            "rows_per_step": stats.rows_per_step,
            "sharing": stats.sharing,
            "mean_layers": [round(decoder.mean_layers([row[j] for row in grid_early]), 2) for j in range(len(grid))],
            "flops_ratio": [round(sum(row[j].cost.flops for row in grid_early)
                                  / sum(row[j].cost.full_flops for row in grid_early), 3) for j in range(len(grid))],
        }
        if not args.skip_naive:
            rows = len(grid) + 1
            naive_s, naive_cpu, naive = best_time(lambda: decoder.generate(
                [p for p in prompts for _ in range(rows)],
                threshold=[t for _ in prompts for t in (math.inf, *grid)], max_new_tokens=budget), 1)
            # float32: a batch of another shape may round a near-tie confidence the other way
            same = sum(
                (got.token_ids, got.exit_layers, got.cost) == (want.token_ids, want.exit_layers, want.cost)
                for i in range(len(prompts))
                for got, want in zip((grid_full[i], *grid_early[i]), naive[i * rows:(i + 1) * rows])
            )
            entry |= {"naive_s": naive_s, "naive_cpu_s": naive_cpu, "naive_over_full": naive_s / full_s,
                      "naive_over_grid": naive_s / grid_s, "naive_over_full_cpu": naive_cpu / full_cpu,
                      "candidates_identical_to_naive": f"{same} / {len(prompts) * rows}"}
        report["settings"][name] = entry
        print(json.dumps({name: {k: v for k, v in entry.items() if k not in ("rows_per_step",)}}), flush=True)
    print(json.dumps(report, indent=1))
    print()
    print("wall seconds (process CPU seconds)")
    print("| pruning | full: decoder λ=1 | full: model.generate | naive K+1 rows | grid "
          "| grid / full | naive / full | rows decoded (grid / naive) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, e in report["settings"].items():
        naive = f"{e['naive_s']:.1f} ({e['naive_cpu_s']:.1f})" if "naive_s" in e else "–"
        naive_ratio = f"{e['naive_over_full']:.1f}× ({e['naive_over_full_cpu']:.1f}×)" if "naive_s" in e else "–"
        print(f"| {name} | {e['full_decoder_s']:.2f} ({e['full_decoder_cpu_s']:.2f}) "
              f"| {library_s:.2f} ({library_cpu:.2f}) | {naive} | {e['grid_s']:.2f} ({e['grid_cpu_s']:.2f}) "
              f"| {e['grid_over_full']:.2f}× ({e['grid_over_full_cpu']:.2f}×) | {naive_ratio} "
              f"| {e['grid_rows_decoded']} / {e['naive_rows']} |")


if __name__ == "__main__":
    main()
