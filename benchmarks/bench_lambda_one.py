"""Does a threshold that cannot exit cost nothing? (issue 15: "at λ = 1 the fast path still consults 10
exit heads per token on SmolLM2, 4.18 against 4.06 ms/token on the H200").

Batch-1 ms per generated token of SmolLM2-135M on the same test prompts (benchmarks/data/smollm2_lee_prompts.json,
the prompts of ``bench_gpu_latency.py``), each prompt run once untimed first:

* the fast path (CUDA graphs, compiled decision where the device allows) at λ = 1, with the number of
  exit-head consultations it made (``last_stats["head_consults"]``: must be 0);
* the same fast path at λ = 0.5 (it consults and exits), for scale;
* the library's own ``model.generate`` (greedy), the plain full model;

and whether the λ = 1 tokens equal ``generate``'s.

    python benchmarks/bench_lambda_one.py --model /tmp/smollm2/model.gguf --out $OUT/lambda_one.json
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, clock, make_fast, per_token, write_json  # noqa: E402

PROMPTS_FILE = ROOT / "benchmarks" / "data" / "smollm2_lee_prompts.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="alias, folder or .gguf file")
    parser.add_argument("--prompts", type=int, default=16, help="test prompts timed at batch 1 (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--min-exit-layer", type=int, default=15)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from ltt_exit.models import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    loaded = load_model(args.model, device=device, dtype=dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    rows = json.loads(PROMPTS_FILE.read_text())["prompts"]
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    prompts = [rows[i]["input_ids"] for i in order[-args.prompts:]]
    N = args.max_new_tokens
    fast, notes = make_fast(model, tokenizer, pruning=("decaying", {"k_max": 1000, "k_min": 10}),
                            min_exit_layer=args.min_exit_layer)
    eos = sorted(fast.backend.default_eos_token_ids())
    result = {"model": str(args.model), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "dtype": dtype, "prompts": len(prompts), "max_new_tokens": N, "min_exit_layer": args.min_exit_layer,
              "fast_path_fallbacks": notes, "fast_path": {"cuda_graphs": fast.uses_cuda_graphs,
                                                          "compile": fast.compile_backend}}
    for label, lam in (("fast_lambda_1", 1.0), ("fast_lambda_0.5", 0.5)):
        consults, steps = [], []

        def run(ids, lam=lam):
            out = fast.generate(input_ids=[ids], threshold=lam, max_new_tokens=N)
            consults.append(fast.last_stats.get("head_consults", -1))
            steps.append(fast.last_stats.get("steps", 0))
            return out

        ms, tokens, outs = per_token(run, prompts, lambda s: len(s[0].token_ids))
        timed = len(prompts)  # the timed pass's stats are the last len(prompts) entries
        result[label] = {"lambda": lam, "ms_per_token": ms, "tokens": tokens,
                         "head_consults": sum(consults[-timed:]), "steps": sum(steps[-timed:]),
                         "mean_layers": sum(sum(s[0].exit_layers) for s in outs) / max(tokens, 1)}
        result[label + "_tokens"] = [list(s[0].token_ids) for s in outs]

    def generate(ids):
        tensor = torch.tensor([ids], device=device)
        return model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor), do_sample=False,
                              num_beams=1, max_new_tokens=N, eos_token_id=eos, pad_token_id=eos[0])

    for ids in prompts:
        generate(ids)
    seconds, outs = clock(lambda: [generate(ids) for ids in prompts])
    library = [o[0, len(ids):].tolist() for o, ids in zip(outs, prompts)]
    tokens = sum(len(t) for t in library)
    result["library_generate"] = {"ms_per_token": 1000 * seconds / tokens, "tokens": tokens}
    same = sum(a == b for a, b in zip(result.pop("fast_lambda_1_tokens"), library))
    result.pop("fast_lambda_0.5_tokens")
    result["lambda_1_same_tokens_as_generate"] = f"{same}/{len(prompts)}"
    result["lambda_1_over_generate"] = result["fast_lambda_1"]["ms_per_token"] / result["library_generate"]["ms_per_token"]
    write_json(args.out, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
