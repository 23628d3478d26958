"""The exit-ready model artefact: a peft LoRA adapter folder (or a full model folder) plus ``manifest.json``.

    <folder>/adapter_config.json, adapter_model.safetensors   (LoRA; peft's own files)
    <folder>/config.json, model.safetensors, tokenizer files   (full fine-tune; transformers' own files)
    <folder>/manifest.json    {"format": "ltt-exit-ready", base model name + fingerprint, training
                               configuration, training-data provenance and example hashes}

``load_exit_ready(folder)`` (what ``load_model(folder)`` calls for such a folder) loads the base model
named in the manifest, refuses it when its fingerprint is not the recorded one, applies the adapter
and merges it into the weights (a merged model decodes at the base model's speed). The returned
model's fingerprint is the merged weights', so loss tables, certificates and ltt-generate treat the
exit-ready model as the distinct model it is.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["MANIFEST_NAME", "MANIFEST_FORMAT", "ExitReadyMismatch", "is_exit_ready", "read_manifest",
           "write_manifest", "save_lora", "load_exit_ready", "training_hashes", "check_training_disjoint"]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "ltt-exit-ready"
MANIFEST_VERSION = 1


class ExitReadyMismatch(ValueError):
    """The exit-ready artefact does not fit the base model it names (other weights, tokenizer or shape)."""


def is_exit_ready(folder: Path) -> bool:
    """Whether ``folder`` holds an exit-ready manifest."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == MANIFEST_FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of ``folder``; ValueError naming the file when it is not an exit-ready manifest."""
    path = Path(folder) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable exit-ready manifest ({error})") from None
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: not an exit-ready manifest of version {MANIFEST_VERSION} "
                         f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})")
    for key in ("kind", "base_model"):
        if key not in manifest:
            raise ValueError(f"{path}: manifest lacks {key!r}")
    return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def write_manifest(folder: Path, *, kind: str, base_name: str, base_fingerprint: str, training: dict[str, Any],
                   data: dict[str, Any], hashes: Any, metrics: dict[str, Any] | None = None,
                   base_dtype: str | None = None) -> Path:
    """Write ``manifest.json`` atomically; the weight files' sha256 are recorded with it."""
    from ltt_exit._atomic import atomic_write_text

    folder = Path(folder)
    weights = sorted(p for p in folder.glob("*.safetensors"))
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "kind": kind,
        "base_model": {"name": base_name, "fingerprint": base_fingerprint, "dtype": base_dtype},
        "training": training,
        "data": data,
        "example_hashes": hashes.to_json() if hashes is not None else None,
        "metrics": metrics or {},
        "files": {p.name: _sha256(p) for p in weights},
    }
    path = folder / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path


def save_lora(peft_model, folder: Path, *, dtype=None) -> None:
    """peft's adapter files for ``peft_model``, the adapter tensors stored in ``dtype`` (None: as trained)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(peft_model)
    state = {name: (t.detach().to("cpu", dtype) if dtype is not None else t.detach().cpu()).contiguous()
             for name, t in state.items()}
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_model.peft_config["default"].save_pretrained(str(folder))


def training_hashes(manifest: dict[str, Any]):
    """The ExampleHashes of the training prompts recorded in a manifest (None when absent)."""
    from ltt_exit.decode.adapters.overlap import ExampleHashes

    data = manifest.get("example_hashes")
    return ExampleHashes.from_json(data) if data else None


def check_training_disjoint(manifest: dict[str, Any], calibration_set) -> None:
    """CalibrationOverlap naming the examples of ``calibration_set`` the exit-ready model was trained on."""
    from ltt_exit.decode.adapters.errors import CalibrationOverlap

    hashes = training_hashes(manifest)
    if hashes is None:
        return
    overlapping = hashes.overlapping(calibration_set)
    if overlapping:
        shown = ", ".join(overlapping[:5]) + (" …" if len(overlapping) > 5 else "")
        raise CalibrationOverlap(
            f"{len(overlapping)} of {len(calibration_set)} calibration examples of {calibration_set.recipe!r} were "
            f"training prompts of this exit-ready model ({shown}); calibrate on examples it never saw (another "
            f"split, seed or recipe)")


def _check_files(folder: Path, manifest: dict[str, Any]) -> None:
    for name, recorded in (manifest.get("files") or {}).items():
        path = folder / name
        if not path.is_file():
            raise ExitReadyMismatch(f"{folder}: {name} named in {MANIFEST_NAME} is missing")
        if _sha256(path) != recorded:
            raise ExitReadyMismatch(f"{path} differs from the file recorded in {MANIFEST_NAME} (edited or replaced)")


def load_exit_ready(folder: str | os.PathLike[str], *, load_base, load_full, dtype=None, cache_dir=None):
    """(model, tokenizer, family, source, fingerprint, manifest) of the exit-ready folder, merged, on the CPU.

    Refuses (ExitReadyMismatch) a base model whose fingerprint differs from the manifest's and weight files
    that differ from those recorded. ``load_base`` is ``ltt_exit.models.load_model`` and ``load_full`` its
    transformers-folder loader ((model, tokenizer, family, source, fingerprint) of a folder); the caller
    hands them in so that this module does not import the loader that imports it.
    """

    folder = Path(folder)
    manifest = read_manifest(folder)
    _check_files(folder, manifest)
    base = manifest["base_model"]
    if manifest["kind"] == "full":
        model, tokenizer, family, _, fingerprint = load_full(folder, dtype)
        source = f"exit-ready full model {folder} (fine-tuned from {base['name']})"
        return model, tokenizer, family, source, fingerprint, manifest
    if manifest["kind"] != "lora":
        raise ValueError(f"{folder / MANIFEST_NAME}: unknown kind {manifest['kind']!r}; expected 'lora' or 'full'")
    base_name = str(base["name"])
    if not Path(base_name).is_absolute() and (folder / base_name).exists():
        base_name = str(folder / base_name)  # a base stored next to the adapter, named relatively
    # the base in the dtype it was trained from (its fingerprint is that dtype's), merged, then cast
    loaded = load_base(base_name, device="cpu", dtype=base.get("dtype"), cache_dir=cache_dir)
    if loaded.fingerprint != base["fingerprint"]:
        raise ExitReadyMismatch(
            f"{folder}: the adapter was trained on base model {base['name']!r} with fingerprint "
            f"{base['fingerprint'][:23]}…, but that name now loads a model with fingerprint "
            f"{loaded.fingerprint[:23]}… (other weights, tokenizer or dtype); refusing to apply it")
    from peft import PeftModel
    from ltt_exit.models.fingerprint import model_fingerprint

    peft_model = PeftModel.from_pretrained(loaded.model, str(folder), is_trainable=False)
    peft_model.to(loaded.dtype)
    model = peft_model.merge_and_unload()
    if dtype is not None and dtype != "auto":
        model.to(dtype)
    model.eval()
    fingerprint = model_fingerprint(model, loaded.tokenizer)
    source = f"exit-ready LoRA {folder} merged into {base['name']!r} ({loaded.source})"
    return model, loaded.tokenizer, loaded.family, source, fingerprint, manifest
