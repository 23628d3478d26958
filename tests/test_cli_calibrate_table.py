"""``ltt-calibrate --table``: certify from a loss table; clear errors, exit code 2, nothing written."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from ltt_exit.certificate import Certificate
from ltt_exit.certify import certify
from ltt_exit.cli.calibrate import build_parser, main, run_certification
from ltt_exit.loss_table import LossTable

GRID = [1.0, 0.9, 0.8, 0.7, 0.6]
RISKS = [0.0, 0.0, 0.02, 0.3, 0.6]


def write_table(folder, *, binary=True, with_layers=True, name="losses.parquet") -> tuple:
    n = 400
    losses = np.zeros((n, 5))
    for j, r in enumerate(RISKS):
        losses[: int(n * r), j] = 1.0 if binary else 0.5
    candidate_columns = {}
    if with_layers:
        # cost falls along the grid, except candidate 1 is cheaper than candidate 2
        candidate_columns["mean_layers"] = np.tile([24.0, 10.0, 14.0, 6.0, 4.0], (n, 1))
        candidate_columns["flops"] = np.tile([5.0, 4.0, 3.0, 2.0, 1.0], (n, 1))
    table = LossTable(losses, GRID, None, {"metric": "rouge_l", "model": "t5-small"}, candidate_columns=candidate_columns)
    path = folder / name
    table.save(path)
    return path, table


def run(argv):
    return main([str(a) for a in argv])


def test_certifies_from_table_writes_certificate_and_prints_summary(tmp_path, capsys):
    path, table = write_table(tmp_path, with_layers=False)
    out = tmp_path / "cert.json"
    assert run(["--delta", 0.1, "--epsilon", 0.05, "--table", path, "--out", out]) == 0
    printed = capsys.readouterr().out
    cert = Certificate.load(out)
    expected = certify(table.losses, table.lambdas, 0.1, 0.05)
    assert cert.lambda_hat == expected.lambda_hat == 0.8
    assert cert.pvalues == expected.pvalues and cert.certified == expected.certified
    assert "λ = 0.8" in printed and "3 of 5 candidates certified" in printed and str(out) in printed
    source = cert.metadata["calibration_source"]
    assert source["loss_table"]["path"] == str(path)
    assert source["loss_table"]["sha256"] == table_sha256(path)
    assert source["metric"] == "rouge_l" and source["cost_column"] is None
    assert cert.metadata["model"] == "t5-small"


def table_sha256(path) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_default_cost_column_mean_layers_and_overrides(tmp_path, capsys):
    path, _ = write_table(tmp_path)
    out = tmp_path / "c.json"
    # certified: candidates 0..2; mean layers 24, 10, 14 → the cheapest is candidate 1 (λ = 0.9)
    assert run(["--delta", 0.1, "--epsilon", 0.05, "--table", path, "--out", out, "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    cert = Certificate.load(out)
    assert cert.lambda_hat == 0.9 and cert.costs == [24.0, 10.0, 14.0, 6.0, 4.0]
    assert cert.metadata["calibration_source"]["cost_column"] == "mean_layers"
    assert run(["--delta", 0.1, "--epsilon", 0.05, "--table", path, "--out", out, "--cost-column", "none", "--quiet"]) == 0
    assert Certificate.load(out).lambda_hat == 0.8
    assert run(["--delta", 0.1, "--epsilon", 0.05, "--table", path, "--out", out, "--cost-column", "flops", "--quiet"]) == 0
    assert Certificate.load(out).lambda_hat == 0.8


def test_methods_and_parameters_are_recorded(tmp_path):
    path, _ = write_table(tmp_path)
    out = tmp_path / "c.json"
    argv = ["--delta", 0.1, "--epsilon", 0.05, "--table", path, "--out", out, "--quiet"]
    assert run(argv + ["--pvalue", "wsr", "--seed", 17, "--procedure", "multi-start", "--starts", 2]) == 0
    cert = Certificate.load(out)
    assert cert.pvalue_method == "wsr" and cert.wsr_seed == 17
    assert cert.procedure == {"name": "multi-start", "params": {"starts": 2, "start_indices": [0, 2]}}
    assert run(argv + ["--pvalue", "hb", "--procedure", "holm"]) == 0
    cert = Certificate.load(out)
    assert cert.pvalue_method == "hoeffding-bentkus" and cert.procedure["name"] == "holm"


def test_csv_table(tmp_path):
    csv = tmp_path / "m.csv"
    rows = ["example_id,1.0,0.5"] + [f"e{i},0,{1 if i < 10 else 0}" for i in range(300)]
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "c.json"
    assert run(["--delta", 0.1, "--epsilon", 0.05, "--table", csv, "--out", out, "--pvalue", "binomial", "--quiet"]) == 0
    assert Certificate.load(out).lambda_hat == 0.5


def test_nothing_certified_still_writes_fallback_certificate(tmp_path, capsys):
    path, _ = write_table(tmp_path)
    out = tmp_path / "c.json"
    assert run(["--delta", 0.001, "--epsilon", 0.001, "--table", path, "--out", out]) == 0
    assert "Nothing certified" in capsys.readouterr().out
    cert = Certificate.load(out)
    assert not cert.certified_any and cert.lambda_hat == 1.0


def test_help_explains_delta_and_epsilon(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "risk tolerance" in text and "largest average loss you accept" in text
    assert "failure probability" in text and "95% confidence" in text
    assert "--table" in text and "--cost-column" in text


def test_build_parser_defaults_fit_run_certification(tmp_path):
    path, table = write_table(tmp_path, with_layers=False)
    args = build_parser().parse_args(["--delta", "0.1", "--epsilon", "0.05", "--out", str(tmp_path / "x.json"), "--quiet"])
    assert args.table is None and args.pvalue == "hoeffding-bentkus" and args.procedure == "fixed-sequence"
    cert = run_certification(table, args)  # an in-memory table (as the decoding branch will pass)
    assert cert.lambda_hat == 0.8 and cert.metadata["calibration_source"]["loss_table"] is None
    assert Certificate.load(tmp_path / "x.json") == cert


# ---------------------------------------------------------------------------- bad input: exit 2, nothing written

def nothing_written(folder, before):
    return sorted(p.name for p in folder.iterdir()) == before


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--delta", "0"], "--delta must be strictly between 0 and 1"),
        (["--delta", "1"], "--delta must be strictly between 0 and 1"),
        (["--epsilon", "1.5"], "--epsilon must be strictly between 0 and 1"),
        (["--epsilon", "abc"], "--epsilon must be a number"),
        (["--pvalue", "clopper-pearson"], "invalid choice"),
        (["--starts", "0"], "--starts must be at least 1"),
        (["--cost-column", "watts"], "'watts' is not a candidate column"),
    ],
)
def test_bad_options(tmp_path, capsys, extra, message):
    path, _ = write_table(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["--delta", "0.1", "--epsilon", "0.05", "--table", str(path), "--out", str(tmp_path / "c.json")]
    assert main(argv + extra) == 2
    assert message in capsys.readouterr().err
    assert nothing_written(tmp_path, before)


def test_binomial_on_non_binary_losses(tmp_path, capsys):
    path, _ = write_table(tmp_path, binary=False)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run(["--delta", 0.1, "--epsilon", 0.05, "--table", path, "--pvalue", "binomial", "--out", tmp_path / "c.json"]) == 2
    assert "binomial" in capsys.readouterr().err and nothing_written(tmp_path, before)


@pytest.mark.parametrize(
    "text, message",
    [
        ("1.0,0.9\n0,nan\n", "NaN"),
        ("1.0,0.9\n0,2\n", "[0, 1]"),
        ("1.0,0.9\n", "n = 0"),
        ("0.9,1.0\n0,0\n", "declared order"),
        ("example_id,1.0,0.9\na,0,0\na,0,0\n", "more than once"),
    ],
)
def test_bad_tables(tmp_path, capsys, text, message):
    csv = tmp_path / "bad.csv"
    csv.write_text(text)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run(["--delta", 0.1, "--epsilon", 0.05, "--table", csv, "--out", tmp_path / "c.json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ltt-calibrate: error:") and message in err
    assert nothing_written(tmp_path, before)


def test_bad_input_leaves_an_existing_certificate_untouched(tmp_path, capsys):
    out = tmp_path / "c.json"
    out.write_text("old certificate")
    csv = tmp_path / "bad.csv"
    csv.write_text("1.0,0.9\n0,1.5\n")
    assert run(["--delta", 0.1, "--epsilon", 0.05, "--table", csv, "--out", out]) == 2
    assert out.read_text() == "old certificate"


def test_missing_table_file_and_missing_output_folder(tmp_path, capsys):
    assert run(["--delta", 0.1, "--epsilon", 0.05, "--table", tmp_path / "nope.parquet", "--out", tmp_path / "c.json"]) == 2
    assert "does not exist" in capsys.readouterr().err
    path, _ = write_table(tmp_path)
    assert run(["--delta", 0.1, "--epsilon", 0.05, "--table", path, "--out", tmp_path / "no" / "c.json"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert run(["--delta", 0.1, "--epsilon", 0.05, "--table", path, "--out", path]) == 2
    assert "loss table itself" in capsys.readouterr().err
    assert LossTable.load(path).n == 400  # the table was not overwritten


def test_without_table_the_model_path_runs_and_names_a_missing_model(tmp_path, capsys, monkeypatch):
    # without --table ltt-calibrate decodes a model (tests/test_cli_pipeline.py runs that path end to
    # end on a small model); a model that does not exist is a clear error and nothing is written
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no-such-model"
    assert main(["--delta", "0.1", "--epsilon", "0.05", "--model", str(missing),
                 "--cache-dir", str(tmp_path / "cache")]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "certificate.json").exists()


def test_missing_required_options(capsys):
    assert main(["--table", "x.parquet"]) == 2
    assert "--epsilon" in capsys.readouterr().err
    # --delta is optional for argparse (--risks can give one δ per risk) but required without --risks
    assert main(["--table", "x.parquet", "--epsilon", "0.05"]) == 2
    assert "--delta" in capsys.readouterr().err


def test_console_entry_point_runs_as_a_process(tmp_path):
    path, _ = write_table(tmp_path)
    out = tmp_path / "c.json"
    result = subprocess.run(
        [sys.executable, "-m", "ltt_exit.cli.calibrate", "--delta", "0.1", "--epsilon", "0.05",
         "--table", str(path), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Certified λ" in result.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "ltt_exit.cli.calibrate", "--delta", "2", "--epsilon", "0.05", "--table", str(path)],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and "--delta" in bad.stderr


def _costed_table(head_flops: float) -> LossTable:
    """3 candidates (λ 1, 0.9, 0.5) on 40 examples: 10 layers of 1 FLOP-unit each at λ = 1; early exit saves
    layers but pays ``head_flops`` per token for the exit heads."""
    n, tokens = 40, 5
    layers = np.tile([10.0, 8.0, 6.0], (n, 1))
    flops = layers * tokens + np.array([0.0, 1.0, 1.0]) * head_flops * tokens
    return LossTable(np.zeros((n, 3)), np.array([1.0, 0.9, 0.5]), [f"e{i}" for i in range(n)], {"num_layers": 10},
                     candidate_columns={"layers_total": layers * tokens, "num_tokens": np.full((n, 3), tokens),
                                        "mean_layers": layers, "flops": flops},
                     example_columns={"full_flops": np.full(n, 10.0 * tokens)})


@pytest.mark.parametrize("head_flops, slower", [(1.0, False), (5.0, True)])
def test_outcome_reports_the_work_at_lambda_hat_and_warns_when_early_exit_costs_more(head_flops, slower):
    from ltt_exit.pipeline import describe_outcome

    table = _costed_table(head_flops)
    certificate = certify(table.losses, table.lambdas, 0.1, 0.05, costs=table.mean_per_candidate("mean_layers"))
    assert certificate.lambda_hat == 0.5
    text = describe_outcome(table, certificate, {})
    ratio = (6.0 + head_flops) / 10.0
    assert f"work at λ̂: {ratio:.2f}× the full model's FLOPs" in text
    assert ("likely slower than the full model" in text) == slower
    assert ("--cost-column flops" in text) == slower
    # --cost-column flops: the certified λ with the least work, the full model when no exit pays
    by_work = certify(table.losses, table.lambdas, 0.1, 0.05, costs=table.mean_per_candidate("flops"))
    assert by_work.lambda_hat == (1.0 if slower else 0.5)
