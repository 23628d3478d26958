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
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS_FILE = ROOT / "benchmarks" / "data" / "smollm2_lee_prompts.json"
# K = 20 candidates, fixed before the run, most conservative first; finer than the project's default grid
# near 1 because SmolLM2 (not trained for early exit) changes its text at every λ below 0.999
GRID = (1.0, 0.9999, 0.9995, 0.999, 0.998, 0.995, 0.99, 0.98, 0.97, 0.95,
        0.93, 0.9, 0.88, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5)
SECTION = "## GPU speed (issue 6)"


# ---- plumbing -------------------------------------------------------------------------------------------
class Results:
    def __init__(self, path: Path, part: str, args):
        self.path = path
        self.data = {"part": part, "args": vars(args), "environment": environment(), "sections": {}, "errors": {}}
        self.started = time.perf_counter()

    def save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as handle:
            json.dump(self.data, handle, indent=1, default=str)
        os.replace(handle.name, self.path)

    def section(self, name: str, fn, *args, limit_s: float | None = None, **kwargs):
        start = time.perf_counter()
        print(f"[{time.perf_counter() - self.started:7.1f}s] {name} ...", flush=True)
        if limit_s:
            def overtime(signum, frame):
                raise TimeoutError(f"section stopped after its limit of {limit_s:.0f} s")
            signal.signal(signal.SIGALRM, overtime)
            signal.alarm(int(limit_s))
        try:
            value = fn(*args, **kwargs)
            self.data["sections"][name] = value
        except Exception as error:  # recorded, the next sections still run
            value = None
            self.data["errors"][name] = f"{type(error).__name__}: {error}\n{traceback.format_exc()[-3000:]}"
            print(f"   FAILED: {type(error).__name__}: {error}", flush=True)
        finally:
            if limit_s:
                signal.alarm(0)
        took = time.perf_counter() - start
        self.data.setdefault("section_seconds", {})[name] = round(took, 2)
        print(f"   {name}: {took:.1f}s {short(value)}", flush=True)
        self.save()
        return value


def short(value, limit=400):
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def environment() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    info["cpu_count"] = os.cpu_count()
    return info


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clock(fn):
    sync()
    start = time.perf_counter()
    value = fn()
    sync()
    return time.perf_counter() - start, value


class PeakMemory:
    """Peak GPU memory allocated inside the block, above what was allocated when it began (MiB)."""

    def __enter__(self):
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            sync()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            sync()
            self.peak_mib = torch.cuda.max_memory_allocated() / 2**20
            self.extra_mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.peak_mib = self.extra_mib = float("nan")
        return False


def per_token(run_prompts, prompts, count_tokens, warm=True):
    """Run every prompt once (batch 1); ms per generated token over all of them, plus the outputs.
    With ``warm``, every prompt first runs once untimed, so no graph capture or compilation (one per
    cache-length bucket of the fast path) lands in the timed pass."""
    if warm:
        for item in prompts:
            run_prompts(item)
    seconds, outputs = clock(lambda: [run_prompts(p) for p in prompts])
    tokens = sum(count_tokens(o) for o in outputs)
    return 1000.0 * seconds / max(tokens, 1), tokens, outputs


def make_fast(model, tokenizer=None, *, attempts=None, **kwargs):
    """A FastEarlyExitDecoder with CUDA graphs and a compiled decision; falls back (recorded) when the
    device refuses either. Returns (decoder, notes)."""
    from ltt_exit.decode import FastEarlyExitDecoder

    cuda = next(model.parameters()).is_cuda
    attempts = attempts or ([dict(compile=True), dict(compile=False), dict(compile=False, cuda_graphs=False)]
                            if cuda else [dict(compile=False)])
    notes = []
    for options in attempts:
        decoder = FastEarlyExitDecoder(model, tokenizer, max_sessions=8, **kwargs, **options)
        try:
            warm = torch.randint(3, min(decoder.backend.vocab_size, 1000), (1, 8))
            decoder.generate(input_ids=warm, threshold=0.5, max_new_tokens=4, eos_token_id=[])
            return decoder, notes
        except Exception as error:
            notes.append(f"{options}: {type(error).__name__}: {str(error)[:300]}")
            print("   fast path attempt failed:", notes[-1], flush=True)
    raise RuntimeError("no fast decoder could run: " + " | ".join(notes))


def describe_fast(decoder):
    return {"cuda_graphs": decoder._graphs_on(), "compile": decoder.compile_backend, "lookahead": decoder.lookahead,
            "fused_decision": decoder.uses_fused_decision, "config": decoder.config_dict()}


def mean_layers(sequences, skip_first=False):
    layers = [x for s in sequences for x in (s.exit_layers[1:] if skip_first else s.exit_layers)]
    return float(np.mean(layers)) if layers else float("nan")


def consults_per_token(sequences, L, j, lookahead, skip_first):
    """Exit decisions the fast path runs per token: layers j..min(e, L-1), plus the layers it queued past an
    exit before it read the decision (lookahead), each of which also runs its decision."""
    counts = []
    for s in sequences:
        for e in (s.exit_layers[1:] if skip_first else s.exit_layers):
            if e >= L:
                counts.append(L - j)
            else:
                counts.append(min(e + lookahead, L - 1) - j + 1)
    return float(np.mean(counts)) if counts else float("nan")


# ---- T5-large shape -------------------------------------------------------------------------------------
def t5_model(quick: bool, device):
    from transformers import T5Config, T5ForConditionalGeneration

    if quick:
        config = T5Config(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=6, num_decoder_layers=6,
                          num_heads=4, feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0,
                          eos_token_id=1)
    else:  # the t5-large shape: 24 + 24 layers, d 1024, 16 heads, d_ff 4096, vocabulary 32128, tied embeddings
        config = T5Config(vocab_size=32128, d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_decoder_layers=24,
                          num_heads=16, feed_forward_proj="relu", tie_word_embeddings=True,
                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        model = T5ForConditionalGeneration(config)
    model.eval()
    model.generation_config.eos_token_id = None  # random weights: decode the whole budget on every path
    return model


def t5_prompts(model, count, length, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, model.config.vocab_size, (1, length), generator=generator) for _ in range(count)]


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


@torch.inference_mode()  # the session's buffers are inference tensors
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


def smollm2_shape(device, dtype=torch.bfloat16):
    """A random-weight Llama with SmolLM2-135M's exact shape (for device timings without the GGUF)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


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


# ---- SmolLM2 --------------------------------------------------------------------------------------------
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


# ---- report ---------------------------------------------------------------------------------------------
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
    out += ["Script: `benchmarks/bench_gpu_latency.py`; fast path: `ltt_exit.decode.FastEarlyExitDecoder` "
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
