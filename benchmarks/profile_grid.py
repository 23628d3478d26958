"""Where the sweep's time goes: one batch of the shared-history grid decode under ``torch.profiler``.

On the H200 the sweep (``EarlyExitDecoder.generate_grid``) runs at about 0.25 s per prompt × configuration
(SAMSum, 32 tokens, 20 candidates, batch 64: about 0.5 s per decoding step), far slower than the model's
arithmetic needs; this script says which operators (device time) and which Python frames (host time)
take it, so the next change to the grid decode is aimed, not guessed. It also reports the batch rows per
step and the peak memory, and can set the CUDA allocator's ``expandable_segments`` (the K/V cache grows by
one position per step, which makes a non-expandable allocator free and re-allocate large blocks).

    python benchmarks/profile_grid.py --model /tmp/smollm2/model.gguf --data /tmp/study-data/samsum_test.jsonl \
        --prompts 64 --max-new-tokens 32 --dtype bfloat16 --out $OUT/profile_grid.txt [--expandable-segments]
    python benchmarks/profile_grid.py --prompts 4 --max-new-tokens 8          # CPU check of the script
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "benchmarks" / "data" / "samsum_jsonl_recipe.yaml"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="alias, folder or .gguf file")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "samsum_test.jsonl"),
                        help="SAMSum JSON Lines file")
    parser.add_argument("--prompts", type=int, default=64, help="prompts decoded together (one sweep batch)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--expandable-segments", action="store_true",
                        help="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (set before torch starts CUDA)")
    parser.add_argument("--rows", type=int, default=25, help="operators / frames listed (default 25)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    if args.expandable_segments:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"

    import torch
    from torch.profiler import ProfilerActivity, profile

    from ltt_exit.decode import EarlyExitDecoder
    from ltt_exit.models import load_model
    from ltt_exit.recipes import load_recipe
    from ltt_exit.sweep.run import DEFAULT_GRID

    cuda = torch.cuda.is_available()
    loaded = load_model(args.model, device="cuda" if cuda else "cpu", dtype=args.dtype)
    calibration_set = load_recipe(RECIPE).load(size=args.prompts, seed=0, data_files=[args.data],
                                               family=loaded.family, tokenizer=loaded.tokenizer)
    prompts = [ex.prompt for ex in calibration_set.examples]
    decoder = EarlyExitDecoder(loaded.model, loaded.tokenizer, scorer="softmax-margin",
                               pruning=("decaying", {"k_max": 1000, "k_min": 10}), min_exit_layer=15)

    def run():
        return decoder.generate_grid(prompts, lambdas=list(DEFAULT_GRID), max_new_tokens=args.max_new_tokens)

    # one small untimed call first (kernels, allocator), not the whole profiled decode again
    decoder.generate_grid(prompts[:2], lambdas=list(DEFAULT_GRID), max_new_tokens=4)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, with_stack=True) as prof:
        run()
        if cuda:
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    stats = decoder.last_grid_stats
    lines = [f"grid decode: {len(prompts)} prompts x {len(DEFAULT_GRID)} candidates, {args.max_new_tokens} new tokens, "
             f"{seconds:.2f} s under the profiler (profiling slows the host side)"]
    lines.append(f"steps {len(stats.rows_per_step)}, batch rows per step {stats.rows_per_step}, "
                 f"sharing {stats.sharing:.2f}, rows split {stats.rows_split}")
    if cuda:
        lines.append(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB; "
                     f"allocator: {os.environ.get('PYTORCH_CUDA_ALLOC_CONF', 'default')}")
        lines += ["", "== operators by device time", prof.key_averages().table(sort_by="cuda_time_total",
                                                                                row_limit=args.rows)]
    lines += ["", "== operators by host time", prof.key_averages().table(sort_by="self_cpu_time_total",
                                                                         row_limit=args.rows),
              "", "== host time by Python frame (5 frames deep)",
              prof.key_averages(group_by_stack_n=5).table(sort_by="self_cpu_time_total", row_limit=args.rows)]
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
