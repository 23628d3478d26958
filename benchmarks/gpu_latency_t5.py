"""The T5-large-shape sections of ``bench_gpu_latency.py``: fast path against the library's ``generate``,
exits forced from a recorded distribution, and the per-piece device times (random weights)."""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from _common import (  # this script's folder is on sys.path
    PeakMemory, Results, clock, consults_per_token, describe_fast, make_fast, mean_layers, per_token, smollm2_shape,
    t5_model, t5_prompts,
)


def library_generate(model, device, **extra):
    def run(ids):
        ids = ids.to(device)
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                              **extra)
    return run


def bench_t5(args, res: Results):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick
    N = 8 if quick else 32
    n = 2 if quick else 8
    model = t5_model(quick, device)
    L = model.config.num_decoder_layers
    j = 2 if quick else 4
    k = 64 if quick else 2048
    prompts = t5_prompts(model, n, 16 if quick else 64)
    res.data["setup"] = {"model": "T5-large shape, random weights" if not quick else "tiny T5", "dtype": "float32",
                         "L": L, "prompt_tokens": prompts[0].shape[1], "max_new_tokens": N, "prompts": n,
                         "min_exit_layer": j, "fixed_k": k, "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    tokens_of = lambda out: out.shape[1] - 1  # noqa: E731  (drop the decoder start token)
    seq_tokens = lambda seqs: len(seqs[0].token_ids)  # noqa: E731
    outputs = {}

    def ours_full():
        decoder, notes = make_fast(model, pruning=("fixed", {"k": k}), min_exit_layer=j)
        outputs["fixed"] = decoder
        run = lambda ids: decoder.generate(input_ids=ids, threshold=1.0, max_new_tokens=N, eos_token_id=[])  # noqa
        run(prompts[0])
        with PeakMemory() as memory:
            ms, tokens, outs = per_token(run, prompts, seq_tokens)
        outputs["ours_full_tokens"] = [o[0].token_ids for o in outs]
        return {"ms_per_token": ms, "tokens": tokens, "peak_mib": memory.peak_mib, "extra_mib": memory.extra_mib,
                "fallbacks": notes, "fast": describe_fast(decoder), "stats": decoder.last_stats}

    def default_generate():
        run = library_generate(model, device, max_new_tokens=N)
        run(prompts[0][:, :8])
        count = max(2, n // 2)
        with PeakMemory() as memory:
            ms, tokens, outs = per_token(run, prompts[:count], tokens_of)
        same = sum(o[0, 1:].tolist() == t for o, t in zip(outs, outputs.get("ours_full_tokens", [])))
        return {"ms_per_token": ms, "tokens": tokens, "prompts": count, "peak_mib": memory.peak_mib,
                "extra_mib": memory.extra_mib, "ours_full_same_tokens": f"{same}/{count}"}

    def head_cost():
        """Exit-decision cost per consulted layer: forced 'never exit' (every layer j..L-1 decides) against
        the full path (no decision), with and without pruning."""
        result = {}
        base = outputs["fixed"]
        full_ms, _, _ = per_token(lambda ids: base.generate(input_ids=ids, threshold=1.0, max_new_tokens=N,
                                                            eos_token_id=[]), prompts, seq_tokens)
        result["full_ms_per_token"] = full_ms
        for name, pruning in [("none", "none"), ("fixed", ("fixed", {"k": k}))]:
            decoder = base if name == "fixed" else make_fast(model, pruning=pruning, min_exit_layer=j)[0]
            outputs[name] = decoder
            never = [[L] * N]
            run = lambda ids, d=decoder: d.generate(input_ids=ids, threshold=0.5, max_new_tokens=N,  # noqa: E731
                                                    eos_token_id=[], force_exit_layers=never)
            run(prompts[0])
            ms, _, _ = per_token(run, prompts, seq_tokens)
            result[name] = {"all_decide_ms_per_token": ms, "decision_us_per_layer": 1000 * (ms - full_ms) / (L - j),
                            "decision_share_when_all_decide": (ms - full_ms) / ms}
        return result

    def exactness():
        """Fast path vs the reference-checked generic decoder on the device, real softmax-margin decisions."""
        from ltt_exit.decode import EarlyExitDecoder

        generic = EarlyExitDecoder(model, pruning=("fixed", {"k": k}), min_exit_layer=j)
        fast = outputs["fixed"]
        rows = []
        for threshold in (1e-4, 1e-3, 1e-2):
            for ids in prompts[:2]:
                a = generic.generate(input_ids=ids, threshold=threshold, max_new_tokens=N // 2, eos_token_id=[])[0]
                b = fast.generate(input_ids=ids, threshold=threshold, max_new_tokens=N // 2, eos_token_id=[])[0]
                rows.append({"threshold": threshold, "same_tokens": a.token_ids == b.token_ids,
                             "same_exit_layers": a.exit_layers == b.exit_layers, "mean_layers": mean_layers([a])})
        return rows

    def compiled_generate():
        run = library_generate(model, device, max_new_tokens=N, cache_implementation="static")
        warm, _ = clock(lambda: [run(prompts[0]), run(prompts[1 % n])])
        with PeakMemory() as memory:
            ms, tokens, outs = per_token(run, prompts, tokens_of)
        same = sum(o[0, 1:].tolist() == t for o, t in zip(outs, outputs.get("ours_full_tokens", [])))
        return {"ms_per_token": ms, "tokens": tokens, "warmup_compile_s": warm, "peak_mib": memory.peak_mib,
                "extra_mib": memory.extra_mib, "ours_full_same_tokens": f"{same}/{n}"}

    res.section("t5.ours_full", ours_full)
    res.section("t5.generate_default", default_generate)
    if "fixed" in outputs:
        res.section("t5.head_cost", head_cost)
        res.section("t5.exactness_vs_generic", exactness)
    if not args.skip_compiled:
        res.section("t5.generate_static_compiled", compiled_generate, limit_s=args.compile_limit)
    return model


def t5_forced(args, res: Results, distributions: dict, model=None, j=None, k=None):
    """T5-large shape with exit layers drawn from SmolLM2's recorded distributions (as depth fractions)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick
    N = 8 if quick else 32
    n = 2 if quick else 8
    model = model if model is not None else t5_model(quick, device)
    L = model.config.num_decoder_layers
    j = j if j is not None else (2 if quick else 4)
    k = k if k is not None else (64 if quick else 2048)
    prompts = t5_prompts(model, n, 16 if quick else 64)
    decoder, notes = make_fast(model, pruning=("fixed", {"k": k}), min_exit_layer=j)
    full_run = lambda ids: decoder.generate(input_ids=ids, threshold=1.0, max_new_tokens=N, eos_token_id=[])  # noqa
    full_run(prompts[0])
    full_ms, _, _ = per_token(full_run, prompts, lambda s: len(s[0].token_ids))
    result = {"full_ms_per_token": full_ms, "fallbacks": notes, "fast": describe_fast(decoder), "L": L, "j": j,
              "k": k, "runs": {}}
    rng = random.Random(0)
    for name, (source_L, layers) in distributions.items():
        if not layers:
            continue
        # a recorded exit layer e of an L_s-layer model -> the same depth fraction of this one, at least j
        scaled = [min(L, max(j, round(e / source_L * L))) for e in layers]
        pairs = [(ids, [rng.choice(scaled) for _ in range(N)]) for ids in prompts]
        run = lambda pair: decoder.generate(input_ids=pair[0], threshold=0.5, max_new_tokens=N,  # noqa: E731
                                            eos_token_id=[], force_exit_layers=[pair[1]])
        with PeakMemory() as memory:
            ms, _, outs = per_token(run, pairs, lambda s: len(s[0].token_ids))
        used = mean_layers([o[0] for o in outs])
        ideal = L / used
        achieved = full_ms / ms
        result["runs"][name] = {
            "mean_layers": used, "ms_per_token": ms, "ideal_speedup": ideal, "achieved_speedup": achieved,
            "fraction_of_ideal": achieved / ideal, "peak_mib": memory.peak_mib,
            "decisions_per_token": consults_per_token([o[0] for o in outs], L, j, decoder.lookahead, False),
            "stats": decoder.last_stats,
        }
    if torch.cuda.is_available():
        try:
            result["pieces"] = piece_times(decoder, prompts[0], N)
        except Exception as error:  # the runs above are kept either way
            result["pieces_error"] = f"{type(error).__name__}: {error}"
    return result


def piece_times(decoder, prompt, N, replays=200):
    """Device time of single captured pieces of one step, replayed alone between CUDA events (µs):
    the whole full-model step, a layer with its exit decision, the last layer (no decision), a layer
    with its decision plus the host's flag copy and event, the K/V tail from the first consulted layer,
    and the final head. Cache positions are reset every few replays so no write leaves the cache."""
    decoder.generate(input_ids=prompt, threshold=0.5, max_new_tokens=N, eos_token_id=[])  # the session exists
    session = next(reversed(decoder._sessions.values()))
    L, j = decoder.num_layers, decoder.min_exit_layer

    def reset():  # every counter a piece advances: cache lengths, the step index, the cache slot
        session.lengths.zero_()
        session.step.zero_()
        session.slot.zero_()

    host = {}

    def time_it(action, name=None):
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            reset()
            start.record()
            launch = time.perf_counter()
            for index in range(replays):
                if index % 16 == 15:
                    reset()
                action()
            launched = time.perf_counter() - launch
            end.record()
            end.synchronize()
            times.append(1000.0 * start.elapsed_time(end) / replays)
            if name:
                host[name] = min(host.get(name, math.inf), 1e6 * launched / replays)
        return min(times)

    graphs = session.graphs
    out = {
        "full_step": time_it(graphs["full"].replay),
        "layer_with_decision": time_it(graphs[f"layer{j}"].replay),
        "last_layer_no_decision": time_it(graphs[f"layer{L - 1}"].replay),
        "layer_with_decision_and_flag_copy": time_it(lambda: (graphs[f"layer{j}"].replay(), decoder._post(session, j)),
                                                     "layer_with_decision_and_flag_copy"),
        "kv_tail_from_j": time_it(graphs[f"kv{j}"].replay),
        "final_head_step_end": time_it(graphs["finish_head"].replay),
        "step_end_no_head": time_it(graphs["finish_nohead"].replay),
    }
    out["full_step_per_layer"] = out["full_step"] / L
    out["decision"] = out["layer_with_decision"] - out["last_layer_no_decision"]
    out["graph_boundary"] = out["last_layer_no_decision"] - out["full_step_per_layer"]
    out["flag_copy_and_event"] = out["layer_with_decision_and_flag_copy"] - out["layer_with_decision"]
    # host side: what launching one decided layer costs the CPU (replay + flag copy + event record), which
    # must stay below the device time of a layer for the lagged reads to keep the device busy
    out["host_launch_us_per_decided_layer"] = host.get("layer_with_decision_and_flag_copy")
    return out


def bench_pieces(args, res: Results):
    """Per-piece device times of the fast path on the T5-large shape and on the SmolLM2 shape."""
    device = "cuda"

    def t5_pieces():
        model = t5_model(False, device)
        decoder, notes = make_fast(model, pruning=("fixed", {"k": args.k}), min_exit_layer=16)
        prompt = t5_prompts(model, 1, 64)[0]
        return {"j": 16, "k": args.k, "fallbacks": notes, **piece_times(decoder, prompt, 32)}

    def smollm2_pieces():
        model = smollm2_shape(device)
        decoder, notes = make_fast(model, pruning=("fixed", {"k": args.k}), min_exit_layer=20)
        prompt = torch.randint(3, 49152, (1, 100))
        return {"j": 20, "k": args.k, "fallbacks": notes, **piece_times(decoder, prompt, 32)}

    res.section("pieces.t5_large_shape", t5_pieces)
    res.section("pieces.smollm2_shape", smollm2_pieces)


def bench_t5_forced(args, res: Results):
    """Only the forced-exit T5 runs, from the recorded distributions of an earlier SmolLM2 result file."""
    recorded = json.loads(Path(args.distributions).read_text())["recorded_distributions"]
    res.data["distributions_from"] = str(args.distributions)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = t5_model(args.quick, device)
    L = model.config.num_decoder_layers

    def expand(histogram):
        return [layer for layer, count in enumerate(histogram) for _ in range(count)]

    smollm2 = {name: (len(d["histogram"]) - 1, expand(d["histogram"]))
               for name, d in recorded.items() if name != "uniform_depth"}
    source_j = args.source_min_exit_layer
    source_L = next(iter(smollm2.values()))[0]
    j = max(1, round(source_j / source_L * L))  # the same depth fraction as the recorded runs' own j
    res.data["setup"] = {"model": "T5-large shape, random weights", "L": L, "min_exit_layer": j, "fixed_k": args.k,
                         "source_min_exit_layer": source_j, "source_L": source_L}
    res.section("t5.forced_matched_j", t5_forced, args, res, smollm2, model=model, j=j, k=args.k)
    res.section("t5.forced_uniform_j1", t5_forced, args, res, {"uniform_depth": (L, list(range(1, L + 1)))},
                model=model, j=1, k=args.k)
