"""certify(): choosing λ, fallbacks, costs, recorded fields, and bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ltt_exit.certificate import Certificate, CertificateError
from ltt_exit.certify import PVALUES, certify
from ltt_exit.certify.procedures import FixedSequence, MultiStart
from ltt_exit.certify.pvalues import HoeffdingBentkus, WSR

GRID = [1.0, 0.9, 0.8, 0.7, 0.6]


def staircase(n=400, risks=(0.0, 0.0, 0.02, 0.5, 0.9)):
    """Binary losses with exact empirical risks ``risks`` per candidate (n·r losses of 1)."""
    losses = np.zeros((n, len(risks)))
    for j, r in enumerate(risks):
        losses[: int(round(n * r)), j] = 1.0
    return losses


def test_chooses_smallest_certified_lambda_and_records_everything():
    # HB p-values for n = 400, δ = 0.1: R̂ = 0 → 0.9^400 ≈ 5e-19, R̂ = 0.02 → tiny, R̂ = 0.5 → 1.
    losses = staircase()
    cert = certify(losses, GRID, 0.1, 0.05, metadata={"model": "m", "nested": {"k": [1, 2]}})
    assert isinstance(cert, Certificate)
    assert cert.certified == [True, True, True, False, False]
    assert cert.certified_any and cert.chosen_index == 2 and cert.lambda_hat == 0.8
    assert cert.reason is None
    assert cert.n == 400 and cert.delta == 0.1 and cert.epsilon == 0.05
    assert cert.pvalue_method == "hoeffding-bentkus"
    assert cert.procedure == {"name": "fixed-sequence", "params": {}}
    assert cert.lambdas == GRID
    assert cert.empirical_risk == pytest.approx([0.0, 0.0, 0.02, 0.5, 0.9], abs=0)
    assert cert.pvalues[0] == pytest.approx(0.9**400, rel=1e-9)
    assert cert.pvalues[3] == 1.0
    assert cert.wsr_seed is None and cert.costs is None
    assert cert.metadata == {"model": "m", "nested": {"k": [1, 2]}}
    assert cert.order == "descending"


def test_fixed_sequence_chooses_last_rejected_not_first_failure():
    # Candidate 2 fails (risk 0.5) but candidate 3 has risk 0: fixed-sequence must stop at 2.
    losses = staircase(risks=(0.0, 0.0, 0.5, 0.0, 0.0))
    cert = certify(losses, GRID, 0.1, 0.05)
    assert cert.certified == [True, True, False, False, False]
    assert cert.lambda_hat == 0.9
    # Bonferroni tests every candidate on its own and may go past the failure.
    cert_b = certify(losses, GRID, 0.1, 0.05, procedure="bonferroni")
    assert cert_b.certified == [True, True, False, True, True]
    assert cert_b.lambda_hat == 0.6


def test_nothing_certified_falls_back_to_full_model_and_says_why():
    losses = staircase(n=10, risks=(0.0, 0.0, 0.0, 0.0, 0.0))  # HB p = 0.9^10 ≈ 0.35 > ε
    cert = certify(losses, GRID, 0.1, 0.05)
    assert not cert.certified_any
    assert cert.chosen_index is None
    assert cert.lambda_hat == 1.0
    assert "fixed-sequence" in cert.reason and "1.0" in cert.reason and "n = 10" in cert.reason
    assert "Nothing certified" in cert.summary()


def test_fallback_uses_grid_start_when_above_one_and_ascending_rule():
    losses = np.ones((5, 3))
    assert certify(losses, [1.5, 1.2, 0.9], 0.1, 0.05).lambda_hat == 1.5
    assert certify(losses, [0.99, 0.9, 0.8], 0.1, 0.05).lambda_hat == 1.0
    assert certify(losses, [0.1, 0.2, 0.3], 0.1, 0.05, order="ascending").lambda_hat == 0.0
    assert certify(losses, [-1.0, 0.2, 0.3], 0.1, 0.05, order="ascending").lambda_hat == -1.0
    assert certify(losses, [0.1, 0.2, 0.3], 0.1, 0.05, order="ascending", fallback_lambda=-7.0).lambda_hat == -7.0
    # a fallback at or past the (uncertified) first candidate is not safe; load would refuse it too
    for unsafe in (7.0, 0.1, 0.15, 0.05):
        with pytest.raises(ValueError, match="fallback_lambda .* not always safe"):
            certify(losses, [0.1, 0.2, 0.3], 0.1, 0.05, order="ascending", fallback_lambda=unsafe)


def test_ascending_grid_certifies_along_its_order():
    losses = staircase()
    cert = certify(losses, [0.1, 0.2, 0.3, 0.4, 0.5], 0.1, 0.05, order="ascending")
    assert cert.lambda_hat == 0.3 and cert.order == "ascending"


def test_costs_pick_cheapest_certified_with_ties_to_later():
    losses = staircase(risks=(0.0, 0.0, 0.0, 0.0, 0.9))
    # certified: 0..3; costs of certified: 5, 3, 4, 3 → tie between 1 and 3 → the later, 3
    cert = certify(losses, GRID, 0.1, 0.05, costs=[5.0, 3.0, 4.0, 3.0, 1.0])
    assert cert.chosen_index == 3 and cert.lambda_hat == 0.7
    assert cert.costs == [5.0, 3.0, 4.0, 3.0, 1.0]
    # a strictly cheapest earlier candidate wins over the furthest one
    cert = certify(losses, GRID, 0.1, 0.05, costs=[5.0, 1.0, 4.0, 3.0, 0.0])
    assert cert.chosen_index == 1 and cert.lambda_hat == 0.9


def test_wsr_records_seed_and_is_reproducible():
    rng = np.random.default_rng(0)
    losses = rng.random((300, 5)) * np.array([0, 0.05, 0.1, 0.3, 0.6])
    a = certify(losses, GRID, 0.1, 0.05, pvalue="wsr", seed=3)
    b = certify(losses, GRID, 0.1, 0.05, pvalue=WSR(), seed=3)
    assert a.wsr_seed == 3 and a.pvalue_method == "wsr"
    assert a.pvalues == b.pvalues
    order = np.random.default_rng(3).permutation(300)
    from ltt_exit.certify import wsr_pvalues_in_order

    assert np.allclose(a.pvalues, wsr_pvalues_in_order(losses[order], 0.1, 0.05), rtol=1e-13)


def test_every_pvalue_name_and_alias_works():
    losses = staircase()
    for name in PVALUES.names():
        cert = certify(losses, GRID, 0.1, 0.05, pvalue=name)
        assert cert.lambda_hat == 0.8, name
    assert certify(losses, GRID, 0.1, 0.05, pvalue="hb").pvalue_method == "hoeffding-bentkus"


def test_procedure_instance_and_params_recorded():
    losses = staircase()
    cert = certify(losses, GRID, 0.1, 0.05, procedure=MultiStart(starts=2))
    assert cert.procedure == {"name": "multi-start", "params": {"starts": 2, "start_indices": [0, 2]}}
    assert certify(losses, GRID, 0.1, 0.05, procedure=FixedSequence()).procedure["name"] == "fixed-sequence"


def test_pvalues_equal_the_pvalue_object_on_the_same_matrix():
    rng = np.random.default_rng(1)
    losses = rng.random((200, 5)) * 0.3
    cert = certify(losses, GRID, 0.2, 0.1)
    assert np.array_equal(cert.pvalues, HoeffdingBentkus()(losses, 0.2))
    assert np.allclose(cert.empirical_risk, losses.mean(axis=0), rtol=1e-15)


def test_accepts_lists_and_integer_arrays():
    cert = certify([[0, 0], [0, 1]], [1, 0.5], 0.4, 0.5, pvalue="binomial")
    assert cert.lambdas == [1.0, 0.5] and all(isinstance(x, float) for x in cert.lambdas)


# ---------------------------------------------------------------------------- bad input

GOOD = staircase(n=20)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"losses": np.where(GOOD == 1, np.nan, GOOD)}, ValueError, "NaN"),
        ({"losses": np.where(GOOD == 1, np.inf, GOOD)}, ValueError, "inf"),
        ({"losses": GOOD * 1.5}, ValueError, r"\[0, 1\]"),
        ({"losses": -GOOD}, ValueError, r"\[0, 1\]"),
        ({"losses": np.zeros((0, 5))}, ValueError, "n = 0"),
        ({"losses": np.zeros((4, 0)), "lambdas": []}, ValueError, "grid is empty"),
        ({"losses": [["a", "b"]]}, TypeError, "numeric"),
        ({"delta": 0.0}, ValueError, "delta"),
        ({"delta": 1.0}, ValueError, "delta"),
        ({"delta": float("nan")}, ValueError, "delta"),
        ({"delta": True}, TypeError, "delta"),
        ({"epsilon": 0.0}, ValueError, "epsilon"),
        ({"epsilon": 1.2}, ValueError, "epsilon"),
        ({"epsilon": "0.05"}, TypeError, "epsilon"),
        ({"losses": staircase(n=20) * 0.5, "pvalue": "binomial"}, ValueError, "binomial"),
        ({"lambdas": GRID[:4]}, ValueError, "4 values but the loss matrix has 5"),
        ({"lambdas": GRID[::-1]}, ValueError, "not in the declared order 'descending'"),
        ({"lambdas": [1.0, 0.9, 0.9, 0.7, 0.6]}, ValueError, "declared order"),
        ({"order": "ascending"}, ValueError, "declared order 'ascending'"),
        ({"order": "random"}, ValueError, "order must be one of"),
        ({"lambdas": [1.0, 0.9, np.nan, 0.7, 0.6]}, ValueError, "finite"),
        ({"pvalue": "clopper"}, ValueError, "unknown p-value"),
        ({"procedure": "bh"}, ValueError, "unknown procedure"),
        ({"costs": [1.0, 2.0]}, ValueError, "costs"),
        ({"costs": [1.0, 2.0, np.nan, 1.0, 1.0]}, ValueError, "finite"),
        ({"metadata": ["not", "a", "dict"]}, TypeError, "metadata"),
        ({"metadata": {"x": {1, 2}}}, CertificateError, "metadata"),
        ({"metadata": {"x": float("nan")}}, CertificateError, "finite"),
        ({"seed": -1}, TypeError, "seed"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, error, message):
    arguments = {"losses": GOOD, "lambdas": GRID, "delta": 0.1, "epsilon": 0.05}
    arguments.update(kwargs)
    losses = arguments.pop("losses")
    lambdas = arguments.pop("lambdas")
    delta = arguments.pop("delta")
    epsilon = arguments.pop("epsilon")
    with pytest.raises(error, match=message):
        certify(losses, lambdas, delta, epsilon, **arguments)


def test_error_names_the_offending_cell():
    losses = np.zeros((6, 5))
    losses[4, 2] = 1.25
    with pytest.raises(ValueError, match="example 4, candidate 2"):
        certify(losses, GRID, 0.1, 0.05)


def test_metadata_numpy_values_are_normalised_to_json():
    cert = certify(GOOD, GRID, 0.1, 0.05, metadata={"layers": np.int64(12), "tau": np.float32(0.5), "ids": np.arange(3)})
    assert cert.metadata == {"layers": 12, "tau": 0.5, "ids": [0, 1, 2]}
    assert type(cert.metadata["layers"]) is int and not math.isnan(cert.metadata["tau"])
