"""The fitting examples' provenance and the calibration-overlap checks.

The certificate's guarantee needs calibration examples the decoder (adapters included) did not see. An
adapter file keeps :class:`ExampleHashes` of its fitting examples (ids, prompts, long text fields);
``ExitAdapters.check_disjoint`` refuses a calibration set that shares any of them, and :func:`fitting_set`
refuses to draw fitting prompts from the calibration split unless the calibration sample is excluded.
:func:`fit_set_digest` identifies an ordered fitting set (recorded in ``fit_info``).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import CalibrationOverlap

__all__ = ["ExampleHashes", "canonical_json", "fit_set_digest", "fitting_set"]

#: text fields at least this long are hashed (shorter values, e.g. labels, collide by chance)
_MIN_FIELD_CHARS = 32


def _short_hash(*parts: str) -> str:
    digest = hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()
    return digest[:24]  # 96 bits: collisions are not a practical concern for sets of this size


_HASH_FIELDS = ("ids", "prompts", "texts", "recipes", "sources")


@dataclass
class ExampleHashes:
    """Hashes of the fitting examples, kept in the adapter file to check calibration sets against.

    ids:     hashes of the example ids (compared only for the same recipe name or the same source)
    prompts: hashes of the formatted prompts
    texts:   hashes of every text field of at least 32 characters (the dialogue, the article, ...),
             so that the same document under another template or recipe name is still recognised
    recipes / sources: the recipe names and source descriptions the examples came from
    """

    ids: set[str] = field(default_factory=set)
    prompts: set[str] = field(default_factory=set)
    texts: set[str] = field(default_factory=set)
    recipes: set[str] = field(default_factory=set)
    sources: set[str] = field(default_factory=set)

    @staticmethod
    def _example_parts(example) -> tuple[str, str, list[str]]:
        texts = [
            _short_hash("text", value)
            for name, value in sorted(getattr(example, "fields", {}).items())
            if name != "id" and isinstance(value, str) and len(value.strip()) >= _MIN_FIELD_CHARS
        ]
        return _short_hash("id", str(example.id)), _short_hash("prompt", str(example.prompt)), texts

    @classmethod
    def of(cls, examples: Iterable, *, recipe: str, source: str) -> "ExampleHashes":
        hashes = cls(recipes={recipe}, sources={source})
        for example in examples:
            id_hash, prompt_hash, texts = cls._example_parts(example)
            hashes.ids.add(id_hash)
            hashes.prompts.add(prompt_hash)
            hashes.texts.update(texts)
        return hashes

    def overlapping(self, calibration_set) -> list[str]:
        """Ids of the calibration examples that were (or share a document with) fitting examples."""
        recipe, source = getattr(calibration_set, "recipe", None), getattr(calibration_set, "source", None)
        return [str(example.id) for example in calibration_set.examples
                if self.overlaps(example, recipe=recipe, source=source)]

    def overlaps(self, example, *, recipe: str | None, source: str | None) -> bool:
        """Whether ``example`` (of data set ``recipe`` / ``source``) was, or shares a document with, a fitting
        example; ids count only within the same recipe name or source (positional ids collide across data)."""
        id_hash, prompt_hash, texts = self._example_parts(example)
        same_data = recipe in self.recipes or source in self.sources
        return prompt_hash in self.prompts or any(t in self.texts for t in texts) or (same_data and id_hash in self.ids)

    def union(self, other: "ExampleHashes | None") -> "ExampleHashes":
        """A new set holding the hashes of both."""
        return ExampleHashes(**{key: set(getattr(self, key)) | (set(getattr(other, key)) if other else set())
                                for key in _HASH_FIELDS})

    def to_json(self) -> dict[str, Any]:
        return {key: sorted(getattr(self, key)) for key in _HASH_FIELDS}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ExampleHashes":
        return cls(**{key: set(data.get(key, [])) for key in _HASH_FIELDS})

    def __len__(self) -> int:
        return len(self.prompts)


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def fit_set_digest(examples) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(canonical_json([str(example.id), str(example.prompt)]))
    return "sha256:" + digest.hexdigest()


def fitting_set(
    recipe,
    *,
    size: int | None,
    seed: int = 0,
    split: str | None = None,
    data_files=None,
    data_dir=None,
    family: str = "decoder-only",
    tokenizer: Any = None,
    exclude=None,
):
    """The fitting examples: ``size`` examples (seeded sample) of ``recipe``'s ``split`` that are not in
    ``exclude`` (a CalibrationSet, or a list of them).

    Refuses (CalibrationOverlap, a ValueError) to draw from the recipe's calibration split — ``split`` None or equal to the
    recipe's own split — unless ``exclude`` gives the calibration sample to leave out. For recipes with one
    split only (aclsum ``all``, gensim), pass the calibration sample as ``exclude``: fitting then uses a
    seeded sample of the remaining rows. Returns (examples, info dict for the adapter file).
    """
    from ltt_exit.recipes import load_recipe

    if isinstance(recipe, (str, os.PathLike)):
        recipe = load_recipe(recipe)
    excluded = [] if exclude is None else (list(exclude) if isinstance(exclude, (list, tuple)) else [exclude])
    fit_split = recipe.split if split is None else split
    if fit_split == recipe.split and not excluded:
        raise CalibrationOverlap(
            f"refusing to fit exit adapters on the split {fit_split!r}: it is the split recipe {recipe.name!r} "
            "calibrates on, and calibration examples must not be seen by the decoder. Fit on another split "
            "(e.g. split='test' with data_files=<that split's file>), or give the calibration sample to exclude "
            "(exclude=<CalibrationSet>; ltt-fit-exits: --calibration-size N [--calibration-seed S] "
            "[--calibration-data-files FILE])."
        )
    pool = recipe.load(size="all", seed=seed, split=fit_split, data_files=data_files, data_dir=data_dir,
                       family=family, tokenizer=tokenizer)
    hashes = [ExampleHashes.of(c.examples, recipe=c.recipe, source=c.source) for c in excluded]
    keep = []
    for example in pool.examples:
        if any(h.overlaps(example, recipe=pool.recipe, source=pool.source) for h in hashes):
            continue
        keep.append(example)
        if size is not None and len(keep) == size:
            break
    if not keep:
        raise ValueError(f"no fitting examples left in split {fit_split!r} of recipe {recipe.name!r} after exclusion")
    if size is not None and len(keep) < size:
        import warnings

        warnings.warn(f"asked for {size} fitting examples but only {len(keep)} are available; using them all",
                      stacklevel=2)
    info = {
        "recipe": pool.recipe,
        "split": fit_split,
        "source": pool.source,
        "family": family,
        "sample_seed": seed,
        "n_prompts": len(keep),
        "fit_set_sha256": fit_set_digest(keep),
        "excluded": [
            {"recipe": c.recipe, "split": c.split, "n": len(c.examples), "seed": c.seed, "fingerprint": c.fingerprint}
            for c in excluded
        ],
    }
    return keep, info
