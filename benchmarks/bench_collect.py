"""Time ``collect_states`` (the fitting data of exit adapters) one prompt at a time against batches.

    python3 benchmarks/bench_collect.py --device cuda --prompts 32 --batch 16

A random-weight Llama with SmolLM2-135M's exact shape (float32, no GGUF needed), a word-level tokenizer,
prompts of 100–200 random words, 32 greedy tokens each (EOS disabled), layers 12–29 recorded as
``ltt-fit-exits --layers 12-29`` does. Prints seconds per prompt for batch 1 and the batch given, and
whether the two collected the same tokens.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    from _common import smollm2_shape  # this script's folder is on sys.path

    from ltt_exit.decode.adapters import collect_states
    from ltt_exit.decode.tiny_models import tiny_word_tokenizer

    model = smollm2_shape(args.device, torch.float32)
    tokenizer = tiny_word_tokenizer(49152, pad_id=0, bos_id=1, eos_id=2, add_bos=True)
    rng = np.random.default_rng(0)
    prompts = [" ".join(f"w{i}" for i in rng.integers(3, 49000, size=rng.integers(100, 200)))
               for _ in range(args.prompts)]
    result = {"device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
              "prompts": args.prompts, "tokens": args.tokens}
    outputs = {}
    for batch in (1, args.batch):
        list(collect_states(model, tokenizer, prompts[:batch], max_new_tokens=2, layers=range(12, 30),
                            eos_token_id=[], batch_size=batch))  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        outputs[batch] = list(collect_states(model, tokenizer, prompts, max_new_tokens=args.tokens,
                                             layers=range(12, 30), eos_token_id=[], batch_size=batch))
        result[f"seconds_per_prompt_batch_{batch}"] = (time.perf_counter() - started) / args.prompts
    result["same_tokens"] = sum(a.tokens == b.tokens for a, b in zip(outputs[1], outputs[args.batch]))
    result["speedup"] = result["seconds_per_prompt_batch_1"] / result[f"seconds_per_prompt_batch_{args.batch}"]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
