"""Atomic file writes: a file either appears complete under its final name or not at all.

Every stage that writes a file (loss tables, certificates, sweep outputs, reports) goes through
these helpers so that an interrupted run never leaves a truncated file under the final name.

The temporary file lives in the *same folder* as the target (``os.replace`` is atomic only within
one file system), is created with the process umask applied (a plain ``open`` would do the same),
keeps the target's suffix (some writers, e.g. ``numpy.save``, append a suffix when it is missing),
is flushed to disk before the rename, and is removed when writing fails.
"""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text"]


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable; not every platform / file system allows it.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temp_beside(path: Path) -> Path:
    """Create an empty, exclusive temporary file next to ``path`` and return its path."""
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: the folder {str(folder)!r} does not exist")
    suffix = "".join(path.suffixes[-1:])
    for _ in range(100):
        temp = folder / f".{path.name}.{secrets.token_hex(6)}.tmp{suffix}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return temp
    raise FileExistsError(f"could not create a unique temporary file next to {str(path)!r}")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; rename it onto ``path`` if the block succeeds.

    The yielded file exists (empty) so that the name is reserved; writers may overwrite it. If the
    block raises, the temporary file is removed, ``path`` is left untouched, and the exception
    propagates.

    Example::

        with atomic_path("table.parquet") as tmp:
            pyarrow.parquet.write_table(table, tmp)
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"cannot write {str(target)!r}: it is a folder")
    temp = _create_temp_beside(target)
    try:
        yield temp
        _fsync_file(temp)
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + ``os.replace``)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes expects bytes, got {type(data).__name__}")
    with atomic_path(path) as temp:
        with open(temp, "wb") as handle:
            handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically, encoded with ``encoding`` (UTF-8 by default)."""
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text expects str, got {type(text).__name__}")
    atomic_write_bytes(path, text.encode(encoding))
