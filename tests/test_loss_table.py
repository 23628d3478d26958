"""The loss-table file format: Parquet round trip, plain-pandas readability, CSV input, validation."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ltt_exit.loss_table import HEADER_KEY, SIDECAR_SUFFIX, LossTable, LossTableError

GRID = [1.0, 0.9, 0.8, 0.7000000000000001]


def make_table(n=6, k=4) -> LossTable:
    rng = np.random.default_rng(0)
    return LossTable(
        rng.random((n, k)),
        GRID[:k],
        [f"ex-{i}" for i in range(n)],
        {"metric": "rouge_l", "model": {"name": "t5-small", "fingerprint": "sha256:00"}, "tau": 4.0},
        candidate_columns={
            "mean_layers": rng.random((n, k)) * 24,
            "num_tokens": rng.integers(1, 50, (n, k)),
            "text": np.array([[f"out {i}/{j} ✓" for j in range(k)] for i in range(n)], dtype=object),
        },
        example_columns={
            "reference": [f"ref {i}" for i in range(n)],
            "full_text": np.array([f"full {i}" for i in range(n)]),
            "prompt_tokens": np.arange(n),
        },
    )


def test_parquet_round_trip_is_exact(tmp_path):
    table = make_table()
    path = tmp_path / "losses.parquet"
    table.save(path)
    loaded = LossTable.load(path)
    assert loaded == table
    assert loaded.losses.dtype == np.float64 and np.array_equal(loaded.losses, table.losses)
    assert loaded.lambdas.tolist() == GRID  # 0.7000000000000001 survives exactly
    assert loaded.candidate_columns["num_tokens"].dtype.kind == "i"
    assert loaded.candidate_columns["text"][2, 3] == "out 2/3 ✓"
    assert loaded.example_columns["reference"].tolist() == [f"ref {i}" for i in range(6)]
    assert loaded.n == 6 and loaded.K == 4 and loaded.metric == "rouge_l"
    assert loaded.source["path"] == str(path) and loaded.source["sha256"].startswith("sha256:")
    assert [p.name for p in tmp_path.iterdir()] == ["losses.parquet"]  # no temp files left


def test_readable_with_plain_pandas_and_pyarrow(tmp_path):
    # Exactly what docs/loss_table.md shows.
    table = make_table()
    path = tmp_path / "losses.parquet"
    table.save(path)

    df = pd.read_parquet(path)
    header = json.loads(pq.read_schema(path).metadata[b"ltt_exit.loss_table"])
    loss_matrix = df[[f"loss@{lam!r}" for lam in header["lambdas"]]].to_numpy()
    assert np.array_equal(loss_matrix, table.losses)
    assert df.filter(regex=r"^loss@").to_numpy().shape == (6, 4)
    assert df["example_id"].tolist() == table.example_ids
    assert header["format_version"] == 1 and header["order"] == "descending" and header["metric"] == "rouge_l"
    assert header["metadata"]["model"]["name"] == "t5-small"
    mean_layers = df[[f"mean_layers@{lam!r}" for lam in header["lambdas"]]].mean().to_numpy()
    assert np.allclose(mean_layers, table.mean_per_candidate("mean_layers"))
    # long format for plotting / grouping, as in the docs
    long = df.melt(id_vars="example_id", value_vars=[c for c in df if c.startswith("loss@")], var_name="column", value_name="loss")
    long["lambda"] = long["column"].str.split("@").str[1].astype(float)
    assert np.allclose(long.groupby("lambda", sort=False)["loss"].mean().to_numpy(), table.losses.mean(axis=0))


def test_to_pandas_matches_file_and_carries_header(tmp_path):
    table = make_table()
    table.save(tmp_path / "t.parquet")
    df = table.to_pandas()
    on_disk = pd.read_parquet(tmp_path / "t.parquet")
    assert list(df.columns) == list(on_disk.columns)
    assert np.array_equal(df["loss@0.9"].to_numpy(), on_disk["loss@0.9"].to_numpy())
    assert df.attrs[HEADER_KEY]["lambdas"] == GRID


def test_ascending_order_round_trip(tmp_path):
    table = LossTable(np.zeros((2, 3)), [0.1, 0.2, 0.3], metadata={"metric": "em"}, order="ascending")
    table.save(tmp_path / "a.parquet")
    loaded = LossTable.load(tmp_path / "a.parquet")
    assert loaded.order == "ascending" and loaded == table
    assert LossTable(np.zeros((2, 3)), [0.1, 0.2, 0.3], metadata={"order": "ascending"}).order == "ascending"
    with pytest.raises(LossTableError, match="disagrees"):
        LossTable(np.zeros((2, 3)), [0.1, 0.2, 0.3], metadata={"order": "ascending"}, order="descending")


# ---------------------------------------------------------------------------- validation

@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"losses": np.full((3, 2), np.nan)}, "NaN"),
        ({"losses": np.full((3, 2), -np.inf)}, "inf"),
        ({"losses": np.full((3, 2), 1.01)}, r"\[0, 1\]"),
        ({"losses": np.zeros((0, 2)), "example_ids": []}, "n = 0"),
        ({"lambdas": [1.0, 0.9, 0.8]}, "3 values but the loss matrix has 2"),
        ({"lambdas": [0.9, 1.0]}, "declared order"),
        ({"example_ids": ["a", "b", "a"]}, "'a' appears more than once"),
        ({"example_ids": ["a", "b"]}, "2 entries but the loss matrix has 3"),
        ({"candidate_columns": {"mean_layers": np.zeros((3, 3))}}, "shape"),
        ({"candidate_columns": {"loss": np.zeros((3, 2))}}, "reserved"),
        ({"candidate_columns": {"a@b": np.zeros((3, 2))}}, "must not contain '@'"),
        ({"example_columns": {"example_id": ["x", "y", "z"]}}, "reserved"),
        ({"example_columns": {"ref": ["x", "y"]}}, "shape"),
        ({"metadata": {"x": float("nan")}}, "JSON"),
    ],
)
def test_bad_tables_rejected(kwargs, message):
    arguments = {"losses": np.zeros((3, 2)), "lambdas": [1.0, 0.9], "example_ids": ["a", "b", "c"]}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        LossTable(**arguments)


def test_non_string_ids_and_mixed_text_rejected():
    with pytest.raises(TypeError, match="strings"):
        LossTable(np.zeros((2, 1)), [1.0], [1, 2])
    with pytest.raises(TypeError, match="str only"):
        LossTable(np.zeros((2, 1)), [1.0], candidate_columns={"text": np.array([["a"], [None]], dtype=object)})


def test_save_refuses_csv_name_and_missing_folder(tmp_path):
    table = make_table()
    with pytest.raises(LossTableError, match="Parquet"):
        table.save(tmp_path / "t.csv")
    with pytest.raises(FileNotFoundError):
        table.save(tmp_path / "missing" / "t.parquet")
    assert list(tmp_path.iterdir()) == []


def _write_with_header(path, frame: pd.DataFrame, header: dict) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    pq.write_table(table.replace_schema_metadata({HEADER_KEY: json.dumps(header)}), path)


def test_parquet_whose_columns_do_not_match_the_header_grid(tmp_path):
    table = make_table(k=3)
    path = tmp_path / "t.parquet"
    header = table.header()
    header["lambdas"] = [1.0, 0.9, 0.8, 0.7]  # one λ more than the loss columns
    _write_with_header(path, table.to_pandas(), header)
    with pytest.raises(LossTableError, match="do not match the header's grid of 4"):
        LossTable.load(path)


def test_parquet_whose_row_count_does_not_match_the_header(tmp_path):
    table = make_table()
    path = tmp_path / "t.parquet"
    header = table.header()
    header["n"] = 7
    _write_with_header(path, table.to_pandas(), header)
    with pytest.raises(LossTableError, match="n = 7"):
        LossTable.load(path)


def test_parquet_with_unknown_format_version_or_damaged_file(tmp_path):
    table = make_table()
    path = tmp_path / "t.parquet"
    header = table.header()
    header["format_version"] = 99
    _write_with_header(path, table.to_pandas(), header)
    with pytest.raises(LossTableError, match="format_version 99"):
        LossTable.load(path)
    table.save(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(LossTableError, match="Parquet"):
        LossTable.load(path)


def test_plain_parquet_without_header_is_read_as_wide_matrix(tmp_path):
    frame = pd.DataFrame({"example_id": ["a", "b"], "1.0": [0.0, 0.0], "0.5": [0.25, 1.0]})
    frame.to_parquet(tmp_path / "plain.parquet", index=False)
    table = LossTable.load(tmp_path / "plain.parquet")
    assert table.lambdas.tolist() == [1.0, 0.5] and table.example_ids == ["a", "b"]


def test_unknown_file_kind(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x00\x01")
    with pytest.raises(LossTableError, match="neither a Parquet file"):
        LossTable.load(tmp_path / "x.bin")
    with pytest.raises(FileNotFoundError):
        LossTable.load(tmp_path / "missing.parquet")


# ---------------------------------------------------------------------------- CSV input

def test_csv_with_ids_and_sidecar(tmp_path):
    path = tmp_path / "losses.csv"
    path.write_text("example_id,0.1,0.2,0.3\nq1,0,0.5,1\nq2,0,0.25,0.75\n007,0,0,1\n")
    (tmp_path / ("losses.csv" + SIDECAR_SUFFIX)).write_text(
        json.dumps({"format_version": 1, "order": "ascending", "metric": "token_f1", "metadata": {"system": "mine"}})
    )
    table = LossTable.load(path)
    assert table.order == "ascending" and table.metric == "token_f1"
    assert table.metadata == {"system": "mine", "metric": "token_f1"}
    assert table.example_ids == ["q1", "q2", "007"]  # leading zeros kept: ids are strings
    assert table.lambdas.tolist() == [0.1, 0.2, 0.3]
    assert np.array_equal(table.losses, [[0, 0.5, 1], [0, 0.25, 0.75], [0, 0, 1]])
    assert table.source["format"] == "csv"


def test_csv_without_ids_or_sidecar_defaults_to_descending(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("1.0,0.95,0.9\n0,0,1\n0,1,1\n")
    table = LossTable.load(path)
    assert table.example_ids == ["0", "1"] and table.order == "descending"


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("example_id,1.0,0.9\n", "n = 0"),
        ("example_id\na\nb\n", "no λ columns"),
        ("example_id,1.0,fast\na,0,0\n", "'fast' is neither 'example_id' nor a λ value"),
        ("1.0,0.9,0.9\n0,0,0\n", "'0.9' appears more than once"),
        ("0.8,0.9,1.0\n0,0,0\n", "declared order 'descending'"),
        ("1.0,0.9\n0,\n", "NaN"),
        ("1.0,0.9\n0,1.5\n", r"\[0, 1\]"),
        ("1.0,0.9\n0,high\n", "non-numeric"),
        ("example_id,1.0\na,0\na,1\n", "'a' appears more than once"),
        ("example_id,1.0\na,0\n,1\n", "missing"),
    ],
)
def test_bad_csv_rejected(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        LossTable.load(path)


def test_sidecar_lambdas_must_match_headers_and_unknown_keys_refused(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("1.0,0.9\n0,0\n")
    sidecar = tmp_path / ("m.csv" + SIDECAR_SUFFIX)
    sidecar.write_text(json.dumps({"lambdas": [1.0, 0.8]}))
    with pytest.raises(LossTableError, match="sidecar declares"):
        LossTable.load(path)
    sidecar.write_text(json.dumps({"lamdbas": [1.0, 0.9]}))
    with pytest.raises(LossTableError, match="unknown keys"):
        LossTable.load(path)
    sidecar.write_text("{not json")
    with pytest.raises(LossTableError, match="not valid JSON"):
        LossTable.load(path)
    sidecar.write_text(json.dumps({"lambdas": [1.0, 0.9], "order": "descending"}))
    assert LossTable.load(path).lambdas.tolist() == [1.0, 0.9]


def test_mean_per_candidate():
    table = make_table()
    assert np.allclose(table.mean_per_candidate("mean_layers"), table.candidate_columns["mean_layers"].mean(axis=0))
    with pytest.raises(KeyError, match="no candidate column"):
        table.mean_per_candidate("flops")
    with pytest.raises(TypeError, match="not numeric"):
        table.mean_per_candidate("text")
