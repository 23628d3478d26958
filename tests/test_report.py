"""ltt-report: the random-split protocol on synthetic tables with known behaviour, and its CLI."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from ltt_exit.loss_table import LossTable
from ltt_exit.report import markdown_table, split_trials

LAMBDAS = np.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
TRUE_RISK = np.array([0.0, 0.02, 0.05, 0.1, 0.2, 0.4])


def _table(n: int = 400, seed: int = 0) -> LossTable:
    rng = np.random.default_rng(seed)
    losses = (rng.random((n, LAMBDAS.size)) < TRUE_RISK).astype(float)
    layers = np.tile(np.array([12, 10, 8, 6, 4, 2], float), (n, 1))
    tokens = np.full((n, LAMBDAS.size), 1, dtype=np.int64)
    return LossTable(losses, LAMBDAS, [f"e{i}" for i in range(n)], {"num_layers": 12, "metric": "exact-match"},
                     candidate_columns={"layers_total": layers.astype(np.int64), "num_tokens": tokens,
                                        "mean_layers": layers,
                                        "exit_layers": np.array([[str(int(v))] * LAMBDAS.size for v in layers[:, 0]],
                                                                dtype=object)})


def test_protocol_reports_layers_speedup_and_a_small_violation_rate():
    table = _table()
    (summary,) = split_trials(table, [0.1], 0.05, trials=60, seed=1)
    # with 320 calibration examples the certified λ is near 0.8 (true risk 0.05) or 0.7 (0.1, not safe)
    assert 0.7 <= summary.mean_lambda <= 0.9
    assert summary.mean_layers == pytest.approx(12 / summary.speedup)
    assert 6 <= summary.mean_layers <= 10
    assert summary.violation_rate <= 0.05 + 3 * max(summary.violation_se, 0.03)
    assert summary.mean_test_risk < 0.1


def test_larger_delta_never_certifies_a_more_conservative_lambda_on_average():
    table = _table()
    small, large = split_trials(table, [0.05, 0.25], 0.05, trials=40, seed=2)
    assert large.mean_lambda <= small.mean_lambda
    assert large.mean_layers <= small.mean_layers


def test_nothing_certified_means_full_model_zero_risk():
    losses = np.ones((50, 3))
    losses[:, 0] = 0.0
    table = LossTable(losses, np.array([1.0, 0.5, 0.2]), [f"e{i}" for i in range(50)], {"num_layers": 6},
                      candidate_columns={"mean_layers": np.tile([6.0, 3.0, 1.0], (50, 1))})
    (summary,) = split_trials(table, [0.1], 0.05, trials=10)
    assert summary.mean_test_risk == 0.0
    assert summary.violation_rate == 0.0
    assert summary.mean_layers == 6.0


def test_bad_split_is_refused():
    with pytest.raises(ValueError, match="calibration_fraction"):
        split_trials(_table(20), [0.1], 0.05, calibration_fraction=1.0)
    with pytest.raises(ValueError, match="cannot be split"):
        split_trials(_table(1), [0.1], 0.05)


def test_markdown_has_one_row_per_delta():
    rows = markdown_table(split_trials(_table(100), [0.1, 0.2], 0.05, trials=5)).strip().splitlines()
    assert len(rows) == 4 and rows[2].startswith("| 0.1 ")


def test_cli_writes_report_and_plots(tmp_path):
    path = tmp_path / "table.parquet"
    _table(200).save(path)
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "ltt_exit.cli.report", str(path), "--deltas", "0.1", "0.2",
                           "--trials", "20", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = (out / "report.md").read_text()
    assert "| 0.2 |" in report and "risk_pvalues.png" in report
    for name in ("risk_pvalues.png", "exit_layers.png", "frontier.png"):
        assert (out / name).stat().st_size > 1000


def test_cli_bad_delta_is_an_error(tmp_path):
    path = tmp_path / "table.parquet"
    _table(50).save(path)
    done = subprocess.run([sys.executable, "-m", "ltt_exit.cli.report", str(path), "--deltas", "1.5",
                           "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert done.returncode == 2 and "δ must be in (0, 1)" in done.stderr
    assert not (tmp_path / "r" / "report.md").exists()
