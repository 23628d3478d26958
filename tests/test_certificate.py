"""Certificate JSON: exact round trip, atomic write, validated load, published schema."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from ltt_exit.certificate import CERTIFICATE_SCHEMA, SCHEMA_VERSION, Certificate, CertificateError, canonical_json
from ltt_exit.certify import certify

DOCS = Path(__file__).resolve().parents[1] / "docs"


def make_certificate(**overrides) -> Certificate:
    rng = np.random.default_rng(0)
    grid = [1.0, 0.9, 0.8, 0.7000000000000001, 0.1 + 0.2]  # awkward floats on purpose
    losses = (rng.random((300, 5)) < np.array([0.0, 0.01, 0.03, 0.2, 0.5])).astype(float)
    kwargs = dict(
        pvalue="wsr",
        seed=9,
        costs=[12.0, 10.5, 9.25, 1e-300, 5e-324],
        metadata={"model": {"fingerprint": "sha256:abc", "layers": 24}, "tau": 4.0, "note": "λ ≥ 0 — ünïcode"},
    )
    kwargs.update(overrides)
    return certify(losses, grid[:4] + [0.25], 0.1, 0.05, **kwargs)


def test_exact_round_trip(tmp_path):
    cert = make_certificate()
    path = tmp_path / "certificate.json"
    cert.save(path)
    loaded = Certificate.load(path)
    assert loaded == cert
    # floats are bit-identical, not merely close
    for a, b in zip(loaded.pvalues + loaded.costs + loaded.empirical_risk, cert.pvalues + cert.costs + cert.empirical_risk):
        assert a.hex() == b.hex()
    # saving the loaded certificate reproduces the file byte for byte
    again = tmp_path / "again.json"
    loaded.save(again)
    assert again.read_bytes() == path.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_round_trip_of_nothing_certified(tmp_path):
    cert = certify(np.ones((4, 2)), [1.0, 0.5], 0.1, 0.05)
    cert.save(tmp_path / "c.json")
    loaded = Certificate.load(tmp_path / "c.json")
    assert loaded == cert and loaded.chosen_index is None and loaded.reason


def test_file_is_valid_against_published_schema_and_digest_is_sha256_of_canonical_content(tmp_path):
    cert = make_certificate()
    cert.save(tmp_path / "c.json")
    data = json.loads((tmp_path / "c.json").read_text())
    jsonschema.validate(data, json.loads((DOCS / "certificate.schema.json").read_text()))
    content = {k: v for k, v in data.items() if k != "digest"}
    expected = "sha256:" + hashlib.sha256(
        json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    ).hexdigest()
    assert data["digest"] == expected
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["wsr_seed"] == 9


def test_published_schema_file_equals_the_one_used_for_loading():
    published = json.loads((DOCS / "certificate.schema.json").read_text(encoding="utf-8"))
    assert published == CERTIFICATE_SCHEMA
    jsonschema.Draft202012Validator.check_schema(published)


@pytest.mark.parametrize("cut", [1, 10, 0.5, -2])
def test_truncated_file_refused(tmp_path, cut):
    path = tmp_path / "c.json"
    make_certificate().save(path)
    raw = path.read_bytes()
    size = int(len(raw) * cut) if isinstance(cut, float) else (cut if cut > 0 else len(raw) + cut)
    path.write_bytes(raw[:size])
    with pytest.raises(CertificateError, match="truncated or corrupted"):
        Certificate.load(path)


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.__setitem__("lambda_hat", 0.5),
        lambda d: d["pvalues"].__setitem__(3, 0.001),
        lambda d: d.__setitem__("delta", 0.2),
        lambda d: d["metadata"].__setitem__("model", "other"),
        lambda d: d["certified"].__setitem__(4, True),
    ],
)
def test_hand_edited_file_refused_by_digest(tmp_path, change):
    path = tmp_path / "c.json"
    make_certificate().save(path)
    _edit(path, change)
    with pytest.raises(CertificateError, match="digest mismatch"):
        Certificate.load(path)


def test_edit_with_recomputed_digest_still_refused_when_inconsistent(tmp_path):
    # The digest is not a signature: someone can recompute it. The consistency checks still catch
    # a chosen λ that is not a certified grid value.
    path = tmp_path / "c.json"
    make_certificate().save(path)

    def forge(data):
        data["lambda_hat"] = 0.123
        content = {k: v for k, v in data.items() if k != "digest"}
        data["digest"] = "sha256:" + hashlib.sha256(canonical_json(content)).hexdigest()

    _edit(path, forge)
    with pytest.raises(CertificateError, match="lambda_hat"):
        Certificate.load(path)


def test_whitespace_reformatting_is_not_an_edit(tmp_path):
    path = tmp_path / "c.json"
    cert = make_certificate()
    cert.save(path)
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data))  # compact, different key layout
    assert Certificate.load(path) == cert


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unknown_schema_version_refused(tmp_path, version):
    path = tmp_path / "c.json"
    make_certificate().save(path)
    _edit(path, lambda d: d.__setitem__("schema_version", version))
    with pytest.raises(CertificateError, match="unknown certificate schema version"):
        Certificate.load(path)


def test_missing_version_and_non_object_refused(tmp_path):
    path = tmp_path / "c.json"
    make_certificate().save(path)
    _edit(path, lambda d: d.pop("schema_version"))
    with pytest.raises(CertificateError, match="no schema_version"):
        Certificate.load(path)
    path.write_text("[1, 2, 3]")
    with pytest.raises(CertificateError, match="JSON object"):
        Certificate.load(path)


@pytest.mark.parametrize(
    "change, where",
    [
        (lambda d: d.pop("pvalues"), "pvalues"),
        (lambda d: d.__setitem__("extra_field", 1), "extra_field"),
        (lambda d: d.__setitem__("n", "300"), "n"),
        (lambda d: d.__setitem__("epsilon", 1.5), "epsilon"),
        (lambda d: d["pvalues"].__setitem__(0, -0.1), "pvalues/0"),
        (lambda d: d.__setitem__("digest", "md5:xyz"), "digest"),
    ],
)
def test_schema_violations_refused_with_location(tmp_path, change, where):
    path = tmp_path / "c.json"
    make_certificate().save(path)
    _edit(path, change)
    with pytest.raises(CertificateError, match="schema") as info:
        Certificate.load(path)
    assert where.split("/")[0] in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Certificate.load(tmp_path / "nope.json")


def test_save_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    path.write_text("previous certificate")
    cert = make_certificate()

    def broken_to_json(self):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Certificate, "to_json", broken_to_json)
    with pytest.raises(RuntimeError):
        cert.save(path)
    assert path.read_text() == "previous certificate"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]


def test_construction_checks_consistency():
    cert = make_certificate()
    fields = cert.to_dict()
    fields.pop("digest")
    with pytest.raises(CertificateError, match="entries but the grid has"):
        Certificate(**{**fields, "pvalues": fields["pvalues"][:-1]})
    with pytest.raises(CertificateError, match="certified_any"):
        Certificate(**{**fields, "certified_any": not fields["certified_any"]})
    with pytest.raises(CertificateError, match="strictly descending"):
        Certificate(**{**fields, "lambdas": fields["lambdas"][::-1]})


def test_summary_mentions_choice_risk_pvalue_and_counts():
    cert = certify(np.zeros((400, 3)), [1.0, 0.9, 0.8], 0.1, 0.05)
    text = cert.summary()
    assert "λ = 0.8" in text
    assert "3 of 3 candidates certified" in text
    assert "empirical risk 0" in text and "δ = 0.1" in text and "ε = 0.05" in text and "n = 400" in text
