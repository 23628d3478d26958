"""Property-based fuzzing of every loader: random corruptions of valid files (issue 14).

Each suite starts from valid files and corrupts them — truncation, byte flips and insertions,
values of the wrong type, missing and extra keys, NaN / ±inf, huge numbers — then loads the result.
A loader may accept the file (then what it returns must be valid) or refuse it with its documented
error type; any other exception is a bug. The command-line suite also checks that a refused input
leaves no output file, complete or partial.

Seeded and bounded: ``derandomize=True`` (the same examples on every run), no example database,
no deadline, a few hundred examples per suite (each suite takes seconds on 2 cores).
"""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ltt_exit.certificate import Certificate, CertificateError
from ltt_exit.certify import certify
from ltt_exit.loss_table import HEADER_KEY, SIDECAR_SUFFIX, LossTable, LossTableError
from ltt_exit.recipes import load_recipe
from ltt_exit.recipes.recipe import Recipe

#: a hard bound per suite for CI (each takes a few seconds on 2 cores)
pytestmark = pytest.mark.timeout(120)

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---------------------------------------------------------------------------- corruption strategies

HUGE = [10**400, -(10**400), 1e308, -1e308, 2**63, -(2**63) - 1, 5e-324]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.sampled_from(HUGE),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                           max_leaves=8)


def _paths(value, prefix=()):
    """Every path (tuple of keys / indices) into nested dicts and lists, the root excluded."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    for key, item in items:
        yield prefix + (key,)
        yield from _paths(item, prefix + (key,))


@st.composite
def mutated(draw, record):
    """``record`` (parsed JSON / YAML) with 1-3 structural edits: replace, delete, add a key, NaN/inf."""
    data = copy.deepcopy(record)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(data))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add", "non-finite"]))
        if action == "replace":
            parent[key] = draw(json_values)
        elif action == "non-finite":
            parent[key] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
        else:
            parent.insert(key, draw(json_values))
    return data


@st.composite
def damaged_bytes(draw, raw: bytes):
    """``raw`` truncated, with flipped bytes, or with bytes inserted."""
    action = draw(st.sampled_from(["truncate", "flip", "insert"]))
    if action == "truncate":
        return raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        if action == "flip":
            data[at] ^= draw(st.integers(1, 255))
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


# ---------------------------------------------------------------------------- certificates

def _certificates():
    rng = np.random.default_rng(0)
    losses = (rng.random((200, 4)) < np.array([0.0, 0.02, 0.05, 0.4])).astype(float)
    grid = [1.0, 0.9, 0.8, 0.7]
    return [
        certify(losses, grid, 0.1, 0.05, costs=[4.0, 3.0, 2.0, 1.0], metadata={"model": {"fp": "sha256:0"}}),
        certify(losses, grid, 0.1, 0.05, pvalue="wsr", seed=3, procedure="holm"),
        certify(np.ones((20, 4)), grid, 0.1, 0.05, pvalue="binomial"),
    ]


CERTIFICATES = _certificates()


def _with_digest(data):
    """Recompute the digest so that the fuzzed content reaches the checks after it (anyone can)."""
    import hashlib

    from ltt_exit.certificate import canonical_json

    if isinstance(data, dict):
        content = {k: v for k, v in data.items() if k != "digest"}
        try:
            data["digest"] = "sha256:" + hashlib.sha256(canonical_json(content)).hexdigest()
        except (TypeError, ValueError):  # NaN / inf cannot be canonical JSON: leave the digest as it is
            pass
    return data


unit = st.floats(0, 1)


@st.composite
def forged(draw, record):
    """In-range edits that pass the JSON Schema, so that the re-derivation has to catch them."""
    data = copy.deepcopy(record)
    k = len(data["lambdas"])
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(["epsilon", "delta", "pvalues", "empirical_risk", "certified", "chosen_index",
                                     "lambda_hat", "n", "costs", "procedure", "pvalue_method", "wsr_seed"]))
        j = draw(st.integers(0, k - 1))
        if name in ("epsilon", "delta"):
            data[name] = draw(st.floats(1e-12, 1 - 1e-12))
        elif name in ("pvalues", "empirical_risk"):
            data[name][j] = draw(unit)
        elif name == "certified":
            data[name][j] = not data[name][j]
            data["certified_any"] = any(data[name])
        elif name == "chosen_index":
            data[name] = draw(st.one_of(st.none(), st.integers(0, k - 1)))
            data["lambda_hat"] = data["lambdas"][data[name]] if data[name] is not None else data["lambda_hat"]
        elif name == "lambda_hat":
            data[name] = draw(st.one_of(st.sampled_from(data["lambdas"]), st.floats(-2, 3)))
        elif name == "n":
            data[name] = draw(st.integers(1, 10**6))
        elif name == "costs":
            data[name] = None if data[name] is not None else draw(st.lists(st.floats(0, 10), min_size=k, max_size=k))
        elif name == "procedure":
            data[name] = draw(st.sampled_from([{"name": "fixed-sequence", "params": {}}, {"name": "holm", "params": {}},
                                               {"name": "bonferroni", "params": {}},
                                               {"name": "multi-start", "params": {"starts": 2, "start_indices": [0, 2]}}]))
        elif name == "pvalue_method":
            data[name] = draw(st.sampled_from(["binomial", "hoeffding", "hoeffding-kl", "bentkus", "hoeffding-bentkus",
                                               "wsr", "hb"]))
        else:
            data[name] = draw(st.one_of(st.none(), st.integers(0, 5)))
    return _with_digest(data)


@st.composite
def certificate_files(draw):
    base = draw(st.sampled_from(CERTIFICATES))
    text = base.to_json()
    kind = draw(st.sampled_from(["bytes", "json", "json+digest", "forged", "forged"]))
    if kind == "bytes":
        return draw(damaged_bytes(text.encode("utf-8")))
    if kind == "forged":
        return json.dumps(draw(forged(json.loads(text)))).encode("utf-8")
    data = draw(mutated(json.loads(text)))
    if kind == "json+digest":
        data = _with_digest(data)
    return json.dumps(data, allow_nan=True).encode("utf-8")


@FUZZ
@given(raw=certificate_files())
def test_certificate_load_accepts_valid_or_raises_certificate_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("cert") / "c.json"
    path.write_bytes(raw)
    try:
        loaded = Certificate.load(path)
    except CertificateError as error:
        message = str(error)
        assert str(path) in message and "\n" not in message
        stages = [("not valid JSON", "JSON"), ("NaN or Infinity", "NaN/inf"), ("schema version", "version"),
                  ("schema", "schema"), ("digest mismatch", "digest"), ("does not follow", "re-derivation"),
                  ("refusing to trust", "re-derivation")]
        event("refused at " + next((stage for text, stage in stages if text in message), "consistency"))
        return
    event("accepted")
    # accepted: it must be a certificate that re-saves and re-loads unchanged
    again = path.with_name("again.json")
    loaded.save(again)
    assert Certificate.load(again) == loaded


# ---------------------------------------------------------------------------- Parquet loss tables

def _table() -> LossTable:
    rng = np.random.default_rng(1)
    n, k = 12, 3
    return LossTable(
        rng.random((n, k)), [1.0, 0.9, 0.8], [f"e{i}" for i in range(n)], {"metric": "rouge_l", "tau": 4.0},
        candidate_columns={"mean_layers": rng.random((n, k)) * 10, "text": np.full((n, k), "out", dtype=object)},
        example_columns={"reference": [f"r{i}" for i in range(n)]},
    )


TABLE = _table()
TABLE_FRAME = TABLE.to_pandas()


def _check_valid_table(table: LossTable) -> None:
    assert table.losses.ndim == 2 and table.n >= 1 and table.K == table.lambdas.size >= 1
    assert np.isfinite(table.losses).all() and (table.losses >= 0).all() and (table.losses <= 1).all()
    assert np.isfinite(table.lambdas).all() and len(set(table.example_ids)) == table.n


column_values = st.one_of(
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=12, max_size=12),
    st.lists(st.text(max_size=4), min_size=12, max_size=12),
    st.lists(st.integers(-3, 3), min_size=12, max_size=12),
    st.lists(st.booleans(), min_size=12, max_size=12),
)


@st.composite
def parquet_files(draw):
    kind = draw(st.sampled_from(["bytes", "header", "header-text", "columns"]))
    header = TABLE.header()
    frame = TABLE_FRAME.copy()
    if kind == "bytes":
        return "bytes", draw(damaged_bytes(_parquet_bytes(frame, json.dumps(header))))
    if kind == "header":
        return "ok", _parquet_bytes(frame, json.dumps(draw(mutated(header)), allow_nan=True))
    if kind == "header-text":
        text = json.dumps(header)
        return "ok", _parquet_bytes(frame, draw(damaged_bytes(text.encode())).decode("utf-8", "replace"))
    pairs = [(name, pa.array(frame[name].tolist())) for name in frame.columns]
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["retype", "drop", "rename", "duplicate"]))
        at = draw(st.integers(0, len(pairs) - 1))
        name, array = pairs[at]
        if action == "retype":
            pairs[at] = (name, pa.array(draw(column_values)))
        elif action == "drop" and len(pairs) > 1:
            pairs.pop(at)
        elif action == "rename":
            pairs[at] = (draw(st.text(min_size=1, max_size=8)), array)
        elif action == "duplicate":
            pairs.insert(at, pairs[draw(st.integers(0, len(pairs) - 1))])
    table = pa.Table.from_arrays([array for _, array in pairs], names=[name for name, _ in pairs])
    return "ok", _table_bytes(table, json.dumps(header))


def _parquet_bytes(frame, header_text: str) -> bytes:
    return _table_bytes(pa.Table.from_pandas(frame, preserve_index=False), header_text)


def _table_bytes(table: pa.Table, header_text: str) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata({HEADER_KEY: header_text}), sink)
    return sink.getvalue().to_pybytes()


@FUZZ
@given(case=parquet_files())
def test_parquet_loss_table_load_accepts_valid_or_raises_loss_table_error(tmp_path_factory, case):
    _, raw = case
    path = tmp_path_factory.mktemp("pq") / "t.parquet"
    path.write_bytes(raw)
    try:
        table = LossTable.load(path)
    except LossTableError as error:
        assert str(path) in str(error) and "\n" not in str(error)
        return
    _check_valid_table(table)


# ---------------------------------------------------------------------------- CSV loss tables with sidecars

CSV_TEXT = "example_id,1.0,0.9,0.8\na,0,0.1,0.5\nb,0,0,1\nc,0.25,0.5,0.75\n"
SIDECAR = {"format_version": 1, "order": "descending", "metric": "rouge_l", "metadata": {"model": "m"},
           "lambdas": [1.0, 0.9, 0.8]}
cells = st.one_of(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=5),
                  st.sampled_from(["nan", "inf", "-inf", "1e400", "-0.5", "2", "", '"', "NA", "\x00"]))


@st.composite
def csv_files(draw):
    csv_raw = CSV_TEXT.encode()
    if draw(st.booleans()):
        kind = draw(st.sampled_from(["bytes", "cell"]))
        if kind == "bytes":
            csv_raw = draw(damaged_bytes(csv_raw))
        else:
            rows = [line.split(",") for line in CSV_TEXT.strip().split("\n")]
            for _ in range(draw(st.integers(1, 3))):
                r = draw(st.integers(0, len(rows) - 1))
                c = draw(st.integers(0, len(rows[r]) - 1))
                rows[r][c] = draw(cells)
            csv_raw = ("\n".join(",".join(row) for row in rows) + "\n").encode("utf-8", "surrogatepass")
    sidecar_choice = draw(st.sampled_from(["none", "valid", "mutated", "mutated", "bytes"]))
    if sidecar_choice == "none":
        sidecar_raw = None
    elif sidecar_choice == "valid":
        sidecar_raw = json.dumps(SIDECAR).encode()
    elif sidecar_choice == "mutated":
        sidecar_raw = json.dumps(draw(mutated(SIDECAR)), allow_nan=True).encode()
    else:
        sidecar_raw = draw(damaged_bytes(json.dumps(SIDECAR).encode()))
    return csv_raw, sidecar_raw


@FUZZ
@given(case=csv_files())
def test_csv_loss_table_with_sidecar_accepts_valid_or_raises_loss_table_error(tmp_path_factory, case):
    csv_raw, sidecar_raw = case
    folder = tmp_path_factory.mktemp("csv")
    path = folder / "t.csv"
    path.write_bytes(csv_raw)
    if sidecar_raw is not None:
        (folder / ("t.csv" + SIDECAR_SUFFIX)).write_bytes(sidecar_raw)
    try:
        table = LossTable.load(path)
    except LossTableError as error:
        assert "t.csv" in str(error) and "\n" not in str(error)
        return
    _check_valid_table(table)


# ---------------------------------------------------------------------------- the CLI on damaged tables

@settings(FUZZ, max_examples=120)
@given(case=st.one_of(parquet_files(), csv_files()))
def test_ltt_calibrate_on_damaged_tables_exits_0_or_2_and_never_leaves_a_partial_certificate(
        tmp_path_factory, capsys, case):
    from ltt_exit.cli.calibrate import main

    folder = tmp_path_factory.mktemp("cli")
    if isinstance(case[0], str):  # a Parquet case
        path = folder / "t.parquet"
        path.write_bytes(case[1])
    else:
        path = folder / "t.csv"
        path.write_bytes(case[0])
        if case[1] is not None:
            (folder / ("t.csv" + SIDECAR_SUFFIX)).write_bytes(case[1])
    before = sorted(p.name for p in folder.iterdir())
    out = folder / "c.json"
    status = main(["--delta", "0.2", "--epsilon", "0.1", "--table", str(path), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert status in (0, 2), err
    if status == 2:
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert sorted(p.name for p in folder.iterdir()) == before  # no certificate, no temporary file
    else:
        Certificate.load(out)
        assert sorted(p.name for p in folder.iterdir()) == sorted(before + ["c.json"])


# ---------------------------------------------------------------------------- recipe YAML

RECIPE_NAMES = ["samsum", "jsonl", "gensim-lee", "iwslt2017-en-de"]


def _recipe_text(name: str) -> str:
    recipe = load_recipe(name)
    return open(recipe.origin, encoding="utf-8").read()


RECIPE_TEXTS = {name: _recipe_text(name) for name in RECIPE_NAMES}


@st.composite
def recipe_files(draw):
    text = RECIPE_TEXTS[draw(st.sampled_from(RECIPE_NAMES))]
    if draw(st.booleans()):
        return draw(damaged_bytes(text.encode("utf-8")))
    data = draw(mutated(yaml.safe_load(text)))
    return yaml.safe_dump(data, allow_unicode=True).encode("utf-8")


@FUZZ
@given(raw=recipe_files())
def test_recipe_yaml_load_accepts_valid_or_raises_value_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_bytes(raw)
    try:
        recipe = load_recipe(path)
    except ValueError as error:  # documented: ValueError naming what is wrong
        assert not isinstance(error, UnicodeDecodeError), error  # a bare codec error names no file
        return
    assert isinstance(recipe, Recipe) and recipe.max_new_tokens >= 1 and recipe.fields


# ---------------------------------------------------------------------------- exit-adapter files

@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from ltt_exit.decode.adapters import ExitAdapters

    adapters = ExitAdapters.identity("affine", num_layers=3, hidden_size=4, model_fingerprint="sha256:test")
    with torch.no_grad():
        for layer_map in adapters.maps.values():
            for tensor in layer_map.parameters():
                tensor.add_(0.1)
    adapters._fingerprint = None
    path = tmp_path_factory.mktemp("adapters") / "a.safetensors"
    adapters.save(path)
    return path.read_bytes()


@FUZZ
@given(kind=st.sampled_from(["bytes", "header"]), data=st.data())
def test_adapter_file_load_accepts_valid_or_raises_adapter_mismatch(tmp_path_factory, adapter_file, kind, data):
    from safetensors import safe_open
    from safetensors.torch import save

    from ltt_exit.decode.adapters import AdapterMismatch, ExitAdapters

    path = tmp_path_factory.mktemp("adapters") / "a.safetensors"
    if kind == "bytes":
        raw = data.draw(damaged_bytes(adapter_file))
    else:
        source = path.with_name("source.safetensors")
        source.write_bytes(adapter_file)
        with safe_open(str(source), framework="pt") as handle:
            metadata = dict(handle.metadata())
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        key = data.draw(st.sampled_from(sorted(metadata)))
        if data.draw(st.booleans()):
            metadata[key] = json.dumps(data.draw(mutated(json.loads(metadata[key]))), allow_nan=True)
        else:
            metadata[key] = data.draw(damaged_bytes(metadata[key].encode())).decode("utf-8", "replace")
        raw = save(tensors, metadata=metadata)
    path.write_bytes(raw)
    try:
        loaded = ExitAdapters.load(path, model_fingerprint="sha256:test")
    except AdapterMismatch as error:
        assert str(path) in str(error)
        return
    assert loaded.num_layers == 3 and loaded.hidden_size == 4
