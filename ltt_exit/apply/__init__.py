"""Apply a certificate: decode with exactly the configuration that was certified, or refuse.

A certificate's guarantee holds only for the model, tokenizer and early-exit configuration it was
calibrated with (pruning renormalises the softmax, a scorer changes the confidence scale, another
dtype changes the numbers). :class:`CertifiedDecoder` rebuilds the decoder from the certificate,
checks the model fingerprint and every decoder setting against it, and decodes at the certified λ
with the certified token budget. Any difference is refused with a message naming what differs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ltt_exit.certificate import Certificate
from ltt_exit.validation import InputError

__all__ = ["CertificateMismatch", "CertifiedDecoder", "certified_exit_adapters", "decoder_settings", "config_differences"]


class CertificateMismatch(InputError):
    """The model or decoder configuration at hand is not the one the certificate was made for."""


def decoder_settings(config: dict[str, Any]) -> dict[str, Any]:
    """EarlyExitDecoder keyword arguments that rebuild the decoder described by ``config``."""
    try:
        return {
            "scorer": (config["scorer"]["name"], dict(config["scorer"]["params"])),
            "pruning": (config["pruning"]["name"], dict(config["pruning"]["params"])),
            "min_exit_layer": int(config["min_exit_layer"]),
            "tau": float(config["tau"]),
        }
    except (KeyError, TypeError) as err:
        raise CertificateMismatch(f"the certificate's decoder configuration is incomplete ({err})") from None


def config_differences(certified: Any, current: Any, path: str = "") -> list[str]:
    """Human-readable differences between two JSON-like values ("" paths name the root)."""
    if isinstance(certified, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(certified) | set(current), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in current:
                out.append(f"{where}: certified {certified[key]!r}, now absent")
            elif key not in certified:
                out.append(f"{where}: not in the certificate, now {current[key]!r}")
            else:
                out.extend(config_differences(certified[key], current[key], where))
        return out
    if isinstance(certified, (list, tuple)) and isinstance(current, (list, tuple)):
        if len(certified) == len(current):
            return [d for i, (a, b) in enumerate(zip(certified, current))
                    for d in config_differences(a, b, f"{path}[{i}]")]
    if certified != current:
        return [f"{path or 'value'}: certified {certified!r}, now {current!r}"]
    return []


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The decoder configuration without the exit-adapter file's path: the file is identified by its
    fingerprint, so a moved file is still the certified one."""
    record = config.get("exit_adapters")
    if isinstance(record, dict) and "path" in record:
        config = dict(config) | {"exit_adapters": {k: v for k, v in record.items() if k != "path"}}
    return config


def certified_exit_adapters(config: dict[str, Any], given: Any, model_fingerprint: str):
    """The exit adapters a certified decoder configuration needs (None when it has none).

    ``given``: a path or an ExitAdapters object to use instead of the path recorded in the certificate.
    Refuses (CertificateMismatch) a missing file, a file whose fingerprint is not the certified one, and
    adapters fitted for another model.
    """
    record = config.get("exit_adapters")
    if record is None:
        if given is not None:
            raise CertificateMismatch(
                "refusing to decode with exit adapters: the certificate was made without them"
            )
        return None
    from ltt_exit.decode.adapters import AdapterMismatch, ExitAdapters

    certified = record.get("fingerprint") if isinstance(record, dict) else None
    if not certified:
        raise CertificateMismatch("the certificate's exit-adapter record has no fingerprint")
    source = given if given is not None else record.get("path")
    if source is None:
        raise CertificateMismatch(
            f"the certificate was made with exit adapters {certified}; give their file (exit_adapters=PATH)"
        )
    try:
        if isinstance(source, ExitAdapters):
            adapters = source
            if adapters.fingerprint != certified:
                raise AdapterMismatch(f"the exit adapters given are {adapters.fingerprint}, not the certified {certified}")
            adapters.check_model(model_fingerprint)
        else:
            adapters = ExitAdapters.load(source, model_fingerprint=model_fingerprint, expected_fingerprint=certified)
    except FileNotFoundError:
        raise CertificateMismatch(
            f"the certificate needs the exit-adapter file {source} (fingerprint {certified}), which is not "
            "there; pass where it is now (exit_adapters=PATH, ltt-generate --exit-adapters PATH)"
        ) from None
    except AdapterMismatch as err:
        raise CertificateMismatch(f"refusing to decode: {err}") from None
    return adapters


def _check_pareto_configuration(certificate: Certificate) -> None:
    """A Pareto Testing certificate decodes with its chosen (or safe) configuration and nothing else:
    the decoder settings in the metadata and λ̂ must be that configuration's."""
    if certificate.pareto is None:
        return
    configuration = certificate.pareto.get("configuration")
    if not isinstance(configuration, dict) or "decoder" not in configuration or "lambda" not in configuration:
        raise CertificateMismatch("the Pareto Testing certificate does not record the configuration to decode with")
    differences = config_differences(configuration["decoder"], certificate.metadata.get("decoder"))
    if differences:
        raise CertificateMismatch(
            "refusing to decode: the metadata's decoder settings are not the certified configuration's: "
            + "; ".join(differences))
    if float(configuration["lambda"]) != certificate.lambda_hat:
        raise CertificateMismatch(
            f"refusing to decode: λ̂ = {certificate.lambda_hat!r} is not the certified configuration's "
            f"λ = {configuration['lambda']!r}")


class CertifiedDecoder:
    """An EarlyExitDecoder bound to a certificate.

    certificate: a :class:`Certificate` or the path of its JSON file (validated on load).
    model:       a LoadedModel (from :func:`ltt_exit.models.load_model`), a model name/path to load,
                 or None to load the model the certificate names.
    device:      where to run ("cpu", "cuda", …; default: CUDA when present).
    exit_adapters: where the certified exit-adapter file is now (a path or a loaded ExitAdapters), when it
                 moved since certification; default: the path recorded in the certificate. Its fingerprint
                 must equal the certified one.
    fast:        decode with :class:`~ltt_exit.decode.FastEarlyExitDecoder` (static buffers, CUDA graphs on
                 a GPU, lagged host reads; docs/decoder.md) instead of the reference decoder the sweep
                 calibrated with. Same exit rule and configuration, so the certificate applies; outputs
                 are identical in float64 and the same tokens were seen in float32, but on a GPU in
                 bfloat16 other kernels can flip a borderline exit decision now and then. Default False.
    """

    def __init__(self, certificate: Certificate | str | Path, model: Any = None, *, device=None,
                 exit_adapters: Any = None, fast: bool = False):
        self.certificate = certificate if isinstance(certificate, Certificate) else Certificate.load(certificate)
        meta = self.certificate.metadata
        _check_pareto_configuration(self.certificate)
        for key in ("model_fingerprint", "decoder", "max_new_tokens"):
            if key not in meta:
                raise CertificateMismatch(
                    f"the certificate has no {key!r} in its metadata: it was certified from a loss table "
                    "that did not come from an ltt-exit sweep, so there is no decoder configuration to apply"
                )
        from ltt_exit.models import LoadedModel, load_model

        if isinstance(model, LoadedModel):
            loaded = model
        else:
            name = model if model is not None else meta.get("model", {}).get("name")
            if name is None:
                raise CertificateMismatch("the certificate does not name its model; pass the model explicitly")
            dtype = meta["decoder"].get("dtype")
            loaded = load_model(str(name), device=device, dtype=dtype)
        if loaded.fingerprint != meta["model_fingerprint"]:
            detail = ""
            certified_parts = meta.get("model_fingerprint_parts")
            if certified_parts:
                from ltt_exit.models import fingerprint_parts

                now = fingerprint_parts(loaded.model, loaded.tokenizer)
                differing = [k for k in certified_parts if certified_parts.get(k) != now.get(k)]
                detail = f" ({', '.join(differing) or 'some part'} differ)"
            raise CertificateMismatch(
                f"refusing to decode: the model {loaded.name!r} (fingerprint {loaded.fingerprint}) is not the model "
                f"this certificate was made for (fingerprint {meta['model_fingerprint']}){detail}. "
                "Certify again for this model with ltt-calibrate."
            )
        from ltt_exit.decode import EarlyExitDecoder, FastEarlyExitDecoder

        self.loaded = loaded
        adapters = certified_exit_adapters(meta["decoder"], exit_adapters, loaded.fingerprint)
        decoder_class = FastEarlyExitDecoder if fast else EarlyExitDecoder
        self.decoder = decoder_class(loaded.model, loaded.tokenizer, **decoder_settings(meta["decoder"]),
                                     exit_adapters=adapters)
        differences = config_differences(_comparable(meta["decoder"]), _comparable(self.decoder.config_dict()))
        if differences:
            raise CertificateMismatch(
                "refusing to decode: the decoder configuration differs from the certified one: "
                + "; ".join(differences)
            )
        self.threshold = float(self.certificate.lambda_hat)
        self.max_new_tokens = int(meta["max_new_tokens"])

    @property
    def prompt_format(self) -> str:
        return self.certificate.metadata.get("prompt_format", "raw")

    def format(self, text: str) -> str:
        """Format a user's text the way the calibration prompts were (chat template or raw)."""
        if self.prompt_format == "chat-template":
            from ltt_exit.models import format_prompt

            return format_prompt(self.loaded, None, text)
        return text

    def generate(self, texts: Sequence[str], *, max_new_tokens: int | None = None, formatted: bool = False):
        """Decode ``texts`` at the certified λ. Returns one DecodedSequence per text.

        ``max_new_tokens`` other than the certified budget is refused: the budget is part of the
        certified configuration (it sets the threshold decay and the output length the risk was measured on).
        """
        if max_new_tokens is not None and int(max_new_tokens) != self.max_new_tokens:
            raise CertificateMismatch(
                f"refusing to decode with max_new_tokens={max_new_tokens}: the certificate was made for "
                f"max_new_tokens={self.max_new_tokens}"
            )
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ValueError("no prompts to decode")
        prompts = list(texts) if formatted else [self.format(t) for t in texts]
        return self.decoder.generate(prompts, threshold=self.threshold, max_new_tokens=self.max_new_tokens)
