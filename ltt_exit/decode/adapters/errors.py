"""The two refusals of the exit-adapter package: a file that does not belong to this model or decoder,
and a calibration set that shares examples with the adapters' fitting set."""
from __future__ import annotations

__all__ = ["AdapterMismatch", "CalibrationOverlap"]


class AdapterMismatch(ValueError):
    """The adapter file does not belong to this model or decoder (other model, shapes, edited file)."""


class CalibrationOverlap(ValueError):
    """Calibration examples were used to fit the exit adapters."""
