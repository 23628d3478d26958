"""argparse value types shared by the command-line tools."""
from __future__ import annotations

import argparse
import json


def json_object(text: str) -> dict:
    """An option value that must be a JSON object, e.g. '{"k": 2000}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"k\": 2000}}', got {text!r}")
    return value


def open_unit(name: str):
    """An option value that must be a number strictly between 0 and 1 (δ, ε, a split fraction);
    ``name`` is the option, named in the error."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number strictly between 0 and 1; got {text!r}") from None
        if not 0.0 < value < 1.0:
            raise argparse.ArgumentTypeError(f"{name} must be strictly between 0 and 1; got {text}")
        return value

    return parse
