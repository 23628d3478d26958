"""The atomic-write helpers: complete file or no file, never a partial one."""
from __future__ import annotations

import os
import stat

import pytest

from ltt_exit._atomic import atomic_path, atomic_write_bytes, atomic_write_text


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_bytes_and_text_replace_existing_file(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    atomic_write_bytes(target, b"\x00new bytes")
    assert target.read_bytes() == b"\x00new bytes"
    atomic_write_text(target, "héllo")
    assert target.read_bytes() == "héllo".encode("utf-8")
    assert _leftovers(tmp_path) == []


def test_failure_inside_block_leaves_target_untouched_and_no_temp(tmp_path):
    target = tmp_path / "certificate.json"
    target.write_text("original")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as temp:
            assert temp.parent == tmp_path
            temp.write_text("half written")
            raise RuntimeError("boom")
    assert target.read_text() == "original"
    assert _leftovers(tmp_path) == []


def test_failure_when_target_did_not_exist_creates_nothing(tmp_path):
    target = tmp_path / "new.parquet"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as temp:
            temp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_temp_keeps_suffix_and_is_in_same_folder(tmp_path):
    target = tmp_path / "array.npy"
    with atomic_path(target) as temp:
        assert temp.suffix == ".npy"
        assert temp.parent == tmp_path
        assert temp != target
        temp.write_bytes(b"x")
    assert target.read_bytes() == b"x"


def test_permissions_follow_umask_not_mkstemp_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.txt").stat().st_mode)
    assert mode == 0o644


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write_text(tmp_path / "nope" / "a.txt", "x")


def test_wrong_types_rejected(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "a", "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        atomic_write_text(tmp_path / "a", b"bytes")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
