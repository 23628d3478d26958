"""The GGUF conversion cache: content hashing, atomic install, races and damaged entries."""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import pytest
import torch

from ltt_exit.models import gguf_cache
from ltt_exit.models.fingerprint import model_fingerprint
from ltt_exit.models.gguf_cache import (
    ENTRY_MANIFEST,
    WEIGHTS_FILE,
    default_cache_dir,
    ensure_gguf_cache,
    file_sha256,
    gguf_entry_dir,
    load_gguf_uncached,
    read_valid_entry,
)
from models_tiny_gguf import write_tiny_llama_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _entries(cache):
    return sorted(p.name for p in (cache / "gguf-v1").iterdir())


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LTT_EXIT_CACHE", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("LTT_EXIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "ltt-exit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "ltt-exit"


def test_file_sha256_is_remembered_per_path_size_and_mtime(tmp_path, monkeypatch):
    data = tmp_path / "blob.bin"
    data.write_bytes(b"abc" * 1000)
    cache = tmp_path / "cache"
    expected = hashlib.sha256(b"abc" * 1000).hexdigest()
    assert file_sha256(data, cache_dir=cache) == expected

    def no_rehash(path):
        raise AssertionError("the unchanged file was hashed again")

    monkeypatch.setattr(gguf_cache, "_stream_sha256", no_rehash)
    assert file_sha256(data, cache_dir=cache) == expected
    monkeypatch.undo()

    data.write_bytes(b"abcd" * 1000)  # new size and mtime: must be hashed again
    assert file_sha256(data, cache_dir=cache) == hashlib.sha256(b"abcd" * 1000).hexdigest()


def test_build_then_reuse_entry(tiny_gguf, tmp_path):
    cache = tmp_path / "cache"
    first = ensure_gguf_cache(tiny_gguf, cache_dir=cache)
    assert first.built_now
    assert first.path == gguf_entry_dir(file_sha256(tiny_gguf), cache)
    assert first.model_type == "llama"
    manifest = read_valid_entry(first.path)
    assert manifest is not None and WEIGHTS_FILE in manifest["files"]
    assert "quantization_config" not in json.loads((first.path / "config.json").read_text())

    second = ensure_gguf_cache(tiny_gguf, cache_dir=cache)
    assert not second.built_now and second.path == first.path
    assert _entries(cache) == [first.path.name]


def test_cached_weights_equal_the_dequantised_gguf(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = ensure_gguf_cache(tiny_gguf, cache_dir=tmp_path)
    direct, direct_tokenizer, _ = load_gguf_uncached(tiny_gguf)
    cached = AutoModelForCausalLM.from_pretrained(str(entry.path))
    cached_tokenizer = AutoTokenizer.from_pretrained(str(entry.path))
    direct_state, cached_state = direct.state_dict(), cached.state_dict()
    assert direct_state.keys() == cached_state.keys()
    for name in direct_state:
        assert torch.equal(direct_state[name], cached_state[name]), name
    text = "the cat in the hat<|im_end|>"
    assert direct_tokenizer(text).input_ids == cached_tokenizer(text).input_ids
    assert model_fingerprint(direct, direct_tokenizer) == model_fingerprint(cached, cached_tokenizer)


def test_threads_of_one_process_build_once(tiny_gguf, tmp_path):
    cache = tmp_path / "cache"
    file_sha256(tiny_gguf, cache_dir=cache)
    barrier = threading.Barrier(2)
    results, errors = [], []

    def build():
        try:
            barrier.wait()
            results.append(ensure_gguf_cache(tiny_gguf, cache_dir=cache))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len({r.path for r in results}) == 1
    assert sum(r.built_now for r in results) == 1
    assert _entries(cache) == [results[0].path.name]


def test_second_build_of_the_same_file_is_discarded(tiny_gguf, tmp_path):
    # Two builds that both saw no entry (what two processes starting together do): the first
    # rename installs, the second copy is deleted and the installed entry stays valid.
    sha = file_sha256(tiny_gguf, cache_dir=tmp_path)
    target = gguf_entry_dir(sha, tmp_path)
    assert gguf_cache._build_entry(tiny_gguf, sha, target) is True
    installed = (target / WEIGHTS_FILE).stat().st_ino
    assert gguf_cache._build_entry(tiny_gguf, sha, target) is False
    assert (target / WEIGHTS_FILE).stat().st_ino == installed
    assert read_valid_entry(target) is not None
    assert _entries(tmp_path) == [sha]


@pytest.mark.slow  # two spawned interpreters import torch + transformers (~15 s on two cores)
def test_concurrent_processes_leave_one_valid_entry(tiny_gguf, tmp_path):
    import multiprocessing

    from models_tiny_gguf import build_entry_after_barrier

    cache = tmp_path / "cache"
    file_sha256(tiny_gguf, cache_dir=cache)  # warm the hash so both processes reach the build together
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [
        context.Process(target=build_entry_after_barrier, args=(str(tiny_gguf), str(cache), barrier, results))
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert len({path for path, _ in outcomes}) == 1
    assert sum(built for _, built in outcomes) == 1  # exactly one rename won
    assert _entries(cache) == [os.path.basename(outcomes[0][0])]  # no leftover temp folders
    assert read_valid_entry(gguf_entry_dir(file_sha256(tiny_gguf, cache_dir=cache), cache)) is not None


def test_install_discards_the_loser(tiny_gguf, tmp_path):
    entry = ensure_gguf_cache(tiny_gguf, cache_dir=tmp_path)
    loser = entry.path.parent / f".{entry.gguf_sha256}.tmp-999-loser"
    loser.mkdir()
    (loser / "partial").write_text("x")
    assert gguf_cache._install(loser, entry.path) is False
    assert not loser.exists()
    assert read_valid_entry(entry.path) is not None


def test_partial_temp_folder_is_ignored(tiny_gguf, tmp_path):
    sha = file_sha256(tiny_gguf, cache_dir=tmp_path)
    parent = gguf_entry_dir(sha, tmp_path).parent
    parent.mkdir(parents=True)
    partial = parent / f".{sha}.tmp-123-abcd"
    partial.mkdir()
    (partial / WEIGHTS_FILE).write_bytes(b"truncated")
    entry = ensure_gguf_cache(tiny_gguf, cache_dir=tmp_path)
    assert entry.built_now and entry.path.name == sha
    assert read_valid_entry(entry.path) is not None
    assert partial.exists()  # a recent temp folder may belong to a running build: left alone


def test_stale_temp_folders_are_swept(tiny_gguf, tmp_path):
    sha = file_sha256(tiny_gguf, cache_dir=tmp_path)
    parent = gguf_entry_dir(sha, tmp_path).parent
    parent.mkdir(parents=True)
    stale = parent / f".{sha}.tmp-1-dead"
    stale.mkdir()
    old = time.time() - 3 * 24 * 3600
    os.utime(stale, (old, old))
    ensure_gguf_cache(tiny_gguf, cache_dir=tmp_path)
    assert not stale.exists()


@pytest.mark.parametrize("damage", ["no-manifest", "truncated-weights", "wrong-hash"])
def test_damaged_entry_is_rebuilt(tiny_gguf, tmp_path, damage):
    entry = ensure_gguf_cache(tiny_gguf, cache_dir=tmp_path)
    if damage == "no-manifest":
        (entry.path / ENTRY_MANIFEST).unlink()
    elif damage == "truncated-weights":
        with open(entry.path / WEIGHTS_FILE, "r+b") as handle:
            handle.truncate(100)
    else:
        manifest = json.loads((entry.path / ENTRY_MANIFEST).read_text())
        manifest["gguf_sha256"] = "0" * 64
        (entry.path / ENTRY_MANIFEST).write_text(json.dumps(manifest))
    assert read_valid_entry(entry.path) is None
    rebuilt = ensure_gguf_cache(tiny_gguf, cache_dir=tmp_path)
    assert rebuilt.built_now and rebuilt.path == entry.path
    assert read_valid_entry(rebuilt.path) is not None
    assert _entries(tmp_path) == [entry.path.name]


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        ensure_gguf_cache(tmp_path / "absent.gguf", cache_dir=tmp_path)


def test_conversion_parses_the_file_once_and_matches_the_library(tiny_gguf, monkeypatch):
    """load_gguf_uncached shares one parsed reader across transformers' config, tokenizer and weight
    loads; the result equals the library's own loading, and gguf's module is left as it was."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(tiny_gguf.parent), tiny_gguf.name
    library = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename)
    library_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)

    parses = []
    real_reader = gguf.GGUFReader

    def counting_reader(path, mode="r"):
        parses.append(str(path))
        return real_reader(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", counting_reader)
    model, tokenizer, _ = load_gguf_uncached(tiny_gguf)
    assert len(parses) == 1
    assert gguf.GGUFReader is counting_reader  # restored after the conversion
    ours, theirs = model.state_dict(), library.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert tokenizer("the cat in the hat").input_ids == library_tokenizer("the cat in the hat").input_ids
