"""Pareto Testing (ltt_exit.certify.pareto): validity by simulation on synthetic configuration
spaces with known true risks, the negative control that orders by the testing part's own risks,
the single-knob reduction to fixed-sequence testing, the front, the certificate record and its
re-derivation, and bad input.
"""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from ltt_exit.certificate import Certificate, CertificateError
from ltt_exit.certify import certify, certify_pareto, rederive_pareto
from ltt_exit.certify.pareto import pareto_decide, pareto_front_order, split_indices
from ltt_exit.certify.simulate import bernoulli_part_risks, simulate_pareto

DRAWS = 2000
EPSILON = 0.05
DELTAS = (0.1, 0.06)

# A space of 8 λ × 3 minimum exit layers × 3 pruning settings × 2 scorers = 144 configurations.
LAMBDAS = np.round(np.linspace(1.0, 0.65, 8), 3)
LAYERS = (2, 4, 6)
PRUNING = ("none", "fixed", "decaying")
SCORERS = ("softmax", "margin")
N_LAYERS = 8


def knob_space(profile: str):
    """(true risks (K, 2), costs (K,)) of the 144-configuration space for one risk profile."""
    risks, costs = [], []
    for lam, layer, prune, scorer in itertools.product(LAMBDAS, LAYERS, PRUNING, SCORERS):
        t = (1.0 - lam) / 0.35  # 0 at λ = 1 (the full model), 1 at the most aggressive λ
        if profile == "monotone":  # monotone in every knob
            r0 = 0.25 * t * (1.3 - 0.1 * layer) * {"none": 1.0, "fixed": 1.3, "decaying": 1.15}[prune] \
                * {"softmax": 1.0, "margin": 0.9}[scorer]
            r1 = 0.6 * r0
        elif profile == "non-monotone":  # bumpy in λ, non-monotone in layer and pruning
            r0 = 0.22 * t * (0.5 + 0.5 * np.sin(7 * t) ** 2) * {2: 1.1, 4: 0.8, 6: 1.0}[layer] \
                * {"none": 1.0, "fixed": 1.4, "decaying": 0.9}[prune] * {"softmax": 1.0, "margin": 1.1}[scorer]
            r1 = 0.5 * r0 * (1.2 if scorer == "softmax" else 0.8)
        elif profile == "cliff":  # safe configurations up to 0.9 δ, then a cliff just above δ
            r0 = 0.0 if lam == 1.0 else DELTAS[0] * (0.9 * t / 0.6 if t <= 0.6 else 1.01)
            r1 = 0.3 * r0
        elif profile == "many-nulls":  # one safe configuration, every other one barely above δ on risk 0
            r0 = 0.0 if lam == 1.0 else DELTAS[0] * 1.02
            r1 = 0.2 * r0
        else:
            raise AssertionError(profile)
        risks.append([min(r0, 1.0), min(r1, 1.0)])
        exit_layer = layer + (N_LAYERS - layer) * (1.0 - 0.8 * t)
        costs.append(exit_layer * {"none": 1.0, "fixed": 0.9, "decaying": 0.93}[prune] * {"softmax": 1.0, "margin": 0.98}[scorer])
    return np.array(risks), np.array(costs)


# ----------------------------------------------------------------------------- validity
@pytest.mark.parametrize("profile", ["monotone", "non-monotone", "cliff", "many-nulls"])
@pytest.mark.parametrize("n", [100, 1000])
@pytest.mark.parametrize("n_risks", [1, 2])
@pytest.mark.parametrize("shared_latent", [True, False])
@pytest.mark.parametrize("pvalue", ["binomial", "hoeffding-bentkus"])
def test_violation_rate_at_most_epsilon(profile, n, n_risks, shared_latent, pvalue):
    risks, costs = knob_space(profile)
    result = simulate_pareto(
        risks[:, :n_risks], costs, DELTAS[:n_risks], EPSILON, n=n, draws=DRAWS,
        shared_latent=shared_latent, pvalue=pvalue, seed=n + 7 * n_risks,
    )
    assert result.violation_rate <= result.bound, result


@pytest.mark.parametrize("n", [100, 1000])
def test_negative_control_ordering_by_testing_risks_fails(n):
    # Many cheap configurations barely above δ with independent losses: ordering by the testing
    # part's own risks puts the luckiest of them first and certifies it far more often than ε.
    risks, costs = knob_space("many-nulls")
    honest = simulate_pareto(risks, costs, DELTAS, EPSILON, n=n, draws=DRAWS, shared_latent=False, pvalue="binomial")
    leaky = simulate_pareto(
        risks, costs, DELTAS, EPSILON, n=n, draws=DRAWS, shared_latent=False, pvalue="binomial", order_by="testing"
    )
    assert honest.violation_rate <= honest.bound
    assert leaky.violation_rate > leaky.bound, leaky


def test_public_function_validity_on_loss_tables():
    # certify_pareto itself (split, p-values, order, choice) on 2,000 materialised loss tables.
    risks, costs = knob_space("many-nulls")
    configs = [{"lambda": float(lam)} for lam in np.repeat(LAMBDAS, len(LAYERS) * len(PRUNING) * len(SCORERS))]
    rng = np.random.default_rng(11)
    n = 100
    violations = 0
    for draw in range(DRAWS):
        losses = (rng.random((n, risks.shape[0], 2)) < risks).astype(np.float64)
        cert = certify_pareto(losses, costs, DELTAS, EPSILON, seed=draw, pvalue="binomial", configurations=configs)
        index = cert.chosen_index if cert.certified_any else cert.pareto["safe_index"]
        violations += bool((risks[index] > DELTAS).any())
    rate = violations / DRAWS
    assert rate <= EPSILON + 3 * np.sqrt(EPSILON * (1 - EPSILON) / DRAWS)


def test_bernoulli_part_risks_have_the_true_means():
    true = np.array([[0.0, 0.1], [0.05, 0.2], [0.3, 0.6], [0.05, 0.9]])
    rng = np.random.default_rng(0)
    for shared in (True, False):
        drawn = bernoulli_part_risks(true, 500, 4000, rng, shared_latent=shared)
        assert drawn.shape == (4000, 4, 2)
        np.testing.assert_allclose(drawn.mean(axis=0), true, atol=4 * np.sqrt(0.25 / (500 * 4000)))
    comonotone = bernoulli_part_risks(true, 50, 200, rng, shared_latent=True)
    assert (comonotone[:, 1, 0] <= comonotone[:, 2, 0]).all()  # nested thresholds: nested counts
    np.testing.assert_array_equal(comonotone[:, 1, 0], comonotone[:, 3, 0])  # equal thresholds: equal losses


# ----------------------------------------------------------------------------- reductions
def test_single_knob_reduces_to_fixed_sequence_on_the_testing_part():
    rng = np.random.default_rng(3)
    n, k = 300, 12
    lambdas = np.linspace(1.0, 0.45, k)
    # Per-example losses strictly increasing along the grid, so the optimisation part's risks are
    # strictly increasing too: the Pareto order is the grid order and every λ is on the front.
    u = rng.random((n, 1))
    losses = u ** (1.0 / np.linspace(0.001, 0.3, k) - 1.0)
    costs = np.linspace(30.0, 8.0, k)
    for pvalue in ("hoeffding-bentkus", "wsr"):
        cert = certify_pareto(losses, costs, 0.12, EPSILON, split=0.4, seed=5, pvalue=pvalue,
                              configurations=[{"lambda": float(v)} for v in lambdas])
        _, test_rows = split_indices(n, 0.4, 5)
        reference = certify(losses[test_rows], lambdas, 0.12, EPSILON, costs=costs, pvalue=pvalue, seed=5)
        assert cert.pareto["tested_order"] == list(range(k))
        assert cert.certified == reference.certified
        assert cert.chosen_index == reference.chosen_index
        assert cert.lambda_hat == reference.lambda_hat
        np.testing.assert_allclose(cert.pvalues, reference.pvalues, rtol=1e-12)
        assert 0 < sum(cert.certified) < k  # the comparison is not vacuous


def test_front_is_exactly_the_non_dominated_set_ordered_by_score():
    rng = np.random.default_rng(8)
    for _ in range(200):
        k = int(rng.integers(1, 15))
        scores = rng.integers(0, 5, k).astype(float)  # many ties on purpose
        costs = rng.integers(0, 5, k).astype(float)
        sorted_index, on_front = pareto_front_order(scores, costs)
        front = sorted_index[on_front]
        for j in range(k):
            dominated = any(
                (scores[i] <= scores[j] and costs[i] <= costs[j])
                and (scores[i] < scores[j] or costs[i] < costs[j] or i < j)
                for i in range(k) if i != j
            )
            assert (j in front) == (not dominated)
        assert np.all(np.diff(scores[front]) > 0) and np.all(np.diff(costs[front]) < 0)


def test_fixed_sequence_stops_at_the_first_failure_along_the_order():
    scores = np.array([0.0, 0.2, 0.4, 0.6, 0.8])
    costs = np.array([10.0, 8.0, 6.0, 4.0, 2.0])
    chosen, certified, tested = pareto_decide(scores, costs, np.array([0.0, 0.01, 0.2, 0.0, 0.0]), 0.05)
    assert chosen == 1 and certified.tolist() == [True, True, False, False, False] and tested.all()
    # an off-front configuration is skipped, not a stopping point
    costs_dominated = np.array([10.0, 8.0, 9.0, 4.0, 2.0])
    chosen, certified, tested = pareto_decide(scores, costs_dominated, np.array([0.0, 0.01, 0.9, 0.0, 0.3]), 0.05)
    assert tested.tolist() == [True, True, False, True, True]
    assert chosen == 3 and certified.tolist() == [True, True, False, True, False]
    chosen, certified, _ = pareto_decide(scores, costs, np.full(5, 0.5), 0.05)
    assert chosen == -1 and not certified.any()


# ----------------------------------------------------------------------------- the certificate
def small_problem(seed: int = 0, n: int = 400):
    rng = np.random.default_rng(seed)
    risks, costs = knob_space("monotone")
    losses = (rng.random((n, 1, 2)) < risks).astype(np.float64)
    configs = [
        {"lambda": float(lam), "min_exit_layer": layer, "pruning": prune, "scorer": scorer}
        for lam, layer, prune, scorer in itertools.product(LAMBDAS, LAYERS, PRUNING, SCORERS)
    ]
    return losses, costs, configs


def test_certificate_records_every_risk_split_and_configuration(tmp_path):
    losses, costs, configs = small_problem()
    cert = certify_pareto(losses, costs, DELTAS, EPSILON, split=0.3, seed=4, configurations=configs,
                          risk_names=["textual", "reference"])
    assert cert.certified_any and cert.procedure["name"] == "pareto-testing"
    split = cert.pareto["split"]
    assert split == {"fraction": 0.3, "seed": 4, "n_optimisation": 120, "n_testing": 280}
    opt_rows, test_rows = split_indices(400, 0.3, 4)
    j = cert.chosen_index
    assert cert.pareto["configuration"] == configs[j] and cert.lambda_hat == configs[j]["lambda"]
    assert [r["name"] for r in cert.pareto["risks"]] == ["textual", "reference"]
    for r, risk in enumerate(cert.pareto["risks"]):
        assert risk["delta"] == DELTAS[r]
        np.testing.assert_allclose(risk["optimisation_risk"], losses[opt_rows, :, r].mean(axis=0))
        np.testing.assert_allclose(risk["testing_risk"], losses[test_rows, :, r].mean(axis=0))
        assert risk["testing_risk"][j] <= DELTAS[r]
    assert cert.pvalues[j] == max(risk["pvalues"][j] for risk in cert.pareto["risks"])
    assert cert.pvalues[j] <= EPSILON
    order = cert.pareto["tested_order"]
    assert j in order and all(cert.certified[i] for i in order[: order.index(j) + 1])
    assert not any(cert.certified[i] for i in range(len(configs)) if i not in order)
    # cheapest certified
    assert cert.costs[j] == min(c for c, ok in zip(cert.costs, cert.certified) if ok)
    assert "textual" in cert.summary() and "configuration" in cert.summary()

    path = tmp_path / "pareto.json"
    cert.save(path)
    loaded = Certificate.load(path)
    assert loaded == cert
    assert rederive_pareto(loaded).chosen_index == j


def test_split_depends_on_seed_and_fraction_only():
    losses, costs, configs = small_problem()
    a = certify_pareto(losses, costs, DELTAS, EPSILON, seed=1, configurations=configs)
    b = certify_pareto(losses, costs, DELTAS, EPSILON, seed=1, configurations=configs)
    c = certify_pareto(losses, costs, DELTAS, EPSILON, seed=2, configurations=configs)
    assert a.pareto == b.pareto
    assert a.pareto["risks"][0]["testing_risk"] != c.pareto["risks"][0]["testing_risk"]


def test_per_example_costs_are_averaged_on_the_optimisation_part():
    losses, costs, _ = small_problem()
    rng = np.random.default_rng(2)
    per_example = costs + rng.normal(0, 0.5, (losses.shape[0], costs.size))
    cert = certify_pareto(losses, per_example, DELTAS, EPSILON, seed=3)
    opt_rows, _ = split_indices(losses.shape[0], 0.5, 3)
    np.testing.assert_allclose(cert.costs, per_example[opt_rows].mean(axis=0))
    assert cert.pareto["cost_source"].startswith("per-example")


def test_nothing_certified_falls_back_to_the_safe_configuration():
    losses, costs, configs = small_problem(n=6)  # 3 testing examples cannot push a p-value below ε
    cert = certify_pareto(losses, costs, DELTAS, EPSILON, configurations=configs)
    assert not cert.certified_any and cert.chosen_index is None
    assert cert.pareto["safe_index"] == 0 and cert.lambda_hat == 1.0
    assert cert.pareto["configuration"] == configs[0]
    assert "safe configuration 0" in cert.reason
    explicit = certify_pareto(losses, costs, DELTAS, EPSILON, configurations=configs, safe_index=6)
    assert explicit.pareto["configuration"] == configs[6]
    no_configs = certify_pareto(losses, costs, DELTAS, EPSILON)
    assert no_configs.pareto["safe_index"] == int(np.argmax(costs)) and no_configs.pareto["configuration"] is None


def _resave(path, data):
    content = {key: value for key, value in data.items() if key != "digest"}
    import hashlib

    from ltt_exit.certificate import canonical_json

    data["digest"] = "sha256:" + hashlib.sha256(canonical_json(content)).hexdigest()
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda d: d.update(chosen_index=d["pareto"]["tested_order"][0], lambda_hat=1.0), "chosen_index"),
        (lambda d: d["pareto"]["tested_order"].reverse(), "tested_order"),
        (lambda d: d["pareto"]["risks"][1]["testing_risk"].__setitem__(d["chosen_index"], 0.0), "pvalues"),
        (lambda d: d["pareto"]["configuration"].__setitem__("min_exit_layer", 99), "configuration"),
        (lambda d: d["pareto"]["split"].__setitem__("n_testing", 5), "pvalues"),
    ],
)
def test_load_refuses_a_record_whose_decision_does_not_rederive(tmp_path, edit, field):
    losses, costs, configs = small_problem()
    cert = certify_pareto(losses, costs, DELTAS, EPSILON, configurations=configs)
    data = cert.to_dict()
    edit(data)
    path = tmp_path / "edited.json"
    _resave(path, data)  # a valid digest: only the re-derivation can catch the edit
    with pytest.raises(CertificateError, match=field):
        Certificate.load(path)


def test_single_grid_certificates_are_unchanged(tmp_path):
    losses = np.random.default_rng(0).random((50, 3)) * 0.1
    cert = certify(losses, [1.0, 0.9, 0.8], 0.2, 0.1)
    assert cert.pareto is None and "pareto" not in cert.to_dict()
    path = tmp_path / "c.json"
    cert.save(path)
    assert Certificate.load(path) == cert
    with pytest.raises(CertificateError, match="pareto"):
        rederive_pareto(cert)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"losses": np.zeros(5)}, ValueError, "shape"),
        ({"losses": np.zeros((5, 3, 1, 1))}, ValueError, "shape"),
        ({"losses": np.zeros((1, 3))}, ValueError, "at least 2"),
        ({"losses": np.full((5, 3), np.nan)}, ValueError, "example 0, configuration 0"),
        ({"losses": np.full((5, 3), 1.5)}, ValueError, r"\[0, 1\]"),
        ({"costs": np.zeros(4)}, ValueError, "costs must have shape"),
        ({"costs": [0.0, np.inf, 1.0]}, ValueError, "finite"),
        ({"delta": [0.1, 0.2]}, ValueError, "one δ_r per risk"),
        ({"delta": 0.0}, ValueError, "delta"),
        ({"epsilon": 1.0}, ValueError, "epsilon"),
        ({"split": 1.0}, ValueError, "split"),
        ({"split": True}, ValueError, "split"),
        ({"configurations": [{}, {}]}, ValueError, "configurations has 2"),
        ({"configurations": [{}, {}, 3]}, TypeError, r"configurations\[2\]"),
        ({"safe_index": 3}, ValueError, "safe_index"),
        ({"pvalue": "binomial", "losses": np.full((5, 3), 0.5)}, ValueError, "binomial"),
        ({"risk_names": ["a", "b"]}, ValueError, "risk_names"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(kwargs, error, message):
    args = {"losses": np.zeros((5, 3)), "costs": np.arange(3.0), "delta": 0.1, "epsilon": 0.05}
    args.update(kwargs)
    losses, costs, delta, epsilon = (args.pop(k) for k in ("losses", "costs", "delta", "epsilon"))
    with pytest.raises(error, match=message):
        certify_pareto(losses, costs, delta, epsilon, **args)
