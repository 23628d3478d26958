"""Per-example metrics and losses, checked against hand-derived values and the libraries' outputs."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import sacrebleu
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from ltt_exit import metrics
from ltt_exit.metrics import (
    METRICS,
    Metric,
    get_metric,
    risk_consistency_loss,
    risk_consistency_losses,
    similarities,
    similarity,
    textual_consistency_loss,
    textual_consistency_losses,
)

ALL_METRICS = sorted(METRICS)


def test_registry_names():
    assert set(METRICS) == {"rouge-l", "bleu", "token-f1", "exact-match"}
    for name, cls in METRICS.items():
        assert cls.name == name
        assert isinstance(get_metric(name), cls)


# ---------------------------------------------------------------- ROUGE-L


def test_rouge_l_hand_computed():
    # Stemmed tokens: prediction [the cat sat on the mat] (6), reference
    # [the cat was sit on the mat] (7). Longest common subsequence "the cat on the mat" = 5.
    # F1 of LCS precision 5/6 and recall 5/7 = 2·5/(6+7) = 10/13.
    value = similarity("rouge-l", "the cat sat on the mat", "the cat was sitting on the mat")
    assert value == pytest.approx(10 / 13)


def test_rouge_l_matches_library_and_uses_stemming():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    prediction, reference = "Stocks were falling sharply today", "the stock fell sharply"
    expected = scorer.score(reference, prediction)["rougeL"].fmeasure
    assert similarity("rouge-l", prediction, reference) == pytest.approx(expected)
    # "cats" and "cat" only match with the Porter stemmer.
    assert similarity("rouge-l", "cats", "cat") == 1.0


def test_rouge_l_maximum_over_references():
    # LCS 2 of 4 tokens each side → F = 0.5; LCS 3 of 4 → F = 0.75.
    prediction = "alpha beta gamma delta"
    refs = ["alpha beta omega sigma", "alpha beta gamma sigma"]
    assert similarity("rouge-l", prediction, refs[0]) == pytest.approx(0.5)
    assert similarity("rouge-l", prediction, refs) == pytest.approx(0.75)


# ---------------------------------------------------------------- BLEU


def test_bleu_multi_reference_hand_computed():
    # Clipped n-gram matches against both references jointly: 1-grams 5/6 ("the" occurs at most
    # once per reference), 2-grams 5/5, 3-grams 4/4, 4-grams 3/3; closest reference length 6 =
    # hypothesis length, so no brevity penalty. BLEU = (5/6 · 1 · 1 · 1)^(1/4).
    prediction = "the cat sat on the mat"
    refs = ["the cat sat on a mat", "a cat sat on the mat"]
    assert similarity("bleu", prediction, refs) == pytest.approx((5 / 6) ** 0.25)
    assert similarity("bleu", prediction, refs) == pytest.approx(
        sacrebleu.sentence_bleu(prediction, refs).score / 100
    )


def test_bleu_brevity_penalty_and_effective_order():
    # Two tokens, both 1-gram and the 2-gram match; effective order 2 → precision mean 1.
    # Brevity penalty exp(1 − 6/2) = exp(−2).
    assert similarity("bleu", "the cat", "the cat sat on the mat") == pytest.approx(math.exp(-2))


def test_bleu_no_overlap_is_zero():
    assert similarity("bleu", "w x y z", "a b c d") == 0.0


# ---------------------------------------------------------------- token F1 / exact match


def test_token_f1_hand_computed_and_max_over_references():
    # Normalised prediction [eiffel tower in paris], reference [tower of paris france]:
    # 2 common tokens, P = R = 2/4 → F1 = 0.5. Second reference [eiffel tower]: 2 common,
    # P = 2/4, R = 2/2 → F1 = 2/3. Maximum = 2/3.
    prediction = "The Eiffel Tower in Paris"
    assert similarity("token-f1", prediction, "the tower of Paris, France") == pytest.approx(0.5)
    assert similarity(
        "token-f1", prediction, ["the tower of Paris, France", "Eiffel Tower"]
    ) == pytest.approx(2 / 3)


def test_token_f1_counts_repeated_tokens_once_per_occurrence():
    # prediction [paris paris], reference [paris]: common = min(2, 1) = 1, P = 1/2, R = 1 → 2/3.
    assert similarity("token-f1", "Paris Paris", "Paris") == pytest.approx(2 / 3)


def test_exact_match_uses_squad_normalisation():
    assert similarity("exact-match", "The Beatles!", "beatles") == 1.0
    assert similarity("exact-match", "Beatles band", "beatles") == 0.0
    assert similarity("exact-match", "Beatles band", ["x", "the beatles band."]) == 1.0


def test_normalize_answer():
    assert metrics.normalize_answer("  The  Quick, brown fox!  an apple ") == "quick brown fox apple"


# ---------------------------------------------------------------- degenerate inputs


@pytest.mark.parametrize("name", ALL_METRICS)
def test_empty_strings(name):
    assert similarity(name, "", "") == 1.0
    assert similarity(name, "", "some words") == 0.0
    assert similarity(name, "some words", "") == 0.0
    assert textual_consistency_loss(name, "", "") == 0.0


def test_texts_without_tokens_are_identical_under_rouge():
    # Under ROUGE's tokenisation neither text has a token (documented rule: similarity 1).
    assert similarity("rouge-l", ".", "!") == 1.0
    assert similarity("rouge-l", ".", "word") == 0.0


@pytest.mark.parametrize("name", ALL_METRICS)
def test_bad_references(name):
    with pytest.raises(ValueError, match="reference is None"):
        similarity(name, "text", None)
    with pytest.raises(ValueError, match="empty list"):
        similarity(name, "text", [])
    with pytest.raises(TypeError):
        similarity(name, "text", [1, 2])
    with pytest.raises(TypeError):
        similarity(name, None, "text")


def test_unknown_metric():
    with pytest.raises(ValueError, match="unknown metric 'rouge'"):
        similarity("rouge", "a", "b")
    with pytest.raises(TypeError):
        get_metric(3)


def test_metric_instances_are_accepted():
    class FirstCharacter(Metric):
        name = "first-char"

        def _tokens(self, text):
            return list(text)

        def _score(self, prediction, references):
            return float(any(prediction[0] == ref[0] for ref in references))

    metric = FirstCharacter()
    assert similarity(metric, "apple", "avocado") == 1.0
    assert textual_consistency_loss(metric, "apple", "banana") == 1.0


@pytest.mark.parametrize("name", ALL_METRICS)
@settings(max_examples=40, deadline=None)
@given(
    a=st.text(alphabet="abc .!", max_size=20),
    b=st.text(alphabet="abc .!", max_size=20),
)
def test_range_and_identity(name, a, b):
    value = similarity(name, a, b)
    assert 0.0 <= value <= 1.0
    assert similarity(name, a, a) == 1.0


# ---------------------------------------------------------------- losses


def test_textual_consistency_loss():
    assert textual_consistency_loss(
        "rouge-l", "the cat sat on the mat", "the cat was sitting on the mat"
    ) == pytest.approx(3 / 13)
    assert textual_consistency_loss("bleu", "same text here", "same text here") == 0.0


def test_risk_consistency_loss_hand_computed():
    # Reference [paris]; full output [paris] → m = 1; early output [in paris france] → P = 1/3,
    # R = 1, F1 = 1/2. Loss = (1 − 1/2) − (1 − 1) = 1/2.
    assert risk_consistency_loss("token-f1", "in Paris, France", "Paris", "Paris") == pytest.approx(
        0.5
    )
    # An early output better than the full one costs nothing (clipped at 0).
    assert risk_consistency_loss("token-f1", "Paris", "in Paris, France", "Paris") == 0.0
    with pytest.raises(ValueError, match="reference is None"):
        risk_consistency_loss("token-f1", "a", "b", None)


def test_vectorised_helpers_match_scalar_versions():
    early = ["in Paris, France", "Paris", "", "the tower"]
    full = ["Paris", "in Paris, France", "", "Eiffel tower"]
    refs = ["Paris", "Paris", ["x", "y"], ["Eiffel Tower", "tower"]]
    sims = similarities("token-f1", early, refs)
    assert sims.shape == (4,) and sims.dtype == np.float64
    np.testing.assert_allclose(sims, [similarity("token-f1", e, r) for e, r in zip(early, refs)])
    np.testing.assert_allclose(
        textual_consistency_losses("token-f1", early, full),
        [textual_consistency_loss("token-f1", e, f) for e, f in zip(early, full)],
    )
    np.testing.assert_allclose(
        risk_consistency_losses("token-f1", early, full, refs),
        [risk_consistency_loss("token-f1", e, f, r) for e, f, r in zip(early, full, refs)],
    )


def test_vectorised_helpers_reject_bad_shapes():
    with pytest.raises(ValueError, match="equal lengths"):
        similarities("bleu", ["a", "b"], ["a"])
    with pytest.raises(TypeError, match="single str"):
        similarities("bleu", "ab", ["a", "b"])
    with pytest.raises(ValueError, match="equal lengths"):
        risk_consistency_losses("bleu", ["a"], ["a", "b"], ["a"])


def test_metrics_module_does_not_import_torch():
    code = "import sys, ltt_exit.metrics as m; m.similarity('rouge-l','a','a'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
