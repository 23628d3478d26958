"""What a recipe produces: one calibration prompt (:class:`Example`) and the sampled set
(:class:`CalibrationSet`) with what identifies it (recipe, split, template, seed, fingerprint).

``ltt_exit.recipes.recipe`` builds these from a YAML recipe; everything downstream (the sweep, the
fitting sets, the benchmarks) only reads them. This module does not import torch.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Union

__all__ = ["CalibrationSet", "Example", "Reference"]

Reference = Union[str, list, None]


@dataclass(frozen=True)
class Example:
    """One calibration prompt.

    ``prompt`` is formatted for the model family (chat template applied when a tokenizer was
    given); ``reference`` is one string, a list of acceptable strings, or None; ``fields`` holds
    every declared field's value for this row.
    """

    id: str
    prompt: str
    reference: Reference
    fields: dict[str, Any]


@dataclass(frozen=True)
class CalibrationSet:
    """The sampled examples of a recipe, in sample order, with what identifies them."""

    recipe: str
    examples: list[Example]
    metric: str
    max_new_tokens: int
    fingerprint: str
    family: str
    split: str
    source: str
    template: str
    seed: int
    n_available: int
    n_skipped: int = 0
    chat_template_applied: bool = False

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    @property
    def ids(self) -> list[str]:
        return [example.id for example in self.examples]

    @property
    def prompts(self) -> list[str]:
        return [example.prompt for example in self.examples]

    @property
    def references(self) -> list[Reference]:
        return [example.reference for example in self.examples]

    @property
    def has_references(self) -> bool:
        return all(example.reference is not None for example in self.examples)

    def describe(self) -> str:
        """A short human-readable summary (several lines)."""
        lines = [
            f"recipe {self.recipe}: {len(self)} of {self.n_available} usable examples "
            f"(seed {self.seed}; {self.n_skipped} rows skipped for empty fields)",
            f"  source: {self.source}",
            f"  split: {self.split}; family: {self.family}"
            + ("; chat template applied" if self.chat_template_applied else ""),
            f"  template: {self.template!r}",
            f"  metric: {self.metric}; max_new_tokens: {self.max_new_tokens}; "
            f"references: {'yes' if self.has_references else 'no (textual consistency only)'}",
            f"  fingerprint: {self.fingerprint}",
        ]
        if self.examples:
            first = self.examples[0].prompt.replace("\n", "\\n")
            lines.append(f"  first prompt: {first[:160]}{'…' if len(first) > 160 else ''}")
        return "\n".join(lines)
