"""Checks for everything that crosses into ltt-exit from outside: files, CLI options, public arguments.

One layer for every boundary, so that bad input fails the same way everywhere: a one-line message
that names the file or argument (and the field inside a file), what was expected and what came in.

* :class:`InputError` is the base class of every *expected* failure — bad input, a file that is not
  what it should be, a refused certificate. The library's own error types (``CertificateError``,
  ``LossTableError``, ``CertificateMismatch`` …) derive from it, and the command-line tools
  (:mod:`ltt_exit.cli._run`) turn it into one line on stderr and exit status 2.
* :class:`InputTypeError` is an :class:`InputError` that is also a ``TypeError`` (a value of the wrong
  type), so callers that catch ``TypeError`` keep working.
* The ``check_*`` functions return the cleaned value or raise one of the two.

``where`` arguments name the thing being checked, e.g. ``"n"``, ``"--delta"`` or
``"losses.csv.meta.json: field 'lambdas'"``. This module imports neither torch nor numpy at load
time; the tensor checks use only the tensor's own methods.
"""
from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping
from typing import Any, Iterable

__all__ = [
    "InputError",
    "InputTypeError",
    "field",
    "check_real",
    "check_whole",
    "check_open_unit",
    "check_json_object",
    "check_string",
    "check_string_list",
    "check_number_list",
    "first_non_finite",
    "check_token_id",
    "check_token_id_rows",
    "check_token_id_tensor",
    "check_attention_mask",
    "check_eos_token_ids",
    "check_thresholds",
    "check_tau",
]


class InputError(ValueError):
    """An expected failure: bad input, a file that is not what it should be, a refused certificate."""


class InputTypeError(InputError, TypeError):
    """An expected failure caused by a value of the wrong type."""


def field(source: str, name: str) -> str:
    """``"<source>: field '<name>'"`` — how a value inside a file is named in messages."""
    return f"{source}: field {name!r}"


def _item(where: str, index: int) -> str:
    """Name element ``index`` of ``where``: ``lambdas[2]``, or ``...: field 'lambdas[2]'`` for a quoted field."""
    if where.endswith("'") and " field '" in where:
        return f"{where[:-1]}[{index}]'"
    return f"{where}[{index}]"


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy.bool_ without importing numpy


# ---------------------------------------------------------------------- numbers
def check_real(value: Any, where: str, *, finite: bool = True, minimum: float | None = None,
               maximum: float | None = None) -> float:
    """``value`` as a float: a real number of any numeric type (int, float, numpy scalar), not a bool or
    a string. ``finite`` refuses NaN and ±inf; ``minimum`` / ``maximum`` are inclusive bounds."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"{where} must be a real number; got {_describe(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer with hundreds of digits
        raise InputError(f"{where} must be a finite number; got an integer of {len(str(abs(int(value))))} digits") from None
    if math.isnan(number) or (finite and math.isinf(number)):
        raise InputError(f"{where} must be a finite number; got {number!r}")
    if minimum is not None and number < minimum:
        raise InputError(f"{where} must be at least {minimum!r}; got {number!r}")
    if maximum is not None and number > maximum:
        raise InputError(f"{where} must be at most {maximum!r}; got {number!r}")
    return number


def check_whole(value: Any, where: str, *, minimum: int | None = None) -> int:
    """``value`` as an int: an integer of any integer type (not a bool, not 2.0, not a string)."""
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise InputTypeError(f"{where} must be a whole number (an integer); got {_describe(value)}")
    number = int(value)
    if minimum is not None and number < minimum:
        raise InputError(f"{where} must be at least {minimum}; got {number}")
    return number


def check_open_unit(value: Any, where: str) -> float:
    """A real number strictly between 0 and 1 (δ, ε)."""
    number = check_real(value, where)
    if not 0.0 < number < 1.0:
        raise InputError(f"{where} must be strictly between 0 and 1; got {number!r}")
    return number


# ---------------------------------------------------------------------- parsed JSON / YAML
def check_json_object(value: Any, where: str) -> dict:
    """A JSON object (dict with string keys)."""
    if not isinstance(value, Mapping):
        raise InputTypeError(f"{where} must be a JSON object; got {_describe(value)}")
    bad = next((k for k in value if not isinstance(k, str)), None)
    if bad is not None:
        raise InputTypeError(f"{where} must have string keys; got key {bad!r}")
    return dict(value)


def check_string(value: Any, where: str, *, allow_none: bool = False, nonempty: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        wanted = "a string or null" if allow_none else "a string"
        raise InputTypeError(f"{where} must be {wanted}; got {_describe(value)}")
    if nonempty and not value:
        raise InputError(f"{where} must not be empty")
    return value


def check_string_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, (list, tuple)):
        raise InputTypeError(f"{where} must be a list of strings; got {_describe(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise InputTypeError(f"{_item(where, i)} must be a string; got {_describe(item)}")
    return list(value)


def check_number_list(value: Any, where: str, *, nonempty: bool = True) -> list[float]:
    """A list of finite real numbers (as floats); strings such as "0.5" are refused, not converted."""
    if not isinstance(value, (list, tuple)):
        raise InputTypeError(f"{where} must be a list of numbers; got {_describe(value)}")
    if nonempty and not value:
        raise InputError(f"{where} must not be empty")
    return [check_real(item, _item(where, i)) for i, item in enumerate(value)]


def first_non_finite(data: Any, path: str = "") -> tuple[str, float] | None:
    """``(path, value)`` of the first NaN or ±inf float inside nested JSON data, or None.

    Paths read like ``pvalues[2]`` or ``metadata.decoder.tau``. ``json.loads`` accepts the
    non-standard tokens ``NaN`` and ``Infinity``; a loader calls this to name the field they are in.
    """
    if isinstance(data, float):
        return None if math.isfinite(data) else (path or "(top level)", data)
    if isinstance(data, Mapping):
        for key, item in data.items():
            found = first_non_finite(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(data, (list, tuple)):
        for i, item in enumerate(data):
            found = first_non_finite(item, f"{path}[{i}]")
            if found:
                return found
    return None


# ---------------------------------------------------------------------- decoder arguments
def check_token_id(value: Any, where: str) -> int:
    """One token id: an integer of any integer type (Python, numpy, 0-d integer tensor), >= 0.

    Floats are refused rather than truncated (1.7 is not token 1), and so are bools and strings.
    """
    if _is_bool(value) or isinstance(value, (str, bytes, float)):
        raise InputTypeError(f"{where} must be an integer token id; got {_describe(value)}")
    dtype = getattr(value, "dtype", None)
    if dtype is not None and (getattr(dtype, "is_floating_point", False) or str(dtype) in ("torch.bool", "bool")):
        raise InputTypeError(f"{where} must be an integer token id; got {_describe(value)}")
    try:
        token = operator.index(value)
    except TypeError:
        raise InputTypeError(f"{where} must be an integer token id; got {_describe(value)}") from None
    if token < 0:
        raise InputError(f"{where} must be a token id >= 0; got {token}")
    return token


def check_token_id_rows(rows: Any, where: str = "input_ids") -> list[list[int]]:
    """A list of token-id lists (the un-padded form of ``input_ids``) as lists of ints."""
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Iterable):
        raise InputTypeError(f"{where} must be a tensor or a list of token-id lists; got {_describe(rows)}")
    out = []
    for r, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not isinstance(row, Iterable):
            raise InputTypeError(f"{where}[{r}] must be a list of token ids; got {_describe(row)}")
        out.append([check_token_id(token, f"{where}[{r}][{c}]") for c, token in enumerate(row)])
    return out


def _tensor_kind(tensor: Any) -> str:
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        return "float"
    return "bool" if str(tensor.dtype) == "torch.bool" else "int"


def check_token_id_tensor(tensor: Any, where: str = "input_ids") -> Any:
    """An integer tensor of token ids; a float or bool tensor is refused instead of truncated."""
    if _tensor_kind(tensor) != "int":
        raise InputTypeError(f"{where} must be an integer tensor of token ids; got dtype {tensor.dtype}")
    return tensor


def check_attention_mask(mask: Any, where: str = "attention_mask") -> Any:
    """A tensor of 0s and 1s (integer or bool): any other value would corrupt prompt lengths and positions."""
    if not hasattr(mask, "dtype") or not hasattr(mask, "ndim"):
        raise InputTypeError(f"{where} must be a tensor of 0s and 1s; got {_describe(mask)}")
    kind = _tensor_kind(mask)
    if kind == "float":
        raise InputTypeError(f"{where} must be an integer or bool tensor of 0s and 1s; got dtype {mask.dtype}")
    if kind == "int" and bool(((mask != 0) & (mask != 1)).any()):
        bad = mask[(mask != 0) & (mask != 1)].reshape(-1)[0].item()
        raise InputError(f"{where} must hold only 0 (padding) and 1 (token); found {bad}")
    return mask


def check_eos_token_ids(value: Any, where: str = "eos_token_id") -> set[int] | None:
    """None (the model's default), one integer id, or an iterable of integer ids ([] never stops early).

    A string is refused: iterating "13" would stop on tokens 1 and 3.
    """
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        raise InputTypeError(f"{where} must be an integer token id or a list of them, not a string; got {value!r}")
    if getattr(value, "ndim", None) == 0 or isinstance(value, numbers.Number):
        return {check_token_id(value, where)}
    if not isinstance(value, Iterable):
        raise InputTypeError(f"{where} must be an integer token id or a list of them; got {_describe(value)}")
    return {check_token_id(item, f"{where}[{i}]") for i, item in enumerate(value)}


def check_thresholds(threshold: Any, batch_size: int, where: str = "threshold") -> list[float]:
    """One float per row from a real number or a per-row sequence / 1-D array / tensor of real numbers.

    Every numeric type is accepted (int, float, numpy and 0-d tensor scalars); strings and bools are
    refused. Values must be >= 0 and not NaN; +inf (never exit) is allowed.
    """
    def one(value, name):
        if getattr(value, "ndim", None) == 0 and hasattr(value, "item") and not isinstance(value, numbers.Number):
            value = value.item()  # a 0-d tensor or array; a bool one comes out as bool and is refused
        if _is_bool(value) or not isinstance(value, numbers.Real):
            raise InputTypeError(f"{name} must be a real number; got {_describe(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer with hundreds of digits: as good as ±inf here
            number = math.copysign(math.inf, value)
        if not number >= 0.0:  # NaN fails this too
            raise InputError(f"{name} must be >= 0 (and not NaN); got {number!r}")
        return number

    if isinstance(threshold, numbers.Number) or getattr(threshold, "ndim", None) == 0:
        return [one(threshold, where)] * batch_size
    if isinstance(threshold, (str, bytes, Mapping)) or not isinstance(threshold, Iterable):
        raise InputTypeError(f"{where} must be a real number or one per row; got {_describe(threshold)}")
    items = threshold.tolist() if hasattr(threshold, "tolist") else list(threshold)
    values = [one(item, f"{where}[{i}]") for i, item in enumerate(items)]
    if len(values) != batch_size:
        raise InputError(f"got {len(values)} thresholds for a batch of {batch_size} rows; give one per row or one number")
    return values


def check_tau(value: Any, where: str = "tau") -> float:
    """The threshold decay τ: a finite real number >= 0 (τ = inf would make λ_0 = NaN)."""
    return check_real(value, where, minimum=0.0)
