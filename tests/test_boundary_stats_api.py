"""Issue 14: the public statistics API refuses bad arguments with a message naming the argument."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from ltt_exit.certify import PVALUES, RiskPValue, certify, get_pvalue
from ltt_exit.validation import InputError

RISK_KINDS = [name for name in PVALUES if isinstance(get_pvalue(name), RiskPValue)]


@pytest.mark.parametrize("kind", RISK_KINDS)
@pytest.mark.parametrize("n", [2.5, True, False, float("nan"), float("inf"), -3, 0, "10", None, 1e3])
def test_from_risk_refuses_n_that_is_not_a_whole_number_at_least_one(kind, n):
    with pytest.raises((TypeError, ValueError), match="n must") as info:
        get_pvalue(kind).from_risk(np.array([0.0, 0.05]), n, 0.1)
    assert isinstance(info.value, InputError)


@pytest.mark.parametrize("kind", RISK_KINDS)
def test_from_risk_refuses_count_arrays_with_fractions_or_nan(kind):
    for n in (np.array([10, 2.5]), np.array([10.0, np.nan]), np.array([10, 0]), np.array([True, True])):
        with pytest.raises(InputError, match="n must"):
            get_pvalue(kind).from_risk(np.array([0.0, 0.0]), n, 0.1)


@pytest.mark.parametrize("kind", RISK_KINDS)
def test_from_risk_still_accepts_whole_numbers_of_every_integer_type(kind):
    method = get_pvalue(kind)
    expected = method.from_risk(np.array([0.0, 0.1]), 50, 0.2)
    for n in (np.int64(50), np.int32(50), np.array(50), np.array([50, 50]), np.array([50.0, 50.0])):
        np.testing.assert_array_equal(method.from_risk(np.array([0.0, 0.1]), n, 0.2), expected)


def test_complex_losses_are_refused_not_cast_with_a_warning():
    losses = np.zeros((10, 2), dtype=complex)
    losses[0, 0] = 0.5j
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's ComplexWarning would be an error here
        with pytest.raises(TypeError, match="losses must be real numbers; got complex"):
            certify(losses, [1.0, 0.5], 0.1, 0.05)
        with pytest.raises(TypeError, match="losses must be real numbers; got complex"):
            get_pvalue("hoeffding")(losses, 0.1)
        with pytest.raises(TypeError, match="risk must be real numbers; got complex"):
            get_pvalue("bentkus").from_risk(np.array([0.1 + 0j]), 10, 0.2)


def test_string_losses_are_refused():
    with pytest.raises(TypeError, match="losses must be numeric"):
        certify([["0.1", "0.2"]], [1.0, 0.5], 0.1, 0.05)


@pytest.mark.parametrize("fallback", ["x", None.__class__, [1.0], True, float("nan"), float("inf")])
def test_fallback_lambda_must_be_a_finite_real_number(fallback):
    with pytest.raises((TypeError, ValueError), match="fallback_lambda"):
        certify(np.ones((5, 2)), [1.0, 0.5], 0.1, 0.05, fallback_lambda=fallback)


def test_fallback_lambda_of_any_numeric_type():
    cert = certify(np.ones((5, 2)), [1.0, 0.5], 0.1, 0.05, fallback_lambda=np.float32(2.0))
    assert cert.lambda_hat == 2.0
    assert certify(np.ones((5, 2)), [1.0, 0.5], 0.1, 0.05, fallback_lambda=3).lambda_hat == 3.0
