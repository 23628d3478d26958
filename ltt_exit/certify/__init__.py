"""The Learn-Then-Test certification core (numpy / scipy / statsmodels only; never imports torch).

Input: a loss matrix ``losses`` of shape (n_examples, n_candidates) with values in [0, 1] and the
candidate grid ``lambdas`` (n_candidates,) in its a-priori order, most conservative first.
Output: a :class:`~ltt_exit.certificate.Certificate`.

    from ltt_exit.certify import certify
    certificate = certify(losses, lambdas, delta=0.1, epsilon=0.05)

Several knobs and risks at once (Pareto Testing): ``certify_pareto(losses, costs, delta, epsilon)``.

See docs/certification.md for the formulas, the procedures and how to choose them.
"""
from __future__ import annotations

from .core import always_safe_lambda, certify
from .pareto import certify_pareto, rederive_pareto
from .procedures import PROCEDURES, Bonferroni, FixedSequence, Holm, MultiStart, Procedure, get_procedure
from .pvalues import (
    PVALUES,
    WSR,
    Bentkus,
    Binomial,
    Hoeffding,
    HoeffdingBentkus,
    HoeffdingKL,
    PValue,
    RiskPValue,
    get_pvalue,
    wsr_pvalues_in_order,
)

__all__ = [
    "certify",
    "certify_pareto",
    "rederive_pareto",
    "always_safe_lambda",
    "PVALUES",
    "PROCEDURES",
    "PValue",
    "RiskPValue",
    "Procedure",
    "get_pvalue",
    "get_procedure",
    "Binomial",
    "Hoeffding",
    "HoeffdingKL",
    "Bentkus",
    "HoeffdingBentkus",
    "WSR",
    "wsr_pvalues_in_order",
    "FixedSequence",
    "MultiStart",
    "Bonferroni",
    "Holm",
]
