"""The certificate: what was certified, how, and from which data — as schema-versioned JSON.

A :class:`Certificate` is what :func:`ltt_exit.certify.certify` returns and what generation under a
certificate reads back. ``save`` writes it atomically; ``load`` refuses a file that is not valid
JSON (e.g. truncated), holds NaN or Infinity (naming the field), has an unknown ``schema_version``,
does not match the JSON Schema (:data:`CERTIFICATE_SCHEMA`, published as
``docs/certificate.schema.json``), whose content digest does not match its content, or whose decision
does not follow from its own evidence (:mod:`ltt_exit.certify.rederive` recomputes the p-values
where it can, the certified set, the chosen index and λ; docs/certification.md, "What load re-checks").

The digest is the SHA-256 of the canonical JSON (sorted keys, no whitespace, UTF-8, floats in
Python's shortest round-trip ``repr``) of every field except ``digest`` itself. It detects
accidental or hand edits; it is **not** a signature — anyone can recompute it after an edit.

Floats survive the JSON round trip exactly (``json`` writes ``repr(float)``, which ``float()``
reads back bit for bit), so ``Certificate.load(path) == certificate`` after ``save(path)``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from ltt_exit import __version__
from ltt_exit._atomic import atomic_write_text
from ltt_exit.validation import InputError, first_non_finite

__all__ = ["Certificate", "CertificateError", "CERTIFICATE_SCHEMA", "SCHEMA_VERSION", "canonical_json"]

#: the certificate schema version this ltt-exit writes and reads
SCHEMA_VERSION = 1


class CertificateError(InputError):
    """A certificate that is inconsistent, or a file that is not a valid certificate."""


_number_array = {"type": "array", "items": {"type": "number"}, "minItems": 1}
_unit_array = {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "minItems": 1}
_open_unit = {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}

#: JSON Schema (draft 2020-12) of a certificate file; ``docs/certificate.schema.json`` is this dict.
CERTIFICATE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "urn:ltt-exit:certificate:1",
    "title": "ltt-exit certificate",
    "description": (
        "A Learn-Then-Test certificate for a thresholded system (e.g. an early-exit decoder). "
        "With probability at least 1 - epsilon over the calibration set, every certified "
        "candidate has expected loss at most delta. Field meanings: docs/certification.md."
    ),
    "$comment": (
        "Beyond this schema, loading re-checks (docs/certification.md, 'What load re-checks'): no NaN or "
        "Infinity anywhere (JSON has none; the field is named); the digest; internal consistency; and the "
        "decision re-derived from the record's own evidence: pvalue_method and procedure are known names "
        "with the params the procedure writes, wsr_seed is set exactly for WSR, pvalues are recomputed "
        "from empirical_risk, n and delta (all but WSR), certified = procedure(pvalues, epsilon), "
        "chosen_index = the selection rule over certified (lowest cost, else furthest along the grid), "
        "lambda_hat = lambdas[chosen_index] or, nothing certified, at least as conservative as the "
        "always-safe value."
    ),
    "type": "object",
    "additionalProperties": False,
    "required": [
        "schema_version", "ltt_exit_version", "created_at", "lambda_hat", "certified_any",
        "chosen_index", "reason", "delta", "epsilon", "n", "pvalue_method", "procedure", "order",
        "lambdas", "empirical_risk", "pvalues", "certified", "costs", "wsr_seed", "metadata",
        "digest",
    ],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION, "description": "format version of this file"},
        "ltt_exit_version": {"type": "string", "description": "ltt-exit version that wrote the file"},
        "created_at": {"type": "string", "minLength": 1, "description": "UTC time, ISO 8601"},
        "lambda_hat": {"type": "number", "description": "the chosen λ = lambdas[chosen_index]; when nothing is certified a value at least as conservative as the always-safe one"},
        "certified_any": {"type": "boolean"},
        "chosen_index": {"type": ["integer", "null"], "minimum": 0, "description": "grid position of lambda_hat; null when nothing is certified"},
        "reason": {"type": ["string", "null"], "description": "why nothing was certified; null otherwise"},
        "delta": {**_open_unit, "description": "risk tolerance δ"},
        "epsilon": {**_open_unit, "description": "allowed failure probability ε"},
        "n": {"type": "integer", "minimum": 1, "description": "number of calibration examples"},
        "pvalue_method": {"type": "string", "minLength": 1, "description": "canonical name of the p-value (binomial, hoeffding, hoeffding-kl, bentkus, hoeffding-bentkus, wsr); load refuses unknown names and aliases"},
        "procedure": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "params"],
            "properties": {"name": {"type": "string", "minLength": 1}, "params": {"type": "object"}},
        },
        "order": {"enum": ["descending", "ascending"], "description": "a-priori grid order, most conservative first"},
        "lambdas": {**_number_array, "description": "candidate grid in its a-priori order"},
        "empirical_risk": {**_unit_array, "description": "mean loss per candidate"},
        "pvalues": {**_unit_array, "description": "p-value of H_j: E[L(λ_j)] > δ per candidate; load recomputes them from empirical_risk, n and delta (all methods but WSR)"},
        "certified": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "description": "the procedure's rejections at epsilon; load re-derives them from pvalues"},
        "costs": {"anyOf": [_number_array, {"type": "null"}], "description": "per-candidate cost used to choose λ, or null"},
        "wsr_seed": {"type": ["integer", "null"], "minimum": 0, "description": "seed of the example shuffle (WSR only)"},
        "metadata": {"type": "object", "description": "free-form: model and tokenizer fingerprints, decoder configuration, dataset fingerprint, ..."},
        "digest": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$", "description": "SHA-256 of the canonical JSON of all other fields; detects edits, not a signature"},
        "pareto": {
            "type": "object",
            "description": (
                "Pareto Testing only (procedure pareto-testing; absent otherwise): the split, every risk's "
                "delta, optimisation and testing risks and p-values, the tested order, the configurations, "
                "the safe index and the configuration to decode with. docs/certification.md#pareto-testing"
            ),
            "required": ["split", "risks", "tested_order", "safe_index", "configurations", "configuration"],
            "properties": {
                "split": {
                    "type": "object",
                    "required": ["fraction", "seed", "n_optimisation", "n_testing"],
                    "properties": {
                        "fraction": _open_unit,
                        "seed": {"type": "integer", "minimum": 0},
                        "n_optimisation": {"type": "integer", "minimum": 1},
                        "n_testing": {"type": "integer", "minimum": 1},
                    },
                },
                "risks": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "delta", "optimisation_risk", "testing_risk", "pvalues"],
                        "properties": {
                            "name": {"type": "string"},
                            "delta": _open_unit,
                            "optimisation_risk": _unit_array,
                            "testing_risk": _unit_array,
                            "pvalues": _unit_array,
                        },
                    },
                },
                "tested_order": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                "safe_index": {"type": "integer", "minimum": 0},
                "configurations": {"anyOf": [{"type": "array", "items": {"type": "object"}}, {"type": "null"}]},
                "configuration": {"type": ["object", "null"]},
            },
        },
    },
}


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, UTF-8, floats as shortest repr, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _to_json_value(value: Any, where: str) -> Any:
    """Convert numpy scalars/arrays and tuples to plain JSON types; refuse what JSON cannot hold."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if not math.isfinite(value):
            raise CertificateError(f"{where} is {value!r}; JSON (and the certificate) needs finite numbers")
        return value
    if isinstance(value, np.ndarray):
        return [_to_json_value(v, f"{where}[{i}]") for i, v in enumerate(value.tolist())]
    if isinstance(value, (list, tuple)):
        return [_to_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise CertificateError(f"{where} has a non-string key {key!r}; JSON object keys must be strings")
            out[key] = _to_json_value(item, f"{where}[{key!r}]")
        return out
    raise CertificateError(f"{where} has a value of type {type(value).__name__} that JSON cannot hold")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Certificate:
    """A Learn-Then-Test certificate. Lists have one entry per candidate, in grid order (K,).

    Build it with :func:`ltt_exit.certify.certify`; construct directly only to rebuild one.
    Construction checks internal consistency (lengths, ranges, chosen index vs certified set).
    """

    lambda_hat: float
    certified_any: bool
    chosen_index: int | None
    delta: float
    epsilon: float
    n: int
    pvalue_method: str
    procedure: dict
    order: str
    lambdas: list
    empirical_risk: list
    pvalues: list
    certified: list
    reason: str | None = None
    costs: list | None = None
    wsr_seed: int | None = None
    metadata: dict = field(default_factory=dict)
    #: Pareto Testing record (``ltt_exit.certify.pareto``); None for single-grid certificates
    pareto: dict | None = None
    created_at: str = field(default_factory=_now)
    ltt_exit_version: str = __version__
    schema_version: int = SCHEMA_VERSION

    # ------------------------------------------------------------------ construction checks
    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        for name in ("lambdas", "empirical_risk", "pvalues"):
            set_(name, [float(v) for v in _to_json_value(getattr(self, name), name)])
        set_("certified", [bool(v) for v in _to_json_value(self.certified, "certified")])
        if self.costs is not None:
            set_("costs", [float(v) for v in _to_json_value(self.costs, "costs")])
        set_("procedure", _to_json_value(self.procedure, "procedure"))
        set_("metadata", _to_json_value(self.metadata, "metadata"))
        if self.pareto is not None:
            set_("pareto", _to_json_value(self.pareto, "pareto"))
        set_("lambda_hat", float(_to_json_value(self.lambda_hat, "lambda_hat")))
        set_("delta", float(_to_json_value(self.delta, "delta")))
        set_("epsilon", float(_to_json_value(self.epsilon, "epsilon")))
        if isinstance(self.n, bool) or not isinstance(self.n, numbers.Integral):
            raise CertificateError(f"n must be a whole number; got {self.n!r}")
        set_("n", int(self.n))
        set_("certified_any", bool(self.certified_any))
        if self.chosen_index is not None:
            set_("chosen_index", int(self.chosen_index))
        if self.wsr_seed is not None:
            set_("wsr_seed", int(self.wsr_seed))
        self._check()

    def _check(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise CertificateError(
                f"unknown certificate schema version {self.schema_version!r}; this ltt-exit reads version {SCHEMA_VERSION}"
            )
        for name in ("delta", "epsilon"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise CertificateError(f"{name} must be strictly between 0 and 1; got {value!r}")
        if self.n < 1:
            raise CertificateError(f"n must be at least 1; got {self.n}")
        k = len(self.lambdas)
        if k == 0:
            raise CertificateError("the candidate grid (lambdas) is empty")
        for name in ("empirical_risk", "pvalues", "certified") + (("costs",) if self.costs is not None else ()):
            if len(getattr(self, name)) != k:
                raise CertificateError(f"{name} has {len(getattr(self, name))} entries but the grid has {k}")
        for name in ("empirical_risk", "pvalues"):
            bad = [v for v in getattr(self, name) if not 0.0 <= v <= 1.0]
            if bad:
                raise CertificateError(f"{name} must lie in [0, 1]; found {bad[0]!r}")
        if self.order not in ("descending", "ascending"):
            raise CertificateError(f"order must be 'descending' or 'ascending'; got {self.order!r}")
        steps = np.diff(self.lambdas)
        # A Pareto Testing certificate's lambdas are each configuration's λ: a space, not a grid.
        not_monotone = (self.order == "descending" and (steps >= 0).any()) or (self.order == "ascending" and (steps <= 0).any())
        if self.pareto is None and not_monotone:
            raise CertificateError(f"lambdas are not strictly {self.order}")
        if self.certified_any != any(self.certified):
            raise CertificateError("certified_any disagrees with the certified list")
        if self.certified_any:
            j = self.chosen_index
            if j is None or not 0 <= j < k or not self.certified[j]:
                raise CertificateError(f"chosen_index {j!r} is not a certified candidate")
            if self.lambda_hat != self.lambdas[j]:
                raise CertificateError(f"lambda_hat {self.lambda_hat!r} is not lambdas[{j}] = {self.lambdas[j]!r}")
        else:
            if self.chosen_index is not None:
                raise CertificateError("chosen_index must be null when nothing is certified")
            if not self.reason:
                raise CertificateError("a certificate that certifies nothing must say why (reason)")
        if not isinstance(self.procedure, dict) or set(self.procedure) != {"name", "params"}:
            raise CertificateError("procedure must be {'name': ..., 'params': {...}}")
        if not isinstance(self.metadata, dict):
            raise CertificateError("metadata must be a JSON object (dict)")
        if self.pareto is not None:
            self._check_pareto(k)

    def _check_pareto(self, k: int) -> None:
        pareto = self.pareto
        if not isinstance(pareto, dict) or not isinstance(pareto.get("risks"), list) or not pareto["risks"]:
            raise CertificateError("pareto must be a dict with a non-empty risks list")
        for r, risk in enumerate(pareto["risks"]):
            for name in ("optimisation_risk", "testing_risk", "pvalues"):
                if not isinstance(risk, dict) or len(risk.get(name) or []) != k:
                    raise CertificateError(f"pareto.risks[{r}].{name} must have one entry per configuration ({k})")
        order = pareto.get("tested_order") or []
        if any(not isinstance(j, int) or not 0 <= j < k for j in order) or len(set(order)) != len(order):
            raise CertificateError("pareto.tested_order must list distinct configuration indices")
        safe = pareto.get("safe_index")
        if not isinstance(safe, int) or not 0 <= safe < k:
            raise CertificateError(f"pareto.safe_index must be a configuration index in [0, {k - 1}]")
        if not self.certified_any and self.lambda_hat != self.lambdas[safe]:
            raise CertificateError(f"lambda_hat {self.lambda_hat!r} is not the safe configuration's λ {self.lambdas[safe]!r}")

    # ------------------------------------------------------------------ derived values
    @property
    def n_candidates(self) -> int:
        return len(self.lambdas)

    @property
    def n_certified(self) -> int:
        return sum(self.certified)

    @property
    def chosen_risk(self) -> float | None:
        """Empirical risk of the chosen candidate (None when nothing is certified)."""
        return None if self.chosen_index is None else self.empirical_risk[self.chosen_index]

    @property
    def chosen_pvalue(self) -> float | None:
        return None if self.chosen_index is None else self.pvalues[self.chosen_index]

    @property
    def digest(self) -> str:
        """``"sha256:<hex>"`` of the canonical JSON of every field but the digest."""
        return "sha256:" + hashlib.sha256(canonical_json(self._content())).hexdigest()

    def _content(self) -> dict:
        content = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if content["pareto"] is None:  # single-grid certificates keep the original fields and digest
            del content["pareto"]
        return content

    def to_dict(self) -> dict:
        """The certificate as plain JSON types, including ``digest``."""
        content = self._content()
        content["digest"] = self.digest
        return json.loads(canonical_json(content))

    def to_json(self) -> str:
        """Human-readable JSON (indented, fields in a fixed order)."""
        content = self.to_dict()
        ordered = {name: content[name] for name in CERTIFICATE_SCHEMA["required"]}
        if "pareto" in content:
            ordered["pareto"] = content["pareto"]
        return json.dumps(ordered, indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the certificate as JSON, atomically (temp file in the same folder + rename)."""
        atomic_write_text(path, self.to_json())

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "certificate") -> "Certificate":
        """Rebuild a certificate from parsed JSON, checking version, JSON Schema and digest."""
        if not isinstance(data, dict):
            raise CertificateError(f"{source}: a certificate is a JSON object, got {type(data).__name__}")
        if "schema_version" not in data:
            raise CertificateError(f"{source}: no schema_version field; this is not an ltt-exit certificate")
        version = data["schema_version"]
        if version != SCHEMA_VERSION or isinstance(version, bool):
            raise CertificateError(
                f"{source}: unknown certificate schema version {version!r}; this ltt-exit "
                f"({__version__}) reads version {SCHEMA_VERSION}"
            )
        non_finite = first_non_finite(data)
        if non_finite is not None:
            raise CertificateError(
                f"{source}: field {non_finite[0]!r} is {non_finite[1]!r}; JSON has no NaN or Infinity and a "
                "certificate holds finite numbers only"
            )
        _validate_schema(data, source)
        content = {k: v for k, v in data.items() if k != "digest"}
        # Digest first (an edit gets the clearest message), then the consistency checks.
        recomputed = "sha256:" + hashlib.sha256(canonical_json(content)).hexdigest()
        if recomputed != data["digest"]:
            raise CertificateError(
                f"{source}: digest mismatch — the file was edited or corrupted after it was written "
                f"(stored {data['digest']}, content gives {recomputed}). The digest detects "
                "changes; it is not a signature. Re-run ltt-calibrate to produce a fresh certificate."
            )
        try:
            certificate = cls(**content)
        except CertificateError as exc:
            raise CertificateError(f"{source}: {exc}") from None
        if certificate.digest != recomputed:  # e.g. an integer where a float belongs
            raise CertificateError(f"{source}: the content does not survive normalisation; refusing it")
        if certificate.pareto is not None:  # the digest is no signature: re-derive the decision
            from ltt_exit.certify.pareto_rule import ParetoRecordError, rederive_record

            try:
                rederive_record(certificate)
            except ParetoRecordError as exc:
                raise CertificateError(f"{source}: {exc}") from None
        else:
            _check_rederivation(data, source)
        return certificate

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Certificate":
        """Read and validate a certificate file (JSON, schema version, JSON Schema, digest)."""
        source = os.fspath(path)
        try:
            with open(path, "rb") as handle:
                raw = handle.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"certificate file {source!r} does not exist") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CertificateError(
                f"{source}: not valid JSON ({exc}); the file is truncated or corrupted"
            ) from None
        return cls.from_dict(data, source=source)

    # ------------------------------------------------------------------ display
    def summary(self) -> str:
        """A few lines for humans: chosen λ, its risk and p-value, how many candidates passed."""
        if self.pareto is not None:
            return self._pareto_summary()
        k = self.n_candidates
        method = f"p-value: {self.pvalue_method}; procedure: {self.procedure['name']}"
        if self.certified_any:
            j = self.chosen_index
            lines = [
                f"Certified λ = {self.lambda_hat!r} (candidate {j + 1} of {k} in grid order)",
                f"  empirical risk {self.empirical_risk[j]:.4g} (δ = {self.delta:g}), "
                f"p-value {self.pvalues[j]:.3g} (ε = {self.epsilon:g}), n = {self.n}",
                f"  {self.n_certified} of {k} candidates certified; {method}",
            ]
            if self.costs is not None:
                lines.append(f"  cost at the chosen λ: {self.costs[j]:.4g} (lowest among certified)")
        else:
            lines = [
                f"Nothing certified: λ = {self.lambda_hat!r} (always-safe fallback)",
                f"  reason: {self.reason}",
                f"  0 of {k} candidates certified at δ = {self.delta:g}, ε = {self.epsilon:g}, n = {self.n}; {method}",
            ]
        return "\n".join(lines)


    def _pareto_summary(self) -> str:
        pareto, k = self.pareto, self.n_candidates
        split = pareto["split"]
        index = self.chosen_index if self.certified_any else pareto["safe_index"]
        head = (
            f"Pareto Testing certified configuration {index} of {k}" if self.certified_any
            else f"Nothing certified: safe configuration {index} of {k} (the full model)"
        )
        lines = [head]
        if pareto.get("configuration") is not None:
            lines.append(f"  configuration: {json.dumps(pareto['configuration'], sort_keys=True)}")
        for risk in pareto["risks"]:
            lines.append(
                f"  {risk['name']}: testing risk {risk['testing_risk'][index]:.4g} (δ = {risk['delta']:g}), "
                f"p-value {risk['pvalues'][index]:.3g}"
            )
        if not self.certified_any:
            lines.append(f"  reason: {self.reason}")
        lines.append(
            f"  ε = {self.epsilon:g}, n = {self.n} (optimisation {split['n_optimisation']}, testing "
            f"{split['n_testing']}, split seed {split['seed']}); {len(pareto['tested_order'])} configurations "
            f"tested along the Pareto front, {self.n_certified} certified; p-value: {self.pvalue_method}"
        )
        if self.costs is not None:
            lines.append(f"  cost: {self.costs[index]:.4g}")
        return "\n".join(lines)


def _check_rederivation(data: dict, source: str) -> None:
    """Refuse a record whose decision does not follow from its own evidence (the digest is no signature)."""
    from ltt_exit.certify.rederive import disagreements, rederive

    try:
        problems = disagreements(data, rederive(data))
    except InputError as exc:
        raise CertificateError(f"{source}: {exc}; refusing to trust its decision") from None
    except (ValueError, TypeError, OverflowError) as exc:  # numbers numpy cannot handle, e.g. a 400-digit n
        raise CertificateError(f"{source}: its evidence cannot be re-derived ({exc}); refusing it") from None
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CertificateError(
            f"{source}: {problems[0]}{more}. The decision does not follow from the certificate's own evidence; "
            "the file was edited. Re-run ltt-calibrate."
        )


def _validate_schema(data: dict, source: str) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(CERTIFICATE_SCHEMA)
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise CertificateError(f"{source}: does not match the certificate schema at {where}: {error.message}")
