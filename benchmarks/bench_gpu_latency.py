"""GPU speed of early-exit decoding (issue 6): per-token latency, speed-up against the ideal, exit-head
cost, sweep cost, batch throughput and peak memory, for the T5-large shape (random weights, exits forced
from a recorded distribution) and the real SmolLM2-135M-Instruct (GGUF file, real prompts).

    # on the GPU machine (see benchmarks/gguf_transfer.py for getting the GGUF there)
    python benchmarks/bench_gpu_latency.py run --part t5 --out OUT/t5.json
    python benchmarks/bench_gpu_latency.py run --part smollm2 --gguf /tmp/smollm2/model.gguf \
        --out OUT/smollm2.json
    # here: the "GPU speed (issue 6)" section of docs/benchmarks.md from those files
    python benchmarks/bench_gpu_latency.py report OUT/t5.json OUT/smollm2.json --doc docs/benchmarks.md

``--quick`` shrinks everything (tiny T5, few prompts, few tokens) so the script can be checked on a CPU.
Every section is timed on its own and a failing section is recorded (with its error) without stopping the
others; results are written after each section.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from _common import Results  # this script's folder is on sys.path
from gpu_latency_report import report  # this script's folder is on sys.path
from gpu_latency_smollm2 import bench_smollm2  # this script's folder is on sys.path
from gpu_latency_t5 import bench_pieces, bench_t5, bench_t5_forced  # this script's folder is on sys.path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="measure (on the GPU machine)")
    run.add_argument("--part", choices=["t5", "smollm2", "t5-forced", "pieces"], required=True)
    run.add_argument("--distributions", type=Path, help="t5-forced: a SmolLM2 result file with recorded_distributions")
    run.add_argument("--source-min-exit-layer", type=int, default=20, help="t5-forced: j of the recorded runs")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--gguf", default="smollm2-135m", help="GGUF file (or the packaged model's alias)")
    run.add_argument("--min-exit-layer", type=int, default=20)
    run.add_argument("--k", type=int, default=256, help="fixed pruning: vocabulary rows kept after j")
    run.add_argument("--quick", action="store_true", help="tiny sizes, to check the script on a CPU")
    run.add_argument("--skip-compiled", action="store_true", help="leave out generate + torch.compile")
    run.add_argument("--skip-t5-forced", action="store_true")
    run.add_argument("--compile-limit", type=float, default=150, help="seconds allowed for a compiled-generate section")
    rep = sub.add_parser("report", help="write the docs section from result files")
    rep.add_argument("results", type=Path, nargs="+")
    rep.add_argument("--doc", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "report":
        report(args.results, args.doc)
        return 0
    args.command_line = "python benchmarks/bench_gpu_latency.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res = Results(args.out, args.part, args)
    res.save()
    if args.part == "t5":
        bench_t5(args, res)
    elif args.part == "t5-forced":
        bench_t5_forced(args, res)
    elif args.part == "pieces":
        bench_pieces(args, res)
    else:
        bench_smollm2(args, res)
    res.data["total_seconds"] = time.perf_counter() - res.started
    res.save()
    print(f"done in {res.data['total_seconds']:.1f}s; errors: {list(res.data['errors'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
