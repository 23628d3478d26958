"""Helpers the benchmark scripts share, so that each script holds only what it measures.

* result writing: :func:`write_json` (atomic, indented), :class:`Results` (named sections, each timed,
  a failing section recorded with its error, the file rewritten after each), :func:`environment`
* timing: :func:`sync`, :func:`clock` (wall seconds of a call, CUDA synchronised), :func:`best_time`
  (best of n, wall and CPU), :func:`per_token` (ms per generated token), :class:`PeakMemory`
* model shapes: :func:`t5_model` (T5-large shape or a tiny one), :func:`t5_prompts`,
  :func:`smollm2_shape` (random-weight Llama of SmolLM2-135M's shape)
* the decoder under measurement: :func:`make_fast` (fast path with graceful fallbacks), :func:`describe_fast`,
  :func:`mean_layers`, :func:`consults_per_token`
* real prompts: :func:`add_samsum_arguments` and :func:`samsum_prompts` (SAMSum through the project's recipe,
  the study table's reductions by name in :data:`STUDY_PRUNINGS`)

Scripts run with their own folder on ``sys.path`` and import this as ``from _common import ...``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


# ---- result writing -------------------------------------------------------------------------------------
def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        json.dump(data, handle, indent=1, default=str)
    os.replace(handle.name, path)


def best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """Best wall time of ``repeats`` calls of ``fn`` (CUDA synchronised), the process CPU time of that call
    (all threads; less sensitive than wall time to other processes on a shared machine), and the last value."""
    best, best_cpu, value = float("inf"), float("inf"), None
    for _ in range(repeats):
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        value = fn()
        sync()
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        if wall < best:
            best, best_cpu = wall, cpu
    return best, best_cpu, value


class Results:
    def __init__(self, path: Path, part: str, args):
        self.path = path
        self.data = {"part": part, "args": vars(args), "environment": environment(), "sections": {}, "errors": {}}
        self.started = time.perf_counter()

    def save(self):
        write_json(self.path, self.data)

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
    return {"cuda_graphs": decoder.uses_cuda_graphs, "compile": decoder.compile_backend, "lookahead": decoder.lookahead,
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


# ---- real prompts: SAMSum through the project's recipe --------------------------------------------------
SAMSUM_RECIPE = ROOT / "benchmarks" / "data" / "samsum_jsonl_recipe.yaml"
#: the study table's reductions (docs/study_table.md) by the names the scripts' --pruning takes
STUDY_PRUNINGS = {"decaying": ("decaying", {"k_max": 1000, "k_min": 10}), "fixed": ("fixed", {"k": 1000}),
                  "none": "none"}


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file {path}")
    return path


def add_samsum_arguments(parser: argparse.ArgumentParser, *, prompts: int, max_new_tokens: int) -> None:
    """--model, --data, --prompts, --max-new-tokens and --pruning, as the SAMSum benchmarks take them."""
    parser.add_argument("--model", default="smollm2-135m", help="alias, folder or .gguf file")
    parser.add_argument("--data", type=_existing_file, default=str(ROOT.parent / "shared" / "data" / "samsum_test.jsonl"),
                        help="SAMSum JSON Lines file")
    parser.add_argument("--prompts", type=int, default=prompts)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--pruning", choices=sorted(STUDY_PRUNINGS), default="decaying")


def samsum_prompts(args: argparse.Namespace, loaded) -> list[str]:
    """The first ``args.prompts`` SAMSum prompts (seed 0) of ``args.data``, formatted for the loaded model. The
    project is imported here, after a script may have put another checkout first on sys.path."""
    from ltt_exit.recipes import load_recipe

    examples = load_recipe(SAMSUM_RECIPE).load(size=args.prompts, seed=0, data_files=[str(args.data)],
                                               family=loaded.family, tokenizer=loaded.tokenizer).examples
    return [example.prompt for example in examples]
