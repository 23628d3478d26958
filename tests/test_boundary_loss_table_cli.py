"""Issue 14 / issue 13: loss-table files of the wrong shape and the commands' one error path.

Every bad input gives one line that names the file (and the field) and exit status 2; a bug gives
the traceback and exit status 1.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ltt_exit.cli import _run
from ltt_exit.cli._run import CLIError, run_cli
from ltt_exit.cli.calibrate import main as calibrate_main
from ltt_exit.cli.report import main as report_main
from ltt_exit.loss_table import HEADER_KEY, SIDECAR_SUFFIX, LossTable, LossTableError
from ltt_exit.validation import InputError

GRID = [1.0, 0.9, 0.8]


def good_table() -> LossTable:
    losses = np.zeros((50, 3))
    losses[:5, 2] = 1.0
    return LossTable(losses, GRID, None, {"metric": "rouge_l"})


def write_parquet(path, header_text: str | None, table: LossTable | None = None) -> None:
    arrow = pa.Table.from_pandas((table or good_table()).to_pandas(), preserve_index=False)
    meta = {} if header_text is None else {HEADER_KEY: header_text}
    pq.write_table(arrow.replace_schema_metadata(meta), path)


def header_with(**changes) -> str:
    header = good_table().header()
    header.update(changes)
    return json.dumps(header)


def calibrate(path, capsys, *extra) -> tuple[int, str]:
    status = calibrate_main(["--delta", "0.1", "--epsilon", "0.05", "--table", str(path),
                             "--out", str(path.parent / "c.json"), *extra])
    return status, capsys.readouterr().err


def assert_one_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("header_text", ["[1, 2]", '"a string"', "3", "null", "true"])
def test_parquet_header_that_is_json_but_not_an_object(tmp_path, capsys, header_text):
    path = tmp_path / "t.parquet"
    write_parquet(path, header_text)
    with pytest.raises(LossTableError, match="header .* must be a JSON object"):
        LossTable.load(path)
    status, err = calibrate(path, capsys)
    assert status == 2
    assert_one_line(err, "ltt-calibrate: error:", str(path), "must be a JSON object")
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("changes, field_name, expected", [
    ({"lambdas": 3}, "lambdas", "list of numbers"),
    ({"lambdas": ["a", "b", "c"]}, "lambdas[0]", "real number"),
    ({"lambdas": ["1.0", "0.9", "0.8"]}, "lambdas[0]", "real number"),
    ({"metadata": [1, 2]}, "metadata", "JSON object"),
    ({"metadata": None}, "metadata", "JSON object"),
    ({"candidate_columns": 5}, "candidate_columns", "list of strings"),
    ({"example_columns": [1]}, "example_columns[0]", "string"),
    ({"order": 1}, "order", "string"),
    ({"order": "sideways"}, "order", "one of"),
    ({"n": "fifty"}, "n", "whole number"),
    ({"metric": ["rouge"]}, "metric", "string or null"),
])
def test_parquet_header_fields_of_the_wrong_type_name_file_and_field(tmp_path, capsys, changes, field_name, expected):
    path = tmp_path / "t.parquet"
    write_parquet(path, header_with(**changes))
    with pytest.raises(LossTableError) as info:
        LossTable.load(path)
    message = str(info.value)
    assert str(path) in message and f"field {field_name!r}" in message and expected in message, message
    status, err = calibrate(path, capsys)
    assert status == 2
    assert_one_line(err, str(path), f"field {field_name!r}")


def write_csv(tmp_path, sidecar: dict):
    path = tmp_path / "losses.csv"
    path.write_text("example_id,1.0,0.9\na,0,0\nb,0,1\n")
    (tmp_path / ("losses.csv" + SIDECAR_SUFFIX)).write_text(json.dumps(sidecar))
    return path


@pytest.mark.parametrize("sidecar, field_name, expected", [
    ({"metadata": [1, 2]}, "metadata", "JSON object"),
    ({"metadata": "x"}, "metadata", "JSON object"),
    ({"lambdas": 1}, "lambdas", "list of numbers"),
    ({"lambdas": ["a", "b"]}, "lambdas[0]", "real number"),
    ({"lambdas": [True, 0.9]}, "lambdas[0]", "real number"),
    ({"order": ["descending"]}, "order", "string"),
    ({"metric": 7}, "metric", "string or null"),
])
def test_sidecar_fields_of_the_wrong_type_name_file_and_field(tmp_path, capsys, sidecar, field_name, expected):
    path = write_csv(tmp_path, sidecar)
    sidecar_path = str(path) + SIDECAR_SUFFIX
    with pytest.raises(LossTableError) as info:
        LossTable.load(path)
    message = str(info.value)
    assert sidecar_path in message and f"field {field_name!r}" in message and expected in message, message
    status, err = calibrate(path, capsys)
    assert status == 2
    assert_one_line(err, sidecar_path, f"field {field_name!r}")


def test_sidecar_lambdas_as_numbers_still_checked_against_headers(tmp_path):
    path = write_csv(tmp_path, {"lambdas": [1, 0.9]})  # an int λ is a real number: accepted
    assert LossTable.load(path).lambdas.tolist() == [1.0, 0.9]


@pytest.mark.parametrize("with_header", [True, False])
def test_parquet_with_duplicate_column_names(tmp_path, capsys, with_header):
    path = tmp_path / "t.parquet"
    column = pa.array([0.0, 0.5])
    names = ["loss@1.0", "loss@1.0"] if with_header else ["1.0", "1.0"]
    table = pa.Table.from_arrays([column, column], names=names)
    if with_header:
        header = {"format_version": 1, "lambdas": [1.0, 1.0], "order": "descending", "candidate_columns": [],
                  "example_columns": [], "metadata": {}}
        table = table.replace_schema_metadata({HEADER_KEY: json.dumps(header)})
    pq.write_table(table, path)
    with pytest.raises(LossTableError, match=r"t\.parquet: column '1\.0' appears more than once|"
                                             r"t\.parquet: column 'loss@1\.0' appears more than once"):
        LossTable.load(path)
    status, err = calibrate(path, capsys)
    assert status == 2
    assert_one_line(err, str(path), "appears more than once")


def test_parquet_loss_column_of_strings_names_the_column(tmp_path):
    table = good_table()
    frame = table.to_pandas()
    frame["loss@0.9"] = frame["loss@0.9"].astype(str)
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False)
                   .replace_schema_metadata({HEADER_KEY: json.dumps(table.header())}), path)
    with pytest.raises(LossTableError, match=r"t\.parquet: column 'loss@0\.9' holds"):
        LossTable.load(path)


# ---------------------------------------------------------------------------- the CLI error path

def test_run_cli_expected_error_is_one_line_and_status_2(capsys):
    def body(argv):
        raise CLIError("--thing 'x' is not a thing\n(on two lines)")

    assert run_cli("ltt-x", body, []) == 2
    assert_one_line(capsys.readouterr().err, "ltt-x: error: --thing 'x' is not a thing (on two lines)")


@pytest.mark.parametrize("error", [FileNotFoundError(2, "No such file or directory", "missing.json"),
                                   ValueError("bad value"), TypeError("bad type"), InputError("refused")])
def test_run_cli_treats_input_and_file_errors_as_expected(capsys, error):
    def body(argv):
        raise error

    assert run_cli("ltt-x", body, None) == 2
    err = capsys.readouterr().err
    assert_one_line(err, "ltt-x: error:")
    if isinstance(error, OSError):
        assert "missing.json" in err


@pytest.mark.parametrize("error", [AttributeError("'list' object has no attribute 'get'"), IndexError("boom"),
                                   RuntimeError("boom"), KeyError("k")])
def test_run_cli_prints_the_traceback_of_a_bug_and_status_1(capsys, error):
    def body(argv):
        raise error

    assert run_cli("ltt-x", body, None) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and type(error).__name__ in err and "internal error" in err


def test_run_cli_help_status_and_return_value(capsys):
    parser = _run.ArgumentParser(prog="ltt-x")
    parser.add_argument("--n", type=int, required=True)
    assert run_cli("ltt-x", lambda argv: parser.parse_args(argv) and 0, ["--help"]) == 0
    assert run_cli("ltt-x", lambda argv: parser.parse_args(argv).n, ["--n", "5"]) == 5
    capsys.readouterr()
    assert run_cli("ltt-x", lambda argv: parser.parse_args(argv), ["--n", "five"]) == 2
    assert_one_line(capsys.readouterr().err, "ltt-x: error:", "--n", "invalid int value", "--help")
    assert run_cli("ltt-x", lambda argv: None, []) == 0


def test_cli_main_decorator_for_new_commands(capsys):
    @_run.cli_main("ltt-train-exits")
    def main(argv=None):
        raise InputError(f"bad {argv}")

    assert main(["x"]) == 2
    assert_one_line(capsys.readouterr().err, "ltt-train-exits: error: bad ['x']")


def test_calibrate_usage_error_is_one_line(capsys):
    assert calibrate_main(["--delta", "2", "--epsilon", "0.05", "--table", "x.parquet"]) == 2
    assert_one_line(capsys.readouterr().err, "ltt-calibrate: error:", "--delta")


def test_report_bad_input_is_one_line_and_status_2(tmp_path, capsys):
    path = tmp_path / "t.parquet"
    write_parquet(path, "[1]")
    assert report_main([str(path), "--out", str(tmp_path / "r"), "--no-plots", "--trials", "2"]) == 2
    assert_one_line(capsys.readouterr().err, "ltt-report: error:", str(path))
    assert report_main([str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "r")]) == 2
    assert_one_line(capsys.readouterr().err, "ltt-report: error:", "missing.parquet")
    assert report_main([str(path), "--epsilon", "nan"]) == 2
    assert_one_line(capsys.readouterr().err, "ltt-report: error:", "ε")
    assert report_main([str(path), "--seed", "-1"]) == 2
    assert_one_line(capsys.readouterr().err, "ltt-report: error:", "--seed")
    assert not (tmp_path / "r").exists()


def test_generate_bad_prompts_file_and_missing_certificate_are_one_line(tmp_path, capsys):
    from ltt_exit.cli.generate import main as generate_main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n[1, 2]\n')
    assert generate_main(["--certificate", str(tmp_path / "c.json"), "--file", str(prompts)]) == 2
    assert_one_line(capsys.readouterr().err, "ltt-generate: error:", "p.jsonl:2", "'prompt'")
    prompts.write_text('{"prompt": "a"}\n{not json\n')
    assert generate_main(["--certificate", str(tmp_path / "c.json"), "--file", str(prompts)]) == 2
    assert_one_line(capsys.readouterr().err, "p.jsonl:2", "not valid JSON")
    assert generate_main(["--certificate", str(tmp_path / "missing.json"), "a prompt"]) == 2
    assert_one_line(capsys.readouterr().err, "ltt-generate: error:", "missing.json")


def test_generate_refuses_a_forged_certificate_with_status_2(tmp_path, capsys):
    from ltt_exit.certificate import canonical_json
    from ltt_exit.certify import certify
    from ltt_exit.cli.generate import main as generate_main
    import hashlib

    path = tmp_path / "c.json"
    certify(np.ones((30, 3)), GRID, 0.1, 0.05).save(path)
    data = json.loads(path.read_text())
    data.update(certified=[True, True, True], certified_any=True, chosen_index=2, lambda_hat=0.8, reason=None)
    content = {k: v for k, v in data.items() if k != "digest"}
    data["digest"] = "sha256:" + hashlib.sha256(canonical_json(content)).hexdigest()
    path.write_text(json.dumps(data))
    assert generate_main(["--certificate", str(path), "a prompt"]) == 2
    assert_one_line(capsys.readouterr().err, "ltt-generate: error: refused:", str(path), "field 'certified'")


def test_fit_exits_bad_option_is_one_line(capsys):
    from ltt_exit.cli.fit_exits import main as fit_main

    assert fit_main(["--out", "x.safetensors", "--kind", "cubic"]) == 2
    assert_one_line(capsys.readouterr().err, "ltt-fit-exits: error:", "--kind")


def test_console_process_exit_status_for_bad_table(tmp_path):
    path = tmp_path / "t.parquet"
    write_parquet(path, '"not an object"')
    result = subprocess.run([sys.executable, "-m", "ltt_exit.cli.calibrate", "--delta", "0.1", "--epsilon", "0.05",
                             "--table", str(path), "--out", str(tmp_path / "c.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert_one_line(result.stderr, str(path))
