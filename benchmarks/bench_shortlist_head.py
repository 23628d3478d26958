"""What does the ``shortlist`` pruning save at the first consulted layer of SmolLM2, and what does it miss?

SmolLM2-135M (d 576, V 49,152, 30 layers) pays a full-vocabulary head (2·d·V = 56.6 M FLOPs, about
7 decoder layers) at the first consulted layer j for every token. The shortlist ranks the vocabulary with
a rank-r truncated SVD of the head (2·(d·r + r·V)) and computes exact logits for the top k only (2·k·d).

Sections (results in ``benchmarks/results/shortlist_head.json``):

* ``flops``: the first consulted head's FLOPs, full vs shortlist per (r, k), and in decoder layers;
* ``agreement``: teacher-forced on the full model's greedy continuations of SAMSum validation prompts
  (../shared/data): at each listed layer ℓ, how often the full head's top-1 at ℓ (and the last layer's
  top-1) is inside the shortlist (and, for comparison, the last layer's top-1 inside the full head's own
  top k at ℓ, the set ``decaying`` starts from), and how often the softmax-margin exit decision at λ over the
  shortlist's k(j) best equals the decision over the decaying pruning's k(j) best of the full head;
* ``decode``: ``EarlyExitDecoder.generate`` with the decaying pruning (k 1000 → 10) against the shortlist
  (r, k 1000 → 10) at min_exit_layer j: mean layers, FLOPs ratio, share of tokens equal to the
  decaying run's, ms per token (batch 1, the generic decoder);
* ``head_time``: the first consulted head alone (full head vs ranking + top-k + k exact rows), best of n.

    python benchmarks/bench_shortlist_head.py                          # CPU, float32
    python benchmarks/bench_shortlist_head.py --device cuda --dtype bfloat16 --out benchmarks/results/shortlist_head_gpu.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, Results, best_time, sync  # noqa: E402

from ltt_exit.decode import EarlyExitDecoder  # noqa: E402
from ltt_exit.decode.pruning import LowRankHead  # noqa: E402
from ltt_exit.models import load_model  # noqa: E402
from ltt_exit.recipes import load_recipe  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def head_flops(backend, configs, context):
    full = backend.head_flops(backend.vocab_size)
    layer = backend.layer_flops(context, 0)
    rows = {"full head": {"flops": full, "layers": full / layer}}
    for rank, k in configs:
        ranking = LowRankHead.ranking_flops(backend.hidden_size, rank, backend.vocab_size)
        total = ranking + backend.head_flops(k)
        rows[f"shortlist r={rank} k={k}"] = {"flops": total, "ranking": ranking,
                                             "exact_rows": backend.head_flops(k), "layers": total / layer,
                                             "saving": 1 - total / full}
    return {"decoder_layer_flops": layer, "context": context, "heads": rows}


def continuations(model, tokenizer, prompts, tokens):
    """Per prompt: the hidden states (L+1) x (T, d) of the positions that predict the full model's tokens."""
    states = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
        full = model.generate(ids, max_new_tokens=tokens, do_sample=False)
        out = model(full, output_hidden_states=True)
        start, stop = ids.shape[1] - 1, full.shape[1] - 1
        states.append([h[0, start:stop] for h in out.hidden_states])
    return states


def margin(logits):
    top = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


def agreement(model, decoders, states, layers, lambdas, j):
    num_layers = model.config.num_hidden_layers
    base = model.model.norm
    rows = {}
    for name, decoder in decoders.items():
        pruning = decoder.pruning
        keep = pruning.k_at(j, num_layers)
        per_layer = {}
        for layer in layers:
            inside = inside_final = final_in_topk = total = 0
            same_decision = {lam: 0 for lam in lambdas}
            for hiddens in states:
                normed = base(hiddens[layer])  # (T, d): the exit head's input at layer ℓ
                full = model.lm_head(normed)  # (T, V)
                final = hiddens[num_layers]  # already normed by the model
                final_top = model.lm_head(final).argmax(-1)
                ids = pruning.shortlist(normed)  # (T, k)
                inside += (ids == full.argmax(-1)[:, None]).any(-1).sum().item()
                inside_final += (ids == final_top[:, None]).any(-1).sum().item()
                # the same question for the decaying pruning's set at ℓ: the k best of the full head
                best_k = full.topk(ids.shape[-1], dim=-1).indices
                final_in_topk += (best_k == final_top[:, None]).any(-1).sum().item()
                # the exit decision over k(j) best ids: the shortlist's vs the decaying pruning's (full head)
                short_logits = full.gather(-1, ids).topk(keep, dim=-1).values
                decay_logits = full.topk(keep, dim=-1).values
                for lam in lambdas:
                    same_decision[lam] += ((margin(short_logits) >= lam) == (margin(decay_logits) >= lam)).sum().item()
                total += normed.shape[0]
            per_layer[layer] = {
                "tokens": total,
                "layer_top1_in_shortlist": inside / total,
                "final_top1_in_shortlist": inside_final / total,
                "final_top1_in_full_head_top_k": final_in_topk / total,
                **{f"same_exit_decision_at_{lam}": same_decision[lam] / total for lam in lambdas},
            }
        rows[name] = per_layer
    return rows


def decode(decoders, prompts, tokens, lambdas):
    rows = {}
    reference = {}
    for name, decoder in decoders.items():
        for lam in lambdas:
            decoder.generate(input_ids=prompts[:1], threshold=lam, max_new_tokens=2)  # warm-up
            sync()
            start = time.perf_counter()
            seqs = [decoder.generate(input_ids=[p], threshold=lam, max_new_tokens=tokens)[0] for p in prompts]
            sync()
            seconds = time.perf_counter() - start
            count = sum(s.cost.tokens for s in seqs)
            flops, full = sum(s.cost.flops for s in seqs), sum(s.cost.full_flops for s in seqs)
            entry = {
                "mean_layers": EarlyExitDecoder.mean_layers(seqs),
                "flops_ratio": flops / full,
                "shortlist_flops_share": sum(s.cost.shortlist_flops for s in seqs) / flops,
                "head_rows_per_token": sum(s.cost.head_rows for s in seqs) / count,
                "ms_per_token": 1000 * seconds / count,
                "tokens": count,
            }
            if name == "decaying":
                reference[lam] = seqs
            else:
                same = sum(a.token_ids == b.token_ids for a, b in zip(reference[lam], seqs))
                entry["sequences_equal_to_decaying"] = same / len(seqs)
                entry["tokens_equal_to_decaying"] = sum(
                    x == y for a, b in zip(reference[lam], seqs) for x, y in zip(a.token_ids, b.token_ids)) / count
            rows[f"{name} λ={lam}"] = entry
    return rows


def head_time(model, pruning, repeats, batch):
    normed = model.model.norm(torch.randn(batch, model.config.hidden_size, device=model.device, dtype=model.dtype))
    weight = model.lm_head.weight

    def full():
        return model.lm_head(normed).argmax(-1)

    def shortlisted():
        ids = pruning.shortlist(normed)
        logits = torch.einsum("bd,bkd->bk", normed, weight[ids])
        return ids.gather(-1, logits.argmax(-1, keepdim=True))

    for fn in (full, shortlisted):
        fn()
    rows = {}
    for name, fn in (("full head", full), ("shortlist", shortlisted)):
        wall, _, _ = best_time(lambda fn=fn: [fn() for _ in range(20)], repeats)
        rows[name] = {"us_per_call": 1e6 * wall / 20}
    rows["ratio"] = rows["shortlist"]["us_per_call"] / rows["full head"]["us_per_call"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--k-min", type=int, default=10)
    parser.add_argument("--min-exit-layer", type=int, default=15)
    parser.add_argument("--size", type=int, default=12, help="SAMSum validation prompts")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 12, 15, 20, 25, 29])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[1.0, 0.9, 0.7, 0.5])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sections", nargs="+", default=["flops", "agreement", "decode", "head_time"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "shortlist_head.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    results = Results(args.out, "shortlist_head", args)
    lm = load_model("smollm2-135m", device=args.device, dtype=args.dtype)
    model, tokenizer = lm.model, lm.tokenizer
    recipe = load_recipe("samsum").load(size=args.size, family="decoder-only", tokenizer=tokenizer, data_dir=DATA)
    prompts = [ex.prompt for ex in recipe.examples]
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    j = args.min_exit_layer
    start = time.perf_counter()
    decoders = {
        "decaying": EarlyExitDecoder(model, tokenizer, pruning=("decaying", {"k_max": args.k, "k_min": args.k_min}),
                                     min_exit_layer=j),
        "shortlist": EarlyExitDecoder(model, tokenizer, min_exit_layer=j, pruning=(
            "shortlist", {"rank": args.rank, "k": args.k, "k_min": args.k_min})),
    }
    results.data["factorisation_seconds"] = time.perf_counter() - start  # both constructors; only one factorises
    context = int(sum(len(p) for p in prompt_ids) / len(prompt_ids)) + args.tokens // 2
    configs = [(32, 1000), (64, 1000), (64, 2000), (128, 1000), (args.rank, args.k)]
    if "flops" in args.sections:
        results.section("flops", head_flops, decoders["shortlist"].backend, list(dict.fromkeys(configs)), context)
    if "agreement" in args.sections:
        variants = {f"r={args.rank} k={args.k}": decoders["shortlist"]}
        for rank, k in ((32, 1000), (128, 1000), (64, 2000)):
            variants[f"r={rank} k={k}"] = EarlyExitDecoder(model, min_exit_layer=j, pruning=(
                "shortlist", {"rank": rank, "k": k, "k_min": args.k_min}))
        states = continuations(model, tokenizer, prompts, args.tokens)
        results.section("agreement", agreement, model, variants, states, args.layers, [0.9, 0.7, 0.5], j)
    if "decode" in args.sections:
        results.section("decode", decode, decoders, prompt_ids, args.tokens, args.lambdas)
    if "head_time" in args.sections:
        results.section("head_time", head_time, model, decoders["shortlist"].pruning, args.repeats, 1)
    results.save()


if __name__ == "__main__":
    main()
