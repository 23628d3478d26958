"""The one on-disk loss-table format: losses per (example, candidate) plus everything needed to
certify from them later (the grid, its order, the metric, the model and decoder settings...).

Layout (docs/loss_table.md has the full description and plain-pandas examples): a *wide* Parquet
table with one row per calibration example —

* ``example_id`` (string), then the per-example columns (e.g. ``reference``, ``prompt``,
  ``full_text``) under their own names;
* ``loss@<λ>`` for every candidate in grid order, ``<λ>`` being ``repr(float(λ))``;
* ``<name>@<λ>`` for every per-(example, candidate) extra column, e.g. ``mean_layers@0.9``;

and the header JSON (``format_version``, ``lambdas``, ``order``, ``metric``, the column names and the
caller's ``metadata``) in the Parquet file's key-value metadata under ``ltt_exit.loss_table``.

``LossTable.load`` also reads a plain "wide" loss matrix from CSV (or a Parquet file without the
header): an optional ``example_id`` column, every other column header is a λ value in grid order,
with an optional JSON sidecar ``<file>.meta.json`` for the order, metric and metadata.

This module does not import torch.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ltt_exit._atomic import atomic_path
from ltt_exit.certify._checks import ORDERS, as_grid, as_loss_matrix
from ltt_exit.validation import (
    InputError,
    check_json_object,
    check_number_list,
    check_string,
    check_string_list,
    check_whole,
    field,
)

__all__ = ["LossTable", "LossTableError", "FORMAT_VERSION", "HEADER_KEY", "SIDECAR_SUFFIX"]

#: version of the loss-table format written by this ltt-exit
FORMAT_VERSION = 1
#: Parquet key-value metadata key holding the header JSON
HEADER_KEY = "ltt_exit.loss_table"
#: a CSV's metadata sidecar is ``<csv path> + SIDECAR_SUFFIX``
SIDECAR_SUFFIX = ".meta.json"

_ID = "example_id"
_LOSS = "loss"
_SEP = "@"
_SIDECAR_KEYS = {"format_version", "order", "metric", "metadata", "lambdas"}


class LossTableError(InputError):
    """A loss table that is inconsistent, or a file that is not a readable loss table."""


def _column_name(name: str, lam: float) -> str:
    return f"{name}{_SEP}{float(lam)!r}"


def _check_json(value: Any, where: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise LossTableError(f"{where} must be JSON-serialisable (finite numbers, str keys): {exc}") from None


class LossTable:
    """Losses of every calibration example under every candidate λ, with extras and metadata.

    Parameters
    ----------
    losses:
        (n, K) floats in [0, 1]; column j belongs to ``lambdas[j]``.
    lambdas:
        (K,) the candidate grid in its a-priori order (most conservative first).
    example_ids:
        n distinct strings (default: "0", "1", ...).
    metadata:
        free-form JSON-serialisable dict: metric, model, scorer, decoder settings, dataset
        fingerprint, ... (``metadata["metric"]`` is also copied into the header).
    candidate_columns:
        name -> (n, K) array of per-(example, candidate) extras, e.g. ``"mean_layers"`` (float),
        ``"num_tokens"`` (int), ``"text"`` (str).
    example_columns:
        name -> (n,) array of per-example extras, e.g. ``"full_text"``, ``"reference"``, ``"prompt"``.
    order:
        "descending" (largest λ first) or "ascending"; default ``metadata.get("order", "descending")``.
    """

    def __init__(
        self,
        losses,
        lambdas,
        example_ids: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        candidate_columns: Mapping[str, Any] | None = None,
        example_columns: Mapping[str, Any] | None = None,
        *,
        order: str | None = None,
    ):
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict; got {type(metadata).__name__}")
        self.metadata: dict[str, Any] = _check_json(dict(metadata), "metadata")
        declared = self.metadata.get("order")
        if order is None:
            order = declared if declared is not None else "descending"
        elif declared is not None and declared != order:
            raise LossTableError(f"order={order!r} disagrees with metadata['order']={declared!r}")
        if order not in ORDERS:
            raise LossTableError(f"order must be one of {ORDERS}; got {order!r}")
        self.order: str = order

        self.losses: np.ndarray = as_loss_matrix(losses)
        n, k = self.losses.shape
        self.lambdas: np.ndarray = as_grid(lambdas, k, order)

        if example_ids is None:
            example_ids = [str(i) for i in range(n)]
        ids = list(example_ids)
        if len(ids) != n:
            raise LossTableError(f"example_ids has {len(ids)} entries but the loss matrix has {n} rows")
        not_str = [i for i in ids if not isinstance(i, str)]
        if not_str:
            raise TypeError(f"example_ids must be strings; got {not_str[0]!r} ({type(not_str[0]).__name__})")
        if len(set(ids)) != n:
            seen: set[str] = set()
            duplicate = next(i for i in ids if i in seen or seen.add(i))
            raise LossTableError(f"example_ids must be distinct; {duplicate!r} appears more than once")
        self.example_ids: list[str] = ids

        self.candidate_columns: dict[str, np.ndarray] = {}
        for name, values in (candidate_columns or {}).items():
            _check_column_name(name, "candidate column")
            if name == _LOSS:
                raise LossTableError("'loss' is reserved for the loss matrix; name the candidate column differently")
            array = _as_column_array(values, name)
            if array.shape != (n, k):
                raise LossTableError(f"candidate column {name!r} must have shape ({n}, {k}); got {array.shape}")
            self.candidate_columns[name] = array
        self.example_columns: dict[str, np.ndarray] = {}
        for name, values in (example_columns or {}).items():
            _check_column_name(name, "example column")
            if name == _ID:
                raise LossTableError("'example_id' is reserved; pass the ids as example_ids")
            array = _as_column_array(values, name)
            if array.shape != (n,):
                raise LossTableError(f"example column {name!r} must have shape ({n},); got {array.shape}")
            self.example_columns[name] = array
        #: where the table was loaded from (path, sha256, format); None when built in memory
        self.source: dict[str, Any] | None = None

    # ------------------------------------------------------------------ basics
    @property
    def n(self) -> int:
        """Number of examples."""
        return self.losses.shape[0]

    @property
    def K(self) -> int:  # noqa: N802 (the field's name for the grid size)
        """Number of candidates."""
        return self.losses.shape[1]

    @property
    def metric(self) -> str | None:
        return self.metadata.get("metric")

    def mean_per_candidate(self, name: str) -> np.ndarray:
        """(K,) mean over examples of the numeric candidate column ``name`` (e.g. mean layers used)."""
        if name not in self.candidate_columns:
            raise KeyError(f"no candidate column {name!r}; the table has {sorted(self.candidate_columns)}")
        values = self.candidate_columns[name]
        if not np.issubdtype(values.dtype, np.number):
            raise TypeError(f"candidate column {name!r} is not numeric ({values.dtype})")
        return values.astype(np.float64).mean(axis=0)

    def header(self) -> dict[str, Any]:
        """The header JSON stored with the table (format version, grid, order, metric, columns, metadata)."""
        return {
            "format_version": FORMAT_VERSION,
            "lambdas": self.lambdas.tolist(),
            "order": self.order,
            "metric": self.metric,
            "n": self.n,
            "K": self.K,
            "loss_columns": [_column_name(_LOSS, lam) for lam in self.lambdas],
            "candidate_columns": list(self.candidate_columns),
            "example_columns": list(self.example_columns),
            "metadata": self.metadata,
        }

    def to_pandas(self):
        """The wide table as a ``pandas.DataFrame`` (the header dict is in ``df.attrs[HEADER_KEY]``)."""
        import pandas as pd

        df = pd.DataFrame(self._columns(), copy=False)
        df.attrs[HEADER_KEY] = self.header()
        return df

    def _columns(self) -> dict[str, Any]:
        columns: dict[str, Any] = {_ID: np.array(self.example_ids, dtype=object)}
        columns.update(self.example_columns)
        for j, lam in enumerate(self.lambdas):
            columns[_column_name(_LOSS, lam)] = self.losses[:, j]
        for name, values in self.candidate_columns.items():
            for j, lam in enumerate(self.lambdas):
                columns[_column_name(name, lam)] = values[:, j]
        return columns

    def __eq__(self, other) -> bool:
        if not isinstance(other, LossTable):
            return NotImplemented
        return (
            self.order == other.order
            and self.metadata == other.metadata
            and self.example_ids == other.example_ids
            and np.array_equal(self.lambdas, other.lambdas)
            and np.array_equal(self.losses, other.losses)
            and _same_columns(self.candidate_columns, other.candidate_columns)
            and _same_columns(self.example_columns, other.example_columns)
        )

    __hash__ = None  # mutable arrays inside

    def __repr__(self) -> str:
        return f"LossTable(n={self.n}, K={self.K}, order={self.order!r}, metric={self.metric!r})"

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the table as Parquet (pyarrow), atomically, header JSON in the key-value metadata."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        target = Path(path)
        if target.suffix.lower() in (".csv", ".tsv", ".json"):
            raise LossTableError(f"LossTable.save writes Parquet; give a .parquet path, not {target.name!r}")
        arrays = {}
        for name, values in self._columns().items():
            if isinstance(values, np.ndarray) and values.dtype == object:
                arrays[name] = pa.array(values.tolist(), type=pa.string())
            else:
                arrays[name] = pa.array(np.ascontiguousarray(values))
        table = pa.table(arrays)
        header = json.dumps(self.header(), allow_nan=False, ensure_ascii=False)
        table = table.replace_schema_metadata({HEADER_KEY: header})
        with atomic_path(target) as temp:
            pq.write_table(table, temp)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "LossTable":
        """Read a loss table: ltt-exit Parquet, or a plain wide loss matrix in CSV / Parquet.

        Plain wide matrix: optional ``example_id`` column; every other column header is a λ value,
        in grid order. Metadata for it (order, metric, free-form metadata, optionally the lambdas
        for an exact check of the headers) may sit in the JSON sidecar ``<path>.meta.json``.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"loss table {str(path)!r} does not exist")
        if path.is_dir():
            raise LossTableError(f"loss table {str(path)!r} is a folder, not a file")
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic == b"PAR1":
            table = _load_parquet(path)
        elif path.suffix.lower() in (".csv", ".txt"):
            table = _load_csv(path)
        else:
            raise LossTableError(
                f"{str(path)!r} is neither a Parquet file (no PAR1 magic bytes) nor a .csv file"
            )
        table.source = {"path": str(path), "sha256": _sha256_file(path), "format": "parquet" if magic == b"PAR1" else "csv"}
        return table


# ---------------------------------------------------------------------- helpers
def _check_column_name(name, what: str) -> None:
    if not isinstance(name, str) or not name:
        raise LossTableError(f"{what} names must be non-empty strings; got {name!r}")
    if _SEP in name:
        raise LossTableError(f"{what} name {name!r} must not contain {_SEP!r} (it separates name and λ)")


def _as_column_array(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind in "US":
        array = array.astype(object)
    if array.dtype == object:
        bad = [v for v in array.reshape(-1) if not isinstance(v, str)]
        if bad:
            raise TypeError(f"column {name!r}: text columns must hold str only; found {bad[0]!r}")
    elif array.dtype.kind not in "biuf":
        raise TypeError(f"column {name!r} has unsupported dtype {array.dtype}; use float, int, bool or str")
    return array


def _same_columns(a: dict, b: dict) -> bool:
    if list(a) != list(b):
        return False
    for name in a:
        x, y = a[name], b[name]
        if x.shape != y.shape:
            return False
        if x.dtype == object or y.dtype == object:
            if x.tolist() != y.tolist():
                return False
        elif x.dtype != y.dtype or not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
            return False
    return True


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def _parse_lambda(header: str, source: str) -> float:
    try:
        value = float(header)
    except ValueError:
        raise LossTableError(
            f"{source}: column {header!r} is neither 'example_id' nor a λ value; in a plain wide loss "
            "matrix every column except 'example_id' is named by its candidate λ"
        ) from None
    if not math.isfinite(value):
        raise LossTableError(f"{source}: column {header!r} is not a finite λ value")
    return value


def _from_wide(frame, source: str, sidecar: dict | None) -> LossTable:
    """A plain wide loss matrix (optional example_id + λ-named columns) → LossTable."""
    columns = [str(c) for c in frame.columns]
    if len(frame) == 0:
        raise LossTableError(f"{source}: the table has no rows: no examples (n = 0)")
    if len(set(columns)) != len(columns):
        duplicate = next(c for c in columns if columns.count(c) > 1)
        raise LossTableError(f"{source}: column {duplicate!r} appears more than once")
    ids = None
    if _ID in columns:
        ids = frame[_ID].tolist()
        bad = next((i for i in ids if not isinstance(i, str)), None)
        if bad is not None or any(not isinstance(i, str) for i in ids):
            raise LossTableError(f"{source}: column 'example_id' must hold strings with no missing values; found {bad!r}")
    lambda_columns = [c for c in columns if c != _ID]
    lambdas = [_parse_lambda(c, source) for c in lambda_columns]
    if not lambda_columns:
        raise LossTableError(f"{source}: no λ columns: the candidate grid is empty")
    values = frame[lambda_columns]
    non_numeric = [c for c in lambda_columns if not _is_numeric(values[c])]
    if non_numeric:
        raise LossTableError(f"{source}: column {non_numeric[0]!r} holds non-numeric values; losses must be numbers in [0, 1]")
    sidecar = sidecar or {}
    if "lambdas" in sidecar and sidecar["lambdas"] != lambdas:
        raise LossTableError(
            f"{source}: the column headers give λ = {lambdas} but the sidecar declares {sidecar['lambdas']}"
        )
    metadata = dict(sidecar.get("metadata") or {})
    if sidecar.get("metric") is not None:
        metadata.setdefault("metric", sidecar["metric"])
    try:
        return LossTable(
            values.to_numpy(dtype=np.float64),
            lambdas,
            ids,
            metadata,
            order=sidecar.get("order", metadata.get("order", "descending")),
        )
    except (ValueError, TypeError) as exc:  # LossTable's own checks (LossTableError too), not yet naming the file
        raise LossTableError(f"{source}: {_brief(exc)}") from None


def _read_sidecar(path: Path) -> dict | None:
    sidecar_path = Path(str(path) + SIDECAR_SUFFIX)
    if not sidecar_path.exists():
        return None
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LossTableError(f"sidecar {str(sidecar_path)!r} is not valid JSON: {exc}") from None
    if not isinstance(sidecar, dict):
        raise LossTableError(f"sidecar {str(sidecar_path)!r} must hold a JSON object; got {type(sidecar).__name__}")
    unknown = set(sidecar) - _SIDECAR_KEYS
    if unknown:
        raise LossTableError(f"sidecar {str(sidecar_path)!r} has unknown keys {sorted(unknown)}; allowed: {sorted(_SIDECAR_KEYS)}")
    version = sidecar.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise LossTableError(f"sidecar {str(sidecar_path)!r}: unknown format_version {version!r}; this ltt-exit reads {FORMAT_VERSION}")
    return _checked_fields(sidecar, f"sidecar {str(sidecar_path)!r}")


def _checked_fields(record: dict, source: str) -> dict:
    """Type-check the header / sidecar fields that are present; messages name ``source`` and the field."""
    out = dict(record)
    try:
        if "lambdas" in record:
            out["lambdas"] = check_number_list(record["lambdas"], field(source, "lambdas"))
        if "order" in record:
            order = check_string(record["order"], field(source, "order"))
            if order not in ORDERS:
                raise LossTableError(f"{field(source, 'order')} must be one of {ORDERS}; got {order!r}")
        if "metric" in record:
            check_string(record["metric"], field(source, "metric"), allow_none=True)
        if "metadata" in record and record["metadata"] is not None:
            out["metadata"] = check_json_object(record["metadata"], field(source, "metadata"))
        for name in ("candidate_columns", "example_columns", "loss_columns"):
            if name in record:
                out[name] = check_string_list(record[name], field(source, name))
        for name in ("n", "K"):
            if name in record:
                check_whole(record[name], field(source, name), minimum=0)
    except LossTableError:
        raise
    except InputError as exc:
        raise LossTableError(str(exc)) from None
    return out


def _load_csv(path: Path) -> LossTable:
    import pandas as pd

    source = str(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle))
        frame = pd.read_csv(path, dtype={_ID: str}, keep_default_na=True)
    except StopIteration:
        raise LossTableError(f"{source}: the file is empty (no header row)") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, csv.Error) as exc:
        raise LossTableError(f"{source}: cannot parse as CSV: {_brief(exc)}") from None
    frame.columns = header if len(header) == len(frame.columns) else frame.columns
    return _from_wide(frame, source, _read_sidecar(path))


def _load_parquet(path: Path) -> LossTable:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = str(path)
    try:
        # The schema first: pyarrow's table reader fails on duplicate column names with a schema dump.
        names = list(pq.read_schema(path).names)
        if len(set(names)) != len(names):
            duplicate = next(c for c in names if names.count(c) > 1)
            raise LossTableError(f"{source}: column {duplicate!r} appears more than once; column names must be unique")
        table = pq.read_table(path)
    except LossTableError:
        raise
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise LossTableError(f"{source}: cannot read as Parquet (truncated or corrupted?): {_brief(exc)}") from None
    raw_meta = table.schema.metadata or {}
    raw_header = raw_meta.get(HEADER_KEY.encode())
    try:
        frame = table.to_pandas()
    except Exception as exc:  # pyarrow types pandas cannot hold; pyarrow raises several kinds
        raise LossTableError(f"{source}: cannot convert the Parquet columns to a table: {_brief(exc)}") from None
    if raw_header is None:
        return _from_wide(frame, source, _read_sidecar(path))
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LossTableError(f"{source}: the loss-table header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise LossTableError(
            f"{source}: the loss-table header ({HEADER_KEY!r} in the Parquet metadata) must be a JSON object; "
            f"got {type(header).__name__}"
        )
    version = header.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise LossTableError(f"{source}: unknown loss-table format_version {version!r}; this ltt-exit reads {FORMAT_VERSION}")
    for key in ("lambdas", "order", "candidate_columns", "example_columns", "metadata"):
        if key not in header:
            raise LossTableError(f"{source}: the loss-table header lacks {key!r}")
    header = _checked_fields(header, f"{source}: header")
    if header["metadata"] is None:
        raise LossTableError(f"{field(source + ': header', 'metadata')} must be a JSON object; got None")
    lambdas = header["lambdas"]
    expected_losses = [_column_name(_LOSS, lam) for lam in lambdas]
    expected = [_ID] + list(header["example_columns"]) + expected_losses + [
        _column_name(name, lam) for name in header["candidate_columns"] for lam in lambdas
    ]
    present = list(frame.columns)
    if present != expected:
        missing = [c for c in expected if c not in present]
        extra = [c for c in present if c not in expected]
        detail = f"missing {missing[:5]}" if missing else ""
        detail += ("; " if detail and extra else "") + (f"unexpected {extra[:5]}" if extra else "")
        if not detail:
            detail = "columns are out of order"
        raise LossTableError(
            f"{source}: the columns do not match the header's grid of {len(lambdas)} λ values ({detail})"
        )
    for name in expected_losses:
        if not _is_numeric(frame[name]):
            raise LossTableError(f"{source}: column {name!r} holds {frame[name].dtype} values; losses must be numbers in [0, 1]")
    n = len(frame)
    if header.get("n", n) != n or header.get("K", len(lambdas)) != len(lambdas):
        raise LossTableError(
            f"{source}: the header says n = {header.get('n')}, K = {header.get('K')} but the file holds "
            f"{n} rows and {len(lambdas)} λ values"
        )
    try:
        return LossTable(
            frame[expected_losses].to_numpy(dtype=np.float64),
            lambdas,
            frame[_ID].tolist(),
            header["metadata"],
            candidate_columns={
                name: _stack(frame, [_column_name(name, lam) for lam in lambdas], n)
                for name in header["candidate_columns"]
            },
            example_columns={name: _column_values(frame[name]) for name in header["example_columns"]},
            order=header["order"],
        )
    except (ValueError, TypeError, pa.ArrowException) as exc:  # LossTable's checks; pyarrow: e.g. invalid UTF-8
        raise LossTableError(f"{source}: {_brief(exc)}") from None


def _brief(exc: BaseException, limit: int = 300) -> str:
    """A library's error message on one line, cut to ``limit`` characters (pyarrow's can hold a schema dump)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_numeric(series) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_complex_dtype(series)


def _column_values(series) -> np.ndarray:
    import pandas as pd

    if series.dtype == object or pd.api.types.is_string_dtype(series.dtype):
        return np.array(series.tolist(), dtype=object)
    return series.to_numpy()


def _stack(frame, names: list[str], n: int) -> np.ndarray:
    parts = [_column_values(frame[name]) for name in names]
    if any(p.dtype == object for p in parts):
        out = np.empty((n, len(parts)), dtype=object)
        for j, part in enumerate(parts):
            out[:, j] = part
        return out
    return np.column_stack(parts)
