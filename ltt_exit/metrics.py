"""Per-example similarity metrics m ∈ [0, 1] and the two per-example loss kinds (CALM eqs. 10–11).

    textual consistency   L_i = 1 − m(Y_early,i, Y_full,i)
    risk consistency      L_i = max(0, (1 − m(Y_early,i, Z_i)) − (1 − m(Y_full,i, Z_i)))

Every metric is computed per example; a loss matrix is the table of these per-example losses, never
a corpus-level score. The scoring itself is delegated to the field's libraries (``rouge-score``,
``sacrebleu``); token F1 and exact match follow the official SQuAD evaluation script.

Metrics, selectable by name through :data:`METRICS` (or pass an instance of :class:`Metric`):

* ``"rouge-l"``: ROUGE-L F-measure of ``rouge_score.RougeScorer(["rougeL"], use_stemmer=True)``;
  with several references, the maximum over them.
* ``"bleu"``: ``sacrebleu.sentence_bleu(prediction, references).score / 100`` (13a tokenisation,
  exponential smoothing, effective order); several references are scored jointly, as BLEU defines.
* ``"token-f1"``: SQuAD token F1 after SQuAD answer normalisation (lower case, punctuation and the
  articles a/an/the removed, whitespace collapsed); maximum over references.
* ``"exact-match"``: 1 if the normalised prediction equals a normalised reference, else 0.

Degenerate texts (documented choice): two *identical* strings have similarity 1 under every
metric, and so do two texts that both contain no token under the metric's own tokenisation (for
example two empty strings, or "." and "!" under ROUGE-L). If only one side has no token, the
similarity is 0. This is the SQuAD v2 script's rule for empty answers; the libraries alone would
score two empty strings 0, which would make an early exit that reproduces the full model's empty
output look like a total failure under textual consistency.

This module does not import torch.
"""
from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence
from typing import Union

import numpy as np

__all__ = [
    "METRICS",
    "Metric",
    "RougeL",
    "SentenceBleu",
    "TokenF1",
    "ExactMatch",
    "get_metric",
    "similarity",
    "similarities",
    "textual_consistency_loss",
    "textual_consistency_losses",
    "risk_consistency_loss",
    "risk_consistency_losses",
    "normalize_answer",
]

Reference = Union[str, Sequence[str]]


def _as_reference_list(reference: Reference) -> list[str]:
    """Validate a reference (one string or several) and return it as a non-empty list of strings."""
    if reference is None:
        raise ValueError(
            "reference is None: this example has no reference text. Risk consistency and task "
            "metrics need one; use textual consistency (early vs. full output) for unreferenced data."
        )
    if isinstance(reference, str):
        return [reference]
    if isinstance(reference, (bytes, bytearray)):
        raise TypeError("reference must be str or a sequence of str, not bytes")
    try:
        references = list(reference)
    except TypeError:
        raise TypeError(
            f"reference must be str or a sequence of str, got {type(reference).__name__}"
        ) from None
    if not references:
        raise ValueError("reference is an empty list: give at least one reference string")
    for item in references:
        if not isinstance(item, str):
            raise TypeError(
                f"every reference must be a str, got an item of type {type(item).__name__}"
            )
    return references


def _check_prediction(prediction: str) -> str:
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}")
    return prediction


def normalize_answer(text: str) -> str:
    """SQuAD answer normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


class Metric:
    """A per-example similarity in [0, 1] between a prediction and one or more references.

    Subclasses implement :meth:`_tokens` (the metric's own tokenisation, used only to detect texts
    without tokens) and :meth:`_score` (the library score for texts that have tokens).
    """

    name: str = ""

    def __call__(self, prediction: str, reference: Reference) -> float:
        prediction = _check_prediction(prediction)
        references = _as_reference_list(reference)
        if any(prediction == ref for ref in references):
            return 1.0
        prediction_empty = not self._tokens(prediction)
        reference_empty = [not self._tokens(ref) for ref in references]
        if prediction_empty:
            return 1.0 if any(reference_empty) else 0.0
        nonempty = [ref for ref, empty in zip(references, reference_empty) if not empty]
        if not nonempty:
            return 0.0
        return float(min(1.0, max(0.0, self._score(prediction, nonempty))))

    def _tokens(self, text: str) -> list[str]:
        raise NotImplementedError

    def _score(self, prediction: str, references: list[str]) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RougeL(Metric):
    """ROUGE-L F-measure (rouge-score, Porter stemming); maximum over references."""

    name = "rouge-l"

    def __init__(self) -> None:
        from rouge_score import rouge_scorer, tokenizers

        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        # The scorer's default tokenisation, used only to detect texts without tokens.
        self._tokenizer = tokenizers.DefaultTokenizer(use_stemmer=True)

    def _tokens(self, text: str) -> list[str]:
        return self._tokenizer.tokenize(text)

    def _score(self, prediction: str, references: list[str]) -> float:
        # RougeScorer.score takes (target, prediction).
        return max(self._scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


class SentenceBleu(Metric):
    """sacrebleu sentence BLEU / 100 (13a, exponential smoothing); references scored jointly."""

    name = "bleu"

    def __init__(self) -> None:
        import sacrebleu

        self._sacrebleu = sacrebleu

    def _tokens(self, text: str) -> list[str]:
        return text.split()

    def _score(self, prediction: str, references: list[str]) -> float:
        return self._sacrebleu.sentence_bleu(prediction, references).score / 100.0


class TokenF1(Metric):
    """SQuAD token F1 over normalised whitespace tokens; maximum over references."""

    name = "token-f1"

    def _tokens(self, text: str) -> list[str]:
        return normalize_answer(text).split()

    def _score(self, prediction: str, references: list[str]) -> float:
        prediction_tokens = self._tokens(prediction)
        best = 0.0
        for ref in references:
            reference_tokens = self._tokens(ref)
            common = collections.Counter(prediction_tokens) & collections.Counter(reference_tokens)
            num_same = sum(common.values())
            if num_same == 0:
                continue
            precision = num_same / len(prediction_tokens)
            recall = num_same / len(reference_tokens)
            best = max(best, 2 * precision * recall / (precision + recall))
        return best


class ExactMatch(Metric):
    """1 if the SQuAD-normalised prediction equals a normalised reference, else 0."""

    name = "exact-match"

    def _tokens(self, text: str) -> list[str]:
        return normalize_answer(text).split()

    def _score(self, prediction: str, references: list[str]) -> float:
        normalized = normalize_answer(prediction)
        return float(any(normalized == normalize_answer(ref) for ref in references))


METRICS: dict[str, type[Metric]] = {
    RougeL.name: RougeL,
    SentenceBleu.name: SentenceBleu,
    TokenF1.name: TokenF1,
    ExactMatch.name: ExactMatch,
}

_INSTANCES: dict[str, Metric] = {}


def get_metric(metric: str | Metric) -> Metric:
    """The metric named ``metric`` (a key of :data:`METRICS`), or ``metric`` itself if an instance."""
    if isinstance(metric, Metric):
        return metric
    if not isinstance(metric, str):
        raise TypeError(f"metric must be a name or a Metric instance, got {type(metric).__name__}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(METRICS)}")
    if metric not in _INSTANCES:
        _INSTANCES[metric] = METRICS[metric]()
    return _INSTANCES[metric]


def similarity(metric: str | Metric, prediction: str, reference: Reference) -> float:
    """Similarity m(prediction, reference) ∈ [0, 1]; ``reference`` is one string or several."""
    return get_metric(metric)(prediction, reference)


def _check_lengths(**sequences: Sequence) -> int:
    lengths = {name: len(seq) for name, seq in sequences.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"sequences must have equal lengths, got {lengths}")
    return next(iter(lengths.values()))


def _check_sequence(name: str, values) -> Sequence:
    if isinstance(values, str):
        raise TypeError(f"{name} must be a sequence of texts, not a single str")
    return list(values)


def similarities(
    metric: str | Metric, predictions: Sequence[str], references: Sequence[Reference]
) -> np.ndarray:
    """Per-example similarities, float64 array of shape (n,), for n predictions and n references."""
    predictions = _check_sequence("predictions", predictions)
    references = _check_sequence("references", references)
    _check_lengths(predictions=predictions, references=references)
    scorer = get_metric(metric)
    return np.array([scorer(p, r) for p, r in zip(predictions, references)], dtype=np.float64)


def textual_consistency_loss(metric: str | Metric, early: str, full: str) -> float:
    """1 − m(early, full): how far the early-exit output is from the full model's output."""
    return 1.0 - similarity(metric, early, full)


def risk_consistency_loss(
    metric: str | Metric, early: str, full: str, reference: Reference
) -> float:
    """max(0, (1 − m(early, ref)) − (1 − m(full, ref))): excess task loss of the early-exit output."""
    scorer = get_metric(metric)
    references = _as_reference_list(reference)
    return max(0.0, scorer(full, references) - scorer(early, references))


def textual_consistency_losses(
    metric: str | Metric, early: Sequence[str], full: Sequence[str]
) -> np.ndarray:
    """Vectorised :func:`textual_consistency_loss`: float64 array of shape (n,)."""
    return 1.0 - similarities(metric, early, full)


def risk_consistency_losses(
    metric: str | Metric,
    early: Sequence[str],
    full: Sequence[str],
    references: Sequence[Reference],
) -> np.ndarray:
    """Vectorised :func:`risk_consistency_loss`: float64 array of shape (n,)."""
    early = _check_sequence("early", early)
    full = _check_sequence("full", full)
    references = _check_sequence("references", references)
    _check_lengths(early=early, full=full, references=references)
    early_sim = similarities(metric, early, references)
    full_sim = similarities(metric, full, references)
    return np.maximum(0.0, full_sim - early_sim)
