"""Issue 14: the decoder's public entry points refuse bad arguments instead of mis-decoding.

eos ids as a string, τ = inf, float token ids, attention-mask values other than 0/1, and thresholds of
the wrong type: each either decoded something else silently or failed with a library message before.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ltt_exit.decode import EarlyExitDecoder
from ltt_exit.decode.schedule import ThresholdSchedule
from ltt_exit.decode.tiny_models import tiny_llama
from ltt_exit.validation import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 128


@pytest.fixture(scope="module")
def decoder():
    return EarlyExitDecoder(tiny_llama(tied=False, num_heads=4, num_key_value_heads=2, vocab_size=VOCAB))


IDS = torch.tensor([[5, 17, 13, 1, 3]])


def tokens(sequences):
    return [s.token_ids for s in sequences]


@pytest.mark.parametrize("eos", ["13", b"13", "1"])
def test_eos_token_id_string_is_refused_not_iterated_per_character(decoder, eos):
    with pytest.raises(TypeError, match="eos_token_id .*not a string"):
        decoder.generate(input_ids=IDS, threshold=1.0, max_new_tokens=4, eos_token_id=eos)
    with pytest.raises(TypeError, match="eos_token_id"):
        decoder.generate_grid(input_ids=IDS, lambdas=[1.0, 0.5], max_new_tokens=4, eos_token_id=eos)


@pytest.mark.parametrize("eos", [1.5, [1, 2.0], [True], -1, [None], {"a": 1}])
def test_eos_token_id_must_be_integer_ids(decoder, eos):
    with pytest.raises(InputError, match="eos_token_id"):
        decoder.generate(input_ids=IDS, threshold=1.0, max_new_tokens=4, eos_token_id=eos)


def test_eos_token_id_of_any_integer_type_is_accepted(decoder):
    first = decoder.generate(input_ids=IDS, threshold=1.0, max_new_tokens=4, eos_token_id=[])[0].token_ids[0]
    for eos in (first, np.int64(first), torch.tensor(first), [first], torch.tensor([first]), (np.int32(first),)):
        out = decoder.generate(input_ids=IDS, threshold=1.0, max_new_tokens=4, eos_token_id=eos)
        assert out[0].token_ids == [first], eos


@pytest.mark.parametrize("tau", [float("inf"), float("nan"), -1.0, "4", True, None])
def test_tau_must_be_finite_and_non_negative(tau):
    with pytest.raises(InputError, match="tau"):
        ThresholdSchedule(tau)
    with pytest.raises(InputError, match="tau"):
        EarlyExitDecoder(tiny_llama(num_layers=2, vocab_size=VOCAB), tau=tau)


def test_large_finite_tau_keeps_thresholds_finite():
    schedule = ThresholdSchedule(np.float32(1e6))
    assert schedule.value(0.5, 0, 10) == pytest.approx(0.5)  # λ_0 = λ, never NaN
    assert schedule.value(0.0, 0, 10) == 0.0


@pytest.mark.parametrize("ids", [
    torch.tensor([[5.0, 17.7, 13.2]]), torch.tensor([[5.0, 17.0, 13.0]], dtype=torch.float16),
    torch.tensor([[True, False]]),
])
def test_float_or_bool_input_id_tensors_are_refused(decoder, ids):
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        decoder.generate(input_ids=ids, threshold=1.0, max_new_tokens=2)


@pytest.mark.parametrize("rows, where", [
    ([[5, 17.7, 13]], r"input_ids\[0\]\[1\]"), ([[5.0, 17.0]], r"input_ids\[0\]\[0\]"),
    ([[5, "17"]], r"input_ids\[0\]\[1\]"), ([[5, True]], r"input_ids\[0\]\[1\]"), (["517"], r"input_ids\[0\]"),
    ([5, 17], r"input_ids\[0\]"),
])
def test_float_or_other_input_id_lists_are_refused(decoder, rows, where):
    with pytest.raises(TypeError, match=where):
        decoder.generate(input_ids=rows, threshold=1.0, max_new_tokens=2)


def test_integer_id_lists_of_numpy_types_still_decode(decoder):
    plain = decoder.generate(input_ids=[[5, 17, 13]], threshold=0.5, max_new_tokens=3, eos_token_id=[])
    numpy_ids = decoder.generate(input_ids=[np.array([5, 17, 13])], threshold=0.5, max_new_tokens=3, eos_token_id=[])
    assert tokens(plain) == tokens(numpy_ids)


@pytest.mark.parametrize("mask, message", [
    (torch.tensor([[1, 1, 2, 1, 1]]), "only 0 .* and 1 .*found 2"),
    (torch.tensor([[1, 1, -1, 1, 1]]), "found -1"),
    (torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]]), "integer or bool tensor"),
    ([[1, 1, 1, 1, 1]], "must be a tensor"),
])
def test_attention_mask_values_other_than_0_and_1_are_refused(decoder, mask, message):
    with pytest.raises(InputError, match="attention_mask .*" + message):
        decoder.generate(input_ids=IDS, attention_mask=mask, threshold=1.0, max_new_tokens=2)


def test_bool_attention_mask_is_accepted(decoder):
    ones = decoder.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), threshold=0.5, max_new_tokens=3,
                            eos_token_id=[])
    bools = decoder.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS, dtype=torch.bool), threshold=0.5,
                             max_new_tokens=3, eos_token_id=[])
    assert tokens(ones) == tokens(bools)


@pytest.mark.parametrize("threshold", [["0.5"], "0.5", [None], [True], True, {"a": 0.5}, [float("nan")], -0.1])
def test_thresholds_that_are_not_real_numbers_are_refused(decoder, threshold):
    with pytest.raises(InputError, match="threshold"):
        decoder.generate(input_ids=IDS, threshold=threshold, max_new_tokens=2)


@pytest.mark.parametrize("threshold", [
    0.5, np.float64(0.5), np.float32(0.5), np.float16(0.5), [np.float32(0.5)], np.array([0.5]), torch.tensor(0.5),
    torch.tensor([0.5]), (0.5,), 1, np.int64(1), [1],
])
def test_thresholds_of_every_numeric_type_are_accepted_alike(decoder, threshold):
    expected = 1.0 if float(np.asarray(threshold, dtype=float).reshape(-1)[0]) == 1.0 else 0.5
    reference = decoder.generate(input_ids=IDS, threshold=expected, max_new_tokens=3, eos_token_id=[])
    got = decoder.generate(input_ids=IDS, threshold=threshold, max_new_tokens=3, eos_token_id=[])
    assert tokens(got) == tokens(reference) and [s.exit_layers for s in got] == [s.exit_layers for s in reference]
