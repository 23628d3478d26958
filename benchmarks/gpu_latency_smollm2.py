"""The SmolLM2-135M sections of ``bench_gpu_latency.py``: the real model (GGUF) on real prompts —
latency, exit-head cost, sweep cost, batch throughput, peak memory."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import numpy as np
import torch

from _common import (  # this script's folder is on sys.path
    ROOT, PeakMemory, Results, clock, consults_per_token, describe_fast, make_fast, mean_layers, per_token,
)
from gpu_latency_t5 import t5_forced  # this script's folder is on sys.path


PROMPTS_FILE = ROOT / "benchmarks" / "data" / "smollm2_lee_prompts.json"


# K = 20 candidates, fixed before the run, most conservative first; finer than the project's default grid
# near 1 because SmolLM2 (not trained for early exit) changes its text at every λ below 0.999
GRID = (1.0, 0.9999, 0.9995, 0.999, 0.998, 0.995, 0.99, 0.98, 0.97, 0.95,
        0.93, 0.9, 0.88, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5)


def load_prompts(quick: bool):
    data = json.loads(PROMPTS_FILE.read_text())
    rows = data["prompts"]
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    n_cal, n_test = (6, 2) if quick else (284, 16)
    calibration = [rows[i]["input_ids"] for i in order[:n_cal]]
    test = [rows[i]["input_ids"] for i in order[n_cal:n_cal + n_test]]
    return calibration, test, data


def bench_smollm2(args, res: Results):
    from ltt_exit import metrics
    from ltt_exit.certify import certify
    from ltt_exit.decode import EarlyExitDecoder
    from ltt_exit.models import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick
    N = 8 if quick else 32
    j, k = args.min_exit_layer, args.k
    calibration, test, prompt_data = load_prompts(quick)
    state = {}

    def load():
        seconds, loaded = clock(lambda: load_model(args.gguf, device=device,
                                                   dtype="float32" if device == "cpu" else "bfloat16"))
        state["lm"] = loaded
        model = loaded.model
        return {"load_s": seconds, "L": loaded.num_layers, "dtype": str(loaded.dtype),
                "fingerprint": loaded.fingerprint, "weights_mib": sum(p.numel() * p.element_size()
                                                                      for p in model.parameters()) / 2**20}

    if res.section("smollm2.load", load) is None:
        return None
    lm = state["lm"]
    model, tokenizer = lm.model, lm.tokenizer
    L = lm.num_layers
    eos = sorted(EarlyExitDecoder(model).backend.default_eos_token_ids())
    res.data["setup"] = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)", "dtype": str(lm.dtype), "L": L,
                         "max_new_tokens": N, "min_exit_layer": j, "fixed_k": k, "calibration_prompts": len(calibration),
                         "test_prompts": len(test), "eos": eos, "prompt_source": prompt_data["source"],
                         "grid": list(GRID), "scorer": "softmax-margin"}
    as_tensor = lambda ids: torch.tensor([ids], device=device)  # noqa: E731
    gen_tokens = lambda out, width: out.shape[1] - width  # noqa: E731

    def fast_run(decoder, threshold, **extra):
        return lambda ids: decoder.generate(input_ids=[ids], threshold=threshold, max_new_tokens=N, **extra)

    def ours_full():
        decoder, notes = make_fast(model, tokenizer, pruning=("fixed", {"k": k}), min_exit_layer=j)
        state["fixed"] = decoder
        run = fast_run(decoder, 1.0)
        with PeakMemory() as memory:
            ms, tokens, outs = per_token(run, test, lambda s: len(s[0].token_ids))
        state["full_outputs"] = [o[0] for o in outs]
        return {"ms_per_token": ms, "tokens": tokens, "peak_mib": memory.peak_mib, "extra_mib": memory.extra_mib,
                "fallbacks": notes, "fast": describe_fast(decoder), "stats": decoder.last_stats}

    def default_generate():
        def run(ids):
            tensor = as_tensor(ids)
            return model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor), do_sample=False,
                                  num_beams=1, max_new_tokens=N, eos_token_id=eos, pad_token_id=eos[0])
        run(test[0][:16])
        count = len(test) if quick else 8
        with PeakMemory() as memory:  # (library generate: one warm-up call above is enough)
            seconds, outs = clock(lambda: [run(ids) for ids in test[:count]])
        tokens = sum(gen_tokens(o, len(ids)) for o, ids in zip(outs, test))
        same = sum(o[0, len(ids):].tolist() == s.token_ids
                   for o, ids, s in zip(outs, test, state.get("full_outputs", [])))
        return {"ms_per_token": 1000 * seconds / tokens, "tokens": tokens, "prompts": count,
                "peak_mib": memory.peak_mib, "extra_mib": memory.extra_mib, "ours_full_same_tokens": f"{same}/{count}"}

    def sweep_and_certify():
        decoder = state["fixed"]
        lambdas = list(GRID)
        rows_full, rows_text, rows_layers, rows_exits = [], [], [], []
        sweep_seconds, per_prompt = 0.0, []
        run_rows = lambda ids: decoder.generate(input_ids=[ids] * (len(lambdas) + 1),  # noqa: E731
                                                threshold=[math.inf] + lambdas, max_new_tokens=N)
        warmed = {}
        for ids in calibration:  # one prompt per cache-length bucket of the fast path (prompt + budget)
            warmed.setdefault(-(-(len(ids) + N - 1) // decoder.length_bucket), ids)
        for ids in warmed.values():
            run_rows(ids)
        with PeakMemory() as memory:
            for ids in calibration:
                seconds, out = clock(lambda: run_rows(ids))
                sweep_seconds += seconds
                per_prompt.append(seconds)
                rows_full.append(out[0].text)
                rows_text.append([s.text for s in out[1:]])
                rows_layers.append([mean_layers([s], skip_first=True) for s in out[1:]])
                rows_exits.append([s.exit_layers[1:] for s in out[1:]])
        # the sweep's cost against one full-model pass over the same prompts (batch 1)
        subset = calibration[: min(24, len(calibration))]
        full_once = lambda ids: decoder.generate(input_ids=[ids], threshold=1.0, max_new_tokens=N)  # noqa: E731
        for ids in subset:
            full_once(ids)
        full_seconds, _ = clock(lambda: [full_once(ids) for ids in subset])
        sweep_subset = sum(per_prompt[: len(subset)])  # the same prompts' sweep time
        losses = np.array([[metrics.textual_consistency_loss("rouge-l", text, full) for text in texts]
                           for texts, full in zip(rows_text, rows_full)])
        layers = np.array(rows_layers)
        certificates = {}
        for delta in (0.1, 0.2, 0.3):
            cert = certify(losses, np.array(lambdas), delta=delta, epsilon=0.05, pvalue="hoeffding-bentkus",
                           procedure="fixed-sequence")
            certificates[str(delta)] = {"lambda_hat": cert.lambda_hat, "certified_any": cert.certified_any,
                                        "chosen_index": cert.chosen_index}
        state["certificates"] = certificates
        state["exit_layers_by_lambda"] = {lam: [e for row in rows_exits for e in row[i]]
                                          for i, lam in enumerate(lambdas)}
        return {
            "K": len(lambdas), "n": len(calibration), "sweep_seconds": sweep_seconds,
            "sweep_seconds_per_prompt": sweep_seconds / len(calibration),
            "full_pass_seconds_per_prompt": full_seconds / len(subset),
            "sweep_over_full_pass": sweep_subset / full_seconds, "peak_mib": memory.peak_mib,
            "extra_mib": memory.extra_mib,
            "empirical_risk": dict(zip(map(str, lambdas), losses.mean(axis=0).round(4).tolist())),
            "mean_layers": dict(zip(map(str, lambdas), np.nanmean(layers, axis=0).round(2).tolist())),
            "certificates": certificates, "epsilon": 0.05, "pvalue": "hoeffding-bentkus",
            "procedure": "fixed-sequence", "metric": "rouge-l textual consistency", "stats": decoder.last_stats,
        }

    def certified_latency():
        decoder = state["fixed"]
        full_ms = res.data["sections"]["smollm2.ours_full"]["ms_per_token"]
        chosen = sorted({c["lambda_hat"] for c in state.get("certificates", {}).values()}, reverse=True)
        extra = [0.9, 0.7, 0.5]
        result = {"full_ms_per_token": full_ms, "runs": {}}
        for threshold in list(dict.fromkeys(chosen + extra)):
            run = fast_run(decoder, threshold)
            run(test[0])
            with PeakMemory() as memory:
                ms, tokens, outs = per_token(run, test, lambda s: len(s[0].token_ids))
            seqs = [o[0] for o in outs]
            used = mean_layers(seqs)
            entry = {"certified_for_delta": [d for d, c in state.get("certificates", {}).items()
                                             if c["lambda_hat"] == threshold],
                     "ms_per_token": ms, "tokens": tokens, "mean_layers": used, "ideal_speedup": L / used,
                     "achieved_speedup": full_ms / ms, "fraction_of_ideal": (full_ms / ms) / (L / used),
                     "decisions_per_token": consults_per_token(seqs, L, j, decoder.lookahead, True),
                     "peak_mib": memory.peak_mib, "stats": decoder.last_stats}
            result["runs"][str(threshold)] = entry
            state.setdefault("test_outputs", {})[threshold] = seqs
        return result

    def head_cost():
        result = {}
        base = state["fixed"]
        full_ms, _, _ = per_token(fast_run(base, 1.0), test, lambda s: len(s[0].token_ids))
        result["full_ms_per_token"] = full_ms
        never = [[L] * N]
        for name, pruning in [("none", "none"), ("fixed", ("fixed", {"k": k}))]:
            decoder = base if name == "fixed" else make_fast(model, tokenizer, pruning=pruning, min_exit_layer=j)[0]
            state[name] = decoder
            run = fast_run(decoder, 0.5, force_exit_layers=never)
            run(test[0])
            ms, _, _ = per_token(run, test, lambda s: len(s[0].token_ids))
            result[name] = {"all_decide_ms_per_token": ms,
                            "decision_us_per_layer": 1000 * (ms - full_ms) / (L - j),
                            "decision_share_when_all_decide": (ms - full_ms) / ms}
        # the certified runs' own exit layers replayed with and without pruning: same layers, different heads
        certified = [lam for lam in state.get("test_outputs", {}) if lam < 1.0]
        if certified:
            lam = max(certified)
            seqs = state["test_outputs"][lam]
            result["replayed_lambda"] = lam
            pairs = [(ids, seq.exit_layers + [L] * (N - len(seq.exit_layers))) for ids, seq in zip(test, seqs)]
            for name in ("none", "fixed"):
                decoder = state[name]
                run = lambda pair, d=decoder: d.generate(  # noqa: E731
                    input_ids=[pair[0]], threshold=0.5, max_new_tokens=N, eos_token_id=[], force_exit_layers=[pair[1]])
                ms, _, outs = per_token(run, pairs, lambda s: len(s[0].token_ids))
                out_seqs = [o[0] for o in outs]
                per_layer = result[name]["decision_us_per_layer"]
                decisions = consults_per_token(out_seqs, L, j, decoder.lookahead, True)
                result[f"replay_{name}"] = {"ms_per_token": ms, "decisions_per_token": decisions,
                                            "estimated_head_share": decisions * per_layer / 1000 / ms}
        return result

    def exactness():
        generic = EarlyExitDecoder(model, tokenizer, pruning=("fixed", {"k": k}), min_exit_layer=j)
        fast = state["fixed"]
        rows = []
        lams = sorted({lam for lam in state.get("test_outputs", {}) if lam < 1.0}, reverse=True)[:2] or [0.9]
        for threshold in lams:
            for ids in test[:2]:
                a = generic.generate(input_ids=[ids], threshold=threshold, max_new_tokens=N)[0]
                b = fast.generate(input_ids=[ids], threshold=threshold, max_new_tokens=N)[0]
                first = next((t for t, (x, y) in enumerate(zip(a.exit_layers, b.exit_layers)) if x != y), None)
                rows.append({"threshold": threshold, "same_tokens": a.token_ids == b.token_ids,
                             "same_exit_layers": a.exit_layers == b.exit_layers, "tokens": len(a.token_ids),
                             "first_exit_difference_at": first})
        return rows

    def batch_throughput():
        fast = state["fixed"]
        certified = [c["lambda_hat"] for c in state.get("certificates", {}).values() if c["lambda_hat"] < 1.0]
        threshold = max(certified) if certified else 0.9
        pad = eos[0]
        result = {"threshold": threshold, "policy": "per-row exits, static batch, no compaction", "runs": {}}
        pool = (test * 4)[: (4 if quick else 16)]
        for batch in ([1, 2, 4] if quick else [1, 4, 16]):
            groups = [pool[i:i + batch] for i in range(0, len(pool), batch)]
            for name, lam in (("ours_certified", threshold), ("ours_full", 1.0)):
                fast.generate(input_ids=groups[0], threshold=lam, max_new_tokens=N)
                seconds, outs = clock(lambda: [fast.generate(input_ids=g, threshold=lam, max_new_tokens=N)
                                               for g in groups])
                tokens = sum(len(s.token_ids) for out in outs for s in out)
                result["runs"][f"{name}_b{batch}"] = {"tokens_per_s": tokens / seconds, "tokens": tokens,
                                                      "mean_layers": mean_layers([s for o in outs for s in o])}
        # the library's default generate on the largest batch (left padding)
        batch = 4 if quick else 16
        group = pool[:batch]
        width = max(len(p) for p in group)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
        run = lambda: model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,  # noqa
                                     max_new_tokens=N, eos_token_id=eos, pad_token_id=pad)
        run()
        seconds, out = clock(run)
        new = out[:, width:]
        tokens = 0
        for row in new.tolist():
            for token in row:
                tokens += 1
                if token in eos:
                    break
        result["runs"][f"generate_default_b{batch}"] = {"tokens_per_s": tokens / seconds, "tokens": tokens}
        return result

    def compiled_generate():
        pad = eos[0]
        width = max(len(p) for p in test)

        def run(ids):
            padded = torch.tensor([[pad] * (width - len(ids)) + ids], device=device)
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids)], device=device)
            return model.generate(input_ids=padded, attention_mask=mask, do_sample=False, num_beams=1,
                                  max_new_tokens=N, eos_token_id=eos, pad_token_id=pad, cache_implementation="static")
        warm, _ = clock(lambda: [run(test[0]), run(test[1 % len(test)])])
        with PeakMemory() as memory:
            seconds, outs = clock(lambda: [run(ids) for ids in test])
        tokens = 0
        for out in outs:
            for token in out[0, width:].tolist():
                tokens += 1
                if token in eos:
                    break
        return {"ms_per_token": 1000 * seconds / tokens, "tokens": tokens, "warmup_compile_s": warm,
                "peak_mib": memory.peak_mib, "extra_mib": memory.extra_mib,
                "note": f"prompts left-padded to one width ({width}) so one compiled graph serves all"}

    res.section("smollm2.ours_full", ours_full)
    res.section("smollm2.generate_default", default_generate)
    if "fixed" in state:
        res.section("smollm2.sweep_and_certify", sweep_and_certify)
        res.section("smollm2.certified_latency", certified_latency)
        res.section("smollm2.head_cost", head_cost)
        res.section("smollm2.exactness_vs_generic", exactness)
        res.section("smollm2.batch_throughput", batch_throughput)
    state.pop("none", None)
    distributions = {}
    for delta, cert in state.get("certificates", {}).items():
        lam = cert["lambda_hat"]
        if lam < 1.0:
            distributions[f"smollm2_certified_delta_{delta}"] = (L, state["exit_layers_by_lambda"][lam])
    for lam in (0.9, 0.8, 0.5):
        if lam in state.get("exit_layers_by_lambda", {}):
            distributions[f"smollm2_lambda_{lam}"] = (L, state["exit_layers_by_lambda"][lam])
    # not recorded: every depth equally likely, to show deeper savings than SmolLM2 (exits >= j) allows
    distributions["uniform_depth"] = (L, list(range(1, L + 1)))
    res.data["recorded_distributions"] = {name: {"source_L": src, "mean": float(np.mean(layers)),
                                                 "histogram": np.bincount(layers, minlength=src + 1).tolist()}
                                          for name, (src, layers) in distributions.items() if layers}
    res.save()
    if distributions and not args.skip_t5_forced:
        state.pop("fixed", None)
        res.section("t5.forced_from_smollm2", t5_forced, args, res, distributions)
    sweep_script = ROOT / "benchmarks" / "bench_sweep.py"
    if sweep_script.exists() and "--device" in sweep_script.read_text() and not quick:
        def other_sweep():
            command = [sys.executable, str(sweep_script), "--device", device]
            if "--gguf" in sweep_script.read_text():
                command += ["--gguf", str(args.gguf)]
            out = subprocess.run(command,
                                 capture_output=True, text=True, timeout=70)
            return {"returncode": out.returncode, "stdout_tail": out.stdout[-4000:], "stderr_tail": out.stderr[-2000:]}
        res.section("sweep.bench_sweep_py", other_sweep, limit_s=75)
    if not args.skip_compiled:
        res.section("smollm2.generate_static_compiled", compiled_generate, limit_s=args.compile_limit)
    return None
