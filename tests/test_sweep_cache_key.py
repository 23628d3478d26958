"""The loss-table cache key of fixed configurations, pinned.

``ltt-calibrate`` reuses a cached loss table when ``sweep_config_key`` (a digest of the model and
dataset fingerprints, ``EarlyExitDecoder.config_dict()`` and the sweep spec) matches. A change to the
decoder's description or to the key's payload silently invalidates every cached table (or, worse,
reuses tables swept under a different exit rule), so such a change must be deliberate: update the
digests below and say why in CHANGELOG.md. The digests were computed before the decoding core was
split out of decoder.py (see CHANGELOG.md) and must survive that refactor.
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ltt_exit.decode import EarlyExitDecoder
from ltt_exit.decode.tiny_models import tiny_t5
from ltt_exit.pipeline import DEFAULTS
from ltt_exit.sweep.run import DEFAULT_GRID, SweepSpec, sweep_config_key

MODEL_FINGERPRINT = "sha256:" + "ab" * 32
DATASET_FINGERPRINT = "sha256:" + "cd" * 32


def _smollm2_shaped_on_meta() -> LlamaForCausalLM:
    """A Llama with SmolLM2-135M's configuration (the pipeline's default model) without real weights."""
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def _key(decoder: EarlyExitDecoder, **spec) -> str:
    return sweep_config_key(MODEL_FINGERPRINT, decoder.config_dict(), DATASET_FINGERPRINT, SweepSpec(**spec))


def test_default_pipeline_configuration_key_is_pinned():
    """The pipeline's defaults (DEFAULTS: softmax-margin, decaying pruning, j = 15, τ = 0, textual loss) on
    a model of SmolLM2-135M's shape, the default grid, 16 new tokens and ROUGE-L."""
    decoder = EarlyExitDecoder(_smollm2_shaped_on_meta(), None, scorer=DEFAULTS["scorer"],
                               pruning=DEFAULTS["pruning"], min_exit_layer=DEFAULTS["min_exit_layer"],
                               tau=DEFAULTS["tau"])
    key = _key(decoder, lambdas=DEFAULT_GRID, max_new_tokens=16, metric="rouge-l", loss=DEFAULTS["loss"])
    assert key == "sha256:2c00f33f338a37e30f81b7850f0b0b378750ef76f55df085fa67e1fdc6ad443f"


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, "sha256:feb2a94216831081cf11113adbb5a0d843bd0c2e1d0f405dec08d5890348adc0"),
        ({"scorer": ("weighted-contrastive", {"alpha": 0.2}), "pruning": ("fixed", {"k": 16}),
          "min_exit_layer": 2, "tau": 1.5}, "sha256:01209b9377d3ca205d56c481625ffa57734163d7532d72c208086cf98629cbf5"),
    ],
    ids=["t5-defaults", "t5-contrastive-fixed-pruning"],
)
def test_t5_configuration_keys_are_pinned(settings, expected):
    decoder = EarlyExitDecoder(tiny_t5(vocab_size=96, num_layers=4), None, **settings)
    key = _key(decoder, lambdas=(1.0, 0.9, 0.5), max_new_tokens=8, metric="token-f1", loss="risk")
    assert key == expected


def test_key_follows_the_decoder_configuration():
    """The pin above can only hold because the key reads the decoder: any setting that changes outputs
    changes it."""
    model = tiny_t5(vocab_size=96, num_layers=4)
    keys = {_key(EarlyExitDecoder(model, None, tau=tau, min_exit_layer=j)) for tau in (0.0, 1.0) for j in (1, 2)}
    assert len(keys) == 4
