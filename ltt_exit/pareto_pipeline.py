"""``ltt-calibrate --space`` / ``--risks``: sweep a configuration space and certify it with Pareto Testing.

``add_pareto_options`` adds the options to ltt-calibrate's parser; ``space_table_from_model`` loads
the model and calibration set, reuses a cached space table or runs the (resumable) space sweep;
``run_pareto_certification`` certifies a :class:`~ltt_exit.space_table.SpaceTable` with
:func:`ltt_exit.certify.certify_pareto` and writes the certificate, whose metadata carries the
chosen configuration's decoder settings so that ``ltt-generate`` decodes with exactly that one.
torch is imported only when decoding runs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ltt_exit.cli._arguments import open_unit
from ltt_exit.space_table import RISK_COLUMNS, SpaceTable

__all__ = ["add_pareto_options", "parse_risks", "space_table_from_model", "run_pareto_certification", "describe_pareto"]

COSTS = ("mean_layers", "flops")


def parse_risks(text: str) -> dict[str, float]:
    """``"textual=0.1,risk=0.05"`` → ``{"textual": 0.1, "risk": 0.05}`` (δ_r per risk, each in (0, 1))."""
    risks: dict[str, float] = {}
    for piece in text.replace(" ", "").split(","):
        name, sep, value = piece.partition("=")
        if not sep or name not in RISK_COLUMNS:
            raise argparse.ArgumentTypeError(
                f"--risks takes NAME=δ pairs separated by commas with NAME in {sorted(RISK_COLUMNS)}; got {text!r}")
        try:
            delta = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--risks: δ for {name!r} must be a number; got {value!r}") from None
        if not 0.0 < delta < 1.0 or name in risks:
            raise argparse.ArgumentTypeError(f"--risks: each risk once, δ strictly between 0 and 1; got {text!r}")
        risks[name] = delta
    return risks


def add_pareto_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "several knobs and risks at once (Pareto Testing; docs/certification.md#pareto-testing)",
        "With --space the sweep decodes every configuration of a space (λ grid × minimum exit layer × pruning "
        "× scorer) and Pareto Testing certifies one configuration: the calibration examples are split, the "
        "Pareto front of (risk, cost) is estimated on one part and tested in order on the other.")
    group.add_argument("--space", metavar="FILE|YAML",
                       help="configuration space: a YAML/JSON file or the same text inline, e.g. "
                            "'{min_exit_layer: [10, 15, 20], scorer: [softmax-margin, softmax-max]}'; knobs it "
                            "leaves out take --grid, --min-exit-layer, --pruning, --scorer, --tau (docs/pipeline.md)")
    group.add_argument("--risks", type=parse_risks, metavar="NAME=δ,…",
                       help="several risks, each with its own δ, e.g. textual=0.1,risk=0.05 (risk needs references); "
                            "a configuration is certified only if every risk is. Default: --loss at --delta")
    group.add_argument("--split", type=open_unit("--split"), default=0.5, metavar="F",
                       help="fraction of the calibration examples that estimates the Pareto front (default 0.5); "
                            "the rest tests it. Split with --seed (recorded)")
    group.add_argument("--cost", choices=COSTS, default="mean_layers",
                       help="cost Pareto Testing minimises: mean exit layer (default) or FLOPs relative to the full model")
    group.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                       help="stop the space sweep after about this long (resume by running the same command again)")


def _log(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


def risks_of(args) -> dict[str, float]:
    """δ per risk: --risks, else --loss at --delta."""
    if args.risks:
        return dict(args.risks)
    if args.delta is None:
        raise ValueError("give --delta (one risk) or --risks NAME=δ,… (several)")
    return {args.loss: args.delta}


def space_table_from_model(args: argparse.Namespace):
    """Load model and calibration set, then reuse or build the space table. Returns (table or None, info)."""
    from ltt_exit.models import load_model
    from ltt_exit.models.gguf_cache import default_cache_dir
    from ltt_exit.pipeline import default_batch_prompts, sweep_metadata
    from ltt_exit.recipes import load_recipe
    from ltt_exit.sweep.space import load_space, run_space_sweep, space_sweep_key

    for option in ("size", "batch_prompts", "threads", "max_new_tokens"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    space = load_space(args.space, {
        "lambdas": args.grid, "min_exit_layer": args.min_exit_layer, "tau": args.tau,
        "pruning": {"name": args.pruning, "params": args.pruning_params},
        "scorer": {"name": args.scorer, "params": args.scorer_params},
    })
    recipe = load_recipe(args.recipe)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    _log(args, f"loading model {args.model!r} …")
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir)
    _log(args, f"  {loaded.source}; {loaded.num_layers} decoder layers ({time.perf_counter() - started:.1f}s)")
    calibration_set = recipe.load(size=args.size, seed=args.sample_seed, data_files=args.data_files,
                                  data_dir=args.data_dir, family=loaded.family, tokenizer=loaded.tokenizer)
    _log(args, f"calibration set: {calibration_set.describe()}")
    adapters = None
    if args.exit_adapters:
        from ltt_exit.decode.adapters import ExitAdapters

        adapters = ExitAdapters.load(args.exit_adapters, model_fingerprint=loaded.fingerprint)
    from ltt_exit.decode import EarlyExitDecoder

    decoders = [EarlyExitDecoder(loaded.model, loaded.tokenizer, **s.decoder_kwargs(), exit_adapters=adapters)
                for s in space.settings]
    max_new_tokens = args.max_new_tokens or calibration_set.max_new_tokens
    key = space_sweep_key(loaded.fingerprint, [d.config_dict() for d in decoders], space, calibration_set.fingerprint,
                          max_new_tokens, calibration_set.metric)
    cache_root = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    cached = cache_root / "space-tables" / (key.split(":", 1)[1][:32] + ".parquet")
    info = {"model": loaded, "calibration_set": calibration_set, "table_path": cached, "reused": False}
    if cached.exists() and not args.no_table_cache:
        table = SpaceTable.load(cached)
        if table.metadata.get("space_sweep_key") == key:
            _log(args, f"reusing the space table swept before with this configuration: {cached}")
            info["reused"] = True
            _keep_copy(table, args)
            return table, info
    cached.parent.mkdir(parents=True, exist_ok=True)
    _log(args, f"sweeping {len(space)} configurations ({len(space.settings)} settings) over "
               f"{len(calibration_set.examples)} prompts (max {max_new_tokens} new tokens each) …")
    metadata = sweep_metadata(args, loaded, calibration_set, decoders[0].backend.device)
    result = run_space_sweep(
        loaded.model, loaded.tokenizer, calibration_set, space, max_new_tokens=max_new_tokens,
        metric=calibration_set.metric, out_path=cached, model_fingerprint=loaded.fingerprint,
        prompts_per_batch=args.batch_prompts or default_batch_prompts(decoders[0].backend.device.type),
        exit_adapters=adapters, metadata=metadata, progress=not getattr(args, "quiet", False),
        time_budget_s=args.time_budget)
    info["sweep_seconds"] = result.seconds
    if result.table is None:
        _log(args, f"time budget reached: {result.remaining_examples} prompts left; run the same command again to resume")
        return None, info
    _log(args, f"sweep done in {result.seconds:.1f}s; space table {cached}")
    _keep_copy(result.table, args)
    return result.table, info


def _keep_copy(table: SpaceTable, args) -> None:
    if getattr(args, "table_out", None):
        table.save(args.table_out)


def run_pareto_certification(table: SpaceTable, args: argparse.Namespace, out: Path):
    """Certify ``table`` with Pareto Testing (options in ``args``), write the certificate, print a summary."""
    from ltt_exit.certify import certify_pareto

    risks = risks_of(args)
    losses = table.losses(list(risks))
    costs = table.cost(getattr(args, "cost", "mean_layers"))
    configurations = table.full_configurations()
    safe = next((j for j, c in enumerate(configurations) if c["lambda"] >= 1.0), None)
    if safe is None:
        raise ValueError("the space has no configuration with λ ≥ 1 (the full model), which Pareto Testing "
                         "falls back to when nothing is certified; add 1.0 to the λ grid")
    metadata = dict(table.metadata)
    metadata["calibration_source"] = {
        "space_table": table.source, "metric": table.metadata.get("metric"),
        "cost": getattr(args, "cost", "mean_layers"), "risks": risks,
    }
    certificate = certify_pareto(
        losses, costs, list(risks.values()), args.epsilon, split=args.split, seed=args.seed,
        pvalue=args.pvalue, configurations=configurations, safe_index=safe, risk_names=list(risks),
        metadata=metadata,
    )
    # ltt-generate reads the decoder settings from here (apply checks they equal pareto.configuration)
    chosen = certificate.pareto["configuration"]
    certificate = _with_decoder(certificate, chosen["decoder"])
    certificate.save(out)
    if not getattr(args, "quiet", False):
        print(certificate.summary())
        print(describe_pareto(table, certificate, costs))
        print(f"certificate written to {out}")
    return certificate


def _with_decoder(certificate, decoder: dict):
    import dataclasses

    return dataclasses.replace(certificate, metadata=dict(certificate.metadata, decoder=decoder))


def describe_pareto(table: SpaceTable, certificate, costs) -> str:
    """Mean layers and FLOPs ratio of the configuration to decode with, on the whole table."""
    import numpy as np

    index = certificate.chosen_index if certificate.certified_any else certificate.pareto["safe_index"]
    layers = float(np.mean(table.values["mean_layers"][:, index]))
    flops = float(np.sum(table.values["flops"][:, index]) / np.sum(table.values["full_flops"][:, index]))
    num_layers = table.metadata.get("num_layers")
    speed = f" (estimated speed-up {num_layers / layers:.2f}× in decoder layers)" if num_layers else ""
    return f"  mean exit layer {layers:.2f} of {num_layers}{speed}; work {flops:.2f}× the full model's FLOPs"
