"""A per-user cache of GGUF checkpoints converted to safetensors.

transformers dequantises a GGUF file to float every time it loads one (about 20 s for the 135M
SmolLM2 on two cores). The first load converts once and stores the result as an ordinary
transformers folder; later loads read that folder in about a second.

Layout, under the cache root (:func:`default_cache_dir`)::

    file-hashes/<key>.json         sha256 of a file, keyed by (real path, size, mtime_ns)
    gguf-v1/<sha256 of the GGUF>/  one entry per GGUF file content
        config.json, generation_config.json, model.safetensors, tokenizer files
        ltt_exit_entry.json        written last: format, source, the size of every file above
        fingerprints/*.json        model fingerprints computed on loads from this entry

Concurrency: an entry is built in a temporary folder beside its final name and renamed into place
in one step (``os.rename`` of a folder is atomic on POSIX). When two processes convert the same
file at once, the first rename wins and the other discards its copy. A folder whose
``ltt_exit_entry.json`` is missing or does not match its files (an interrupted build, a damaged
disk) is never used: it is moved aside and rebuilt. Temporary folders start with a dot and are
swept after a day.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._atomic import atomic_write_text

__all__ = [
    "CACHE_FORMAT_VERSION",
    "GGUFCacheEntry",
    "default_cache_dir",
    "file_sha256",
    "gguf_entry_dir",
    "read_valid_entry",
    "ensure_gguf_cache",
    "load_gguf_uncached",
    "read_cached_fingerprint",
    "write_cached_fingerprint",
]

CACHE_FORMAT_VERSION = 1
ENTRY_MANIFEST = "ltt_exit_entry.json"
WEIGHTS_FILE = "model.safetensors"
_HASH_CHUNK = 1 << 22
_STALE_TEMP_SECONDS = 24 * 3600
# transformers' from_pretrained is not thread-safe (it swaps the default device globally while it
# builds a model), so threads of one process convert one at a time; processes race on the rename.
_BUILD_LOCK = threading.Lock()


def default_cache_dir() -> Path:
    """$LTT_EXIT_CACHE, else $XDG_CACHE_HOME/ltt-exit, else ~/.cache/ltt-exit."""
    explicit = os.environ.get("LTT_EXIT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ltt-exit"


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _stream_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """sha256 (hex) of a file's content, remembered per (real path, size, mtime_ns).

    The file is hashed in chunks; the result is stored under ``<cache>/file-hashes/`` so a later
    call on the unchanged file costs one ``stat``. A changed size or modification time re-hashes.
    """
    real = Path(path).expanduser().resolve()
    stat = real.stat()
    identity = {"path": str(real), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    record_path = _cache_root(cache_dir) / "file-hashes" / f"{key}.json"
    try:
        record = json.loads(record_path.read_text())
        if {k: record.get(k) for k in identity} == identity and len(record.get("sha256", "")) == 64:
            return record["sha256"]
    except (OSError, ValueError):
        pass
    sha = _stream_sha256(real)
    try:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record_path, json.dumps({**identity, "sha256": sha}, indent=1))
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return sha


@dataclass(frozen=True)
class GGUFCacheEntry:
    """A complete converted checkpoint: ``path`` is a folder ``from_pretrained`` can load."""

    path: Path
    gguf_sha256: str
    manifest: dict[str, Any]
    built_now: bool = False

    @property
    def model_type(self) -> str:
        return self.manifest["model_type"]


def gguf_entry_dir(gguf_sha256: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the entry for a GGUF file with this content hash lives (it may not exist)."""
    return _cache_root(cache_dir) / f"gguf-v{CACHE_FORMAT_VERSION}" / gguf_sha256


def read_valid_entry(entry_dir: Path) -> dict[str, Any] | None:
    """The entry's manifest if the folder is a complete entry, else None."""
    try:
        manifest = json.loads((entry_dir / ENTRY_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT_VERSION:
        return None
    if manifest.get("gguf_sha256") != entry_dir.name:
        return None
    files = manifest.get("files")
    if not isinstance(files, dict) or WEIGHTS_FILE not in files:
        return None
    for name, size in files.items():
        try:
            if (entry_dir / name).stat().st_size != size:
                return None
        except OSError:
            return None
    return manifest


def load_gguf_uncached(gguf_path: str | os.PathLike[str]):
    """Load a GGUF file with transformers, dequantising it: returns (model, tokenizer, config).

    The model class follows the file's architecture: T5ForConditionalGeneration for T5, the
    causal-LM class otherwise. No cache is read or written.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, T5ForConditionalGeneration

    gguf_path = Path(gguf_path).expanduser().resolve()
    folder, filename = str(gguf_path.parent), gguf_path.name
    with _parse_gguf_once():
        config = AutoConfig.from_pretrained(folder, gguf_file=filename)
        model_class = T5ForConditionalGeneration if config.model_type == "t5" else AutoModelForCausalLM
        model = model_class.from_pretrained(folder, gguf_file=filename)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    return model, tokenizer, config


@contextlib.contextmanager
def _parse_gguf_once():
    """Within the block, parse each GGUF file once and build each gguf tensor-name map once.

    transformers reads the whole GGUF header (every tokenizer string, element by element) for the
    config, for the tokenizer and twice for the weights, and rebuilds gguf's tensor-name map for every
    sub-module of the model: for SmolLM2 on two cores that is 4 × 3.5 s of parsing plus 5 s of maps,
    most of a first load. Both objects are read-only once built, so sharing them changes nothing but
    the time. The names are swapped on the ``gguf`` module, where transformers imports them at call
    time, and restored on exit.
    """
    import gguf

    original_reader, original_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def shared_reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_name_map


def _save_converted(model, tokenizer, folder: Path) -> None:
    """Write a dequantised GGUF model as a plain transformers folder (no quantisation config)."""
    from safetensors.torch import save_model

    config = model.config.to_dict()
    # The weights are already dequantised; a stored gguf quantisation config would make
    # from_pretrained look for the GGUF file again.
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    # save_model writes tied tensors (embedding / lm_head) once.
    save_model(model, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def _sweep_stale_temps(parent: Path) -> None:
    now = time.time()
    for child in parent.glob(".*.tmp-*"):
        try:
            if now - child.stat().st_mtime > _STALE_TEMP_SECONDS:
                shutil.rmtree(child, ignore_errors=True)
        except OSError:
            pass


def _install(temp: Path, target: Path) -> bool:
    """Rename ``temp`` onto ``target``; return False (and delete ``temp``) if another build won."""
    for _ in range(3):
        try:
            os.rename(temp, target)
            return True
        except OSError:
            if read_valid_entry(target) is not None:
                shutil.rmtree(temp, ignore_errors=True)
                return False
            # target is an incomplete folder (not ours): move it aside, then retry.
            aside = target.parent / f".{target.name}.tmp-invalid-{secrets.token_hex(4)}"
            try:
                os.rename(target, aside)
                shutil.rmtree(aside, ignore_errors=True)
            except OSError:
                pass
    shutil.rmtree(temp, ignore_errors=True)
    if read_valid_entry(target) is None:
        raise OSError(f"could not install the converted GGUF cache entry at {target}")
    return False


def ensure_gguf_cache(
    gguf_path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None
) -> GGUFCacheEntry:
    """Return the cache entry for ``gguf_path``, converting the file first if it has none."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    sha = file_sha256(gguf_path, cache_dir=cache_dir)
    target = gguf_entry_dir(sha, cache_dir)
    manifest = read_valid_entry(target)
    if manifest is not None:
        return GGUFCacheEntry(target, sha, manifest)

    with _BUILD_LOCK:
        manifest = read_valid_entry(target)  # another thread may have built it meanwhile
        if manifest is not None:
            return GGUFCacheEntry(target, sha, manifest)
        built = _build_entry(gguf_path, sha, target)
    manifest = read_valid_entry(target)
    if manifest is None:  # pragma: no cover - only on a file system that lost the rename
        raise OSError(f"the GGUF cache entry at {target} is not readable after installing it")
    return GGUFCacheEntry(target, sha, manifest, built_now=built)


def _build_entry(gguf_path: Path, sha: str, target: Path) -> bool:
    """Convert ``gguf_path`` into a temporary folder and rename it onto ``target``.

    Returns True if this call installed the entry, False if another process had installed one
    first (this call's copy is then deleted).
    """
    import transformers

    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temps(parent)
    temp = parent / f".{sha}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    temp.mkdir()
    try:
        model, tokenizer, config = load_gguf_uncached(gguf_path)
        _save_converted(model, tokenizer, temp)
        del model
        files = {
            str(p.relative_to(temp)): p.stat().st_size for p in sorted(temp.rglob("*")) if p.is_file()
        }
        manifest = {
            "format": CACHE_FORMAT_VERSION,
            "gguf_sha256": sha,
            "gguf_name": gguf_path.name,
            "gguf_size": gguf_path.stat().st_size,
            "model_type": config.model_type,
            "transformers_version": transformers.__version__,
            "created_unix": time.time(),
            "files": files,
        }
        # Written last: its presence (with matching file sizes) marks a complete entry.
        (temp / ENTRY_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return _install(temp, target)


def _fingerprint_record_path(entry: GGUFCacheEntry, key: str) -> Path:
    return entry.path / "fingerprints" / f"{key}.json"


def _weights_identity(entry: GGUFCacheEntry) -> dict[str, int]:
    stat = (entry.path / WEIGHTS_FILE).stat()
    return {"weights_size": stat.st_size, "weights_mtime_ns": stat.st_mtime_ns}


def read_cached_fingerprint(entry: GGUFCacheEntry, key: str) -> str | None:
    """A fingerprint stored for this entry under ``key``, if the weights file is unchanged."""
    try:
        record = json.loads(_fingerprint_record_path(entry, key).read_text())
    except (OSError, ValueError):
        return None
    identity = _weights_identity(entry)
    if any(record.get(k) != v for k, v in identity.items()):
        return None
    fingerprint = record.get("fingerprint")
    return fingerprint if isinstance(fingerprint, str) else None


def write_cached_fingerprint(entry: GGUFCacheEntry, key: str, fingerprint: str) -> None:
    """Store ``fingerprint`` for this entry under ``key`` (atomically; best effort)."""
    path = _fingerprint_record_path(entry, key)
    try:
        path.parent.mkdir(exist_ok=True)
        atomic_write_text(
            path, json.dumps({"fingerprint": fingerprint, **_weights_identity(entry)}, indent=1)
        )
    except OSError:
        pass  # a read-only cache still works; the fingerprint is recomputed next time
