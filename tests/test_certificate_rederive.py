"""Certificate.load re-derives the stored decision from the stored evidence (issue 14).

Every forgery below recomputes the digest, as anyone can: the digest detects accidental edits, the
re-derivation refuses decisions that do not follow from the file's own p-values, risks, n, δ, ε and
procedure, naming the field.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ltt_exit.certificate import Certificate, CertificateError, canonical_json
from ltt_exit.certify import MultiStart, certify
from ltt_exit.certify.rederive import Expected, disagreements, rederive
from ltt_exit.validation import InputError


def staircase_losses(n=400):
    rng = np.random.default_rng(3)
    return (rng.random((n, 5)) < np.array([0.0, 0.01, 0.02, 0.3, 0.6])).astype(float)


GRID = [1.0, 0.9, 0.8, 0.7, 0.6]


def saved(tmp_path: Path, **kwargs) -> Path:
    path = tmp_path / "c.json"
    certify(staircase_losses(), GRID, 0.1, 0.05, **kwargs).save(path)
    return path


def forge(path: Path, change) -> None:
    """Edit the file and recompute its digest (the digest is not a signature)."""
    data = json.loads(path.read_text())
    change(data)
    content = {k: v for k, v in data.items() if k != "digest"}
    data["digest"] = "sha256:" + hashlib.sha256(canonical_json(content)).hexdigest()
    path.write_text(json.dumps(data, indent=2))


@pytest.mark.parametrize("kwargs", [
    {}, {"pvalue": "wsr", "seed": 4}, {"pvalue": "hoeffding"}, {"pvalue": "binomial"}, {"pvalue": "bentkus"},
    {"procedure": "holm"}, {"procedure": "bonferroni"}, {"procedure": MultiStart(starts=2)},
    {"procedure": MultiStart(start_indices=[0, 3])}, {"costs": [5.0, 4.0, 4.0, 1.0, 0.5]},
])
def test_genuine_certificates_of_every_kind_load(tmp_path, kwargs):
    path = saved(tmp_path, **kwargs)
    assert Certificate.load(path).certified_any


def test_nothing_certified_genuine_loads(tmp_path):
    path = tmp_path / "c.json"
    certify(np.ones((20, 3)), [0.9, 0.8, 0.7], 0.1, 0.05).save(path)
    assert Certificate.load(path).lambda_hat == 1.0


def _promote_all(data):
    """Claim every candidate certified and choose the last one (whose p-value exceeds ε)."""
    data["certified"] = [True] * len(data["lambdas"])
    data["certified_any"] = True
    data["chosen_index"] = len(data["lambdas"]) - 1
    data["lambda_hat"] = data["lambdas"][-1]
    data["reason"] = None


def test_certified_list_chosen_index_and_lambda_edited_together_refused(tmp_path):
    path = saved(tmp_path)
    assert max(json.loads(path.read_text())["pvalues"]) > 0.05  # the forged candidates fail at ε
    forge(path, _promote_all)
    with pytest.raises(CertificateError, match=r"c\.json: field 'certified'"):
        Certificate.load(path)


def test_edited_epsilon_refused(tmp_path):
    path = saved(tmp_path)
    forge(path, lambda d: d.__setitem__("epsilon", 1e-12))
    with pytest.raises(CertificateError, match="field 'certified'.*ε = 1e-12"):
        Certificate.load(path)


def test_edited_delta_refused_by_the_recomputed_pvalues(tmp_path):
    path = saved(tmp_path)
    forge(path, lambda d: d.__setitem__("delta", 0.3))
    with pytest.raises(CertificateError, match="field 'pvalues'"):
        Certificate.load(path)


def test_lowered_pvalues_refused_for_risk_only_pvalues(tmp_path):
    path = saved(tmp_path)

    def lower(data):
        data["pvalues"][3:] = [0.0, 0.0]
        _promote_all(data)

    forge(path, lower)
    with pytest.raises(CertificateError, match=r"field 'pvalues': pvalues\[3\] = 0.0, .* is 1.0"):
        Certificate.load(path)


@pytest.mark.parametrize("field_name, value, message", [
    ("pvalue_method", "magic", "field 'pvalue_method': unknown p-value 'magic'"),
    ("pvalue_method", "hb", "field 'pvalue_method': unknown p-value 'hb'"),  # aliases are never written
    ("procedure", {"name": "lucky", "params": {}}, "field 'procedure': unknown procedure 'lucky'"),
    ("procedure", {"name": "multi-start", "params": {"starts": 2, "start_indices": [0, 1, 3]}},
     "field 'procedure'"),
    ("procedure", {"name": "multi-start", "params": {"starts": 2, "start_indices": [0, 9]}},
     "field 'procedure'"),
    ("procedure", {"name": "holm", "params": {"alpha": 1}}, "field 'procedure'"),
    ("wsr_seed", 3, "field 'wsr_seed'"),
])
def test_unknown_or_inconsistent_methods_refused(tmp_path, field_name, value, message):
    path = saved(tmp_path)
    forge(path, lambda d: d.__setitem__(field_name, value))
    with pytest.raises(CertificateError, match=message):
        Certificate.load(path)


def test_wsr_without_seed_refused(tmp_path):
    path = saved(tmp_path, pvalue="wsr", seed=2)
    forge(path, lambda d: d.__setitem__("wsr_seed", None))
    with pytest.raises(CertificateError, match="field 'wsr_seed'"):
        Certificate.load(path)


def test_chosen_index_other_than_the_selection_rule_refused(tmp_path):
    path = saved(tmp_path)
    data = json.loads(path.read_text())
    assert data["certified"][:3] == [True, True, True] and data["chosen_index"] == 2

    def earlier(d):  # still a certified candidate, so construction accepts it; the rule picks index 2
        d["chosen_index"] = 1
        d["lambda_hat"] = d["lambdas"][1]

    forge(path, earlier)
    with pytest.raises(CertificateError, match="field 'chosen_index'.*gives 2, the file says 1"):
        Certificate.load(path)


def test_chosen_index_with_costs_follows_the_cheapest_rule(tmp_path):
    path = saved(tmp_path, costs=[5.0, 1.0, 3.0, 0.0, 0.0])
    assert json.loads(path.read_text())["chosen_index"] == 1

    def most_along(d):
        d["chosen_index"] = 2
        d["lambda_hat"] = d["lambdas"][2]

    forge(path, most_along)
    with pytest.raises(CertificateError, match="field 'chosen_index'.*lowest cost.*gives 1"):
        Certificate.load(path)


@pytest.mark.parametrize("lambda_hat", [0.55, 0.9, 0.95, 0.999])
def test_unsafe_lambda_when_nothing_is_certified_refused(tmp_path, lambda_hat):
    path = tmp_path / "c.json"
    certify(np.ones((20, 3)), [0.9, 0.8, 0.7], 0.1, 0.05).save(path)
    forge(path, lambda d: d.__setitem__("lambda_hat", lambda_hat))
    with pytest.raises(CertificateError, match="field 'lambda_hat'.*always-safe value.*1.0"):
        Certificate.load(path)


def test_lambda_more_conservative_than_the_always_safe_one_is_accepted_when_nothing_is_certified(tmp_path):
    path = tmp_path / "c.json"
    certify(np.ones((20, 3)), [0.9, 0.8, 0.7], 0.1, 0.05, fallback_lambda=2.0).save(path)
    assert Certificate.load(path).lambda_hat == 2.0


@pytest.mark.parametrize("field_name, token", [
    ("delta", "NaN"), ("epsilon", "Infinity"), ("lambda_hat", "-Infinity"), ("pvalues", "NaN"),
    ("empirical_risk", "NaN"), ("costs", "NaN"), ("metadata", "NaN"),
])
def test_nan_and_infinity_refused_naming_file_and_field(tmp_path, field_name, token):
    path = saved(tmp_path, costs=[5.0, 4.0, 3.0, 2.0, 1.0])
    text = path.read_text()
    data = json.loads(text)
    if isinstance(data[field_name], list):
        data[field_name][1] = "@@"
        where = f"{field_name}[1]"
    elif isinstance(data[field_name], dict):
        data[field_name]["tau"] = "@@"
        where = f"{field_name}.tau"
    else:
        data[field_name] = "@@"
        where = field_name
    path.write_text(json.dumps(data).replace('"@@"', token))
    with pytest.raises(CertificateError) as info:
        Certificate.load(path)
    message = str(info.value)
    assert str(path) in message and repr(where) in message and "finite" in message
    assert "\n" not in message


def test_rederive_returns_the_expected_values():
    cert = certify(staircase_losses(), GRID, 0.1, 0.05, costs=[5.0, 4.0, 4.0, 1.0, 0.5])
    record = cert.to_dict()
    expected = rederive(record)
    assert isinstance(expected, Expected)
    assert expected.certified.tolist() == cert.certified
    assert expected.chosen_index == cert.chosen_index and expected.lambda_hat == cert.lambda_hat
    np.testing.assert_allclose(expected.pvalues, cert.pvalues, rtol=1e-12)
    assert disagreements(record, expected) == []
    wsr = certify(staircase_losses(), GRID, 0.1, 0.05, pvalue="wsr").to_dict()
    assert rederive(wsr).pvalues is None  # WSR needs the loss matrix; only the selection is re-derived


def test_rederive_errors_are_input_errors_naming_the_field():
    record = certify(staircase_losses(), GRID, 0.1, 0.05).to_dict()
    record["schema_version"] = 99
    with pytest.raises(InputError, match="field 'schema_version'"):
        rederive(record)
