"""What the JSD amateur search costs at batch 1, read per layer or together.

At every consulted layer ℓ the JSD contrastive scorer reads the exit head of every lower layer over the
rows' vocabulary set. ``StepHeads.many`` evaluates the heads not yet known in one norm and one product and the
scorer scores them in chunks (``JSD_CHUNK_ELEMENTS``); ``--per-layer`` restores one head call per lower layer
(``StepHeads.__call__`` for each, then a stack), the reading the study table's JSD rows up to the tenth
session were timed with. Decodes the first ``--prompts`` SAMSum prompts one at a time with the fast path
(CUDA graphs on CUDA, eager on the CPU), JSD contrastive, the given pruning, j = 15, at each ``--lambdas``
value, after one untimed pass; reports milliseconds per generated token (median of ``--passes``) and, with
``--compare``, whether another run's tokens are reproduced.

    python benchmarks/bench_jsd_heads.py --prompts 4 --max-new-tokens 16 --threads 2 --json batched.json
    python benchmarks/bench_jsd_heads.py --prompts 4 --max-new-tokens 16 --threads 2 --per-layer \
        --json per_layer.json --compare batched.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _common import STUDY_PRUNINGS, add_samsum_arguments, samsum_prompts  # this script's folder is on sys.path

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_samsum_arguments(parser, prompts=8, max_new_tokens=32)
    parser.add_argument("--lambdas", default="0.95,0.5", help="comma-separated thresholds (default 0.95,0.5)")
    parser.add_argument("--passes", type=int, default=3, help="timed passes per λ; the median is reported")
    parser.add_argument("--per-layer", action="store_true", help="one head call per lower layer (the old reading)")
    parser.add_argument("--device", default=None, help="default: CUDA when present")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write timings and outputs here")
    parser.add_argument("--compare", type=Path, default=None, help="a --json file of another run: same tokens?")
    args = parser.parse_args(argv)
    if args.compare is not None and not args.compare.is_file():
        parser.error(f"--compare: no such file {args.compare}")
    try:
        lambdas = [float(x) for x in args.lambdas.split(",")]
    except ValueError:
        parser.error(f"--lambdas: not a comma-separated list of numbers: {args.lambdas!r}")
    if args.passes < 1:
        parser.error(f"--passes must be ≥ 1, got {args.passes}")
    sys.path.insert(0, str(REPO))

    import torch

    from ltt_exit.decode import FastEarlyExitDecoder, exit_rule
    from ltt_exit.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.per_layer:
        def per_layer(self, layers, ids, count_for):
            return torch.stack([self(layer, ids, count_for) for layer in layers])

        exit_rule.StepHeads.many = per_layer
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(args.model, device=device, dtype=args.dtype)
    prompts = samsum_prompts(args, loaded)
    decoder = FastEarlyExitDecoder(loaded.model, loaded.tokenizer, scorer="jsd-contrastive",
                                   pruning=STUDY_PRUNINGS[args.pruning], min_exit_layer=15, length_bucket=64)
    cuda = device.startswith("cuda")

    def one_pass(threshold):
        outputs = [decoder.generate([prompt], threshold=threshold, max_new_tokens=args.max_new_tokens)[0]
                   for prompt in prompts]
        if cuda:
            torch.cuda.synchronize()
        return outputs

    result = {"device": device, "hardware": torch.cuda.get_device_name() if cuda else "cpu",
              "dtype": str(loaded.model.dtype), "threads": torch.get_num_threads(), "prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens, "pruning": args.pruning,
              "reading": "per-layer" if args.per_layer else "batched", "by_lambda": {}}
    for threshold in lambdas:
        one_pass(threshold)  # untimed: graphs of every length bucket, kernels, the allocator
        seconds = []
        for _ in range(args.passes):
            start = time.perf_counter()
            outputs = one_pass(threshold)
            seconds.append(time.perf_counter() - start)
        tokens = sum(len(o.token_ids) for o in outputs)
        median = statistics.median(seconds)
        result["by_lambda"][str(threshold)] = {
            "seconds_passes": [round(s, 4) for s in seconds], "tokens": tokens,
            "ms_per_token": round(1000 * median / tokens, 3),
            "mean_exit_layer": round(statistics.fmean(x for o in outputs for x in o.exit_layers), 3),
            "outputs": [[o.token_ids, o.exit_layers] for o in outputs]}
        print(f"{result['reading']}: λ {threshold}: {1000 * median / tokens:.2f} ms per token "
              f"({tokens} tokens, mean exit layer {result['by_lambda'][str(threshold)]['mean_exit_layer']})")
    status = 0
    if args.compare is not None:
        other = json.loads(args.compare.read_text())
        for threshold, mine in result["by_lambda"].items():
            theirs = other["by_lambda"].get(threshold)
            if theirs is None:
                continue
            same = sum(a == b for a, b in zip(mine["outputs"], theirs["outputs"]))
            ratio = mine["ms_per_token"] / theirs["ms_per_token"]
            print(f"λ {threshold}: {same} of {len(mine['outputs'])} outputs identical to {args.compare.name}; "
                  f"time {ratio:.2f}× its ({other['reading']})")
            status |= same != len(mine["outputs"])
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
