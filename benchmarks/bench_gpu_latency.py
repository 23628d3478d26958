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


def bucket_of(item, bucket=64):
    """The fast path's cache-length bucket of a prompt (graphs are captured once per bucket)."""
    prompt = item[0] if isinstance(item, tuple) else item
    length = prompt.shape[-1] if isinstance(prompt, torch.Tensor) else len(prompt)
    return -(-length // bucket)


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


def smollm2_shape(device):
    """A random-weight Llama with SmolLM2-135M's exact shape (for device timings without the GGUF)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16).eval()


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
        parts[data["part"]] = data
    lines = [SECTION, ""]
    lines.append("Script: `benchmarks/bench_gpu_latency.py` (fast path: `ltt_exit.decode.FastEarlyExitDecoder`, "
                 "docs/decoder.md § Fast path). One run of each command below on one NVIDIA H200; numbers are "
                 "wall-clock per generated token at batch 1 unless a row says otherwise (CUDA synchronised "
                 "around each timed region, after one untimed warm-up call).")
    lines.append("")
    for name, data in parts.items():
        env = data["environment"]
        lines.append(f"* `{name}`: `{data['args'].get('command_line', '')}` — {env.get('gpu', 'cpu')}, torch "
                     f"{env.get('torch')}, transformers {env.get('transformers')}, CUDA {env.get('cuda')}")
    lines.append("")
    body = render(parts)
    lines.extend(body)
    text = "\n".join(lines).rstrip() + "\n"
    if doc is None:
        print(text)
        return
    current = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if SECTION in current:
        start = current.index(SECTION)
        rest = current[start + len(SECTION):]
        end = rest.find("\n## ")
        current = current[:start] + (rest[end + 1:] if end >= 0 else "")
        current = current.rstrip() + "\n"
    new = current.rstrip() + "\n\n" + text
    with tempfile.NamedTemporaryFile("w", dir=doc.parent, delete=False, suffix=".tmp") as handle:
        handle.write(new)
    os.replace(handle.name, doc)
    print(f"wrote {doc}")


def render(parts) -> list[str]:
    """The tables of the section (kept separate so a partial run still renders what it has)."""
    out: list[str] = []
    t5 = parts.get("t5", {}).get("sections", {})
    sm = parts.get("smollm2", {}).get("sections", {})
    errors = {**parts.get("t5", {}).get("errors", {}), **parts.get("smollm2", {}).get("errors", {})}
    out += ["### 1. Per-token latency, batch 1", ""]
    out += ["| path | T5-large shape, fp32 (ms/token) | SmolLM2-135M, bf16 (ms/token) |", "|---|---|---|"]

    def cell(section, key="ms_per_token"):
        return fmt(section.get(key)) if section else "–"

    out.append(f"| library `generate` (default) | {cell(t5.get('t5.generate_default'))} | "
               f"{cell(sm.get('smollm2.generate_default'))} |")
    out.append(f"| library `generate`, static cache + `torch.compile` | {cell(t5.get('t5.generate_static_compiled'))} | "
               f"{cell(sm.get('smollm2.generate_static_compiled'))} |")
    out.append(f"| ours, λ above every confidence (full model) | {cell(t5.get('t5.ours_full'))} | "
               f"{cell(sm.get('smollm2.ours_full'))} |")
    forced = (sm.get("t5.forced_from_smollm2") or {}).get("runs", {})
    cert = (sm.get("smollm2.certified_latency") or {}).get("runs", {})
    certified_rows = {lam: r for lam, r in cert.items() if r["certified_for_delta"]}
    for lam, r in certified_rows.items():
        deltas = ", ".join(r["certified_for_delta"])
        t5_run = forced.get(f"smollm2_certified_delta_{r['certified_for_delta'][0]}", {})
        out.append(f"| ours at the certified λ = {lam} (δ = {deltas}) | {fmt(t5_run.get('ms_per_token'))} "
                   f"(exits forced) | {fmt(r['ms_per_token'])} |")
    out.append("")
    return out + render_rest(parts, t5, sm, forced, cert, errors)


def render_rest(parts, t5, sm, forced, cert, errors) -> list[str]:
    out: list[str] = []
    out += ["### 2. Speed-up against the ideal L / mean layers", ""]
    out += ["| model, λ | mean layers | ideal | achieved | achieved / ideal | exit decisions per token |",
            "|---|---|---|---|---|---|"]
    for lam, r in cert.items():
        tag = f" (certified, δ = {', '.join(r['certified_for_delta'])})" if r["certified_for_delta"] else ""
        out.append(f"| SmolLM2, λ = {lam}{tag} | {fmt(r['mean_layers'])} | {fmt(r['ideal_speedup'])} | "
                   f"{fmt(r['achieved_speedup'])} | {fmt(r['fraction_of_ideal'])} | {fmt(r['decisions_per_token'], 1)} |")
    for name, r in forced.items():
        out.append(f"| T5-large shape, exits forced from `{name}` | {fmt(r['mean_layers'])} | {fmt(r['ideal_speedup'])} | "
                   f"{fmt(r['achieved_speedup'])} | {fmt(r['fraction_of_ideal'])} | {fmt(r['decisions_per_token'], 1)} |")
    out.append("")
    out += ["### 3. Exit-head cost", ""]
    out += ["| model | pruning | decision cost per consulted layer (µs) | share of decode time when every layer "
            "j..L−1 decides | share in the replayed certified run |", "|---|---|---|---|---|"]
    for model_name, head in (("T5-large shape", t5.get("t5.head_cost")), ("SmolLM2", sm.get("smollm2.head_cost"))):
        if not head:
            continue
        for pruning in ("none", "fixed"):
            r = head.get(pruning)
            if not r:
                continue
            replay = head.get(f"replay_{pruning}", {})
            out.append(f"| {model_name} | {pruning} | {fmt(r['decision_us_per_layer'], 1)} | "
                       f"{fmt(100 * r['decision_share_when_all_decide'], 1)} % | "
                       f"{fmt(100 * replay['estimated_head_share'], 1) + ' %' if replay else '–'} |")
    out.append("")
    sweep = sm.get("smollm2.sweep_and_certify")
    out += ["### 4. The sweep's cost", ""]
    if sweep:
        out.append(f"K = {sweep['K']} candidates + the full model as K + 1 rows of one batch per prompt "
                   f"(the naive sweep, run by the fast path), n = {sweep['n']} calibration prompts: "
                   f"{fmt(sweep['sweep_seconds_per_prompt'] * 1000, 1)} ms per prompt against "
                   f"{fmt(sweep['full_pass_seconds_per_prompt'] * 1000, 1)} ms for one full-model pass "
                   f"(batch 1) — **{fmt(sweep['sweep_over_full_pass'])}×**.")
        out.append("")
    other = sm.get("sweep.bench_sweep_py")
    if other:
        out += ["`benchmarks/bench_sweep.py --device cuda` (grid sharing, generic decoder):", "", "```",
                other["stdout_tail"].strip()[-2000:], "```", ""]
    out += ["### 5. Peak GPU memory", ""]
    out += ["| path | T5-large shape: peak (MiB) | above the weights (MiB) | SmolLM2: peak (MiB) | above the weights (MiB) |",
            "|---|---|---|---|---|"]
    for label, t5_key, sm_key in (("library `generate` (default)", "t5.generate_default", "smollm2.generate_default"),
                                  ("library `generate`, static + compile", "t5.generate_static_compiled",
                                   "smollm2.generate_static_compiled"),
                                  ("ours, full model", "t5.ours_full", "smollm2.ours_full")):
        a, b = t5.get(t5_key) or {}, sm.get(sm_key) or {}
        out.append(f"| {label} | {fmt(a.get('peak_mib'), 0)} | {fmt(a.get('extra_mib'), 0)} | "
                   f"{fmt(b.get('peak_mib'), 0)} | {fmt(b.get('extra_mib'), 0)} |")
    if sweep:
        out.append(f"| ours, sweep (K + 1 = {sweep['K'] + 1} rows) | – | – | {fmt(sweep['peak_mib'], 0)} | "
                   f"{fmt(sweep['extra_mib'], 0)} |")
    out.append("")
    batch = sm.get("smollm2.batch_throughput")
    if batch:
        out += ["### Batch > 1 (SmolLM2)", ""]
        out.append(f"Policy: {batch['policy']}; λ = {batch['threshold']}.")
        out.append("")
        out += ["| run | tokens/s | mean layers |", "|---|---|---|"]
        for name, r in batch["runs"].items():
            out.append(f"| {name} | {fmt(r['tokens_per_s'], 0)} | {fmt(r.get('mean_layers'))} |")
        out.append("")
    if errors:
        out += ["### Sections that failed", ""]
        for name, error in errors.items():
            out.append(f"* `{name}`: {error.splitlines()[0]}")
        out.append("")
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
