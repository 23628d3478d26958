"""Decode once, calibrate many times.

For every calibration prompt the sweep decodes the full model once and then every candidate λ of a
grid fixed before any data is seen, computes the per-example losses of each candidate against the
full model (textual consistency) and, where the recipe has references, against them (risk
consistency), and writes one loss table. Any (δ, ε) is then certified from that table without
decoding again.

Progress is recorded per prompt in a partial file beside the output, so a killed sweep resumes
where it stopped with no lost or duplicated rows.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ltt_exit import __version__
from ltt_exit.loss_table import LossTable
from ltt_exit.sweep.partial import PartialSweep

# Fixed before looking at any data, most conservative first. λ = 1.0 never exits (the decoder's
# rule), so its losses are exactly 0. Dense just below 1: margin and max-probability confidences
# of models not trained for early exit saturate, and their outputs already change below λ ≈ 0.999
# (measured on SmolLM2-135M); coarse further down.
DEFAULT_GRID: tuple[float, ...] = (
    1.0, 0.9999, 0.9995, 0.999, 0.998, 0.995, 0.99, 0.98, 0.97, 0.95,
    0.93, 0.9, 0.88, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5,
)

LOSS_KINDS = ("textual", "risk")
SWEEP_DECODINGS = ("grid", "rows")

#: version of the decoder's cost model (``ltt_exit.decode.outputs.CostAccount``) behind a table's cost
#: columns; 2: ``flops`` includes the exit adapters. Tables record it and their cache key changes with it.
COST_MODEL_VERSION = 2


@dataclass(frozen=True)
class SweepSpec:
    """What the sweep decodes and how it scores it.

    lambdas : candidate thresholds in a-priori order, most conservative (largest) first.
    max_new_tokens : generation budget N per prompt (also the N of the decaying threshold).
    metric : per-example similarity name from :mod:`ltt_exit.metrics`.
    loss : "textual" (1 − m(Y_early, Y_full)) or "risk" (excess loss against the reference).
    prompts_per_batch : prompts decoded together (each brings K + 1 rows).
    decoding : how the candidates are decoded (the same outputs in exact arithmetic, so not part of the
        table's key; in bf16 the two batch shapes round differently and flip greedy near-ties, even at λ = 1):
        "grid": ``decoder.generate_grid``, candidates that agree share a batch row (eager; the least
        arithmetic: the CPU's choice); "rows": one batch row per candidate through ``decoder.generate``
        (K + 1 rows per prompt, no sharing): with a ``FastEarlyExitDecoder`` on CUDA that is static buffers
        and CUDA graphs, where a step costs launches rather than arithmetic.
    """

    lambdas: tuple[float, ...] = DEFAULT_GRID
    max_new_tokens: int = 32
    metric: str = "rouge-l"
    loss: str = "textual"
    prompts_per_batch: int = 1
    decoding: str = "grid"

    def __post_init__(self):
        lambdas = tuple(float(x) for x in self.lambdas)
        object.__setattr__(self, "lambdas", lambdas)
        if not lambdas:
            raise ValueError("the candidate grid is empty")
        if any(not math.isfinite(x) for x in lambdas):
            raise ValueError(f"the candidate grid has a non-finite value: {lambdas}")
        if any(b >= a for a, b in zip(lambdas, lambdas[1:])):
            raise ValueError(
                "the candidate grid must be strictly decreasing (most conservative first), "
                f"got {list(lambdas)}"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"loss must be one of {LOSS_KINDS}, got {self.loss!r}")
        if self.prompts_per_batch < 1:
            raise ValueError(f"prompts_per_batch must be ≥ 1, got {self.prompts_per_batch}")
        if self.decoding not in SWEEP_DECODINGS:
            raise ValueError(f"decoding must be one of {SWEEP_DECODINGS}, got {self.decoding!r}")


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sweep_config_key(model_fingerprint: str, decoder_config: dict, dataset_fingerprint: str,
                     spec: SweepSpec) -> str:
    """A digest of everything that determines the table's contents (not the batch layout)."""
    payload = {
        "model": model_fingerprint,
        "decoder": decoder_config,
        "dataset": dataset_fingerprint,
        "lambdas": list(spec.lambdas),
        "max_new_tokens": spec.max_new_tokens,
        "metric": spec.metric,
        "loss": spec.loss,
        "cost_model": COST_MODEL_VERSION,  # the table's flops column follows the cost model
    }
    return "sha256:" + hashlib.sha256(_canonical(payload).encode()).hexdigest()


def _mean_layers(exit_layers: Sequence[int]) -> float:
    return float(np.mean(exit_layers)) if len(exit_layers) else float("nan")


def decode_candidates(decoder, prompts: list[str], lambdas: Sequence[float], max_new_tokens: int,
                      decoding: str = "grid"):
    """Full-model output and one output per candidate for each prompt (``SweepSpec.decoding``; a decoder
    without ``generate_grid`` always decodes rows).

    Returns ``(full, early)``: ``full[i]`` is prompt i's full-model DecodedSequence and
    ``early[i][j]`` its output at ``lambdas[j]``.
    """
    if decoding == "grid" and hasattr(decoder, "generate_grid"):
        return decoder.generate_grid(prompts, lambdas=list(lambdas), max_new_tokens=max_new_tokens)
    rows_per_prompt = len(lambdas) + 1
    batch_prompts = [p for p in prompts for _ in range(rows_per_prompt)]
    thresholds = [t for _ in prompts for t in (float("inf"), *lambdas)]
    outputs = decoder.generate(batch_prompts, threshold=thresholds, max_new_tokens=max_new_tokens)
    full = [outputs[i * rows_per_prompt] for i in range(len(prompts))]
    early = [outputs[i * rows_per_prompt + 1:(i + 1) * rows_per_prompt] for i in range(len(prompts))]
    return full, early


def _example_record(metric: str, full, early, reference) -> dict[str, Any]:
    from ltt_exit import metrics

    texts = [seq.text for seq in early]
    record: dict[str, Any] = {
        "full_text": full.text,
        "full_num_tokens": len(full.token_ids),
        "text": texts,
        "num_tokens": [len(seq.token_ids) for seq in early],
        "mean_layers": [_mean_layers(seq.exit_layers) for seq in early],
        "layers_total": [int(np.sum(seq.exit_layers)) for seq in early],
        "exit_layers": [" ".join(str(int(x)) for x in seq.exit_layers) for seq in early],
        "flops": [float(seq.cost.flops) for seq in early],
        "full_flops": float(full.cost.flops),
        "loss_textual": [float(metrics.textual_consistency_loss(metric, t, full.text)) for t in texts],
    }
    if reference is not None:
        record["loss_risk"] = [
            float(metrics.risk_consistency_loss(metric, t, full.text, reference)) for t in texts
        ]
    return record


@dataclass
class SweepResult:
    table: LossTable | None       # None on ranks other than 0 of a distributed sweep
    path: Path
    resumed_examples: int
    decoded_examples: int
    seconds: float = 0.0


def check_examples(calibration_set) -> list:
    """The calibration set's examples, refused when empty or when two share an id (records are keyed
    by id). Every sweep (one configuration or a space) starts with this."""
    examples = list(calibration_set.examples)
    if not examples:
        raise ValueError("the calibration set is empty: nothing to sweep")
    ids = [str(ex.id) for ex in examples]
    if len(set(ids)) != len(ids):
        raise ValueError("the calibration set has duplicate example ids")
    return examples


def check_calibration_set(calibration_set, spec: SweepSpec) -> list:
    examples = check_examples(calibration_set)
    if spec.loss == "risk" and any(ex.reference is None for ex in examples):
        raise ValueError("risk-consistency losses need a reference for every example; "
                         "this calibration set has none — use loss='textual'")
    return examples


def prepare_sweep(decoder, calibration_set, spec: SweepSpec, model_fingerprint: str) -> tuple[list, str]:
    """Checks every sweep (single-process or distributed) makes before decoding; returns the
    examples and the configuration key."""
    examples = check_calibration_set(calibration_set, spec)
    # exit adapters must not have been fitted on the calibration prompts (that would bias the risk)
    getattr(getattr(decoder, "exit_adapters", None), "check_disjoint", lambda _: None)(calibration_set)
    key = sweep_config_key(model_fingerprint, decoder.config_dict(), calibration_set.fingerprint, spec)
    return examples, key


def partial_path(out_path: Path, rank: int = 0, world_size: int = 1) -> Path:
    """Where one process keeps its resumable progress, beside the final table."""
    suffix = ".partial.jsonl" if world_size == 1 else f".partial-r{rank}-of-{world_size}.jsonl"
    return out_path.with_name(out_path.name + suffix)


def decode_examples(decoder, examples: list, spec: SweepSpec, partial: PartialSweep, *,
                    progress: bool = True, desc: str = "sweep",
                    after_example: Callable[[int], None] | None = None) -> int:
    """Decode the examples not yet in ``partial`` and record each durably. Returns how many."""
    from tqdm.auto import tqdm

    todo = [ex for ex in examples if str(ex.id) not in partial]
    if spec.decoding == "rows":
        # prompts of similar length batched together: less padding, and the fast path's static shapes (one
        # buffer and graph capture per length bucket) change a few times rather than at every batch
        todo.sort(key=lambda ex: len(ex.prompt))
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc=desc, unit="prompt",
               disable=not progress, dynamic_ncols=True)
    decoded = 0
    try:
        for first in range(0, len(todo), spec.prompts_per_batch):
            group = todo[first:first + spec.prompts_per_batch]
            full, early = decode_candidates(decoder, [ex.prompt for ex in group], spec.lambdas,
                                            spec.max_new_tokens, spec.decoding)
            for ex, full_i, early_i in zip(group, full, early):
                partial.append(str(ex.id), _example_record(spec.metric, full_i, early_i, ex.reference))
                decoded += 1
                bar.update(1)
                if after_example is not None:
                    after_example(decoded)
    finally:
        bar.close()
    return decoded


def assemble_table(examples: list, records: dict[str, dict], spec: SweepSpec, *,
                   metadata: dict) -> LossTable:
    """Build the loss table from per-example records, in the calibration set's order."""
    ids = [str(ex.id) for ex in examples]
    missing = [i for i in ids if i not in records]
    if missing:
        raise ValueError(f"{len(missing)} examples have no sweep record (first: {missing[0]!r})")
    rows = [records[i] for i in ids]
    loss_key = "loss_textual" if spec.loss == "textual" else "loss_risk"
    losses = np.array([r[loss_key] for r in rows], dtype=np.float64)
    candidate_columns = {
        "loss_textual": np.array([r["loss_textual"] for r in rows], dtype=np.float64),
        "mean_layers": np.array([r["mean_layers"] for r in rows], dtype=np.float64),
        "num_tokens": np.array([r["num_tokens"] for r in rows], dtype=np.int64),
        "layers_total": np.array([r["layers_total"] for r in rows], dtype=np.int64),
        "flops": np.array([r["flops"] for r in rows], dtype=np.float64),
        "text": np.array([r["text"] for r in rows], dtype=object),
        # per-token exit layers, space-separated: for histograms without re-decoding
        "exit_layers": np.array([r["exit_layers"] for r in rows], dtype=object),
    }
    if all("loss_risk" in r for r in rows):
        candidate_columns["loss_risk"] = np.array([r["loss_risk"] for r in rows], dtype=np.float64)
    example_columns = {
        "prompt": np.array([ex.prompt for ex in examples], dtype=object),
        "full_text": np.array([r["full_text"] for r in rows], dtype=object),
        "full_num_tokens": np.array([r["full_num_tokens"] for r in rows], dtype=np.int64),
        "full_flops": np.array([r["full_flops"] for r in rows], dtype=np.float64),
        "reference": np.array(["" if ex.reference is None else json.dumps(ex.reference, ensure_ascii=False)
                               for ex in examples], dtype=object),
    }
    return LossTable(losses, np.array(spec.lambdas), ids, metadata,
                     candidate_columns=candidate_columns, example_columns=example_columns)


def table_metadata(decoder, calibration_set, spec: SweepSpec, *, key: str, model_fingerprint: str,
                   world_size: int = 1, extra: dict | None = None) -> dict:
    return {
        "ltt_exit_version": __version__,
        "sweep_config_key": key,
        "model_fingerprint": model_fingerprint,
        "decoder": decoder.config_dict(),
        "dataset_fingerprint": calibration_set.fingerprint,
        "metric": spec.metric,
        "loss": spec.loss,
        "max_new_tokens": spec.max_new_tokens,
        "num_layers": int(decoder.num_layers),
        "cost_model": COST_MODEL_VERSION,
        "sweep": asdict(spec) | {"lambdas": list(spec.lambdas)},
        "world_size": world_size,
        **(extra or {}),
    }


def run_sweep(
    decoder,
    calibration_set,
    spec: SweepSpec,
    *,
    out_path: str | Path,
    model_fingerprint: str,
    metadata: dict | None = None,
    progress: bool = True,
    after_example: Callable[[int], None] | None = None,
) -> SweepResult:
    """Sweep every candidate of ``spec.lambdas`` over ``calibration_set`` and save a loss table.

    ``calibration_set`` has ``examples`` (each with ``id``, ``prompt``, ``reference``) and a
    ``fingerprint``. ``after_example(k)`` is called after the k-th newly decoded example is
    recorded (tests use it to inject a failure). A rerun after a failure resumes.
    """
    import time

    examples, key = prepare_sweep(decoder, calibration_set, spec, model_fingerprint)
    out_path = Path(out_path)
    partial = PartialSweep(partial_path(out_path), key)
    resumed = len(partial)
    start = time.perf_counter()
    decoded = decode_examples(decoder, examples, spec, partial, progress=progress,
                              after_example=after_example)
    seconds = time.perf_counter() - start
    meta = table_metadata(decoder, calibration_set, spec, key=key,
                          model_fingerprint=model_fingerprint, extra=metadata)
    table = assemble_table(examples, partial.records, spec, metadata=meta)
    table.save(out_path)
    partial.remove()
    return SweepResult(table=table, path=out_path, resumed_examples=resumed,
                       decoded_examples=decoded, seconds=seconds)
