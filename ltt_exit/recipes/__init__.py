"""Calibration-set recipes: declarative YAML files (``calibration_sets/``) turned into prompts,
references and a dataset fingerprint.

    from ltt_exit.recipes import load_recipe
    calibration = load_recipe("samsum").load(data_dir="../shared/data", size=200, tokenizer=tok)
    calibration.prompts, calibration.references, calibration.fingerprint

This package does not import torch.
"""
from __future__ import annotations

from .recipe import (
    FAMILIES,
    INDEX_COLUMN,
    CalibrationSet,
    Example,
    Recipe,
    available_recipes,
    load_recipe,
    recipe_search_path,
)
from .sources import SOURCES, DataUnavailableError, Source

__all__ = [
    "FAMILIES",
    "INDEX_COLUMN",
    "SOURCES",
    "CalibrationSet",
    "DataUnavailableError",
    "Example",
    "Recipe",
    "Source",
    "available_recipes",
    "load_recipe",
    "recipe_search_path",
]
