"""Model fingerprints: stable across load paths, sensitive to weights, tokenizer and dtype."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ltt_exit.models.fingerprint import fingerprint_parts, model_fingerprint, weights_digest
from ltt_exit.models.gguf_cache import ensure_gguf_cache, load_gguf_uncached
from models_tiny_gguf import write_tiny_llama_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer, cache entry path) for the tiny GGUF, model loaded from the GGUF itself."""
    gguf = write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    model, tokenizer, _ = load_gguf_uncached(gguf)
    entry = ensure_gguf_cache(gguf, cache_dir=tmp_path_factory.mktemp("cache"))
    return model, tokenizer, entry.path


def test_format(tiny):
    model, tokenizer, _ = tiny
    fingerprint = model_fingerprint(model, tokenizer)
    assert fingerprint.startswith("sha256:") and len(fingerprint) == len("sha256:") + 64
    assert fingerprint == model_fingerprint(model, tokenizer)


def test_same_from_gguf_and_from_cache(tiny):
    model, tokenizer, entry = tiny
    cached = AutoModelForCausalLM.from_pretrained(str(entry))
    cached_tokenizer = AutoTokenizer.from_pretrained(str(entry))
    assert fingerprint_parts(model, tokenizer) == fingerprint_parts(cached, cached_tokenizer)


def test_one_changed_weight_changes_only_the_weights_part(tiny):
    model, tokenizer, _ = tiny
    before = fingerprint_parts(model, tokenizer)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight[3, 7] += 1e-3
    after = fingerprint_parts(changed, tokenizer)
    assert after["weights"] != before["weights"]
    assert after["config"] == before["config"] and after["tokenizer"] == before["tokenizer"]
    assert model_fingerprint(changed, tokenizer) != model_fingerprint(model, tokenizer)


def test_tokenizer_changes_are_detected(tiny):
    model, tokenizer, _ = tiny
    before = fingerprint_parts(model, tokenizer)

    with_token = copy.deepcopy(tokenizer)
    with_token.add_tokens(["<new-token>"])
    assert fingerprint_parts(model, with_token)["tokenizer"] != before["tokenizer"]

    other_template = copy.deepcopy(tokenizer)
    other_template.chat_template = "{{ messages[0]['content'] }}"
    assert fingerprint_parts(model, other_template)["tokenizer"] != before["tokenizer"]


def test_padding_a_batch_does_not_change_the_tokenizer_part(tiny):
    model, tokenizer, _ = tiny
    used = copy.deepcopy(tokenizer)
    used.pad_token = used.pad_token or used.eos_token
    before = fingerprint_parts(model, used)["tokenizer"]
    used(["the cat", "the cat in the hat"], padding=True, truncation=True, max_length=8)
    assert fingerprint_parts(model, used)["tokenizer"] == before


def test_dtype_is_part_of_the_fingerprint(tiny):
    model, tokenizer, _ = tiny
    as_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    parts = fingerprint_parts(as_bf16, tokenizer)  # bfloat16 bytes are hashable
    reference = fingerprint_parts(model, tokenizer)
    assert parts["config"] != reference["config"]  # the parameter dtype is recorded
    assert parts["weights"] != reference["weights"]


def test_runtime_switches_do_not_change_it_but_architecture_does(tiny):
    model, tokenizer, _ = tiny
    reference = fingerprint_parts(model, tokenizer)["config"]
    switched = copy.deepcopy(model)
    switched.config.output_hidden_states = True
    switched.config.use_cache = False
    assert fingerprint_parts(switched, tokenizer)["config"] == reference

    other = copy.deepcopy(model)
    other.config.rms_norm_eps = 1e-3
    assert fingerprint_parts(other, tokenizer)["config"] != reference


def test_parameter_order_does_not_matter():
    # Same weights registered through two separately built models: identical digests.
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    torch.manual_seed(0)
    first = LlamaForCausalLM(config)
    second = LlamaForCausalLM(config)
    second.load_state_dict(first.state_dict())
    assert weights_digest(first) == weights_digest(second)
    with torch.no_grad():
        second.lm_head.weight[0, 0] += 1.0
    assert weights_digest(first) != weights_digest(second)


def test_fingerprinting_leaves_the_model_untouched(tiny):
    model, tokenizer, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model_fingerprint(model, tokenizer)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) and value.device.type == "cpu"


def test_missing_tokenizer_is_an_error(tiny):
    model, _, _ = tiny
    with pytest.raises(TypeError, match="tokenizer"):
        model_fingerprint(model, None)
