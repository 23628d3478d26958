"""The resumable partial-sweep store: durable appends, torn-line recovery, configuration check."""
import json

import pytest

from ltt_exit.sweep.partial import PartialSweep, PartialSweepMismatch


def test_appends_survive_reopening(tmp_path):
    path = tmp_path / "t.partial.jsonl"
    store = PartialSweep(path, "key-a")
    store.append("ex1", {"loss": [0.0, 0.5]})
    store.append("ex2", {"loss": [0.0, 1.0]})
    reopened = PartialSweep(path, "key-a")
    assert list(reopened) == ["ex1", "ex2"]
    assert reopened.records["ex2"] == {"loss": [0.0, 1.0]}


def test_duplicate_append_is_refused(tmp_path):
    store = PartialSweep(tmp_path / "p.jsonl", "k")
    store.append("a", {})
    with pytest.raises(ValueError, match="already recorded"):
        store.append("a", {})


def test_torn_last_line_is_cut_and_appending_continues(tmp_path):
    path = tmp_path / "p.jsonl"
    store = PartialSweep(path, "k")
    store.append("a", {"x": 1})
    store.append("b", {"x": 2})
    # the process died while writing the third record
    with open(path, "a") as handle:
        handle.write('{"kind": "example", "id": "c", "da')
    reopened = PartialSweep(path, "k")
    assert list(reopened) == ["a", "b"]
    reopened.append("c", {"x": 3})
    lines = path.read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["header", "example", "example", "example"]
    assert list(PartialSweep(path, "k")) == ["a", "b", "c"]


def test_other_configuration_is_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    PartialSweep(path, "key-a").append("a", {})
    with pytest.raises(PartialSweepMismatch, match="another configuration"):
        PartialSweep(path, "key-b")


def test_foreign_file_is_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"hello": 1}\n')
    with pytest.raises(PartialSweepMismatch, match="not an ltt-exit partial"):
        PartialSweep(path, "k")
