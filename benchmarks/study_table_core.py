"""The study table's computation (issue 17): tasks and their calibration / test splits, the decoder
configurations, cached resumable sweeps, certification with lookups on the test split, and batch-1
timing, written as one JSON result per (model, task, configuration).

``benchmarks/study_table.py`` is the command; ``benchmarks/study_table_report.py`` turns the results into
the table, the answers to the issue's questions and the frontier plots. This module imports torch only
inside the functions that decode.

Why the test split is swept at every λ too: the certified λ̂ depends on δ and on the loss kind, but
the test split's risk, FLOPs ratio, mean exit layer and task metric at any λ of the grid are then
lookups in one table, so no second decode of the test split is needed for any (δ, loss kind).
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import re
import sys
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ltt_exit._atomic import atomic_write_text
from ltt_exit.sweep.run import DEFAULT_GRID
# this script's folder is on sys.path
from study_table_report import scorer_stale, timing_revision, timing_stale, timing_stale_at

EPSILON = 0.05
DELTAS = (0.1, 0.2)
LOSS_KINDS = ("textual", "risk")
PVALUE = "hoeffding-bentkus"
PROCEDURE = "fixed-sequence"
#: bumped when a config result's layout or meaning changes; older results are recomputed
RESULT_VERSION = 1


# ---------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """One dataset of the table.

    recipe:         recipe name (calibration_sets/) or YAML path; it fixes the prompt template and metric
    data_file:      the JSONL file, relative to --data-dir (or absolute)
    metrics:        task metrics reported against the references; the first is the recipe's, which the
                    losses use
    max_new_tokens: generation budget N, the same for every configuration of the task
    n_cal, n_test:  default split sizes (disjoint: the first n_cal and the next n_test of one seeded
                    permutation of the file)
    note:           what the row label stands for (split, truncation)
    cuda_batch:     prompts swept together on CUDA: each brings up to K + 1 rows once the candidates split,
                    each row a K/V cache of prompt + N positions (about 46 KB per position for SmolLM2 in
                    float32), so long-prompt tasks take fewer
    """

    name: str
    recipe: str
    data_file: str
    metrics: tuple[str, ...]
    max_new_tokens: int
    n_cal: int
    n_test: int
    note: str = ""
    cuda_batch: int = 64


TASKS: dict[str, Task] = {
    "squad": Task("squad", "squad", "squad_v1.1_dev.jsonl", ("token-f1", "exact-match"), 24, 400, 200,
                  "SQuAD v1.1 dev (10,570 questions); token F1 and exact match, max over the gold answers"),
    "samsum": Task("samsum", "samsum", "samsum_test.jsonl", ("rouge-l",), 64, 400, 200,
                   "SAMSum test (819 dialogues); ROUGE-L F"),
    "cnn-dailymail": Task("cnn-dailymail", "cnn-dailymail", "cnndm_test_frank250.jsonl", ("rouge-l",), 128, 150, 100,
                          "CNN/DailyMail test, FRANK's 250 articles: 150 calibration / 100 test; each article "
                          "cut to its first 400 words (recipe truncate_words) before the prompt template",
                          cuda_batch=32),
    "iwslt2017-en-de": Task("iwslt2017-en-de", "iwslt2017-en-de", "iwslt2017_en-de_tst2017.jsonl", ("bleu",), 128,
                            400, 200, "IWSLT 2017 en→de tst2017 (1,138 segments); sentence BLEU / 100 (sacrebleu)"),
    "xsum": Task("xsum", "xsum", "xsum_test_helm1000.jsonl", ("rouge-l",), 64, 400, 200,
                 "XSum test, HELM's 1,000 articles; each cut to its first 400 words; ROUGE-L F", cuda_batch=32),
}


def _subset(full, examples: list, split: str):
    """A CalibrationSet of some of ``full``'s examples, with a fingerprint of its own content (recipe,
    template, family, ids, prompts, references; not the file's path nor the other split's size, so a split's
    cached tables serve any call that draws the same examples)."""
    content = [full.recipe, full.template, full.family, split,
               [[e.id, e.prompt, e.reference] for e in examples]]
    digest = hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()
    return dataclasses.replace(full, examples=list(examples), fingerprint="sha256:" + digest,
                               split=f"{full.split}:{split}")


def task_data_path(task: Task, data_dir: Path) -> Path:
    """The task's data file (FileNotFoundError naming it and --data-dir when it is not there)."""
    path = Path(task.data_file)
    if not path.is_absolute():
        path = Path(data_dir) / path
    if not path.is_file():
        raise FileNotFoundError(f"task {task.name}: data file {path} not found (set --data-dir)")
    return path


def task_splits(task: Task, *, data_dir: Path, n_cal: int, n_test: int, family: str, tokenizer: Any,
                seed: int = 0) -> dict[str, Any]:
    """{"cal": …, "test": …}: disjoint CalibrationSets, the first n_cal and the next n_test examples of the
    recipe's seeded permutation of the task's file."""
    from ltt_exit.recipes import load_recipe

    if n_cal < 1 or n_test < 1:
        raise ValueError(f"task {task.name}: --n-cal and --n-test must be at least 1, got {n_cal} and {n_test}")
    path = task_data_path(task, data_dir)
    recipe = load_recipe(task.recipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a size above the usable rows is reported below, as an error
        full = recipe.load(size=n_cal + n_test, seed=seed, data_files=[str(path)], family=family,
                           tokenizer=tokenizer)
    if len(full.examples) < n_cal + n_test:
        raise ValueError(f"task {task.name}: {path} has {full.n_available} usable examples, fewer than "
                         f"--n-cal + --n-test = {n_cal + n_test}")
    return {"cal": _subset(full, full.examples[:n_cal], "cal"),
            "test": _subset(full, full.examples[n_cal:n_cal + n_test], "test")}


# ------------------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Reduction:
    """Exit-head vocabulary pruning: kind "none", "fixed" (params k) or "decaying" (params k_max, k_min)."""

    kind: str
    params: tuple[tuple[str, int], ...] = ()

    @property
    def label(self) -> str:
        p = dict(self.params)
        if self.kind == "fixed":
            return f"fixed k={p['k']}"
        if self.kind == "decaying":
            return f"decaying k={p['k_max']}→{p['k_min']}"
        return "none"

    @property
    def slug(self) -> str:
        return "-".join([self.kind, *(str(v) for _, v in self.params)])

    def pruning_spec(self) -> tuple[str, dict[str, int]]:
        return self.kind, dict(self.params)


def reductions(names: list[str], fixed_k: int, decaying: tuple[int, int]) -> list[Reduction]:
    known = {"none": Reduction("none"), "fixed": Reduction("fixed", (("k", fixed_k),)),
             "decaying": Reduction("decaying", (("k_max", decaying[0]), ("k_min", decaying[1])))}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--reductions: unknown {unknown}; choose from {sorted(known)}")
    return [known[n] for n in names]


@dataclass(frozen=True)
class Configuration:
    """One decoder setting: a row group of the table (certified separately for each δ and loss kind)."""

    scorer: str
    reduction: Reduction
    min_exit_layer: int
    tau: float = 0.0

    @property
    def slug(self) -> str:
        return f"{self.scorer}__{self.reduction.slug}__j{self.min_exit_layer}"

    def decoder_kwargs(self) -> dict[str, Any]:
        return {"scorer": self.scorer, "pruning": self.reduction.pruning_spec(),
                "min_exit_layer": self.min_exit_layer, "tau": self.tau}


@dataclass(frozen=True)
class ModelSpec:
    """A model of the table: ``label`` names its rows; ``source`` is what load_model takes (alias, folder,
    .gguf); ``adapters`` an exit-adapter file used by every configuration of this model (its classifier,
    when it holds one, adds the exit-classifier scorer)."""

    label: str
    source: str
    adapters: str | None = None


_LABEL = re.compile(r"^[A-Za-z0-9._-]+$")


def parse_model_spec(text: str) -> ModelSpec:
    """``LABEL=SOURCE`` or ``SOURCE`` (label: the alias, or the file / folder name without suffix)."""
    label, _, source = text.partition("=") if "=" in text else ("", "", text)
    if not source:
        raise ValueError(f"--models: empty model in {text!r}")
    label = label or Path(source.rstrip("/")).stem or source
    if not _LABEL.match(label):
        raise ValueError(f"--models: label {label!r} must use letters, digits, '.', '_' and '-' only "
                         "(write LABEL=SOURCE)")
    return ModelSpec(label, source)


# ----------------------------------------------------------------------------------------- the store
class Store:
    """Where results and caches live under --out: ``configs/`` (one JSON per model, task, configuration;
    the raw results), ``tables/`` (the swept loss tables, one per split, and their partial files while a
    sweep runs), ``timing/`` (one JSON per timed λ)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def config_path(self, model: str, task: str, config: str) -> Path:
        return self.root / "configs" / f"{model}__{task}__{config}.json"

    def table_stem(self, model: str, task: str, config: str, split: str) -> Path:
        """The split's loss table is ``<stem>__<first 12 hex digits of its sweep key>.parquet``, so tables
        swept with other sizes or budgets neither clash with nor replace each other."""
        return self.root / "tables" / f"{model}__{task}__{config}__{split}"

    def timing_path(self, model: str, task: str, what: str, lam: float) -> Path:
        return self.root / "timing" / f"{model}__{task}__{what}__lam{lam:.6g}.json"

    @staticmethod
    def read(path: Path) -> dict | None:
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return None  # written atomically, so this is a foreign file: recompute

    @staticmethod
    def write(path: Path, data: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data, indent=1, ensure_ascii=False, default=_json_default) + "\n")

    def config_results(self) -> list[dict]:
        folder = self.root / "configs"
        results = [self.read(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
        return [r for r in results if r and r.get("version") == RESULT_VERSION]


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


# ---------------------------------------------------------------------------------------- the budget
class OutOfTime(Exception):
    """The --time-budget would be overrun by the next piece of work; everything finished is on disk."""


class Budget:
    """Wall-clock budget of one call. ``check(needed, what)`` raises :class:`OutOfTime` when less than
    ``needed`` seconds are left; ``clock`` is injectable (tests)."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.deadline = None if seconds is None else clock() + float(seconds)

    def remaining(self) -> float:
        return math.inf if self.deadline is None else self.deadline - self.clock()

    def check(self, needed: float, what: str) -> None:
        left = self.remaining()
        if left < needed or left <= 0:
            raise OutOfTime(f"stopped before {what}: {max(left, 0):.0f} s of the time budget left, "
                            f"about {needed:.0f} s needed; run the same command again to resume")


# ------------------------------------------------------------------------------------------ sweeping
def sweep_split(decoder, calibration_set, spec, *, stem: Path, model_fingerprint: str, metadata: dict,
                budget: Budget, estimates: dict[str, float], estimate_key: str, progress: bool = False):
    """The split's loss table (file ``<stem>__<key>.parquet``, see :meth:`Store.table_stem`): the cached one
    when it exists, else a sweep, resumed from its partial file.

    Before each batch the budget is checked against the slowest batch seen so far, so a call stops cleanly
    with every finished prompt in the partial file: ``estimates`` holds seconds per token position of a
    batch, per task (``estimate_key``); a task not timed yet borrows the slowest rate of the others.
    """
    from ltt_exit.loss_table import LossTable
    from ltt_exit.sweep.run import prepare_sweep, run_sweep

    _, key = prepare_sweep(decoder, calibration_set, spec, model_fingerprint)
    out_path = stem.with_name(f"{stem.name}__{key.split(':', 1)[1][:12]}.parquet")
    if out_path.exists():
        table = LossTable.load(out_path)
        if table.metadata.get("sweep_config_key") == key:
            return table
    out_path.parent.mkdir(parents=True, exist_ok=True)
    what = f"a sweep batch of {out_path.name}"

    def batch_seconds() -> float:
        rate = estimates.get(estimate_key, max(estimates.values(), default=0.0))
        return rate * spec.max_new_tokens

    budget.check(batch_seconds(), what)
    last = [budget.clock()]

    def after_example(decoded: int) -> None:
        if decoded % spec.prompts_per_batch:
            return
        now = budget.clock()
        rate = (now - last[0]) / spec.max_new_tokens
        estimates[estimate_key] = max(estimates.get(estimate_key, 0.0), rate)
        last[0] = now
        budget.check(batch_seconds(), what)

    return run_sweep(decoder, calibration_set, spec, out_path=out_path, model_fingerprint=model_fingerprint,
                     metadata=metadata, progress=progress, after_example=after_example).table


# ------------------------------------------------------------------------------- certify and look up
def _parse_reference(cell: str):
    return json.loads(cell) if cell else None


def metric_matrix(metric: str, texts: np.ndarray, references: list) -> np.ndarray:
    """m(texts[i, j], references[i]) as a float array of texts' shape (n, K); each distinct text of a row
    is scored once (near λ = 1 most candidates repeat the full model's text)."""
    from ltt_exit import metrics

    n, k = texts.shape
    values = np.empty((n, k), dtype=np.float64)
    for i in range(n):
        seen: dict[str, float] = {}
        for j in range(k):
            text = str(texts[i, j])
            if text not in seen:
                seen[text] = metrics.similarity(metric, text, references[i])
            values[i, j] = seen[text]
    return values


def curves(table, metric_names: tuple[str, ...], num_layers: int) -> dict[str, Any]:
    """Per-candidate aggregates of one split's table, each a list over the grid:
    flops_ratio (Σ FLOPs / Σ full-model FLOPs, exit heads and adapters counted), mean_exit_layer (per
    generated token), risk_textual / risk_risk (mean loss), metric_early[name] (mean task metric against the
    references), and metric_full[name] (the full model's, one number)."""
    cols, examples = table.candidate_columns, table.example_columns
    references = [_parse_reference(c) for c in examples["reference"]]
    full_flops = float(np.sum(examples["full_flops"]))
    out: dict[str, Any] = {
        "n": int(table.n),
        "flops_ratio": (np.sum(cols["flops"], axis=0) / full_flops).tolist(),
        "mean_exit_layer": (np.sum(cols["layers_total"], axis=0) / np.maximum(np.sum(cols["num_tokens"], axis=0), 1)
                            ).tolist(),
        "risk_textual": np.mean(cols["loss_textual"], axis=0).tolist(),
        "num_layers": num_layers,
    }
    if "loss_risk" in cols:
        out["risk_risk"] = np.mean(cols["loss_risk"], axis=0).tolist()
    if all(r is not None for r in references):
        full_texts = np.asarray(examples["full_text"], dtype=object)[:, None]
        out["metric_early"] = {m: metric_matrix(m, cols["text"], references).mean(axis=0).tolist()
                               for m in metric_names}
        out["metric_full"] = {m: float(metric_matrix(m, full_texts, references).mean()) for m in metric_names}
    return out


#: what λ̂ minimises among the certified candidates (calibration means): "layers" (mean exit layer per token,
#: ltt-calibrate's default cost) or "flops" (the cost account, heads counted: picks λ = 1 whenever the exit
#: heads cost more than the layers they skip)
COSTS = ("layers", "flops")


def certify_and_look_up(cal, test, *, metric_names: tuple[str, ...], num_layers: int,
                        deltas=DELTAS, epsilon: float = EPSILON, cost: str = "layers") -> dict[str, Any]:
    """Certify λ on the calibration table for each (loss kind, δ) and read the test table at λ̂.

    The chosen λ̂ is the certified candidate of least calibration ``cost`` (``certify``'s ``costs``, see
    :data:`COSTS`): any certified candidate carries the guarantee, fixed-sequence testing controls them all
    at once.
    Returns {"lambdas", "cal": curves, "test": curves, "certificates": [...]} where each certificate has
    loss, delta, lambda_hat, certified_any, index (None: λ = 1 outside the grid), cal_risk and the test
    split's lookups (risk, flops_ratio, mean_exit_layer, metric_early).
    """
    from ltt_exit.certify import certify

    lambdas = np.asarray(cal.lambdas, dtype=np.float64)
    if not np.array_equal(lambdas, np.asarray(test.lambdas, dtype=np.float64)):
        raise ValueError("the calibration and test tables were swept on different grids")
    cal_curves = curves(cal, metric_names, num_layers)
    test_curves = curves(test, metric_names, num_layers)
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    costs_key = "mean_exit_layer" if cost == "layers" else "flops_ratio"
    certificates = []
    for loss in LOSS_KINDS:
        column = f"loss_{loss}"
        if column not in cal.candidate_columns or column not in test.candidate_columns:
            continue
        for delta in deltas:
            cert = certify(cal.candidate_columns[column], lambdas, delta=delta, epsilon=epsilon, pvalue=PVALUE,
                           procedure=PROCEDURE, costs=cal_curves[costs_key])
            index = cert.chosen_index
            if index is None:  # nothing certified: λ = 1, the full model (the grid's λ = 1 column if it has one)
                at_one = np.flatnonzero(lambdas >= 1.0)
                index = int(at_one[0]) if at_one.size else None
            entry = {"loss": loss, "delta": delta, "epsilon": epsilon, "lambda_hat": float(cert.lambda_hat),
                     "certified_any": bool(cert.certified_any), "index": index,
                     "cal_risk": float(cert.empirical_risk[index]) if index is not None else 0.0}
            if index is None:
                entry.update(test_risk=0.0, flops_ratio=1.0, mean_exit_layer=float(num_layers),
                             metric_early=dict(test_curves.get("metric_full", {})))
            else:
                entry.update(test_risk=test_curves[f"risk_{loss}"][index],
                             flops_ratio=test_curves["flops_ratio"][index],
                             mean_exit_layer=test_curves["mean_exit_layer"][index],
                             metric_early={m: v[index] for m, v in test_curves.get("metric_early", {}).items()})
            certificates.append(entry)
    return {"lambdas": lambdas.tolist(), "cal": cal_curves, "test": test_curves, "certificates": certificates}


# -------------------------------------------------------------------------------------------- timing
def hardware(device) -> str:
    """What a device is, beyond its index: the GPU's model name on CUDA ("cuda:0" names no machine, and the
    session's device may be an H100 one day and an H200 the next), "cpu" otherwise. Timings are comparable
    only between equal names."""
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def time_batch1(decoder, prompts: list[str], threshold: float, max_new_tokens: int,
                passes: int = 1) -> dict[str, Any]:
    """Wall clock of decoding ``prompts`` one at a time (batch 1) at ``threshold``: the median of ``passes``
    timed passes over all of them (each pass's seconds kept in ``runtime_passes_s``).

    On CUDA every cache-length bucket of the fast path is warmed once untimed first (graph capture is a
    one-off per bucket, not decode time), and the device is synchronised around each timed pass. One pass of
    ten short prompts moved by up to a quarter between processes on the same GPU model (docs/benchmarks.md),
    hence several passes and their median. As ``timeit`` does, the garbage left by what ran before (a sweep's
    tables and records) is collected first and the collector is off while passes are timed: the first pass
    after a sweep ran 15–31 % slower than the next two (docs/study_table.md), and a collection of that garbage
    falling inside a pass is one cause that does not belong to decoding.
    """
    import torch

    if passes < 1:
        raise ValueError(f"passes must be ≥ 1, got {passes}")
    cuda = decoder.backend.device.type == "cuda"
    if cuda:
        bucket = getattr(decoder, "length_bucket", 1)
        warmed: dict[int, str] = {}
        for prompt in prompts:
            length = len(decoder.tokenizer(prompt)["input_ids"]) if decoder.tokenizer is not None else 0
            warmed.setdefault(-(-(length + max_new_tokens) // bucket), prompt)
        for prompt in warmed.values():
            decoder.generate([prompt], threshold=threshold, max_new_tokens=max_new_tokens)
        torch.cuda.synchronize()
    pass_seconds = []
    gc.collect()
    collecting = gc.isenabled()
    gc.disable()
    try:
        for _ in range(passes):
            outputs = []
            start = time.perf_counter()
            for prompt in prompts:
                outputs.append(decoder.generate([prompt], threshold=threshold, max_new_tokens=max_new_tokens)[0])
            if cuda:
                torch.cuda.synchronize()
            pass_seconds.append(time.perf_counter() - start)
    finally:
        if collecting:
            gc.enable()
    seconds = float(np.median(pass_seconds))
    return {"lambda": threshold, "n": len(prompts), "runtime_s": seconds, "samples_per_s": len(prompts) / seconds,
            "runtime_passes_s": pass_seconds,
            "tokens": int(sum(len(o.token_ids) for o in outputs)),
            "mean_exit_layer": float(np.mean([x for o in outputs for x in o.exit_layers]))
            if any(o.exit_layers for o in outputs) else float("nan"),
            "texts": [o.text for o in outputs], "device": str(decoder.backend.device),
            "hardware": hardware(decoder.backend.device), "fast_path": type(decoder).__name__,
            "cuda_graphs": bool(getattr(decoder, "_graphs_on", lambda: False)())}


def fast_decoder(model, tokenizer, config: Configuration | None, adapters, compile_decision: bool, *,
                 max_sessions: int = 8, length_bucket: int = 64):
    """The fast path (``FastEarlyExitDecoder``): CUDA graphs on CUDA; ``config`` None: the full model's
    setting (λ = 1 consults no exit head, so any configuration times the same). The timing keeps a session
    (buffers and graphs) per batch-1 length bucket; the rows sweep keeps few large ones."""
    from ltt_exit.decode import FastEarlyExitDecoder

    kwargs = config.decoder_kwargs() if config is not None else {}
    cuda = next(model.parameters()).is_cuda
    return FastEarlyExitDecoder(model, tokenizer, exit_adapters=adapters if config is not None else None,
                                compile=bool(compile_decision and cuda), max_sessions=max_sessions,
                                length_bucket=length_bucket, **kwargs)


# ---------------------------------------------------------------------------------------- the runner
@dataclass
class StudySettings:
    """Everything a call decides, besides which models, tasks and configurations it runs."""

    out: Path
    data_dir: Path
    n_cal: dict[str, int] = field(default_factory=dict)          # per task (default: the task's)
    n_test: dict[str, int] = field(default_factory=dict)
    max_new_tokens: dict[str, int] = field(default_factory=dict)
    n_time: int = 20
    grid: tuple[float, ...] = DEFAULT_GRID
    deltas: tuple[float, ...] = DELTAS
    epsilon: float = EPSILON
    cost: str = "layers"
    batch_prompts: int | None = None
    compile_decision: bool = False
    sweep_decoding: str = "grid"  # SweepSpec.decoding; "rows" sweeps on the fast path
    progress: bool = True
    seed: int = 0
    #: instead of sweeping what is not done: for finished configurations whose timings come from different
    #: machines, time again on this machine those not made here (the sweep and the certificates stay)
    retime: bool = False
    #: with ``retime``: few-pass timings made on another GPU model count too (all of a configuration's timings
    #: then move to this machine); otherwise they are left to the machine that made them
    retime_any_machine: bool = False
    #: timed passes over the n_time prompts per timing (their median is the runtime); a stored timing with
    #: fewer passes is timed again, and --retime revisits the configurations that have one
    time_passes: int = 3
    #: the computing call's command line, recorded in each configuration's JSON (not part of its identity)
    command: str | None = None

    def sizes(self, task: Task) -> tuple[int, int, int]:
        """(n_cal, n_test, max_new_tokens) of ``task``: its own override, else the "*" one, else its default."""
        def pick(overrides: dict[str, int], default: int) -> int:
            return overrides.get(task.name, overrides.get("*", default))

        return (pick(self.n_cal, task.n_cal), pick(self.n_test, task.n_test),
                pick(self.max_new_tokens, task.max_new_tokens))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def model_configurations(configs: list[Configuration], adapters) -> list[Configuration]:
    """The configurations run for one model: the given ones, plus exit-classifier for each reduction and
    minimum exit layer when the model's adapters hold a fitted classifier."""
    out = [c for c in configs if c.scorer != "exit-classifier"]
    if adapters is not None and getattr(adapters, "exit_classifier", None) is not None:
        seen = []
        for c in configs:
            key = (c.reduction, c.min_exit_layer, c.tau)
            if key not in seen:
                seen.append(key)
                out.append(Configuration("exit-classifier", *key))
    return out


def run_study(models: list[ModelSpec], tasks: list[Task], configs: list[Configuration], settings: StudySettings,
              budget: Budget, loader: Callable[[ModelSpec], Any]) -> dict[str, int]:
    """Sweep, certify, look up and time every (model, task, configuration) not already done under
    ``settings.out``; raises :class:`OutOfTime` when the budget would be overrun (all finished work kept).

    ``loader(spec)`` returns a loaded model (``model``, ``tokenizer``, ``family``, ``fingerprint``,
    ``num_layers``); it is called only when some configuration of the model is still to do. Returns counts
    {"done_before", "done_now"}.
    """
    store = Store(settings.out)
    counts = {"done_before": 0, "done_now": 0}
    estimates: dict[str, float] = {}  # slowest sweep batch seen per task (seconds per token position)
    for spec in models:
        adapters = None
        if spec.adapters:
            from ltt_exit.decode.adapters import ExitAdapters

            adapters = ExitAdapters.load(spec.adapters)  # checked against the model once it is loaded
        loaded = None
        for task in tasks:
            n_cal, n_test, tokens = settings.sizes(task)
            splits = None
            for config in model_configurations(configs, adapters):
                done = _complete(store, spec.label, task, config.slug, settings, adapters)
                counts["done_before"] += done
                if settings.retime:  # only finished configurations timed on several machines or too few times
                    here = hardware(loaded.device) if loaded is not None else None
                    result = store.read(store.config_path(spec.label, task.name, config.slug))
                    if not (done and _to_retime(result, here, settings.time_passes, settings.retime_any_machine)):
                        continue
                elif done:
                    continue
                if loaded is None:
                    budget.check(0, f"loading {spec.label}")
                    loaded = loader(spec)
                    if spec.adapters:
                        from ltt_exit.decode.adapters import ExitAdapters

                        adapters = ExitAdapters.load(spec.adapters, model_fingerprint=loaded.fingerprint)
                if splits is None:
                    splits = task_splits(task, data_dir=settings.data_dir, n_cal=n_cal, n_test=n_test,
                                         family=loaded.family, tokenizer=loaded.tokenizer, seed=settings.seed)
                if done:
                    _log(f"[{spec.label} | {task.name} | {config.slug}] timings again on {hardware(loaded.device)}")
                    counts["retimed"] = counts.get("retimed", 0) + retime_configuration(
                        spec, loaded, adapters, task, splits, config, settings, store, budget)
                    continue
                _log(f"[{spec.label} | {task.name} | {config.slug}] n_cal {n_cal}, n_test {n_test}, N {tokens}")
                run_configuration(spec, loaded, adapters, task, splits, config, settings, store, budget, estimates)
                counts["done_now"] += 1
    return counts


def _timed_apart(result: dict | None) -> bool:
    """Whether a configuration's batch-1 timings (λ = 1 and each λ̂) were not all measured on one machine."""
    timing = (result or {}).get("timing", {})
    return len({_machine_of(t) for t in timing.values()}) > 1


def _machine_of(timing: dict) -> str | None:
    """The GPU model a timing ran on ("cpu" on the CPU; timings older than the field: the device)."""
    return timing.get("hardware", timing.get("device"))


def _to_retime(result: dict | None, here: str | None, passes: int, any_machine: bool = False) -> bool:
    """Whether ``--retime`` revisits a finished configuration: its timings come from several machines, one
    of them was made on this machine (``here``; None: not known yet; any machine with ``any_machine``) with
    fewer than ``passes`` passes, or one predates its scorer's current decoding (``TIMING_REVISIONS``)."""
    timing = (result or {}).get("timing", {})
    scorer = ((result or {}).get("configuration") or {}).get("scorer")
    return _timed_apart(result) or any(
        (_passes(t) < passes and (any_machine or here is None or _machine_of(t) == here))
        or timing_stale_at(t, float(key), scorer) for key, t in timing.items())


def retime_configuration(spec: ModelSpec, loaded, adapters, task: Task, splits: dict, config: Configuration,
                         settings: StudySettings, store: Store, budget: Budget) -> int:
    """Time again, on this machine, the timings of a finished configuration that were made elsewhere or here
    with fewer than ``settings.time_passes`` passes, so that its runtime at λ̂ and at λ = 1 compare; returns
    how many. The sweep's texts of the timed prompts (kept in the JSON since they were recorded, else read from
    the test split's loss table when it is at hand) say whether the fast path still reproduces the sweep;
    without either the agreement is left unknown (None)."""
    path = store.config_path(spec.label, task.name, config.slug)
    result = store.read(path)
    here = hardware(loaded.device)
    if not _to_retime(result, here, settings.time_passes, settings.retime_any_machine):
        return 0  # chosen before the machine was known: timed on one other machine only, nothing to compare
    tokens = result["task"]["max_new_tokens"]
    prompts = [e.prompt for e in splits["test"].examples[: result["n_time"]]]
    swept = result.get("sweep_texts_timed") or _sweep_texts_from_table(store, spec.label, task.name, config.slug,
                                                                      result, len(prompts))
    retimed = 0
    for key, old in result["timing"].items():
        if (_machine_of(old) == here and _passes(old) >= settings.time_passes
                and not timing_stale_at(old, float(key), config.scorer)):
            continue
        lam = float(key)
        full = key == "1"
        new = _timed(store, spec.label, task.name, "full" if full else config.slug, lam, loaded, adapters,
                     None if full else config, prompts, tokens, settings, budget)
        new["same_text_as_sweep"] = _share_same((swept or {}).get(key), new["texts"])
        result["timing"][key] = {k: v for k, v in new.items() if k != "texts"}
        retimed += 1
    result["timing_retimed_by"] = settings.command
    store.write(path, result)
    return retimed


def _sweep_texts_from_table(store: Store, model: str, task: str, config: str, result: dict, n: int) -> dict | None:
    """The test sweep's texts of the first ``n`` prompts at each timed λ, from the loss table if it is here."""
    from ltt_exit.loss_table import LossTable

    stem = store.table_stem(model, task, config, "test")
    matching = [LossTable.load(p) for p in sorted(stem.parent.glob(stem.name + "__*.parquet"))]
    matching = [t for t in matching if t.n == result["task"]["n_test"]]
    if len(matching) != 1:
        return None
    return _sweep_texts(matching[0], result["lambdas"], result["timing"].keys(), n)


def _share_same(recorded: list[str] | None, texts: list[str]) -> float | None:
    """Share of the timed prompts whose fast-path text equals the sweep's (None: the sweep's texts unknown)."""
    return None if recorded is None else float(np.mean([a == b for a, b in zip(recorded, texts)]))


def _sweep_texts(table, lambdas: list[float], keys, n: int) -> dict[str, list[str]]:
    """{timing key: the sweep's texts of the first n test prompts}: "1" the full model's, else λ's candidate's."""
    out = {}
    for key in keys:
        if key == "1":
            out[key] = [str(t) for t in table.example_columns["full_text"][:n]]
        else:
            j = [f"{lam:.6g}" for lam in lambdas].index(key)
            out[key] = [str(t) for t in table.candidate_columns["text"][:n, j]]
    return out


def _complete(store: Store, model: str, task: Task, config: str, settings: StudySettings,
              adapters=None) -> bool:
    """A stored result counts as done when it was made with this call's split sizes, budget, grid and δs, with
    the current revision of its scorer (an earlier one's sweep is made again: its loss tables' key differs),
    and through the same exit-adapter file as ``adapters`` (by content; None: without adapters). The model
    itself is known by its label only, its fingerprint needing the weights loaded; an adapter file is already
    loaded here, so a refitted one under the same label is not mistaken for the file that made the result."""
    result = store.read(store.config_path(model, task.name, config))
    if result is None:
        return False
    made_with = ((result.get("configuration") or {}).get("decoder") or {}).get("exit_adapters") or {}
    return (result.get("version") == RESULT_VERSION
            and result.get("identity", {}).get("settings") == _identity(settings, task)
            and made_with.get("fingerprint") == (adapters.fingerprint if adapters is not None else None)
            and not scorer_stale(result))


def _identity(settings: StudySettings, task: Task) -> dict:
    n_cal, n_test, tokens = settings.sizes(task)
    return {"n_cal": n_cal, "n_test": n_test, "max_new_tokens": tokens, "n_time": settings.n_time,
            "grid": list(settings.grid), "deltas": list(settings.deltas), "epsilon": settings.epsilon,
            "seed": settings.seed, "cost": settings.cost}


#: prompts swept together on the CPU (ltt-calibrate's default there); on CUDA each task's ``cuda_batch``: a
#: 135M-parameter model is bound by per-step latency there, so wide batches cost little more per step
CPU_BATCH = 8
#: prompts per batch of the rows sweep on CUDA: 16 × 21 = 336 rows, a static K/V buffer of about 9 GB
#: (SmolLM2, bfloat16) at the longest task's 1,152 positions
ROWS_CUDA_BATCH = 16


def run_configuration(spec: ModelSpec, loaded, adapters, task: Task, splits: dict, config: Configuration,
                      settings: StudySettings, store: Store, budget: Budget, estimates: dict) -> dict:
    """One configuration end to end (sweeps resumed or reused, certification, timing); writes its JSON."""
    from ltt_exit.decode import EarlyExitDecoder
    from ltt_exit.sweep.run import SweepSpec

    n_cal, n_test, tokens = settings.sizes(task)
    if settings.sweep_decoding == "rows":
        # K + 1 rows per prompt: static buffers (CUDA graphs on CUDA), sized per batch × length bucket; the
        # sweep takes prompts in length order, so each bucket's session is built once
        decoder = fast_decoder(loaded.model, loaded.tokenizer, config, adapters, settings.compile_decision,
                               max_sessions=2, length_bucket=128)
    else:
        decoder = EarlyExitDecoder(loaded.model, loaded.tokenizer, exit_adapters=adapters,
                                   **config.decoder_kwargs())
    batch = settings.batch_prompts or (
        (task.cuda_batch if settings.sweep_decoding == "grid" else ROWS_CUDA_BATCH)
        if decoder.backend.device.type == "cuda" else CPU_BATCH)
    # loss "risk" makes the sweep record both loss columns (textual is always recorded)
    sweep = SweepSpec(lambdas=settings.grid, max_new_tokens=tokens, metric=splits["cal"].metric, loss="risk",
                      prompts_per_batch=batch, decoding=settings.sweep_decoding)
    metadata = {"model": {"label": spec.label, "source": spec.source, "adapters": spec.adapters},
                "task": task.name, "configuration": config.slug}
    tables = {}
    sweep_seconds = {}
    for split in ("cal", "test"):
        started = time.perf_counter()
        tables[split] = sweep_split(decoder, splits[split], sweep,
                                    stem=store.table_stem(spec.label, task.name, config.slug, split),
                                    model_fingerprint=loaded.fingerprint, metadata=metadata, budget=budget,
                                    estimates=estimates, estimate_key=task.name, progress=settings.progress)
        sweep_seconds[split] = time.perf_counter() - started
    num_layers = int(loaded.num_layers)
    result = certify_and_look_up(tables["cal"], tables["test"], metric_names=task.metrics, num_layers=num_layers,
                                 deltas=settings.deltas, epsilon=settings.epsilon, cost=settings.cost)
    # batch-1 wall clock on the first n_time test prompts: λ = 1 once per (model, task), each distinct λ̂ < 1
    time_prompts = [e.prompt for e in splits["test"].examples[: settings.n_time]]
    timings = {}
    swept_texts = {}
    if time_prompts:
        timings["1"] = _timed(store, spec.label, task.name, "full", 1.0, loaded, adapters, None, time_prompts,
                              tokens, settings, budget)
        for lam in sorted({c["lambda_hat"] for c in result["certificates"] if c["lambda_hat"] < 1}, reverse=True):
            timings[f"{lam:.6g}"] = _timed(store, spec.label, task.name, config.slug, lam, loaded, adapters, config,
                                           time_prompts, tokens, settings, budget)
        # the fast path must reproduce what the sweep recorded for these prompts at each timed λ; the sweep's
        # texts stay in the JSON so that a later call can time again elsewhere without the loss table
        swept_texts = _sweep_texts(tables["test"], result["lambdas"], timings.keys(), len(time_prompts))
        for key, timing in timings.items():
            timing["same_text_as_sweep"] = _share_same(swept_texts[key], timing["texts"])
    summary = {
        "version": RESULT_VERSION,
        "identity": {"model": spec.label, "task": task.name, "configuration": config.slug,
                     "settings": _identity(settings, task)},
        "model": {"label": spec.label, "source": spec.source, "adapters": spec.adapters,
                  "fingerprint": loaded.fingerprint, "num_layers": num_layers, "dtype": str(loaded.dtype)
                  if hasattr(loaded, "dtype") else None},
        "task": {"name": task.name, "recipe": task.recipe, "data_file": task.data_file, "note": task.note,
                 "metrics": list(task.metrics), "max_new_tokens": tokens, "n_cal": n_cal, "n_test": n_test,
                 # the metric inside the risk-consistency loss max(0, m_full − m_early): the recipe's own
                 "risk_metric": splits["cal"].metric,
                 "template": splits["cal"].template, "chat_template": bool(splits["cal"].chat_template_applied)},
        "configuration": {"scorer": config.scorer, "reduction": config.reduction.label,
                          "reduction_kind": config.reduction.kind, "pruning": config.reduction.pruning_spec(),
                          "min_exit_layer": config.min_exit_layer, "tau": config.tau, "decoder": decoder.config_dict()},
        "sweep": {"batch_prompts": batch, "decoding": settings.sweep_decoding, "seconds_this_call": sweep_seconds,
                  "device": str(decoder.backend.device), "hardware": hardware(decoder.backend.device),
                  "grid": list(settings.grid), "pvalue": PVALUE, "procedure": PROCEDURE,
                  "chosen_by_least": settings.cost},
        "command": settings.command,
        "n_time": len(time_prompts),
        "timing": {k: {kk: vv for kk, vv in v.items() if kk != "texts"} for k, v in timings.items()},
        "sweep_texts_timed": swept_texts,
        **result,
    }
    store.write(store.config_path(spec.label, task.name, config.slug), summary)
    return summary


def _timed(store: Store, model: str, task: str, what: str, lam: float, loaded, adapters, config, prompts, tokens,
           settings: StudySettings, budget: Budget) -> dict:
    path = store.timing_path(model, task, what, lam)
    # the hardware is part of what is reused: a λ = 1 timing from another GPU model would make the row's two
    # runtimes incomparable (timings written before it was recorded are re-timed)
    identity = {"max_new_tokens": tokens, "device": str(loaded.device), "hardware": hardware(loaded.device),
                "dtype": str(loaded.dtype),
                "prompts_sha256": hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()}
    cached = store.read(path)
    scorer = config.scorer if config is not None else None
    if (cached is not None and all(cached.get(k) == v for k, v in identity.items())
            and _passes(cached) >= settings.time_passes and not timing_stale(cached, scorer)):
        return cached  # the same prompts, budget, device and dtype were timed (as often) by an earlier call
    full = store.read(store.timing_path(model, task, "full", 1.0))
    budget.check((1 + settings.time_passes) * full["runtime_s"] if full else 0.0, f"timing {what} at λ = {lam:g}")
    decoder = _timing_decoder(loaded, adapters, config, settings.compile_decision)
    result = time_batch1(decoder, prompts, lam, tokens, passes=settings.time_passes) | identity
    if timing_revision(scorer) > 1:
        result["timing_revision"] = timing_revision(scorer)
    store.write(path, result)
    return result


#: the batch-1 timing decoders of this process, least recently used first (as FastEarlyExitDecoder keeps its
#: sessions): the λ̂ timings of one configuration (and a task's λ = 1 timings) share one decoder, so its
#: sessions' CUDA graphs are captured once rather than once per λ (the thresholds live in the sessions'
#: buffers; the graphs do not depend on them)
_TIMING_DECODERS: OrderedDict[tuple, Any] = OrderedDict()
TIMING_DECODERS_KEPT = 2  # the λ = 1 decoder and the current configuration's


def _timing_decoder(loaded, adapters, config: Configuration | None, compile_decision: bool):
    """The fast decoder that times ``config`` (None: the full model) on ``loaded``, reused while kept."""
    # the entry holds the decoder, which holds the model and adapters: their ids cannot be reused meanwhile
    key = (id(loaded.model), id(adapters) if config is not None else None, config, bool(compile_decision))
    decoder = _TIMING_DECODERS.get(key)
    if decoder is not None:
        _TIMING_DECODERS.move_to_end(key)
        return decoder
    while len(_TIMING_DECODERS) >= TIMING_DECODERS_KEPT:
        _TIMING_DECODERS.popitem(last=False)
    decoder = _TIMING_DECODERS[key] = fast_decoder(loaded.model, loaded.tokenizer, config, adapters,
                                                   compile_decision)
    return decoder


def _passes(timing: dict) -> int:
    """Timed passes behind a stored timing (those written before passes were recorded made one)."""
    return len(timing.get("runtime_passes_s") or [None])
