"""The "GPU speed" section of docs/benchmarks.md, rendered from the result files of ``bench_gpu_latency.py``."""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch


SECTION = "## GPU speed (issue 6)"


def fmt(value, digits=2):
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}f}"
    return str(value)


def report(paths: list[Path], doc: Path | None):
    parts = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        data["file"] = str(path)
        parts[data["part"]] = data
    text = "\n".join(render(parts)).rstrip() + "\n"
    if doc is None:
        print(text)
        return
    current = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if SECTION in current:  # replace our section, keep everything else
        start = current.index(SECTION)
        rest = current[start + len(SECTION):]
        end = rest.find("\n## ")
        current = current[:start].rstrip() + "\n" + (rest[end:] if end >= 0 else "")
    new = current.rstrip() + "\n\n" + text
    with tempfile.NamedTemporaryFile("w", dir=doc.parent, delete=False, suffix=".tmp") as handle:
        handle.write(new)
    os.replace(handle.name, doc)
    print(f"wrote {doc}")


def _sections(parts, part):
    return parts.get(part, {}).get("sections", {})


def _ratio_rows(runs, full_ms):
    """(mean layers, ideal, achieved, fraction, decisions) per run, against the given full-model time."""
    rows = {}
    for name, r in runs.items():
        ideal = r["ideal_speedup"]
        achieved = full_ms / r["ms_per_token"]
        rows[name] = (r["mean_layers"], ideal, achieved, achieved / ideal, r.get("decisions_per_token"))
    return rows


def render(parts) -> list[str]:
    t5, sm = _sections(parts, "t5"), _sections(parts, "smollm2")
    t5f, pieces = _sections(parts, "t5-forced"), _sections(parts, "pieces")
    out = [SECTION, ""]
    out += ["Script: `benchmarks/bench_gpu_latency.py` (sections in `gpu_latency_t5.py`, `gpu_latency_smollm2.py`, "
            "report in `gpu_latency_report.py`, helpers in `_common.py`); fast path: "
            "`ltt_exit.decode.FastEarlyExitDecoder` "
            "(docs/decoder.md § Fast path). One NVIDIA H200 (`nvidia-h200`), torch 2.11 + CUDA 13.0, "
            "transformers 5.24 (carried as a wheel). Raw results: `benchmarks/results/*.json`. Latencies are "
            "wall-clock per generated token at batch 1 (prefill / encoder included, CUDA synchronised around "
            "each timed region, every prompt run once untimed before the timed pass unless noted); one run "
            "of each command:", ""]
    for name, data in parts.items():
        command = data["args"].get("command_line", "").replace(str(Path(data["args"]["out"]).parent) + "/", "$OUT/")
        out.append(f"* `{command}` → `{Path(data['file']).name}` "
                   f"({data.get('total_seconds', 0):.0f} s)")
    out += ["", "Models: the **T5-large shape** (24 + 24 layers, d 1024, 16 heads, d_ff 4096, vocabulary 32,128, "
            "fp32, random weights, 64-token random prompts, 32 new tokens, EOS off); the real **SmolLM2-135M-Instruct** "
            "(GGUF → bf16, 30 layers, vocabulary 49,152; prompts: the 300 Lee news articles of recipe "
            "`gensim-lee-continue` in the chat template, 284 for calibration and 16 for timing; 32 new tokens, "
            "the model's EOS). Early-exit setting: softmax-margin scorer, fixed pruning k = 256 after "
            "`min_exit_layer` j (SmolLM2: j = 20), lookahead 1, fused decision compiled with inductor.", ""]

    # ---- 1 ---------------------------------------------------------------------------------------------
    cert = (sm.get("smollm2.certified_latency") or {}).get("runs", {})
    sm_full = cert.get("1.0", {}).get("ms_per_token")
    out += ["### 1. Per-token latency, batch 1", "",
            "| path | T5-large shape, fp32 (ms/token) | SmolLM2-135M, bf16 (ms/token) |", "|---|---|---|"]
    g = lambda sec, key="ms_per_token": fmt((sec or {}).get(key))  # noqa: E731
    out.append(f"| library `generate` (default, dynamic cache) | {g(t5.get('t5.generate_default'))} | "
               f"{g(sm.get('smollm2.generate_default'))} |")
    tc, sc = t5.get("t5.generate_static_compiled") or {}, sm.get("smollm2.generate_static_compiled") or {}
    out.append(f"| library `generate`, `cache_implementation=\"static\"` (auto `torch.compile`, reduce-overhead) | "
               f"{g(tc)} (after {fmt(tc.get('warmup_compile_s'), 0)} s of compile warm-up) | "
               f"{g(sc)} (after {fmt(sc.get('warmup_compile_s'), 0)} s) |")
    out.append(f"| ours, λ = 1 (full model) | {g(t5.get('t5.ours_full'))} | {fmt(sm_full)} ¹ |")
    forced = (t5f.get("t5.forced_matched_j") or {})
    frun = forced.get("runs", {})
    for lam, r in cert.items():
        if not r["certified_for_delta"] or lam == "1.0":
            continue
        deltas = ", ".join(r["certified_for_delta"])
        t5_run = frun.get(f"smollm2_certified_delta_{r['certified_for_delta'][0]}", {})
        out.append(f"| ours at the certified λ = {lam} (δ = {deltas}, ε = 0.05) | {fmt(t5_run.get('ms_per_token'))} ² "
                   f"| {fmt(r['ms_per_token'])} |")
    delta_full = [d for d, c in (sm.get("smollm2.sweep_and_certify") or {}).get("certificates", {}).items()
                  if c["lambda_hat"] == 1.0]
    if delta_full:
        out.append(f"| ours at the certified λ for δ = {', '.join(delta_full)} | – | λ = 1: nothing below 1 certified, "
                   f"{fmt(sm_full)} |")
    out.append("")
    ours_full_first = (sm.get("smollm2.ours_full") or {}).get("ms_per_token")
    out += [f"¹ The λ = 1 run of the certified-latency section (same decoder, same prompts, every graph already "
            f"captured); the head-cost section measured {fmt((sm.get('smollm2.head_cost') or {}).get('full_ms_per_token'))} "
            f"ms. The run's first section (`smollm2.ours_full`) reported {fmt(ours_full_first)} ms: its warm-up grouped "
            f"prompts by prompt length instead of the cache bucket (prompt + budget), so a graph capture fell inside "
            f"the timed pass. The script now runs every prompt untimed first.",
            f"² T5 exits forced per token from SmolLM2's recorded exit layers at that λ (its calibration run), "
            f"mapped to the same depth fraction, with j at the same fraction (16 of 24); from the `t5-forced` run, "
            f"whose own λ = 1 time was {fmt(forced.get('full_ms_per_token'))} ms/token.", ""]
    dg, df = (t5.get("t5.generate_default") or {}), (sm.get("smollm2.generate_default") or {})
    if dg.get("ms_per_token") and sm_full and df.get("ms_per_token"):
        out.append(f"Our full-model path against the library's default `generate`: "
                   f"**{dg['ms_per_token'] / t5['t5.ours_full']['ms_per_token']:.1f}× faster** (T5-large shape), "
                   f"**{df['ms_per_token'] / sm_full:.1f}× faster** (SmolLM2); against `generate` with a static cache "
                   f"and `torch.compile`: {tc.get('ms_per_token', 0) / t5['t5.ours_full']['ms_per_token']:.2f}× and "
                   f"{sc.get('ms_per_token', 0) / sm_full:.2f}× faster, with no compile warm-up for the layers. Same "
                   f"tokens as the library: T5 {dg.get('ours_full_same_tokens')} (default) and "
                   f"{tc.get('ours_full_same_tokens')} (compiled) sequences identical in fp32; SmolLM2 "
                   f"{df.get('ours_full_same_tokens')} identical in bf16 (see *Exactness*).")
        out.append("")

    # ---- 2 ---------------------------------------------------------------------------------------------
    out += ["### 2. Speed-up against the ideal L / mean layers (target ≥ 0.8 of ideal)", "",
            "achieved = (our λ = 1 time) / (time at λ), both from the same run; ideal = L / mean layers used "
            "(the first SmolLM2 token, always full, included).", "",
            "| run | mean layers | ideal | achieved | achieved / ideal | exit decisions per token |",
            "|---|---|---|---|---|---|"]
    if sm_full:
        for lam, row in _ratio_rows({k: v for k, v in cert.items() if k != "1.0"}, sm_full).items():
            tag = f" (certified, δ = {', '.join(cert[lam]['certified_for_delta'])})" if cert[lam]["certified_for_delta"] else ""
            out.append(f"| SmolLM2, λ = {lam}{tag} | {fmt(row[0])} | {fmt(row[1])} | {fmt(row[2])} | "
                       f"**{fmt(row[3])}** | {fmt(row[4], 1)} |")
    for label, sec in (("T5-large shape, j = 16, k = 256", t5f.get("t5.forced_matched_j")),
                       ("T5-large shape, j = 1, k = 256", t5f.get("t5.forced_uniform_j1")),
                       ("T5-large shape, j = 4, k = 2048 (first run)", sm.get("t5.forced_from_smollm2"))):
        if not sec:
            continue
        for name, row in _ratio_rows(sec["runs"], sec["full_ms_per_token"]).items():
            out.append(f"| {label}, exits from `{name}` | {fmt(row[0])} | {fmt(row[1])} | {fmt(row[2])} | "
                       f"**{fmt(row[3])}** | {fmt(row[4], 1)} |")
    out.append("")

    # ---- 3 ---------------------------------------------------------------------------------------------
    out += ["### 3. Exit-head cost (target ≤ 10 % of decode time with pruning)", "",
            "Cost per consulted layer = (time with a decision at every layer j..L−1 and no exit, forced) − (λ = 1 "
            "time), divided by L − j; it includes the full-vocabulary decision at layer j (pruning selects the k "
            "rows there). *Share, certified run*: that cost × decisions per token ÷ time per token, with the "
            "certified run's exit layers replayed (forced) with and without pruning.", "",
            "| model | pruning | cost per consulted layer (µs) | share when every layer j..L−1 decides | "
            "time, certified exits replayed (ms/token) | share, certified run |", "|---|---|---|---|---|---|"]
    for model_name, head, j in (("T5-large shape (j = 4, k = 2048)", t5.get("t5.head_cost"), 4),
                                ("SmolLM2 (j = 20, k = 256)", sm.get("smollm2.head_cost"), 20)):
        if not head:
            continue
        for pruning in ("none", "fixed"):
            r = head.get(pruning)
            replay = head.get(f"replay_{pruning}") or {}
            out.append(f"| {model_name} | {pruning} | {fmt(r['decision_us_per_layer'], 1)} | "
                       f"{fmt(100 * r['decision_share_when_all_decide'], 1)} % | {fmt(replay.get('ms_per_token'))} | "
                       f"{fmt(100 * replay['estimated_head_share'], 1) + ' %' if replay else '–'} |")
    out.append("")
    if pieces:
        out += ["Where a decided layer's time goes — single captured pieces replayed 200× between CUDA events "
                "(random weights of each model's exact shape, batch 1, k = 256, best of 3; µs):", "",
                "| piece | T5-large shape (j = 16) | SmolLM2 shape (j = 20) |", "|---|---|---|"]
        a, b = pieces.get("pieces.t5_large_shape", {}), pieces.get("pieces.smollm2_shape", {})
        for key, label in (("full_step", "whole full-model step (one graph: embed, L layers, final head)"),
                           ("last_layer_no_decision", "one layer (its own graph, no decision)"),
                           ("layer_with_decision", "one layer + its exit decision"),
                           ("decision", "→ the decision alone (pruned head, scorer, state update, flag)"),
                           ("flag_copy_and_event", "flag copy to pinned host memory + event"),
                           ("kv_tail_from_j", "K/V tail of every layer above j (one batched product)"),
                           ("final_head_step_end", "final full head + step end"),
                           ("step_end_no_head", "step end without the final head"),
                           ("host_launch_us_per_decided_layer", "host time to launch one decided layer")):
            out.append(f"| {label} | {fmt(a.get(key), 1)} | {fmt(b.get(key), 1)} |")
        out.append("")

    # ---- 4 ---------------------------------------------------------------------------------------------
    sweep = sm.get("smollm2.sweep_and_certify")
    out += ["### 4. The sweep's cost (target ≤ 2× one full-model pass)", ""]
    if sweep:
        out.append(f"K = {sweep['K']} candidates (the grid in the script, 1.0 … 0.5) plus the full model as "
                   f"K + 1 = {sweep['K'] + 1} rows of one batch per prompt — the plain sweep, no sharing — run by the "
                   f"fast path over n = {sweep['n']} SmolLM2 calibration prompts: "
                   f"{fmt(sweep['sweep_seconds_per_prompt'] * 1000, 1)} ms per prompt against "
                   f"{fmt(sweep['full_pass_seconds_per_prompt'] * 1000, 1)} ms for one full-model pass at batch 1 "
                   f"(same prompts, first 24) — **{fmt(sweep['sweep_over_full_pass'])}×**. The batch costs little "
                   f"more than one row because a step is bound by launches, not arithmetic; the rest is the exit "
                   f"decisions of the 20 candidate rows at layers j..L−1. (An untimed warm-up covered one prompt per "
                   f"prompt-length group, so a graph capture may sit inside the timed sweep: the ratio is an upper "
                   f"bound.) `benchmarks/bench_sweep.py` (grid sharing) had no `--device` option at the time of the "
                   f"GPU run and was not run there.")
        out.append("")
        out += ["Certification from that table (ROUGE-L textual consistency against the full model, "
                "Hoeffding–Bentkus, fixed-sequence, ε = 0.05):", "",
                "| λ | 1.0 | 0.9999 | 0.9995 | 0.999 | 0.998 | 0.995 | 0.99 | 0.98 | 0.95 | 0.9 | 0.8 | 0.5 |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        keys = ["1.0", "0.9999", "0.9995", "0.999", "0.998", "0.995", "0.99", "0.98", "0.95", "0.9", "0.8", "0.5"]
        out.append("| empirical risk | " + " | ".join(fmt(sweep["empirical_risk"].get(k), 3) for k in keys) + " |")
        out.append("| mean layers | " + " | ".join(fmt(sweep["mean_layers"].get(k), 1) for k in keys) + " |")
        out.append("")
        out.append("Certified λ: " + "; ".join(f"δ = {d}: **{c['lambda_hat']}**" for d, c in sweep["certificates"].items())
                   + ". SmolLM2 was not trained for early exit: its intermediate layers are confidently wrong, so "
                   "every λ below 0.9999 changes the continuation of some prompts and only thresholds that keep "
                   "~96 % of the layers certify.")
        out.append("")

    # ---- 5 ---------------------------------------------------------------------------------------------
    out += ["### 5. Peak GPU memory", "",
            "Peak allocated during the timed pass, and above what was allocated when it began (weights: T5-large "
            "shape ≈ 2.8 GiB fp32, SmolLM2 257 MiB bf16; our column includes every captured session of that "
            "decoder: buffers, graph pools, the stacked K/V weights).", "",
            "| path | T5: peak (MiB) | T5: above start (MiB) | SmolLM2: peak (MiB) | SmolLM2: above start (MiB) |",
            "|---|---|---|---|---|"]
    for label, tk, sk in (("library `generate` (default)", "t5.generate_default", "smollm2.generate_default"),
                          ("library `generate`, static + compile", "t5.generate_static_compiled",
                           "smollm2.generate_static_compiled"),
                          ("ours, full model", "t5.ours_full", "smollm2.ours_full")):
        a, b = t5.get(tk) or {}, sm.get(sk) or {}
        out.append(f"| {label} | {fmt(a.get('peak_mib'), 0)} | {fmt(a.get('extra_mib'), 0)} | "
                   f"{fmt(b.get('peak_mib'), 0)} | {fmt(b.get('extra_mib'), 0)} |")
    if cert:
        r = next((v for k, v in cert.items() if v["certified_for_delta"] and k != "1.0"), None)
        if r:
            out.append(f"| ours, certified λ | – | – | {fmt(r['peak_mib'], 0)} | – |")
    if sweep:
        out.append(f"| ours, sweep ({sweep['K'] + 1} rows) | – | – | {fmt(sweep['peak_mib'], 0)} | "
                   f"{fmt(sweep['extra_mib'], 0)} |")
    out.append("")

    # ---- batch ---------------------------------------------------------------------------------------------
    batch = sm.get("smollm2.batch_throughput")
    if batch:
        out += ["### Batch > 1 (SmolLM2, 16 prompts, 32 new tokens)", "",
                f"Policy: every row exits at its own layer (outputs equal decoding it alone); a layer runs in full "
                f"while any live row is undecided, only the batched K/V tail once all have exited; rows that finish "
                f"stay in the static batch until the batch ends (no compaction). λ = {batch['threshold']} (certified, "
                f"δ = 0.2).", "",
                "| batch | ours, certified λ (tokens/s) | ours, λ = 1 (tokens/s) | library `generate` (tokens/s) |",
                "|---|---|---|---|"]
        runs = batch["runs"]
        for size in (1, 4, 16):
            c, f = runs.get(f"ours_certified_b{size}", {}), runs.get(f"ours_full_b{size}", {})
            lib = runs.get(f"generate_default_b{size}", {})
            note = " ³" if size == 4 else ""
            out.append(f"| {size} | {fmt(c.get('tokens_per_s'), 0)}{note} | {fmt(f.get('tokens_per_s'), 0)}{note} | "
                       f"{fmt(lib.get('tokens_per_s'), 0) if lib else '–'} |")
        out += ["", "³ Not a clean measurement: only the first of the four batches was warmed up, so graph captures "
                "for the other batch shapes (their padded widths fall in other cache buckets) are inside the timed "
                "pass (per-step time 2.5× that of batch 1 and 16). Batch 1 and batch 16 (one batch, warmed) are clean.",
                "", "At batch 16 the certified λ is slower than λ = 1: rows seldom all exit at the same layer, so "
                "no layer is skipped while every row pays its decisions. With this policy early exit pays at "
                "batch 1 (latency), not for throughput; the fast path's full model gives "
                f"{fmt(runs.get('ours_full_b16', {}).get('tokens_per_s', 0) / max(runs.get('generate_default_b16', {}).get('tokens_per_s', 1), 1), 1)}× "
                "the library's throughput at batch 16.", ""]

    # ---- exactness -------------------------------------------------------------------------------------------
    out += ["### Exactness on the GPU", ""]
    out.append("* `LTT_FAST_TEST_DEVICE=cuda python -m pytest tests/test_decode_fast.py`: **57 passed** on the H200 "
               "with CUDA graphs (float64 tiny T5 / Llama / Qwen2 / Mistral-sliding-window models: tokens, exit "
               "layers, confidences to 1e-9 and cost accounts identical to the generic decoder for every scorer × "
               "pruning, τ > 0, per-row thresholds, padding, EOS, lookahead 0–3; λ = 1 equal to the library's "
               "`generate`). Log: `benchmarks/results/gpu_tests.log`.")
    ex5 = t5.get("t5.exactness_vs_generic") or []
    if ex5:
        same = sum(r["same_tokens"] and r["same_exit_layers"] for r in ex5)
        out.append(f"* T5-large shape, fp32, real softmax-margin decisions, fast vs generic decoder: {same}/{len(ex5)} "
                   f"sequences identical (tokens and exit layers) — but random weights put every exit at j, so this "
                   f"checks little beyond the full path.")
    exs = sm.get("smollm2.exactness_vs_generic") or []
    if exs:
        tok = sum(r["same_tokens"] for r in exs)
        lay = sum(r["same_exit_layers"] for r in exs)
        out.append(f"* SmolLM2, **bf16**, λ ∈ {{{', '.join(sorted({str(r['threshold']) for r in exs}))}}}, fast vs "
                   f"generic decoder: tokens identical in {tok}/{len(exs)} sequences, exit layers in {lay}/{len(exs)}. "
                   f"bf16 rounding differs between the kernels of the two paths (attention over the static cache "
                   f"with a mask vs the dynamic cache, the batched K/V tail vs per-layer projections); with a margin "
                   f"threshold of 0.999 that flips some decisions and then the continuation. The library's own paths "
                   f"differ the same way (our full model vs its default `generate`: "
                   f"{(sm.get('smollm2.generate_default') or {}).get('ours_full_same_tokens')} identical). In bf16, "
                   f"calibrate with the path you serve with (this benchmark's sweep ran on the fast path).")
    out.append("")

    # ---- verdict -----------------------------------------------------------------------------------------------
    out += ["### Targets", ""]
    out += verdicts(t5, sm, t5f, pieces, cert, sm_full)
    errors = {}
    for data in parts.values():
        errors.update(data.get("errors", {}))
    if errors:
        out += ["", "### Sections that failed", ""]
        for name, error in errors.items():
            out.append(f"* `{name}`: {error.splitlines()[0]}")
    return out


def verdicts(t5, sm, t5f, pieces, cert, sm_full) -> list[str]:
    out = []
    fractions = []
    if sm_full:
        fractions += [row[3] for row in _ratio_rows({k: v for k, v in cert.items() if k != "1.0"}, sm_full).values()]
    matched = t5f.get("t5.forced_matched_j")
    if matched:
        fractions += [row[3] for row in _ratio_rows(matched["runs"], matched["full_ms_per_token"]).values()]
    uniform = t5f.get("t5.forced_uniform_j1")
    a, b = pieces.get("pieces.t5_large_shape", {}), pieces.get("pieces.smollm2_shape", {})
    if fractions:
        out.append(f"* **Speed-up vs ideal ≥ 0.8: met** for every SmolLM2 threshold and every recorded distribution "
                   f"on the T5-large shape at the matching j ({min(fractions):.2f}–{max(fractions):.2f}). But at the "
                   f"*certified* thresholds the ideal itself is only ≈ 1.04–1.05 (28.7 of 30 layers), and the achieved "
                   f"speed-up is below 1 (0.93–0.96): the exit decisions cost more than the ~1.2 layers they save.")
    if uniform:
        row = next(iter(_ratio_rows(uniform["runs"], uniform["full_ms_per_token"]).values()))
        first = sm.get("t5.forced_from_smollm2")
        worst = min(r[3] for r in _ratio_rows(first["runs"], first["full_ms_per_token"]).values()) if first else None
        out.append(f"* **Missed** where many layers decide and exits are deep: uniform exit depth with j = 1 "
                   f"({row[3]:.2f} of ideal: {row[4]:.1f} decisions per token), and the first T5 run with j = 4 "
                   f"(down to {fmt(worst)}, ~15–19 decisions per token). Measured limits: a decision costs "
                   f"{fmt(a.get('decision'), 1)} µs (T5) / {fmt(b.get('decision'), 1)} µs (SmolLM2) of device time plus "
                   f"{fmt(a.get('flag_copy_and_event'), 1)} / {fmt(b.get('flag_copy_and_event'), 1)} µs for the flag copy, "
                   f"against {fmt(a.get('last_layer_no_decision'), 0)} / {fmt(b.get('last_layer_no_decision'), 0)} µs "
                   f"per layer — each consulted layer adds ~25–35 % of a layer; the layer queued past an exit "
                   f"(lookahead 1) runs in full instead of its K/V; and per-call work outside the step graphs (the "
                   f"eager encoder / prompt prefill, loading the prompt state: the T5 full step replays in "
                   f"{fmt(a.get('full_step', 0) / 1000)} ms of the {fmt(matched['full_ms_per_token'] if matched else None)} "
                   f"ms per token) does not shrink with exits but is counted in the ideal.")
    head = sm.get("smollm2.head_cost") or {}
    if head.get("replay_fixed"):
        out.append(f"* **Exit-head cost ≤ 10 % with pruning: missed** — "
                   f"{100 * head['replay_fixed']['estimated_head_share']:.1f} % in the certified SmolLM2 run with k = 256 "
                   f"(without pruning {100 * head['replay_none']['estimated_head_share']:.1f} %); the T5-large shape with "
                   f"every layer deciding: {100 * t5['t5.head_cost']['fixed']['decision_share_when_all_decide']:.1f} % "
                   f"(k = 2048) vs {100 * t5['t5.head_cost']['none']['decision_share_when_all_decide']:.1f} % unpruned. "
                   f"What remains is not the head's arithmetic (k rows × d) but kernel launches: the fused, compiled "
                   f"decision is still several kernels (norm, head rows, softmax/top-2, state update) plus the flag "
                   f"copy, ~{fmt(b.get('decision', 0) + b.get('flag_copy_and_event', 0), 0)} µs per decided layer.")
    sweep = sm.get("smollm2.sweep_and_certify")
    if sweep:
        out.append(f"* **Sweep ≤ 2× a full pass: met** ({sweep['sweep_over_full_pass']:.2f}×, plain K + 1-row batches on "
                   f"the fast path).")
    dg = t5.get("t5.generate_default") or {}
    df = sm.get("smollm2.generate_default") or {}
    if dg and df and sm_full:
        out.append(f"* **Full-model path at least as fast as the library's default `generate`: met** "
                   f"({t5['t5.ours_full']['ms_per_token']:.2f} vs {dg['ms_per_token']:.1f} ms/token on the T5-large shape, "
                   f"{sm_full:.2f} vs {df['ms_per_token']:.1f} on SmolLM2), and faster than `generate` with a static cache "
                   f"and `torch.compile`.")
    return out
