"""Scaling of the calibration sweep over GPUs (issue 8): the same ltt-calibrate sweep on 1 and on N
GPUs, wall time and scaling efficiency, and whether the two tables agree.

Runs on a machine with N GPUs, after the GGUF arrived (benchmarks/gguf_transfer.py):

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 python benchmarks/bench_distributed.py \
        --gguf /tmp/smollm2/model.gguf --data samsum_validation.jsonl --size 320 --gpus 2 --out OUT/dist.json

Both runs use the same converted-model cache (converted once beforehand, not timed) and sweep afresh
(--no-table-cache). Wall time is the whole command (start-up and model load included: what a user
waits for); the sweep time is what the sweep itself took on rank 0.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path


def _calibrate(args, gpus: int, out_dir: Path) -> dict:
    common = ["--delta", "0.1", "--epsilon", "0.05", "--model", args.gguf, "--recipe", args.recipe,
              "--data-files", args.data, "--size", str(args.size), "--max-new-tokens", str(args.max_new_tokens),
              "--dtype", args.dtype, "--device", "cuda", "--batch-prompts", str(args.batch_prompts),
              "--no-table-cache", "--table-out", str(out_dir / f"table-{gpus}.parquet"),
              "--out", str(out_dir / f"cert-{gpus}.json")]
    if gpus == 1:
        cmd = [sys.executable, "-m", "ltt_exit.cli.calibrate", *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus),
               "-m", "ltt_exit.cli.calibrate", *common]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    log = done.stdout + done.stderr
    (out_dir / f"log-{gpus}.txt").write_text(log)
    sweep = re.search(r"sweep done in ([0-9.]+)s", log)
    return {"gpus": gpus, "returncode": done.returncode, "wall_s": wall,
            "sweep_s_rank0": float(sweep.group(1)) if sweep else None, "log_tail": log[-1500:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--recipe", default=str(Path(__file__).resolve().parent / "data" / "samsum_jsonl_recipe.yaml"))
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-prompts", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    out_dir = args.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    import torch

    from ltt_exit.models import load_model

    t = time.perf_counter()
    load_model(args.gguf, device="cpu")  # convert once into the shared cache (not part of the timings)
    convert_s = time.perf_counter() - t
    runs = [_calibrate(args, 1, out_dir), _calibrate(args, args.gpus, out_dir)]
    result = {"gpus_available": torch.cuda.device_count(), "gpu": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "convert_s": convert_s, "size": args.size,
              "max_new_tokens": args.max_new_tokens, "batch_prompts": args.batch_prompts, "dtype": args.dtype,
              "runs": runs}
    if all(r["returncode"] == 0 for r in runs):
        import numpy as np

        from ltt_exit.loss_table import LossTable

        one = LossTable.load(out_dir / "table-1.parquet")
        many = LossTable.load(out_dir / f"table-{args.gpus}.parquet")
        result["same_ids_in_order"] = one.example_ids == many.example_ids
        result["loss_cells_differing"] = int((one.losses != many.losses).sum())
        result["loss_cells"] = int(one.losses.size)
        result["max_abs_loss_difference"] = float(np.abs(one.losses - many.losses).max())
        result["world_size_recorded"] = many.metadata.get("world_size")
        result["speedup"] = runs[0]["wall_s"] / runs[1]["wall_s"]
        result["scaling_efficiency"] = result["speedup"] / args.gpus
        if runs[0]["sweep_s_rank0"] and runs[1]["sweep_s_rank0"]:
            result["sweep_speedup"] = runs[0]["sweep_s_rank0"] / runs[1]["sweep_s_rank0"]
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    for run in runs:
        print(run["gpus"], "GPU(s): rc", run["returncode"], "wall", round(run["wall_s"], 1), "sweep", run["sweep_s_rank0"])
        if run["returncode"]:
            print(run["log_tail"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
