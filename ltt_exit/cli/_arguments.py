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
