"""How well do the real model's intermediate layers agree with its last layer?

Teacher-forced on the full model's own greedy continuations of real prompts (SAMSum validation
from ../shared/data, or ACLSum offline), every layer ℓ's exit head (final norm + LM head on h_ℓ)
is scored with the softmax-margin confidence. Reports per-layer top-1 agreement with the last
layer, and for each threshold λ the mean exit layer of the first layer ≥ j whose margin ≥ λ and
the top-1 agreement of the exited tokens with the last layer. This isolates the exit rule from
state propagation (the trajectory is the full model's).

    python benchmarks/bench_exit_agreement.py --recipe samsum --size 40 --tokens 24
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ltt_exit.models import load_model
from ltt_exit.recipes import load_recipe

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="samsum")
    parser.add_argument("--size", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--min-exit-layer", type=int, default=1)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.99, 0.9, 0.8, 0.6, 0.4])
    args = parser.parse_args()
    torch.set_num_threads(2)
    lm = load_model("smollm2-135m", device="cpu")
    model, tok = lm.model, lm.tokenizer
    kwargs = {"data_dir": DATA} if args.recipe in ("samsum", "squad", "xsum", "cnn-dailymail") else {}
    cs = load_recipe(args.recipe).load(size=args.size, family="decoder-only", tokenizer=tok, **kwargs)
    num_layers = model.config.num_hidden_layers
    preds, margins = [], []  # per token: (L,) argmax per layer, (L,) margin per layer
    with torch.inference_mode():
        for ex in cs.examples:
            ids = tok(ex.prompt, return_tensors="pt")["input_ids"]
            full = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)
            out = model(full, output_hidden_states=True)
            start, stop = ids.shape[1] - 1, full.shape[1] - 1  # positions that predict new tokens
            hidden = out.hidden_states  # (L+1) x (1, T, d); the last one is already normed
            for layer in range(1, num_layers + 1):
                h = hidden[layer][0, start:stop]
                h = h if layer == num_layers else model.model.norm(h)
                probs = torch.softmax(model.lm_head(h).float(), dim=-1)
                top2 = probs.topk(2, dim=-1).values
                if layer == 1:
                    layer_pred = torch.empty(h.shape[0], num_layers, dtype=torch.long)
                    layer_margin = torch.empty(h.shape[0], num_layers)
                layer_pred[:, layer - 1] = probs.argmax(-1)
                layer_margin[:, layer - 1] = top2[:, 0] - top2[:, 1]
            preds.append(layer_pred.numpy())
            margins.append(layer_margin.numpy())
    pred = np.concatenate(preds)
    margin = np.concatenate(margins)
    agree = pred == pred[:, -1:]
    print(f"{pred.shape[0]} tokens from {len(cs.examples)} {args.recipe} prompts")
    print("per-layer top-1 agreement with the last layer:")
    print(" ".join(f"{layer}:{agree[:, layer - 1].mean():.2f}" for layer in range(1, num_layers + 1)))
    print("| λ | mean exit layer | top-1 agreement of exited tokens with layer L | share exited early |")
    print("|---|---|---|---|")
    j = args.min_exit_layer
    for lam in args.thresholds:
        ok = margin[:, j - 1:num_layers - 1] >= lam
        exit_layer = np.where(ok.any(1), ok.argmax(1) + j, num_layers)
        agreement = agree[np.arange(len(exit_layer)), exit_layer - 1]
        early = exit_layer < num_layers
        print(f"| {lam} | {exit_layer.mean():.2f} | {agreement.mean():.3f} | {early.mean():.2f} |")


if __name__ == "__main__":
    main()
