"""benchmarks/study_table.py (issue 17): the study table end to end on a tiny random model and a tiny JSONL
task (rows, resume after an interruption, the doc section and the plots), its lookups on hand-made loss
tables, and its refusals of bad input."""
from __future__ import annotations

import gc
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import study_table  # noqa: E402
import study_table_core as core  # noqa: E402
import study_table_report as report  # noqa: E402

from ltt_exit import metrics  # noqa: E402
from ltt_exit.loss_table import LossTable  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64
RECIPE = """\
name: tiny-task
source: {kind: jsonl}
split: all
fields: {id: id, text: text, answer: answer}
templates: {t5: "{text}", decoder-only: "{text}"}
reference: answer
metric: rouge-l
max_new_tokens: 5
sample: {seed: 0, size: null}
"""


def _tiny_task(folder: Path) -> core.Task:
    rng = np.random.default_rng(3)
    lines = []
    for i in range(14):
        text = " ".join(f"w{w}" for w in rng.integers(3, VOCAB - 1, size=rng.integers(3, 8)))
        answer = " ".join(f"w{w}" for w in rng.integers(3, VOCAB - 1, size=4))
        lines.append(json.dumps({"id": f"q{i}", "text": text, "answer": answer}))
    data = folder / "tiny.jsonl"
    data.write_text("\n".join(lines) + "\n")
    recipe = folder / "tiny.yaml"
    recipe.write_text(RECIPE)
    return core.Task("tiny", str(recipe), str(data), ("rouge-l",), 5, n_cal=8, n_test=4, note="tiny random task")


def _loader(spec):
    from ltt_exit.decode.tiny_models import tiny_llama, tiny_word_tokenizer
    from ltt_exit.models.fingerprint import model_fingerprint
    from ltt_exit.models.loading import LoadedModel

    model = tiny_llama(vocab_size=VOCAB, num_layers=4, seed=1)
    tokenizer = tiny_word_tokenizer(VOCAB, eos_id=2)
    return LoadedModel(model, tokenizer, "decoder-only", spec.source, "random tiny llama",
                       model_fingerprint(model, tokenizer))


def _argv(out: Path, folder: Path, *extra: str) -> list[str]:
    return ["--models", "tiny=tiny", "--scorers", "softmax-margin,weighted-contrastive", "--reductions", "none,fixed",
            "--fixed-k", "16", "--min-exit-layer", "1", "--n-time", "2", "--batch-prompts", "2", "--device", "cpu",
            "--out", str(out), "--doc", str(folder / "bench.md"), "--docs-dir", str(folder / "plots"), "--quiet",
            *extra]


class TickClock:
    """A clock that advances one second per reading: a budget of B seconds allows about B readings."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 1.0
        return self.now


TIMING_FIELDS = ("runtime_s", "samples_per_s", "runtime_full_s", "samples_per_s_full", "runtime_passes_s",
                 "runtime_full_passes_s")


def _rows(out: Path) -> list[dict]:
    rows = json.loads((out / "rows.json").read_text())["rows"]
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    task = _tiny_task(folder)
    out = folder / "out"
    status = study_table.main(_argv(out, folder), loader=_loader, tasks={"tiny": task})
    return folder, task, out, status


def test_a_certified_early_exit_is_timed_and_looked_up(tmp_path):
    # δ = 0.9 with risk consistency (random references: the full model's ROUGE-L is already near 0, so the
    # excess loss of early outputs stays small) certifies λ̂ < 1 even with n = 8
    task = _tiny_task(tmp_path)
    out = tmp_path / "out"
    argv = _argv(out, tmp_path, "--deltas", "0.9", "--grid", "1,0.5,0.2,0", "--scorers", "softmax-margin",
                 "--reductions", "none")
    assert study_table.main(argv, loader=_loader, tasks={"tiny": task}) == 0
    rows = json.loads((out / "rows.json").read_text())["rows"]
    early = [r for r in rows if r["lambda_hat"] < 1]
    assert early, "nothing certified below λ = 1"
    result = json.loads(next((out / "configs").glob("*.json")).read_text())
    for r in early:
        j = result["lambdas"].index(r["lambda_hat"])
        assert r["mean_exit_layer"] == pytest.approx(result["test"]["mean_exit_layer"][j]) and r["mean_exit_layer"] < 4
        assert r["test_risk"] == pytest.approx(result["test"][f"risk_{r['loss']}"][j])
        assert r["metric_early"]["rouge-l"] == pytest.approx(result["test"]["metric_early"]["rouge-l"][j])
        assert r["runtime_s"] > 0 and r["samples_per_s"] == pytest.approx(2 / r["runtime_s"])
        # the timed fast path decoded the same texts as the sweep at λ̂
        assert r["timing_same_text"] == 1.0


def _pretend_timed_elsewhere(out: Path, key: str, machine: str) -> dict:
    """Rewrite a finished configuration (and the shared timing file) as if its timing ``key`` had been made on
    ``machine``, with a runtime no real run gives; returns the configuration's JSON as it was."""
    path = next((out / "configs").glob("*.json"))
    result = json.loads(path.read_text())
    changed = json.loads(path.read_text())
    changed["timing"][key].update(hardware=machine, runtime_s=999.0, samples_per_s=2 / 999.0)
    path.write_text(json.dumps(changed))
    if key == "1":  # the λ = 1 timing file is what an earlier session left for every configuration of the task
        timing = next((out / "timing").glob("*__full__lam1.json"))
        timing.write_text(json.dumps(dict(json.loads(timing.read_text()), hardware=machine, runtime_s=999.0)))
    return result


def test_runtimes_from_different_machines_are_marked_and_retime_makes_them_compare(tmp_path):
    task = _tiny_task(tmp_path)
    out = tmp_path / "out"
    argv = _argv(out, tmp_path, "--deltas", "0.9", "--grid", "1,0.5,0.2,0", "--scorers", "softmax-margin",
                 "--reductions", "none")
    # --retime sweeps nothing that is not finished
    assert study_table.main([*argv, "--retime"], loader=_loader, tasks={"tiny": task}) == 0
    assert not list((out / "configs").glob("*.json"))
    assert study_table.main(argv, loader=_loader, tasks={"tiny": task}) == 0
    before = _pretend_timed_elsewhere(out, "1", "NVIDIA H200")
    assert before["sweep"]["hardware"] == "cpu" and {t["hardware"] for t in before["timing"].values()} == {"cpu"}
    lam_keys = [k for k in before["timing"] if k != "1"]
    assert lam_keys, "nothing certified below λ = 1"
    rows = report.rows_from_results(core.Store(out).config_results())
    apart = [r for r in rows if r["lambda_hat"] < 1]
    assert apart and not any(report.timings_comparable(r) for r in apart)
    assert all(report.timings_comparable(r) for r in rows if r["lambda_hat"] == 1)
    text = "\n".join(report.markdown_table(rows))
    assert " ‡ |" in text and "measured on cpu, the one at λ = 1 on NVIDIA H200" in text
    q1 = "\n".join(report._answer_wall_clock(rows))
    assert "No row with a certified λ̂ < 1 has its two runtimes from the same machine" in q1
    assert f"Left out: {len(apart)} timed rows" in q1
    # a plain rerun finds everything done and leaves the timings alone
    assert study_table.main(argv, loader=_loader, tasks={"tiny": task}) == 0
    path = next((out / "configs").glob("*.json"))
    assert json.loads(path.read_text())["timing"]["1"]["runtime_s"] == 999.0
    # --retime times λ = 1 again here (the cached file is from the other machine), keeps the λ̂ timings made
    # here, and checks the new timing against the sweep's texts kept in the JSON
    assert study_table.main([*argv, "--retime"], loader=_loader, tasks={"tiny": task}) == 0
    after = json.loads(path.read_text())
    assert after["timing"]["1"]["hardware"] == "cpu" and after["timing"]["1"]["runtime_s"] < 999.0
    assert after["timing"]["1"]["same_text_as_sweep"] == 1.0
    assert {k: after["timing"][k] for k in lam_keys} == {k: before["timing"][k] for k in lam_keys}
    assert after["certificates"] == before["certificates"] and after["test"] == before["test"]
    rows = json.loads((out / "rows.json").read_text())["rows"]
    assert all(report.timings_comparable(r) for r in rows)
    # without the sweep's texts in the JSON they come from the test split's loss table; without that too, the
    # agreement is unknown rather than guessed
    for drop_tables in (False, True):
        _pretend_timed_elsewhere(out, lam_keys[0], "NVIDIA H100 80GB HBM3")
        changed = json.loads(path.read_text())
        changed.pop("sweep_texts_timed", None)
        path.write_text(json.dumps(changed))
        if drop_tables:
            for table in (out / "tables").glob("*__test__*.parquet"):
                table.unlink()
        assert study_table.main([*argv, "--retime"], loader=_loader, tasks={"tiny": task}) == 0
        timing = json.loads(path.read_text())["timing"][lam_keys[0]]
        assert timing["hardware"] == "cpu" and timing["runtime_s"] < 999.0
        assert timing["same_text_as_sweep"] == (None if drop_tables else 1.0)


class _CountingDecoder:
    """A decoder whose every generate() call takes one tick of a fake clock; counts calls."""

    def __init__(self):
        import torch

        self.backend = type("B", (), {"device": torch.device("cpu")})()
        self.tokenizer = None
        self.calls = 0
        self.collector_on = []

    def generate(self, prompts, threshold, max_new_tokens):
        self.calls += 1
        self.collector_on.append(gc.isenabled())
        return [type("O", (), {"token_ids": [1, 2], "exit_layers": [3, 4], "text": "ab"})()]


def test_batch1_timing_is_the_median_of_its_passes(monkeypatch):
    ticks = iter([0.0, 1.0, 10.0, 15.0, 20.0, 22.0])  # passes of 1, 5 and 2 seconds
    monkeypatch.setattr(core.time, "perf_counter", lambda: next(ticks))
    decoder = _CountingDecoder()
    timing = core.time_batch1(decoder, ["p", "q"], 0.9, 4, passes=3)
    assert decoder.calls == 6  # every prompt in every pass
    # the garbage collector stays out of the timed passes, as timeit keeps it, and is on again afterwards
    assert decoder.collector_on == [False] * 6 and gc.isenabled()
    assert timing["runtime_passes_s"] == [1.0, 5.0, 2.0] and timing["runtime_s"] == 2.0
    assert timing["samples_per_s"] == 1.0 and timing["tokens"] == 4 and timing["mean_exit_layer"] == 3.5
    with pytest.raises(ValueError, match="passes"):
        core.time_batch1(decoder, ["p"], 0.9, 4, passes=0)


def test_timings_of_one_configuration_share_one_decoder(monkeypatch):
    # a configuration's λ̂ timings reuse the decoder (its CUDA graphs are captured once, not once per λ); another
    # configuration or model gets its own, and only the λ = 1 decoder and the current one are kept
    built = []
    monkeypatch.setattr(core, "fast_decoder", lambda model, tok, config, adapters, compile: built.append(config)
                        or object())
    monkeypatch.setattr(core, "_TIMING_DECODERS", core.OrderedDict())
    loaded = type("L", (), {"model": object(), "tokenizer": None})()
    other = type("L", (), {"model": object(), "tokenizer": None})()
    margin = core.Configuration("softmax-margin", core.reductions(["none"], 1000, (1000, 10))[0], 15)
    fixed = core.Configuration("softmax-margin", core.reductions(["fixed"], 1000, (1000, 10))[0], 15)
    full = core._timing_decoder(loaded, None, None, False)
    first = core._timing_decoder(loaded, None, margin, False)
    assert core._timing_decoder(loaded, None, margin, False) is first
    assert core._timing_decoder(loaded, None, None, False) is full
    assert core._timing_decoder(loaded, None, fixed, False) is not first
    assert core._timing_decoder(other, None, fixed, False) is not core._timing_decoder(loaded, None, fixed, False)
    assert len(core._TIMING_DECODERS) == core.TIMING_DECODERS_KEPT
    assert core._timing_decoder(loaded, None, margin, False) is not first  # dropped meanwhile, built again
    assert built == [None, margin, fixed, fixed, margin]


def test_question_1_says_which_sides_hold_in_every_timed_pass():
    def row(at, full):
        return {"model": "m", "task": "t", "reduction": "decaying", "reduction_kind": "decaying", "scorer": "s",
                "loss": "risk", "delta": 0.1, "epsilon": 0.05, "lambda_hat": 0.9, "metrics": ["rouge-l"],
                "risk_metric": "rouge-l", "test_risk": 0.05,
                "metric_early": {"rouge-l": 0.2}, "metric_full": {"rouge-l": 0.21}, "cal_metric_full": {"rouge-l": 0.2},
                "timing_device": "gpu", "timing_device_at": "gpu",
                "runtime_s": float(np.median(at)), "runtime_full_s": float(np.median(full)),
                "runtime_passes_s": at if len(at) > 1 else None, "runtime_full_passes_s": full if len(full) > 1 else None}

    rows = [row([2.0, 2.1, 2.2], [1.0, 1.1, 1.2]),   # slower in every pass
            row([0.5, 0.6, 0.7], [1.0, 1.1, 1.2]),   # faster in every pass
            row([1.0, 1.3, 1.15], [1.1, 1.0, 1.2]),  # slower by the median only: within the spread
            row([1.3], [1.0, 1.1, 1.2])]             # one pass at λ̂
    text = "\n".join(report._answer_wall_clock(rows))
    assert "Of 4 rows with a certified λ̂ < 1, 3 ran slower" in text
    assert ("Of the 3 rows timed with several passes, 1 were slower in every pass than in any pass at λ = 1, "
            "1 faster in every pass, 1 within the passes' spread.") in text
    assert "1 of these rows rest on one timed pass" in text


def test_question_1_says_how_deep_the_rows_that_beat_the_full_model_exit():
    def row(layers, runtime):
        return {"model": "m", "task": "t", "reduction": "decaying", "scorer": "s", "lambda_hat": 0.5,
                "mean_exit_layer": layers, "num_layers": 30, "runtime_s": runtime, "runtime_full_s": 1.0}

    rows = [row(18.0, 0.8), row(19.5, 1.1), row(21.0, 0.9), row(27.0, 1.3), row(30.0, 1.0)]
    text = "\n".join(report._exit_depth_and_speed(rows))
    assert ("by the share of layers the tokens keep (mean exit layer / L): 1 of 2 keeping 0–67 %, 1 of 1 keeping "
            "67–75 %, 0 of 2 keeping 88–100 %.") in text
    assert "The deepest faster row keeps 70 % (21.00 of 30: m, t, decaying, s, λ̂ 0.5)." in text
    assert "deepest" not in "\n".join(report._exit_depth_and_speed([row(25.0, 1.2)]))


def test_rows_whose_test_risk_exceeds_delta_are_named_with_their_calibration_risk():
    def row(test_risk, **extra):
        return dict({"model": "m", "task": "t", "reduction": "fixed k=1000", "scorer": "s", "loss": "textual",
                     "delta": 0.2, "epsilon": 0.05, "lambda_hat": 0.97, "cal_risk": 0.153, "test_risk": test_risk,
                     "n_cal": 400, "n_test": 50}, **extra)

    text = report._test_risk_over_delta([row(0.247), row(0.12), row(0.2)])
    assert text.startswith("Test risk above δ in 1 of 3 rows: m / t / fixed k=1000 / s / textual δ = 0.2 "
                           "(λ̂ 0.97: calibration risk 0.153 on 400 prompts, test risk 0.247 on 50).")
    assert "ε = 0.05." in text
    clean = report._test_risk_over_delta([row(0.1), row(0.05, epsilon=0.1)])
    assert clean.startswith("Test risk above δ in 0 of 2 rows. ") and "ε = 0.05/0.1." in clean


def _finished_for_retime(tmp_path: Path, scorers: str) -> tuple[core.Task, Path, list[str]]:
    """A finished table (one δ, reduction none, timings of two passes) to re-time: (task, out folder, argv)."""
    task = _tiny_task(tmp_path)
    out = tmp_path / "out"
    argv = _argv(out, tmp_path, "--deltas", "0.9", "--grid", "1,0.5,0.2,0", "--scorers", scorers,
                 "--reductions", "none", "--time-passes", "2")
    assert study_table.main(argv, loader=_loader, tasks={"tiny": task}) == 0
    return task, out, argv


def _drop_from_stored_timings(out: Path, field: str, pattern: str = "*.json") -> None:
    for stored in (out / "timing").glob(pattern):
        stored.write_text(json.dumps({k: v for k, v in json.loads(stored.read_text()).items() if k != field}))


def test_retime_times_again_the_timings_older_than_their_scorers_decoding(tmp_path):
    # jsd-contrastive's amateur heads are read together since revision 2: its λ̂ timings without the field were
    # made with the slower per-layer reading and are re-timed; λ = 1 (no scorer) and other scorers are not
    task, out, argv = _finished_for_retime(tmp_path, "jsd-contrastive,softmax-margin")
    paths = {p.name.split("__")[2]: p for p in (out / "configs").glob("*.json")}
    jsd = json.loads(paths["jsd-contrastive"].read_text())
    early = [key for key in jsd["timing"] if key != "1"]
    assert early, "the test needs a certified λ̂ < 1"
    assert all(jsd["timing"][key]["timing_revision"] == report.TIMING_REVISIONS["jsd-contrastive"] for key in early)
    assert "timing_revision" not in jsd["timing"]["1"]
    assert not core._to_retime(jsd, jsd["timing"]["1"]["hardware"], 2)
    # as the tenth session left the JSD rows: no revision recorded
    for key in early:
        jsd["timing"][key].pop("timing_revision")
        jsd["timing"][key]["runtime_s"] = 999.0
    paths["jsd-contrastive"].write_text(json.dumps(jsd))
    _drop_from_stored_timings(out, "timing_revision", "*jsd-contrastive*.json")
    margin_before = json.loads(paths["softmax-margin"].read_text())["timing"]
    # a plain rerun re-times nothing finished, but the table marks the old timings (§) and says why
    assert study_table.main(argv, loader=_loader, tasks={"tiny": task}) == 0
    doc = (tmp_path / "bench.md").read_text()
    assert "999.00" in doc and "§ timed with an older, slower decoding of its scorer (jsd-contrastive" in doc
    early_rows = [r for r in json.loads((out / "rows.json").read_text())["rows"] if r["lambda_hat"] < 1]
    assert [r["timing_stale"] for r in early_rows] == [r["scorer"] == "jsd-contrastive" for r in early_rows]
    assert study_table.main([*argv, "--retime"], loader=_loader, tasks={"tiny": task}) == 0
    assert "§" not in (tmp_path / "bench.md").read_text()
    after = json.loads(paths["jsd-contrastive"].read_text())
    for key in early:
        assert after["timing"][key]["runtime_s"] < 999.0 and after["timing"][key]["timing_revision"] == 2
    assert after["timing"]["1"] == jsd["timing"]["1"]  # made here with enough passes: kept
    assert json.loads(paths["softmax-margin"].read_text())["timing"] == margin_before


def test_retime_times_again_what_was_timed_here_with_too_few_passes(tmp_path):
    task, out, argv = _finished_for_retime(tmp_path, "softmax-margin")
    path = next((out / "configs").glob("*.json"))
    result = json.loads(path.read_text())
    assert all(len(t["runtime_passes_s"]) == 2 for t in result["timing"].values())
    # as an older call left it: one pass, nothing recorded about passes
    for key, timing in result["timing"].items():
        timing.pop("runtime_passes_s")
        timing["runtime_s"] = 999.0
    path.write_text(json.dumps(result))
    _drop_from_stored_timings(out, "runtime_passes_s")
    # asking for one pass: nothing to do; a plain rerun never re-times a finished configuration
    assert study_table.main([*argv, "--retime", "--time-passes", "1"], loader=_loader, tasks={"tiny": task}) == 0
    assert study_table.main(argv, loader=_loader, tasks={"tiny": task}) == 0
    assert all(t["runtime_s"] == 999.0 for t in json.loads(path.read_text())["timing"].values())
    assert study_table.main([*argv, "--retime"], loader=_loader, tasks={"tiny": task}) == 0
    after = json.loads(path.read_text())
    assert set(after["timing"]) == set(result["timing"])
    for timing in after["timing"].values():
        assert len(timing["runtime_passes_s"]) == 2 and timing["runtime_s"] < 999.0
        assert timing["runtime_s"] == pytest.approx(float(np.median(timing["runtime_passes_s"])))
    assert after["certificates"] == result["certificates"] and after["test"] == result["test"]
    # one-pass timings all made on one other machine compare among themselves: not this machine's to redo
    for timing in after["timing"].values():
        timing.update(hardware="NVIDIA H100 80GB HBM3", runtime_s=999.0)
        timing.pop("runtime_passes_s")
    path.write_text(json.dumps(after))
    assert study_table.main([*argv, "--retime"], loader=_loader, tasks={"tiny": task}) == 0
    assert json.loads(path.read_text())["timing"] == after["timing"]
    assert study_table.main(["--time-passes", "0", *argv[:-2]], loader=_loader, tasks={"tiny": task}) == 2
    # ... unless that machine is not to be had: --retime-any-machine moves all of them here, with the passes
    assert study_table.main([*argv, "--retime-any-machine"], loader=_loader, tasks={"tiny": task}) == 2
    assert study_table.main([*argv, "--retime", "--retime-any-machine"], loader=_loader, tasks={"tiny": task}) == 0
    moved = json.loads(path.read_text())["timing"]
    assert set(moved) == set(after["timing"])
    for timing in moved.values():
        assert timing["hardware"] != "NVIDIA H100 80GB HBM3" and len(timing["runtime_passes_s"]) == 2
        assert timing["runtime_s"] < 999.0


def test_the_rows_sweep_on_the_fast_path_gives_the_grid_sweeps_rows(uninterrupted, tmp_path):
    folder, task, out, status = uninterrupted
    rows_out = tmp_path / "out"
    assert study_table.main(_argv(rows_out, tmp_path, "--sweep-decoding", "rows"), loader=_loader,
                            tasks={"tiny": task}) == status
    # the same rows in float32, save the label of how they were swept
    label = {"sweep": None, "sweep_decoding": None}
    assert [dict(r, **label) for r in _rows(rows_out)] == [dict(r, **label) for r in _rows(out)]
    assert {r["sweep"] for r in _rows(rows_out)} == {"cpu, float32, rows sweep"}
    result = json.loads(next((rows_out / "configs").glob("*.json")).read_text())
    assert result["sweep"]["decoding"] == "rows"


def test_rows_doc_and_plots_of_a_full_run(uninterrupted):
    folder, task, out, status = uninterrupted
    assert status == 0
    rows = json.loads((out / "rows.json").read_text())["rows"]
    # 2 scorers × 2 reductions × 2 loss kinds × 2 δ
    assert len(rows) == 16
    assert {(r["scorer"], r["reduction"]) for r in rows} == {
        (s, red) for s in ("softmax-margin", "weighted-contrastive") for red in ("none", "fixed k=16")}
    for r in rows:
        assert r["num_layers"] == 4 and r["n_cal"] == 8 and r["n_test"] == 4 and r["max_new_tokens"] == 5
        assert 1.0 <= r["mean_exit_layer"] <= 4.0 and r["flops_ratio"] > 0
        assert r["runtime_full_s"] > 0 and r["n_time"] == 2
        assert r["timing_same_text"] == 1.0  # the timed fast path at λ = 1 gave the sweep's full-model texts
        # with n = 8 nothing is certifiable at these δ: λ̂ = 1 reproduces the full model exactly
        assert r["lambda_hat"] == 1.0 and r["test_risk"] == 0.0
        assert r["metric_early"]["rouge-l"] == pytest.approx(r["metric_full"]["rouge-l"])
    # the full model's metric is the mean per-example ROUGE-L of its test outputs against the references
    table = LossTable.load(*(out / "tables").glob("tiny__tiny__softmax-margin__none__j1__test__*.parquet"))
    refs = [json.loads(c) for c in table.example_columns["reference"]]
    expected = np.mean([metrics.similarity("rouge-l", t, ref)
                        for t, ref in zip(table.example_columns["full_text"], refs)])
    assert rows[0]["metric_full"]["rouge-l"] == pytest.approx(expected)
    # calibration and test splits are disjoint
    cal = LossTable.load(*(out / "tables").glob("tiny__tiny__softmax-margin__none__j1__cal__*.parquet"))
    assert not set(cal.example_ids) & set(table.example_ids) and cal.n == 8 and table.n == 4
    doc = (folder / "bench.md").read_text()
    assert doc.count(report.BEGIN) == 1 and doc.count(report.END) == 1
    assert "| tiny | fixed k=16 (j=1) | weighted-contrastive | textual | 0.2 | 1 (none) |" in doc
    assert "| tiny | fixed k=16 (j=1) | weighted-contrastive | risk | 0.2" in doc
    assert "What the table answers" in doc and "FILL: the exit-ready model" in doc
    assert (folder / "plots" / "study_frontier_tiny.png").stat().st_size > 1000
    # --report-only rebuilds the section from the JSON alone and keeps the computing call's command
    (folder / "bench.md").write_text("# Benchmarks\n")
    assert study_table.main(["--report-only", "--out", str(out), "--doc", str(folder / "bench.md"),
                             "--docs-dir", str(folder / "plots")]) == 0
    rebuilt = (folder / "bench.md").read_text()
    assert "--batch-prompts 2" in rebuilt and "--report-only" not in rebuilt
    assert "| tiny | fixed k=16 (j=1) | weighted-contrastive | textual | 0.2 | 1 (none) |" in rebuilt


def test_report_only_rebuilds_rows_json_from_the_configurations_present(uninterrupted, tmp_path):
    # results copied in from a device run replace configuration JSONs; rows.json must follow them
    folder, task, out, status = uninterrupted
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = json.loads((copy / "rows.json").read_text())
    dropped = sorted((copy / "configs").glob("*.json"))[0]
    dropped.unlink()
    assert study_table.main(["--report-only", "--out", str(copy), "--doc", str(tmp_path / "bench.md"),
                             "--docs-dir", str(tmp_path / "plots")]) == 0
    after = json.loads((copy / "rows.json").read_text())
    assert len(after["rows"]) == len(before["rows"]) - 4  # one configuration: 2 losses × 2 δ
    assert after["command"] == before["command"] and after["complete"] == before["complete"]


def test_task_block_says_how_its_rows_were_swept_and_timed(uninterrupted):
    folder, task, out, status = uninterrupted
    rows = json.loads((out / "rows.json").read_text())["rows"]
    text = "\n".join(report.markdown_table(rows))
    assert "swept on cpu, float32, grid sweep" in text and "batch-1 timing on the first 2 test prompts (cpu)" in text
    untimed = "\n".join(report.markdown_table([dict(r, n_time=0, timing_device=None) for r in rows]))
    assert "not timed" in untimed and "timing on the first" not in untimed
    # results written before the rows sweep existed record no decoding: they were swept with the grid
    config = json.loads(next((out / "configs").glob("*.json")).read_text())
    config["sweep"] = {k: v for k, v in config["sweep"].items() if k != "decoding"}
    older = report.rows_from_results([config])
    assert {(r["sweep"], r["sweep_decoding"]) for r in older} == {("cpu, float32, grid sweep", "grid")}


def test_a_full_output_that_moves_with_the_sweeps_decoding_is_named_per_model(uninterrupted):
    # in bf16 the grid and the rows sweep decode λ = 1 in different batch shapes, and the full output can
    # differ; the table must say which value came from which decoding instead of showing two "full" models
    folder, task, out, status = uninterrupted
    rows = json.loads((out / "rows.json").read_text())["rows"]
    assert "‖" not in "\n".join(report.markdown_table(rows))  # one decoding, one full output: no note
    first = rows[0]["reduction"], rows[0]["scorer"]
    moved = [dict(r, sweep_dtype="bfloat16", sweep_decoding="rows",
                  metric_full={"rouge-l": r["metric_full"]["rouge-l"] + 0.013})
             if (r["reduction"], r["scorer"]) == first else r for r in rows]
    other = [dict(r, model="other") for r in rows]  # a second model whose full output does not move
    text = "\n".join(report.markdown_table(moved + other))
    n_configs = len({(r["reduction"], r["scorer"]) for r in rows})
    full = 100 * rows[0]["metric_full"]["rouge-l"]
    assert text.count("‖") == 1 and "configurations of tiny:" in text and "of other" not in text
    assert (f"{full + 1.3:.1f} from 1 configuration of the rows sweep" in text
            and f"{full:.1f} from {n_configs - 1} configuration" in text)
    assert "in bfloat16 and float32 another batch shape rounds differently" in text  # the dtypes of its sweeps


def test_interrupted_run_resumes_to_the_same_rows(uninterrupted, tmp_path):
    folder, task, reference_out, _ = uninterrupted
    out = tmp_path / "out"
    first = study_table.main(_argv(out, tmp_path, "--time-budget", "9"), loader=_loader, tasks={"tiny": task},
                             clock=TickClock())
    assert first == study_table.INCOMPLETE
    assert list((out / "tables").glob("*.partial.jsonl")), "the budget should stop a sweep part-way"
    assert len(list((out / "configs").glob("*.json"))) < 4
    second = study_table.main(_argv(out, tmp_path), loader=_loader, tasks={"tiny": task})
    assert second == 0
    assert not list((out / "tables").glob("*.partial.jsonl"))
    assert _rows(out) == _rows(reference_out)
    # a third call finds everything done and changes nothing
    before = {p.name: p.read_text() for p in (out / "configs").glob("*.json")}
    assert study_table.main(_argv(out, tmp_path), loader=_loader, tasks={"tiny": task}) == 0
    assert {p.name: p.read_text() for p in (out / "configs").glob("*.json")} == before
    assert (tmp_path / "bench.md").read_text().count(report.BEGIN) == 1
    # other sizes: the calibration tables are reused, the test split is swept anew beside the old tables
    cal_tables = sorted(p.name for p in (out / "tables").glob("*__cal__*.parquet"))
    assert study_table.main(_argv(out, tmp_path, "--n-test", "3"), loader=_loader, tasks={"tiny": task}) == 0
    assert sorted(p.name for p in (out / "tables").glob("*__cal__*.parquet")) == cal_tables
    assert len(list((out / "tables").glob("*__test__*.parquet"))) == 8
    assert {r["n_test"] for r in json.loads((out / "rows.json").read_text())["rows"]} == {3}


def _no_model(spec):
    raise AssertionError(f"--check loaded the model {spec.label}")


def _files(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_check_says_whether_a_selection_has_work_left_without_loading_or_writing(uninterrupted, tmp_path):
    folder, task, out, _ = uninterrupted
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = _files(copy)

    def check(*extra):
        return study_table.main(_argv(copy, tmp_path, *extra, "--check"), loader=_no_model, tasks={"tiny": task})

    assert check() == 0
    assert check("--reductions", "decaying") == study_table.PENDING  # never swept
    assert check("--retime") == 0
    # timed with 3 passes: asking for 5 leaves timings to make again
    assert check("--retime", "--time-passes", "5") == study_table.PENDING
    assert _files(copy) == before and not (tmp_path / "bench.md").exists()


def test_pending_names_the_finished_selections_checked_in_one_process(uninterrupted, capsys, tmp_path):
    import shlex

    import study_table_pending

    folder, task, out, _ = uninterrupted

    def line(*extra):
        return shlex.join(_argv(out, folder, *extra))

    lines = [line(), "# marked", line("--reductions", "decaying"), "", line("--deltas", "7"),
             line("--reductions", "nope"), line("--retime")]
    assert study_table_pending.finished_selections(lines, loader=_no_model, tasks={"tiny": task}) == [1, 7]
    assert study_table_pending.main([str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err


def _table(texts, full, references, flops, layers, tokens, n_copies=1) -> LossTable:
    """A loss table by hand: texts (n, K), full texts (n,), references (n,), flops/layers/tokens (n, K)."""
    texts = np.array(texts * n_copies, dtype=object)
    full = list(full) * n_copies
    references = list(references) * n_copies
    n, k = texts.shape
    textual = np.array([[metrics.textual_consistency_loss("rouge-l", texts[i, j], full[i]) for j in range(k)]
                        for i in range(n)])
    risk = np.array([[metrics.risk_consistency_loss("rouge-l", texts[i, j], full[i], references[i]) for j in range(k)]
                     for i in range(n)])
    return LossTable(risk, np.array([1.0, 0.5]), [f"e{i}" for i in range(n)], {},
                     candidate_columns={"loss_textual": textual, "loss_risk": risk, "text": texts,
                                        "flops": np.array(flops * n_copies, dtype=float),
                                        "layers_total": np.array(layers * n_copies),
                                        "num_tokens": np.array(tokens * n_copies)},
                     example_columns={"full_text": np.array(full, dtype=object),
                                      "full_flops": np.full(n, 10.0),
                                      "reference": np.array([json.dumps(r) for r in references], dtype=object)})


def test_certified_lambda_and_test_lookups_on_a_hand_made_case():
    # calibration: λ = 0.5 changes nothing (loss 0) on 200 examples, so it is certified at δ = 0.1, ε = 0.05,
    # and it costs half the FLOPs
    cal = _table([["a b c", "a b c"]], ["a b c"], ["a b c"], [[10.0, 5.0]], [[8, 4]], [[2, 2]], n_copies=200)
    # test: example 0 keeps its text at λ = 0.5, example 1 changes "x y" -> "x z"
    test = _table([["a b c", "a b c"], ["x y", "x z"]], ["a b c", "x y"], ["a b", "x y"],
                  [[10.0, 6.0], [10.0, 2.0]], [[8, 6], [8, 2]], [[2, 2], [2, 2]])
    result = core.certify_and_look_up(cal, test, metric_names=("rouge-l",), num_layers=4, deltas=(0.1,))
    by_loss = {c["loss"]: c for c in result["certificates"]}
    for loss in ("textual", "risk"):
        cert = by_loss[loss]
        assert cert["lambda_hat"] == 0.5 and cert["certified_any"] and cert["index"] == 1
        assert cert["cal_risk"] == 0.0
        assert cert["flops_ratio"] == pytest.approx((6.0 + 2.0) / 20.0)
        assert cert["mean_exit_layer"] == pytest.approx((6 + 2) / 4)
    # ROUGE-L F of "x z" against "x y": P = R = 1/2 -> F = 1/2; "a b c" against "a b": P 2/3, R 1 -> F 0.8
    assert by_loss["textual"]["test_risk"] == pytest.approx((0.0 + 0.5) / 2)
    assert by_loss["risk"]["test_risk"] == pytest.approx((0.0 + 0.5) / 2)
    assert by_loss["risk"]["metric_early"]["rouge-l"] == pytest.approx((0.8 + 0.5) / 2)
    assert result["test"]["metric_full"]["rouge-l"] == pytest.approx((0.8 + 1.0) / 2)
    assert result["test"]["metric_early"]["rouge-l"] == pytest.approx([0.9, 0.65])
    # exit heads that cost more than the layers they skip: least FLOPs keeps λ = 1, least layers still exits
    dear = _table([["a b c", "a b c"]], ["a b c"], ["a b c"], [[10.0, 12.0]], [[8, 4]], [[2, 2]], n_copies=200)
    by_flops = core.certify_and_look_up(dear, test, metric_names=("rouge-l",), num_layers=4, deltas=(0.1,),
                                        cost="flops")["certificates"]
    by_layers = core.certify_and_look_up(dear, test, metric_names=("rouge-l",), num_layers=4, deltas=(0.1,),
                                         cost="layers")["certificates"]
    assert [c["lambda_hat"] for c in by_flops] == [1.0, 1.0] and all(c["certified_any"] for c in by_flops)
    assert [c["lambda_hat"] for c in by_layers] == [0.5, 0.5]
    # too few calibration examples: nothing certified, λ̂ = 1 and the test lookups are the full model's
    small = core.certify_and_look_up(test, test, metric_names=("rouge-l",), num_layers=4, deltas=(0.1,))
    for cert in small["certificates"]:
        assert cert["lambda_hat"] == 1.0 and not cert["certified_any"] and cert["index"] == 0
        assert cert["test_risk"] == 0.0 and cert["flops_ratio"] == 1.0 and cert["mean_exit_layer"] == 4.0


def test_section_between_markers_is_replaced_not_appended(tmp_path):
    doc = tmp_path / "b.md"
    doc.write_text("# Benchmarks\n\nbefore\n\n## Later section\n")
    report.write_section(doc, report.BEGIN + "\nfirst\n" + report.END + "\n")
    report.write_section(doc, report.BEGIN + "\nsecond\n" + report.END + "\n")
    text = doc.read_text()
    assert "second" in text and "first" not in text and text.count(report.BEGIN) == 1
    assert text.startswith("# Benchmarks\n\nbefore") and "## Later section" in text


@pytest.mark.parametrize("argv, message", [
    (["--models", "a=x", "a=y"], "share a label"),
    (["--exit-adapters", "other=/nonexistent.safetensors"], "not --models labels"),
    (["--tasks", "squad", "--data-dir", "/nonexistent"], "squad_v1.1_dev.jsonl not found"),
])
def test_bad_input_is_one_clear_error(tmp_path, capsys, argv, message):
    status = study_table.main(["--out", str(tmp_path / "out"), "--doc", str(tmp_path / "b.md"), *argv])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "b.md").exists()


def test_per_task_sizes_parse_and_apply():
    assert study_table._per_task("32") == 32
    assert study_table._per_task("squad=16,samsum=48") == {"squad": 16, "samsum": 48}
    with pytest.raises(Exception, match="task=N"):
        study_table._per_task("nosuchtask=3")
    settings = core.StudySettings(out=Path("."), data_dir=Path("."), max_new_tokens={"*": 32, "squad": 16})
    assert settings.sizes(core.TASKS["squad"])[2] == 16
    assert settings.sizes(core.TASKS["samsum"]) == (400, 200, 32)
    assert settings.sizes(core.TASKS["cnn-dailymail"])[:2] == (150, 100)


def test_exit_classifier_rows_come_with_an_adapter_file_that_holds_one(tmp_path):
    import torch

    from ltt_exit.decode.adapters import ExitAdapters
    from ltt_exit.decode.scorers import EXIT_FEATURES, LogisticExitModel

    loaded = _loader(core.ModelSpec("tiny", "tiny"))
    adapters = ExitAdapters.identity("affine", num_layers=4, hidden_size=loaded.model.config.hidden_size,
                                     model_fingerprint=loaded.fingerprint)
    generator = torch.Generator().manual_seed(5)
    classifier = LogisticExitModel(EXIT_FEATURES, [2, 3], torch.randn(2, len(EXIT_FEATURES), generator=generator),
                                   torch.randn(2, generator=generator))
    path = adapters.with_exit_classifier(classifier).save(tmp_path / "exits.safetensors")
    task = _tiny_task(tmp_path)
    out = tmp_path / "out"
    argv = _argv(out, tmp_path, "--exit-adapters", f"tiny={path}", "--scorers", "softmax-margin",
                 "--reductions", "fixed", "--min-exit-layer", "2")
    assert study_table.main(argv, loader=_loader, tasks={"tiny": task}) == 0
    rows = json.loads((out / "rows.json").read_text())["rows"]
    assert sorted({r["scorer"] for r in rows}) == ["exit-classifier", "softmax-margin"]
    results = {r["configuration"]["scorer"]: r for r in core.Store(out).config_results()}
    for result in results.values():  # the adapters serve every configuration of the model
        assert result["model"]["adapters"] == str(path)
        assert result["configuration"]["decoder"]["exit_adapters"] is not None
    assert results["exit-classifier"]["configuration"]["reduction"] == "fixed k=16"

    def check(adapter_file):
        argv = _argv(out, tmp_path, "--exit-adapters", f"tiny={adapter_file}", "--scorers", "softmax-margin",
                     "--reductions", "fixed", "--min-exit-layer", "2", "--check")
        return study_table.main(argv, loader=_no_model, tasks={"tiny": task})

    assert check(path) == 0
    # a refit under the same label (another classifier) is other adapters: its rows are still to make
    refit = LogisticExitModel(EXIT_FEATURES, [2, 3], torch.randn(2, len(EXIT_FEATURES), generator=generator),
                              torch.randn(2, generator=generator))
    other = adapters.with_exit_classifier(refit).save(tmp_path / "refit.safetensors")
    assert check(other) == study_table.PENDING


def test_exit_classifier_is_added_per_reduction_only_with_a_fitted_classifier():
    configs = [core.Configuration(s, red, 15) for red in core.reductions(["none", "fixed"], 100, (100, 10))
               for s in ("softmax-margin", "jsd-contrastive")]
    assert core.model_configurations(configs, None) == configs
    assert core.model_configurations(configs, type("A", (), {"exit_classifier": None})()) == configs
    added = core.model_configurations(configs, type("A", (), {"exit_classifier": object()})())[len(configs):]
    assert [(c.scorer, c.reduction.kind) for c in added] == [("exit-classifier", "none"), ("exit-classifier", "fixed")]


def test_budget_stops_before_work_that_would_overrun_it():
    clock = TickClock()  # each reading advances one second
    budget = core.Budget(10, clock=clock)  # deadline at t = 11
    budget.check(5, "a batch")  # read at t = 2: 9 s left
    with pytest.raises(core.OutOfTime, match="stopped before the next batch: 8 s of the time budget left, about 9 s"):
        budget.check(9, "the next batch")
    assert core.Budget(None).remaining() == float("inf")


def test_risk_rows_whose_delta_reaches_the_full_models_metric_are_marked(uninterrupted):
    # the risk loss max(0, m_full − m_early) never exceeds m_full: a δ at or above the full model's
    # calibration metric cannot rule out a collapse, and the table must say so rather than look reassuring
    folder, task, out, status = uninterrupted
    rows = json.loads((out / "rows.json").read_text())["rows"]
    assert all("rouge-l" in r["cal_metric_full"] for r in rows)  # carried from the configuration's JSON
    risk = next(r for r in rows if r["loss"] == "risk" and r["delta"] == 0.2)
    textual = next(r for r in rows if r["loss"] == "textual" and r["delta"] == 0.2)
    low, high = dict(risk, cal_metric_full={"rouge-l": 0.15}), dict(risk, cal_metric_full={"rouge-l": 0.35})
    assert report.delta_reaches_full_metric(low) and report.delta_reaches_full_metric(
        dict(risk, cal_metric_full={"rouge-l": 0.2}))
    assert not report.delta_reaches_full_metric(high)
    assert not report.delta_reaches_full_metric(dict(textual, cal_metric_full={"rouge-l": 0.15}))
    marked = "\n".join(report.markdown_table([low]))
    assert "| risk | 0.2 † |" in marked and "mean ROUGE-L on the calibration split (tiny 0.150)" in marked
    plain = "\n".join(report.markdown_table([high]))
    assert "†" not in plain
    answer = "\n".join(report.answers([low, high], []))
    assert "1 of 2 risk-consistency rows (marked †; tiny)" in answer
    # the test reads the metric inside the loss, recorded in the configuration's JSON, not the first declared
    assert {r["risk_metric"] for r in rows} == {"rouge-l"}
    second = dict(risk, metrics=["f1", "exact"], risk_metric="exact", cal_metric_full={"f1": 0.9, "exact": 0.15})
    assert report.delta_reaches_full_metric(second)
    assert not report.delta_reaches_full_metric(dict(second, risk_metric="f1"))
    # a configuration written before the loss's metric was recorded: the row falls back to the first declared
    config = json.loads(next((out / "configs").glob("*.json")).read_text())
    config["task"] = {k: v for k, v in config["task"].items() if k != "risk_metric"}
    config["task"]["metrics"] = ["f1", "exact"]
    config["cal"] = dict(config.get("cal", {}), metric_full={"f1": 0.9, "exact": 0.15})
    older = [r for r in report.rows_from_results([config]) if r["loss"] == "risk" and r["delta"] == 0.2]
    assert older and {r["risk_metric"] for r in older} == {"f1"}
    assert not any(report.delta_reaches_full_metric(r) for r in older)
    assert "mean exact on the calibration split (tiny 0.150)" in "\n".join(report.markdown_table([second]))


def test_q2_counts_contrastive_and_learned_scorers_against_the_margin_of_the_same_setting(uninterrupted):
    folder, task, out, status = uninterrupted
    base = next(r for r in json.loads((out / "rows.json").read_text())["rows"]
                if r["loss"] == "risk" and r["delta"] == 0.1)

    def row(scorer, flops, model="tiny"):
        return dict(base, scorer=scorer, flops_ratio=flops, model=model)

    rows = [row("softmax-margin", 0.90), row("weighted-contrastive", 0.80), row("jsd-contrastive", 0.9005),
            row("softmax-margin", 1.10, "adapted"), row("exit-classifier", 1.00, "adapted"),
            row("jsd-contrastive", 0.50, "no-margin")]  # no margin row in its setting: not compared
    text = "\n".join(report.answers(rows, []))
    assert "contrastive cheaper in 1, equal (±0.001) in 1, dearer in 0 of 2 comparisons" in text
    assert "exit classifier against the margin through the same adapted heads: cheaper in 1, equal in 0, " \
           "dearer in 0 of 1" in text
    assert "adapted / tiny / " in text and "exit-classifier 1.000 vs margin 1.100" in text


def test_each_configuration_records_its_command_and_mixed_calls_are_listed(uninterrupted):
    folder, task, out, status = uninterrupted
    results = core.Store(out).config_results()
    commands = {r["command"] for r in results}
    assert len(commands) == 1 and "--batch-prompts 2" in commands.pop()
    last = results[0]["command"]
    assert report._computing_commands(results, last) == []  # one call: the "Generated by" line says it all
    mixed = [dict(results[0], command="python benchmarks/study_table.py --tasks tiny --n-test 3"),
             dict(results[1], command=None), *results[2:]]
    text = "\n".join(report._computing_commands(mixed, last))
    assert "`python benchmarks/study_table.py --tasks tiny --n-test 3`: tiny / tiny / " in text
    assert "1 configurations computed before their command was recorded" in text
    assert f"`{last}`" in text
    # the section names its origin by what computed the rows: one call, or several assembled
    one = report.section(results, last, [], None, "complete for the command's selection")
    assert f"Generated by `{last}`" in one and "Status: complete" in one and "Assembled" not in one
    several = report.section(mixed, last, [], None, "complete for the command's selection")
    assert ("Assembled from the JSON results of 2 calls of `benchmarks/study_table.py` and of earlier ones that did "
            "not record their command") in several and "Generated by" not in several


def test_q2_compares_scorers_runtimes_only_at_one_lambda_on_one_machine():
    def row(scorer, lam, runtime, machine, task="t", loss="risk", delta=0.1):
        return {"model": "m", "task": task, "reduction": "decaying", "scorer": scorer, "lambda_hat": lam,
                "runtime_s": runtime, "timing_device_at": machine, "loss": loss, "delta": delta}

    rows = [row("softmax-margin", 0.9, 1.0, "A"), row("jsd-contrastive", 0.9, 3.0, "A"),
            # the same timing seen again by another (loss, δ) row of the setting: counted once
            row("softmax-margin", 0.9, 1.0, "A", loss="textual"), row("jsd-contrastive", 0.9, 3.0, "A", loss="textual"),
            row("softmax-margin", 0.8, 1.0, "A", task="u"), row("jsd-contrastive", 0.8, 2.0, "A", task="u"),
            # another machine, another λ̂, or λ̂ = 1: not compared
            row("softmax-margin", 0.9, 1.0, "A", task="v"), row("jsd-contrastive", 0.9, 9.0, "B", task="v"),
            row("softmax-margin", 0.9, 1.0, "A", task="w"), row("jsd-contrastive", 0.8, 9.0, "A", task="w"),
            row("softmax-margin", 1.0, 1.0, "A", task="x"), row("jsd-contrastive", 1.0, 9.0, "A", task="x")]
    text = report._runtime_comparison(rows)
    assert "jsd-contrastive / softmax-margin median 2.50 (range 2.00–3.00, 2 settings)" in text
    assert "weighted" not in text
    assert report._runtime_comparison(rows[6:]) == ""


def test_frontier_axis_turns_logarithmic_only_when_a_line_reaches_far_beyond_the_others():
    assert report._log_axis_ticks([0.7, 0.9, 1.0, 1.2]) is None
    assert report._log_axis_ticks([0.78, 1.0, 1.2, 3.64]) == [0.8, 1, 1.25, 1.5, 2, 3, 4]
    assert report._log_axis_ticks([None, 0.0]) is None


def test_a_configuration_swept_with_an_earlier_scorer_revision_is_marked_and_swept_again(tmp_path):
    # jsd-contrastive revision 2 restricts the amateur candidates in log space; a result recorded without
    # "revision" is revision 1's: the table marks it (¶) and the next call sweeps it again
    task, out, argv = _finished_for_retime(tmp_path, "jsd-contrastive,softmax-margin")
    paths = {p.name.split("__")[2]: p for p in (out / "configs").glob("*.json")}
    jsd = json.loads(paths["jsd-contrastive"].read_text())
    assert jsd["configuration"]["decoder"]["scorer"]["params"]["revision"] == 2 and not report.scorer_stale(jsd)
    del jsd["configuration"]["decoder"]["scorer"]["params"]["revision"]
    jsd["certificates"][0]["test_risk"] = 0.123456  # a value only revision 1's row has
    paths["jsd-contrastive"].write_text(json.dumps(jsd))
    margin_before = paths["softmax-margin"].read_text()
    assert report.scorer_stale(jsd)
    assert study_table.main([*argv, "--report-only"], loader=_loader, tasks={"tiny": task}) == 0
    doc = (tmp_path / "bench.md").read_text()
    assert "| jsd-contrastive ¶ |" in doc and "| softmax-margin ¶" not in doc
    assert "¶ swept and certified with an earlier revision of its scorer (jsd-contrastive: revision 1" in doc
    assert study_table.main(argv, loader=_loader, tasks={"tiny": task}) == 0
    again = json.loads(paths["jsd-contrastive"].read_text())
    assert again["configuration"]["decoder"]["scorer"]["params"]["revision"] == 2
    assert again["certificates"][0]["test_risk"] != 0.123456
    assert paths["softmax-margin"].read_text() == margin_before  # current revision: not swept again
    assert "¶" not in (tmp_path / "bench.md").read_text()
