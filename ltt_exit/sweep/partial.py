"""A resumable, append-only record of a sweep in progress (JSON Lines).

Line 1 is a header naming the configuration the sweep runs under; every further line is one
finished example. Each append is flushed and fsynced before the next example starts, so a sweep
killed at any moment loses at most the example it was working on. A torn last line (the process
died mid-write) is cut off on reopening. Reopening with another configuration is refused, so rows
of two configurations can never mix in one table.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from ltt_exit.validation import InputError

PARTIAL_FORMAT = 1


class PartialSweepMismatch(InputError):
    """The partial file on disk belongs to another sweep configuration."""


class PartialSweep:
    """Append-only store of finished examples, keyed by example id.

    Parameters
    ----------
    path : where the JSON Lines file lives (created on first use).
    config_key : a string identifying the sweep configuration (model fingerprint, decoder
        settings, grid, dataset fingerprint …); stored in the header and checked on reopening.
    """

    def __init__(self, path: str | os.PathLike, config_key: str):
        self.path = Path(path)
        self.config_key = config_key
        self.records: dict[str, dict[str, Any]] = {}
        self._open_existing()

    def _open_existing(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        good_end = 0  # byte offset after the last complete, parseable line
        lines = []
        for piece in raw.split(b"\n")[:-1]:  # the element after the last newline is torn or empty
            try:
                lines.append(json.loads(piece))
            except json.JSONDecodeError:
                break
            good_end += len(piece) + 1
        if not lines:
            self.path.unlink()  # only a torn header: nothing was recorded
            return
        header = lines[0]
        if not isinstance(header, dict) or header.get("kind") != "header" or header.get("format") != PARTIAL_FORMAT:
            raise PartialSweepMismatch(f"{self.path} is not an ltt-exit partial sweep file; delete it")
        if header.get("config_key") != self.config_key:
            raise PartialSweepMismatch(
                f"{self.path} holds a sweep of another configuration "
                f"({header.get('config_key')!r}, now {self.config_key!r}); "
                "delete it or choose another output path"
            )
        for number, record in enumerate(lines[1:], 2):
            if not (isinstance(record, dict) and isinstance(record.get("id"), str) and "data" in record):
                raise PartialSweepMismatch(f"{self.path}: line {number} is not an example record; the file is "
                                           "damaged, delete it")
            self.records[record["id"]] = record["data"]
        if good_end < len(raw):
            with open(self.path, "r+b") as handle:
                handle.truncate(good_end)

    def __contains__(self, example_id: str) -> bool:
        return example_id in self.records

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[str]:
        return iter(self.records)

    def append(self, example_id: str, data: dict[str, Any]) -> None:
        """Record one finished example durably. Appending an id twice is an error."""
        if example_id in self.records:
            raise ValueError(f"example {example_id!r} is already recorded in {self.path}")
        lines = []
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lines.append({"kind": "header", "format": PARTIAL_FORMAT, "config_key": self.config_key})
        lines.append({"kind": "example", "id": example_id, "data": data})
        payload = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        self.records[example_id] = data

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
