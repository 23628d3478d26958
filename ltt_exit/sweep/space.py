"""The configuration space of an early-exit decoder, and the sweep that decodes all of it.

A *setting* is every knob but λ: minimum exit layer, pruning (none / fixed k / decaying k_max,
k_min), scorer (with its parameters) and decay τ. A *configuration* is a setting plus one λ of that
setting's grid. :class:`ConfigurationSpace` is declared in YAML/JSON (a file, or the same text
inline on the command line, ``ltt-calibrate --space``) as a product or as an explicit list:

    lambdas: [1.0, 0.999, 0.99, 0.95, 0.9]     # default: the sweep's grid (--grid)
    min_exit_layer: [10, 15, 20]
    pruning: [none, {name: fixed, k: 2000}, {name: decaying, k_max: 8000, k_min: 500}]
    scorer: [softmax-margin, softmax-max, {name: weighted-contrastive, alpha: 0.1}]
    tau: 0.0

    settings:                                  # or an explicit list of settings ...
      - {min_exit_layer: 15, pruning: decaying, scorer: softmax-margin}
      - {min_exit_layer: 20, pruning: none, scorer: softmax-max, lambdas: [1.0, 0.99]}

    configurations:                            # ... or of configurations (grouped by setting)
      - {lambda: 0.99, min_exit_layer: 15, pruning: none, scorer: softmax-margin}

Knobs a file leaves out take the command line's single values (``--min-exit-layer`` …).

:func:`run_space_sweep` decodes every configuration once per prompt: one decoder per setting, each
through the public shared-history grid decode (``EarlyExitDecoder.generate_grid``: the setting's
whole λ grid in one pass), and every configuration's losses are measured against one full-model
output per prompt (the first setting's; the full model does not depend on the setting, and the
other settings' full rows — shared with their λ ≈ 1 candidates inside the grid decode — are only
compared with it and counted in ``full_mismatches``). Progress is recorded per prompt in a
partial file beside the output (resumable, like :func:`ltt_exit.sweep.run_sweep`); an optional
time budget stops after the current batch so that long sweeps run in chunks. The result is a
:class:`~ltt_exit.space_table.SpaceTable`.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ltt_exit import __version__
from ltt_exit.space_table import SpaceTable
from ltt_exit.sweep.partial import PartialSweep
from ltt_exit.sweep.run import COST_MODEL_VERSION, check_examples, partial_path

__all__ = ["Setting", "ConfigurationSpace", "load_space", "SpaceSweepResult", "run_space_sweep", "space_sweep_key",
           "assemble_partial_space_table"]

_PRODUCT_KEYS = {"lambdas", "min_exit_layer", "pruning", "scorer", "tau"}
_SETTING_KEYS = {"min_exit_layer", "pruning", "scorer", "tau"}


@dataclass(frozen=True)
class Setting:
    """Every decoder knob but λ."""

    min_exit_layer: int
    pruning: tuple[str, tuple]   # (name, sorted (param, value) pairs): hashable
    scorer: tuple[str, tuple]
    tau: float = 0.0

    def knobs(self) -> dict[str, Any]:
        return {
            "min_exit_layer": self.min_exit_layer,
            "pruning": {"name": self.pruning[0], "params": dict(self.pruning[1])},
            "scorer": {"name": self.scorer[0], "params": dict(self.scorer[1])},
            "tau": self.tau,
        }

    def decoder_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``EarlyExitDecoder`` for this setting."""
        return {
            "scorer": (self.scorer[0], dict(self.scorer[1])),
            "pruning": (self.pruning[0], dict(self.pruning[1])),
            "min_exit_layer": self.min_exit_layer,
            "tau": self.tau,
        }


@dataclass(frozen=True)
class ConfigurationSpace:
    """Settings, each with its λ grid (strictly decreasing, most conservative first)."""

    settings: tuple[Setting, ...]
    lambdas: tuple[tuple[float, ...], ...]

    def __post_init__(self):
        if not self.settings or len(self.settings) != len(self.lambdas):
            raise ValueError("a configuration space needs at least one setting and one λ grid per setting")
        if len(set(self.settings)) != len(self.settings):
            raise ValueError("the configuration space lists a setting twice")
        for grid in self.lambdas:
            if not grid or any(not math.isfinite(x) for x in grid) or any(b >= a for a, b in zip(grid, grid[1:])):
                raise ValueError(f"every λ grid must be non-empty, finite and strictly decreasing; got {list(grid)}")

    def configurations(self) -> list[dict[str, Any]]:
        """One dict per configuration, settings in order and λ in grid order within each."""
        return [
            {"lambda": lam, "setting": s, **setting.knobs()}
            for s, (setting, grid) in enumerate(zip(self.settings, self.lambdas))
            for lam in grid
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"settings": [dict(s.knobs(), lambdas=list(g)) for s, g in zip(self.settings, self.lambdas)]}

    def __len__(self) -> int:
        return sum(len(g) for g in self.lambdas)


def _knob(value: Any, kind: str, where: str) -> tuple[str, tuple]:
    """A pruning / scorer knob from ``name`` or ``{name: ..., <param>: ...}`` / ``{name, params}``."""
    if isinstance(value, str) and value:
        return value, ()
    if isinstance(value, Mapping) and isinstance(value.get("name"), str):
        params = dict(value.get("params", {})) if "params" in value else {k: v for k, v in value.items() if k != "name"}
        return value["name"], tuple(sorted(params.items()))
    raise ValueError(f"{where}: {kind} must be a name or a mapping with a 'name'; got {value!r}")


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _setting(entry: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> Setting:
    merged = {**defaults, **entry}
    try:
        layer = merged["min_exit_layer"]
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise ValueError(f"min_exit_layer must be a whole number ≥ 1; got {layer!r}")
        tau = float(merged.get("tau", 0.0))
        return Setting(layer, _knob(merged["pruning"], "pruning", where), _knob(merged["scorer"], "scorer", where), tau)
    except KeyError as exc:
        raise ValueError(f"{where}: no {exc.args[0]!r} given (in the space or on the command line)") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def _grid(values: Any, where: str) -> tuple[float, ...]:
    try:
        grid = tuple(float(x) for x in _as_list(values))
    except (TypeError, ValueError):
        raise ValueError(f"{where}: lambdas must be numbers; got {values!r}") from None
    if not grid or any(b >= a for a, b in zip(grid, grid[1:])) or not all(map(math.isfinite, grid)):
        raise ValueError(f"{where}: lambdas must be finite and strictly decreasing (most conservative first); got {list(grid)}")
    return grid


def load_space(source: str | os.PathLike, defaults: Mapping[str, Any]) -> ConfigurationSpace:
    """Read a space from a YAML/JSON file, or from inline YAML/JSON text when ``source`` is no file.

    ``defaults`` supplies the knobs the space leaves out: ``lambdas``, ``min_exit_layer``,
    ``pruning``, ``scorer``, ``tau`` (``ltt-calibrate`` passes its single-value options).
    Errors name the file (or "--space") and the entry.
    """
    import yaml

    text, where = str(source), "--space"
    if Path(text).is_file():
        where = text
        text = Path(text).read_text(encoding="utf-8")
    elif text.endswith((".yaml", ".yml", ".json")):
        raise FileNotFoundError(f"space file {text!r} does not exist")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{where}: not valid YAML/JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: a space is a mapping (lambdas, min_exit_layer, pruning, scorer, tau, or settings / configurations)")
    explicit = [key for key in ("settings", "configurations") if key in data]
    knob_defaults = {k: v for k, v in defaults.items() if k in _SETTING_KEYS}
    default_grid = data.get("lambdas", defaults.get("lambdas"))
    if len(explicit) > 1:
        raise ValueError(f"{where}: give either settings or configurations, not both")
    if explicit:
        extra = set(data) - {explicit[0], "lambdas", "tau"}
        if extra:
            raise ValueError(f"{where}: unknown key(s) beside {explicit[0]}: {sorted(extra)}")
        entries = data[explicit[0]]
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{where}: {explicit[0]} must be a non-empty list")
        settings, grids = [], []
        for i, entry in enumerate(entries):
            here = f"{where}: {explicit[0]}[{i}]"
            if not isinstance(entry, Mapping):
                raise ValueError(f"{here} must be a mapping")
            allowed = _SETTING_KEYS | ({"lambdas"} if explicit[0] == "settings" else {"lambda"})
            unknown = set(entry) - allowed
            if unknown:
                raise ValueError(f"{here}: unknown key(s) {sorted(unknown)} (allowed: {sorted(allowed)})")
            setting = _setting({k: v for k, v in entry.items() if k in _SETTING_KEYS},
                               {**knob_defaults, **({"tau": data["tau"]} if "tau" in data else {})}, here)
            if explicit[0] == "settings":
                if setting in settings:
                    raise ValueError(f"{here}: the same setting is listed twice")
                settings.append(setting)
                grids.append(_grid(entry.get("lambdas", default_grid), here))
            else:
                if "lambda" not in entry:
                    raise ValueError(f"{here}: a configuration needs a lambda")
                if setting not in settings:
                    settings.append(setting)
                    grids.append([])
                grids[settings.index(setting)].append(float(entry["lambda"]))
        if explicit[0] == "configurations":
            grids = [tuple(sorted(set(g), reverse=True)) for g in grids]
        return ConfigurationSpace(tuple(settings), tuple(grids))
    unknown = set(data) - _PRODUCT_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: {sorted(_PRODUCT_KEYS)}, settings, configurations)")
    grid = _grid(default_grid, where)
    axes = {key: _as_list(data.get(key, knob_defaults.get(key))) for key in ("min_exit_layer", "pruning", "scorer", "tau")}
    settings = []
    for layer, pruning, scorer, tau in itertools.product(*axes.values()):
        setting = _setting({"min_exit_layer": layer, "pruning": pruning, "scorer": scorer, "tau": tau}, {}, where)
        if setting in settings:
            raise ValueError(f"{where}: the product lists the same setting twice ({setting.knobs()})")
        settings.append(setting)
    return ConfigurationSpace(tuple(settings), tuple(grid for _ in settings))


# --------------------------------------------------------------------------- the sweep
def space_sweep_key(model_fingerprint: str, decoder_configs: Sequence[dict], space: ConfigurationSpace,
                    dataset_fingerprint: str, max_new_tokens: int, metric: str) -> str:
    """Digest of everything that determines a space table's contents (not the batch layout)."""
    payload = {
        "model": model_fingerprint,
        "decoders": list(decoder_configs),
        "lambdas": [list(g) for g in space.lambdas],
        "dataset": dataset_fingerprint,
        "max_new_tokens": max_new_tokens,
        "metric": metric,
        "cost_model": COST_MODEL_VERSION,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@dataclass
class SpaceSweepResult:
    table: SpaceTable | None   # None while the sweep is incomplete (time budget reached)
    path: Path
    resumed_examples: int
    decoded_examples: int
    remaining_examples: int
    seconds: float


def _mean(values: Sequence[int]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _setting_record(metric: str, full, early, reference) -> dict[str, Any]:
    from ltt_exit import metrics

    texts = [seq.text for seq in early]
    record = {
        "text": texts,
        "num_tokens": [len(seq.token_ids) for seq in early],
        "mean_layers": [_mean(seq.exit_layers) for seq in early],
        "layers_total": [int(np.sum(seq.exit_layers)) for seq in early],
        "flops": [float(seq.cost.flops) for seq in early],
        "loss_textual": [float(metrics.textual_consistency_loss(metric, t, full.text)) for t in texts],
    }
    if reference is not None:
        record["loss_risk"] = [float(metrics.risk_consistency_loss(metric, t, full.text, reference)) for t in texts]
    return record


def run_space_sweep(
    model,
    tokenizer,
    calibration_set,
    space: ConfigurationSpace,
    *,
    max_new_tokens: int,
    metric: str,
    out_path: str | Path,
    model_fingerprint: str,
    prompts_per_batch: int = 1,
    exit_adapters: Any = None,
    metadata: dict | None = None,
    progress: bool = True,
    time_budget_s: float | None = None,
    after_example: Callable[[int], None] | None = None,
) -> SpaceSweepResult:
    """Decode every configuration of ``space`` on every calibration prompt; write a space table.

    ``calibration_set`` has ``examples`` (``id``, ``prompt``, ``reference``) and ``fingerprint``.
    A rerun resumes from the partial file beside ``out_path``. With ``time_budget_s`` the sweep
    stops after the batch that crosses the budget and returns ``table=None``; run it again to go on.
    """
    from tqdm.auto import tqdm

    if prompts_per_batch < 1 or max_new_tokens < 1:
        raise ValueError("prompts_per_batch and max_new_tokens must be at least 1")
    examples, decoders, decoder_configs, key = _prepare(model, tokenizer, calibration_set, space, max_new_tokens,
                                                        metric, model_fingerprint, exit_adapters)
    out_path = Path(out_path)
    partial = PartialSweep(partial_path(out_path), key)
    resumed = len(partial)
    todo = [ex for ex in examples if str(ex.id) not in partial]
    start = time.perf_counter()
    decoded = 0
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc="space sweep", unit="prompt",
               disable=not progress, dynamic_ncols=True)
    try:
        for first in range(0, len(todo), prompts_per_batch):
            if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                break
            group = todo[first:first + prompts_per_batch]
            prompts = [ex.prompt for ex in group]
            per_setting = [d.generate_grid(prompts, lambdas=list(grid), max_new_tokens=max_new_tokens)
                           for d, grid in zip(decoders, space.lambdas)]
            reference_full = per_setting[0][0]
            for i, ex in enumerate(group):
                full = reference_full[i]
                record = {
                    "full_text": full.text,
                    "full_num_tokens": len(full.token_ids),
                    "full_flops": float(full.cost.flops),
                    "full_mismatches": sum(list(fulls[i].token_ids) != list(full.token_ids) for fulls, _ in per_setting),
                    "settings": [_setting_record(metric, full, early[i], ex.reference) for _, early in per_setting],
                }
                partial.append(str(ex.id), record)
                decoded += 1
                bar.update(1)
                if after_example is not None:
                    after_example(decoded)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    remaining = len(examples) - len(partial)
    if remaining:
        return SpaceSweepResult(None, out_path, resumed, decoded, remaining, seconds)
    table = assemble_space_table(examples, partial.records, space, decoder_configs, metadata=_table_metadata(
        key, model_fingerprint, calibration_set, metric, max_new_tokens, decoders, space, metadata))
    table.save(out_path)
    partial.remove()
    return SpaceSweepResult(table, out_path, resumed, decoded, 0, seconds)


def _prepare(model, tokenizer, calibration_set, space: ConfigurationSpace, max_new_tokens: int, metric: str,
             model_fingerprint: str, exit_adapters: Any):
    """The examples, one decoder per setting, their configs and the sweep key (shared by the sweep and
    :func:`assemble_partial_space_table`, so that both open the same partial file)."""
    from ltt_exit.decode import EarlyExitDecoder

    examples = check_examples(calibration_set)
    decoders = [EarlyExitDecoder(model, tokenizer, **s.decoder_kwargs(), exit_adapters=exit_adapters) for s in space.settings]
    if exit_adapters is not None:
        exit_adapters.check_disjoint(calibration_set)
    decoder_configs = [d.config_dict() for d in decoders]
    key = space_sweep_key(model_fingerprint, decoder_configs, space, calibration_set.fingerprint, max_new_tokens, metric)
    return examples, decoders, decoder_configs, key


def _table_metadata(key: str, model_fingerprint: str, calibration_set, metric: str, max_new_tokens: int,
                    decoders: Sequence, space: ConfigurationSpace, metadata: dict | None) -> dict:
    return {
        "ltt_exit_version": __version__,
        "space_sweep_key": key,
        "model_fingerprint": model_fingerprint,
        "dataset_fingerprint": calibration_set.fingerprint,
        "metric": metric,
        "max_new_tokens": max_new_tokens,
        "num_layers": int(decoders[0].num_layers),
        "cost_model": COST_MODEL_VERSION,
        "space": space.to_dict(),
        **(metadata or {}),
    }


def assemble_partial_space_table(
    model,
    tokenizer,
    calibration_set,
    space: ConfigurationSpace,
    *,
    max_new_tokens: int,
    metric: str,
    out_path: str | Path,
    model_fingerprint: str,
    exit_adapters: Any = None,
    metadata: dict | None = None,
) -> SpaceTable | None:
    """The space table of the prompts an unfinished :func:`run_space_sweep` (same arguments) has
    recorded so far, in the calibration set's order; ``None`` when it has recorded none.

    Its metadata is the complete table's plus ``partial: {"n_swept": k, "n_planned": n}``. Neither the
    partial file nor ``out_path`` is touched (beyond cutting a torn last line, as a resume would), so
    the sweep can still be resumed; saving the returned table is the caller's choice."""
    examples, decoders, decoder_configs, key = _prepare(model, tokenizer, calibration_set, space, max_new_tokens,
                                                        metric, model_fingerprint, exit_adapters)
    partial = PartialSweep(partial_path(Path(out_path)), key)
    swept = [ex for ex in examples if str(ex.id) in partial]
    if not swept:
        return None
    meta = _table_metadata(key, model_fingerprint, calibration_set, metric, max_new_tokens, decoders, space, metadata)
    meta["partial"] = {"n_swept": len(swept), "n_planned": len(examples)}
    return assemble_space_table(swept, partial.records, space, decoder_configs, metadata=meta)


def assemble_space_table(examples, records: Mapping[str, dict], space: ConfigurationSpace,
                         decoder_configs: Sequence[dict], *, metadata: dict) -> SpaceTable:
    """Build the space table from per-example sweep records, in the calibration set's order."""
    rows = [records[str(ex.id)] for ex in examples]
    values: dict[str, np.ndarray] = {}
    names = ["loss_textual", "mean_layers", "layers_total", "num_tokens", "flops", "text"]
    if all("loss_risk" in s for r in rows for s in r["settings"]):
        names.append("loss_risk")
    for name in names:
        values[name] = np.array(
            [[v for s in r["settings"] for v in s[name]] for r in rows],
            dtype=object if name == "text" else np.float64,
        )
    k = len(space)
    values["full_flops"] = np.repeat(np.array([[r["full_flops"] for r in rows]], dtype=np.float64).T, k, axis=1)
    metadata = dict(metadata, full_mismatches=int(sum(r["full_mismatches"] for r in rows)))
    return SpaceTable([str(ex.id) for ex in examples], space.configurations(), decoder_configs, values, metadata)
