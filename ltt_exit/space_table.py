"""The on-disk loss table of a configuration-space sweep (Pareto Testing's input); no torch.

Long-form Parquet: one row per (example, configuration) with the columns

* ``example_id`` (string), ``configuration`` (int, index into the header's configurations),
  ``setting`` (int: the decoder setting = every knob but λ), ``lambda`` (float);
* ``loss_<risk>`` for every risk the sweep measured (``loss_textual``: 1 − m(early, full);
  ``loss_risk``: excess loss against the reference, when the calibration set has references);
* ``mean_layers``, ``layers_total``, ``num_tokens``, ``flops``, ``full_flops`` and ``text``.

The header JSON sits in the Parquet key-value metadata under :data:`HEADER_KEY`: format version,
the configurations (knobs of each, in column order), the decoder configuration of each setting
(``EarlyExitDecoder.config_dict()``), the risks, and the sweep metadata (model fingerprint,
dataset fingerprint, metric, max_new_tokens, num_layers, sweep key). Rows are sorted by
(example order of the calibration set, configuration).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ltt_exit._atomic import atomic_path

__all__ = ["SpaceTable", "SpaceTableError", "HEADER_KEY", "FORMAT_VERSION", "RISK_COLUMNS", "is_space_table"]

HEADER_KEY = "ltt_exit.space_table"
FORMAT_VERSION = 1
#: per-(example, configuration) numeric columns besides the losses
VALUE_COLUMNS = ("mean_layers", "layers_total", "num_tokens", "flops", "full_flops")
#: risk name -> loss column
RISK_COLUMNS = {"textual": "loss_textual", "risk": "loss_risk"}


class SpaceTableError(ValueError):
    """A file that is not a readable configuration-space loss table, or inconsistent contents."""


def is_space_table(path: str | os.PathLike) -> bool:
    """True when ``path`` is a Parquet file whose header marks it as a configuration-space table."""
    if not str(path).endswith(".parquet") or not Path(path).is_file():
        return False
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
    except Exception:  # not Parquet: the loss-table reader gives the clear message
        return False
    return HEADER_KEY.encode() in metadata


class SpaceTable:
    """Per-(example, configuration) losses and costs of a configuration-space sweep.

    Parameters
    ----------
    example_ids: n distinct strings, in calibration-set order.
    configurations: K dicts (the knobs of each configuration: lambda, setting, min_exit_layer,
        pruning, scorer, tau), in column order.
    settings: one ``EarlyExitDecoder.config_dict()`` per setting.
    values: column name -> (n, K) array (``loss_*`` in [0, 1], :data:`VALUE_COLUMNS`, ``text``).
    metadata: JSON-serialisable sweep metadata.
    """

    def __init__(self, example_ids: Sequence[str], configurations: Sequence[Mapping[str, Any]],
                 settings: Sequence[Mapping[str, Any]], values: Mapping[str, Any], metadata: Mapping[str, Any]):
        self.example_ids = [str(i) for i in example_ids]
        self.configurations = [dict(c) for c in configurations]
        self.settings = [dict(s) for s in settings]
        self.metadata = json.loads(json.dumps(dict(metadata), allow_nan=False))
        n, k = len(self.example_ids), len(self.configurations)
        if n == 0 or k == 0:
            raise SpaceTableError(f"a space table needs examples and configurations; got {n} × {k}")
        if len(set(self.example_ids)) != n:
            raise SpaceTableError("example ids must be distinct")
        for j, config in enumerate(self.configurations):
            if not 0 <= int(config.get("setting", -1)) < len(self.settings) or "lambda" not in config:
                raise SpaceTableError(f"configuration {j} needs a lambda and a setting index in [0, {len(self.settings) - 1}]")
        self.values: dict[str, np.ndarray] = {}
        for name, array in values.items():
            array = np.asarray(array, dtype=object if name == "text" else np.float64)
            if array.shape != (n, k):
                raise SpaceTableError(f"column {name!r} has shape {array.shape}; expected ({n}, {k})")
            if name.startswith("loss_") and (not np.isfinite(array).all() or (array < 0).any() or (array > 1).any()):
                raise SpaceTableError(f"column {name!r} must hold losses in [0, 1]")
            self.values[name] = array
        if not self.risks:
            raise SpaceTableError("a space table needs at least one loss column (loss_textual, loss_risk)")
        self.source: dict[str, Any] | None = None

    # ------------------------------------------------------------------ views
    @property
    def n(self) -> int:
        return len(self.example_ids)

    @property
    def K(self) -> int:  # noqa: N802 (the paper's K)
        return len(self.configurations)

    @property
    def risks(self) -> list[str]:
        """Risk names with a loss column, e.g. ``["textual", "risk"]``."""
        return [name for name, column in RISK_COLUMNS.items() if column in self.values]

    def losses(self, risks: Sequence[str]) -> np.ndarray:
        """(n, K, R) losses of the given risks, in that order."""
        missing = [r for r in risks if r not in self.risks]
        if missing:
            raise SpaceTableError(f"the space table has no {missing[0]!r} losses (it has: {', '.join(self.risks)})")
        return np.stack([self.values[RISK_COLUMNS[r]] for r in risks], axis=-1)

    def cost(self, name: str) -> np.ndarray:
        """(n, K) per-example cost: ``mean_layers``, or ``flops`` as a ratio to the full model's."""
        if name == "flops":
            return self.values["flops"] / np.maximum(self.values["full_flops"], 1e-300)
        if name not in self.values or name == "text":
            raise SpaceTableError(f"no numeric column {name!r} in the space table (have: {sorted(self.values)})")
        return self.values[name]

    def full_configurations(self) -> list[dict]:
        """Each configuration's knobs plus its setting's full decoder configuration (``decoder``)."""
        return [dict(c, decoder=self.settings[int(c["setting"])]) for c in self.configurations]

    def header(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "configurations": self.configurations,
            "settings": self.settings,
            "risks": self.risks,
            "metadata": self.metadata,
        }

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Write the long-form Parquet table atomically."""
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        n, k = self.n, self.K
        frame = {
            "example_id": np.repeat(np.array(self.example_ids, dtype=object), k),
            "configuration": np.tile(np.arange(k), n),
            "setting": np.tile([int(c["setting"]) for c in self.configurations], n),
            "lambda": np.tile([float(c["lambda"]) for c in self.configurations], n),
        }
        for name, array in self.values.items():
            frame[name] = array.reshape(-1)
        table = pa.Table.from_pandas(pd.DataFrame(frame), preserve_index=False)
        header = json.dumps(self.header(), ensure_ascii=False, allow_nan=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), HEADER_KEY: header})
        with atomic_path(path) as temp:
            pq.write_table(table, temp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SpaceTable":
        """Read a space table written by :meth:`save`; refuse anything else with a one-line error."""
        import pyarrow.parquet as pq

        source = os.fspath(path)
        if not Path(source).is_file():
            raise FileNotFoundError(f"space table {source!r} does not exist")
        try:
            table = pq.read_table(source)
        except Exception as exc:
            raise SpaceTableError(f"{source}: not a readable Parquet file ({exc})") from None
        raw = (table.schema.metadata or {}).get(HEADER_KEY.encode())
        if raw is None:
            raise SpaceTableError(f"{source}: no {HEADER_KEY} header; not a configuration-space table")
        try:
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            if header.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"unknown format_version {header.get('format_version')!r}")
            configurations, settings, metadata = header["configurations"], header["settings"], header["metadata"]
        except (ValueError, KeyError) as exc:
            raise SpaceTableError(f"{source}: bad {HEADER_KEY} header ({exc})") from None
        frame = table.to_pandas()
        k = len(configurations)
        ids = list(dict.fromkeys(frame["example_id"].astype(str)))
        n = len(ids)
        if len(frame) != n * k or list(frame["configuration"][:k]) != list(range(k)):
            raise SpaceTableError(f"{source}: expected {n} × {k} rows sorted by (example, configuration)")
        values = {}
        for name in frame.columns:
            if name in ("example_id", "configuration", "setting", "lambda"):
                continue
            values[name] = frame[name].to_numpy().reshape(n, k)
        try:
            loaded = cls(ids, configurations, settings, values, metadata)
        except SpaceTableError as exc:
            raise SpaceTableError(f"{source}: {exc}") from None
        loaded.source = {"path": os.path.abspath(source)}
        return loaded
