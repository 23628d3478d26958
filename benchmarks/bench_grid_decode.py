"""Wall clock of the sweep's grid decode (``EarlyExitDecoder.generate_grid``) on real prompts.

Times one ``generate_grid`` call over the first ``--prompts`` SAMSum prompts (seed 0) with the default grid of
20 candidates, margin scorer and the given pruning (j = 15), and reports prompt-steps per second (one prompt,
all candidates, one token position). ``--code`` decodes with another checkout's ``ltt_exit`` (a before/after
comparison of the same prompts); ``--json`` writes the outputs' tokens and exit layers so two runs can be
checked for identical results (``--compare``).

    python benchmarks/bench_grid_decode.py --prompts 16 --max-new-tokens 24
    python benchmarks/bench_grid_decode.py --prompts 16 --max-new-tokens 24 --code /tmp/old-checkout --json old.json
    python benchmarks/bench_grid_decode.py --prompts 16 --max-new-tokens 24 --json new.json --compare old.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "benchmarks" / "data" / "samsum_jsonl_recipe.yaml"
PRUNINGS = {"decaying": ("decaying", {"k_max": 1000, "k_min": 10}), "fixed": ("fixed", {"k": 1000}), "none": "none"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="alias, folder or .gguf file")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "samsum_test.jsonl",
                        help="SAMSum JSON Lines file")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--pruning", choices=sorted(PRUNINGS), default="decaying")
    parser.add_argument("--device", default=None, help="default: CUDA when present")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--code", type=Path, default=None, help="a checkout whose ltt_exit package is timed instead")
    parser.add_argument("--json", type=Path, default=None, help="write timing and outputs here")
    parser.add_argument("--compare", type=Path, default=None, help="a --json file of another run: check same outputs")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        parser.error(f"--data: no such file {args.data}")
    sys.path.insert(0, str(args.code.resolve() if args.code else REPO))

    import torch

    from ltt_exit.decode import EarlyExitDecoder
    from ltt_exit.models import load_model
    from ltt_exit.recipes import load_recipe
    from ltt_exit.sweep.run import DEFAULT_GRID

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(args.model, device=device, dtype=args.dtype)
    calibration_set = load_recipe(RECIPE).load(size=args.prompts, seed=0, data_files=[str(args.data)],
                                               family=loaded.family, tokenizer=loaded.tokenizer)
    prompts = [example.prompt for example in calibration_set.examples]
    decoder = EarlyExitDecoder(loaded.model, loaded.tokenizer, scorer="softmax-margin",
                               pruning=PRUNINGS[args.pruning], min_exit_layer=15)
    if device.startswith("cuda"):  # one small untimed call: kernels and the allocator warmed
        decoder.generate_grid(prompts[:2], lambdas=list(DEFAULT_GRID), max_new_tokens=4)
        torch.cuda.synchronize()
    start = time.perf_counter()
    full, early = decoder.generate_grid(prompts, lambdas=list(DEFAULT_GRID), max_new_tokens=args.max_new_tokens)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    stats = decoder.last_grid_stats
    prompt_steps = sum(len(sequence.token_ids) for sequence in full)
    result = {
        "code": str(args.code or REPO), "device": device, "dtype": str(loaded.model.dtype), "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens, "pruning": args.pruning, "candidates": len(DEFAULT_GRID),
        "seconds": round(seconds, 3), "prompt_steps": prompt_steps,
        "prompt_steps_per_second": round(prompt_steps / seconds, 3), "rows_decoded": stats.rows_decoded,
        "sharing": round(stats.sharing, 3),
        "outputs": [[sequence.token_ids, sequence.exit_layers] for row in early for sequence in row]
                   + [[sequence.token_ids, sequence.exit_layers] for sequence in full],
    }
    print(f"{len(prompts)} prompts x {len(DEFAULT_GRID)} candidates x {args.max_new_tokens} tokens ({args.pruning}, "
          f"{device}, {result['dtype']}): {seconds:.1f} s, {result['prompt_steps_per_second']:.2f} prompt-steps/s, "
          f"{stats.rows_decoded} rows decoded, sharing {stats.sharing:.2f}")
    status = 0
    if args.compare is not None:
        other = json.loads(args.compare.read_text())
        same = other["outputs"] == result["outputs"]
        print(f"outputs identical to {args.compare}: {same}; speed-up {other['seconds'] / seconds:.2f}x")
        status = 0 if same else 1
    if args.json is not None:
        args.json.write_text(json.dumps(result))
    return status


if __name__ == "__main__":
    sys.exit(main())
