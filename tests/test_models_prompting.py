"""format_prompt: chat template for decoder-only instruct models, raw text otherwise."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest

from ltt_exit.models import LoadedModel
from ltt_exit.models.gguf_cache import load_gguf_uncached
from ltt_exit.models.prompting import format_prompt, has_chat_template
from models_tiny_gguf import write_tiny_llama_gguf


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    gguf = write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return load_gguf_uncached(gguf)[1]


def test_chat_template_for_decoder_only(tokenizer):
    assert has_chat_template(tokenizer)
    prompt = format_prompt(tokenizer, "decoder-only", "Summarize: hello")
    # The tiny GGUF's template (tests/models_tiny_gguf.py) renders one user turn and opens the
    # assistant turn.
    assert prompt == "<|im_start|>user\nSummarize: hello<|im_end|>\n<|im_start|>assistant\n"


def test_raw_text_for_t5_and_for_models_without_a_template(tokenizer):
    assert format_prompt(tokenizer, "t5", "summarize: hello") == "summarize: hello"
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    assert not has_chat_template(plain)
    assert format_prompt(plain, "decoder-only", "hello") == "hello"
    assert format_prompt(None, "decoder-only", "hello") == "hello"


def test_loaded_model_supplies_tokenizer_and_family(tokenizer):
    loaded = LoadedModel(model=None, tokenizer=tokenizer, family="decoder-only", name="x", source="x", fingerprint="x")
    assert format_prompt(loaded, None, "hi") == format_prompt(tokenizer, "decoder-only", "hi")
    loaded_t5 = LoadedModel(model=None, tokenizer=tokenizer, family="t5", name="x", source="x", fingerprint="x")
    assert format_prompt(loaded_t5, None, "hi") == "hi"


def test_bad_input(tokenizer):
    with pytest.raises(ValueError, match="unknown model family"):
        format_prompt(tokenizer, "encoder-only", "hi")
    with pytest.raises(ValueError, match="family is None"):
        format_prompt(tokenizer, None, "hi")
    with pytest.raises(TypeError):
        format_prompt(tokenizer, "t5", None)


def test_prompting_does_not_import_torch():
    code = "import sys, ltt_exit.models.prompting; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
