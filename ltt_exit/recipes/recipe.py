"""Calibration-set recipes: a small YAML file in, a deterministic list of prompts out.

A recipe names a data source, the fields it uses, one prompt template per model family, the
reference field, the per-example metric, the generation budget and a deterministic sample::

    name: samsum
    description: Summarise a chat dialogue in one sentence; reference = the human summary.
    source: {kind: hub, path: samsum}          # or aclsum / gensim / jsonl (see sources.py)
    split: validation
    local_file: samsum_validation.jsonl         # the file a --data-dir holds for this split
    fields:                                     # field -> column, or a list of candidates
      id: id
      dialogue: dialogue
      summary: summary
    truncate_words: {dialogue: 400}             # optional: keep the first N words of a field
    templates:
      t5: "summarize: {dialogue}"
      decoder-only: "Summarize the following dialogue in one sentence.\\n\\n{dialogue}"
    reference: summary                          # a field, or null (textual consistency only)
    metric: rouge-l                             # rouge-l | bleu | token-f1 | exact-match
    max_new_tokens: 64
    sample: {seed: 0, size: 500}                # size null: every usable row

Field columns may be dotted paths into nested rows (``answers.text``). When a field lists several
candidates, the first one present in a row is used; ``"@index"`` stands for the row's position
(for datasets without ids). Without an ``id`` field, ids are row positions.

``load_recipe(name_or_path, **overrides)`` finds a recipe by file path or by name (see
:func:`recipe_search_path`); ``Recipe.load(...)`` reads the data and returns a
:class:`CalibrationSet`. This module does not import torch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import string
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .calibration_set import CalibrationSet, Example
from .sources import SOURCES, Source, as_file_list

__all__ = [
    "FAMILIES",
    "INDEX_COLUMN",
    "CalibrationSet",
    "Example",
    "Recipe",
    "available_recipes",
    "load_recipe",
    "recipe_search_path",
]

FAMILIES = ("t5", "decoder-only")  # the same names as ltt_exit.models.prompting.FAMILIES
INDEX_COLUMN = "@index"
RECIPE_SUFFIXES = (".yaml", ".yml")
CALIBRATION_FINGERPRINT_VERSION = 1


_TOP_LEVEL_KEYS = {
    "name",
    "description",
    "source",
    "split",
    "local_file",
    "fields",
    "truncate_words",
    "templates",
    "reference",
    "metric",
    "max_new_tokens",
    "sample",
}


# ------------------------------------------------------------------------------ helpers


def _template_fields(template: str) -> list[str]:
    """Names used in a str.format template; only plain names are allowed."""
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(
            f"template {template!r} is not a valid format string ({error}); write literal braces as {{{{ }}}}"
        ) from None
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(
                f"template {template!r} uses the placeholder {{{name}}}; placeholders must be plain "
                "field names such as {text}"
            )
        names.append(name)
    return names


def _as_candidates(name: str, spec: Any) -> tuple[str, ...]:
    if isinstance(spec, str):
        candidates = (spec,)
    elif isinstance(spec, Sequence) and spec and all(isinstance(c, str) for c in spec):
        candidates = tuple(spec)
    else:
        raise ValueError(
            f"field {name!r} must map to a column name or a non-empty list of column names, got {spec!r}"
        )
    if INDEX_COLUMN in candidates and name != "id":
        raise ValueError(f"{INDEX_COLUMN!r} (the row position) can only be used for the id field")
    return candidates


_MISSING = object()


def _lookup(row: Mapping[str, Any], column: str) -> Any:
    """``row[column]`` for a dotted path into nested mappings; _MISSING if absent or None."""
    value: Any = row
    for part in column.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return _MISSING if value is None else value


def _truncate_words(text: str, max_words: int) -> str:
    """The first ``max_words`` whitespace-separated words of ``text``, original spacing kept."""
    words = list(re.finditer(r"\S+", text))
    if len(words) <= max_words:
        return text
    return text[: words[max_words - 1].end()]


def _is_blank(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return not value or all(_is_blank(v) for v in value)
    return False


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


# ------------------------------------------------------------------------------ recipe


@dataclass(frozen=True)
class Recipe:
    """A validated calibration-set recipe (see the module docstring for the YAML keys)."""

    name: str
    source: dict[str, Any]
    fields: dict[str, tuple[str, ...]]
    templates: dict[str, str]
    metric: str
    max_new_tokens: int
    description: str = ""
    split: str = "all"
    local_file: str | None = None
    truncate_words: dict[str, int] = field(default_factory=dict)
    reference: str | None = None
    sample_seed: int = 0
    sample_size: int | None = None
    origin: str | None = None  # the file it was read from

    def __post_init__(self) -> None:
        if isinstance(self.fields, Mapping) and self.fields:
            # Accept a column name or a list of candidates per field; store tuples.
            object.__setattr__(
                self, "fields", {str(k): _as_candidates(str(k), v) for k, v in self.fields.items()}
            )
        else:
            raise ValueError(f"recipe {self.name!r}: fields must be a non-empty mapping of field -> column(s)")
        self._validate()

    # -------------------------------------------------------------- construction / validation

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, origin: str | None = None) -> "Recipe":
        """Build a recipe from the YAML mapping; raises ValueError naming what is wrong."""
        where = f"recipe {origin or data.get('name', '?')!r}"
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
        unknown = set(data) - _TOP_LEVEL_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_TOP_LEVEL_KEYS)}")
        for key in ("name", "source", "fields", "templates", "metric", "max_new_tokens"):
            if key not in data:
                raise ValueError(f"{where}: missing the required key {key!r}")
        sample = data.get("sample") or {}
        if not isinstance(sample, Mapping) or set(sample) - {"seed", "size"}:
            raise ValueError(f"{where}: sample must be a mapping with keys seed and size, got {sample!r}")
        fields = data["fields"]
        if not isinstance(fields, Mapping) or not fields:
            raise ValueError(f"{where}: fields must be a non-empty mapping of field -> column(s)")
        return cls(
            name=data["name"],
            description=data.get("description") or "",
            source=dict(data["source"]) if isinstance(data["source"], Mapping) else data["source"],
            split=str(data.get("split", "all")),
            local_file=data.get("local_file"),
            fields=dict(fields),
            truncate_words=dict(data.get("truncate_words") or {}) if isinstance(data.get("truncate_words") or {}, Mapping)
            else data["truncate_words"],
            templates=dict(data["templates"]) if isinstance(data["templates"], Mapping) else data["templates"],
            reference=data.get("reference"),
            metric=data["metric"],
            max_new_tokens=data["max_new_tokens"],
            sample_seed=sample.get("seed", 0),
            sample_size=sample.get("size"),
            origin=origin,
        )

    def _validate(self) -> None:
        from ..metrics import METRICS

        where = f"recipe {self.origin or self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"{where}: recipe name must be a non-empty string, got {self.name!r}")
        # Types first, so that a list or a mapping where a name belongs gives this message rather than
        # "unhashable type" from a lookup below.
        for key, value in (("metric", self.metric), ("reference", self.reference), ("local_file", self.local_file),
                           ("description", self.description)):
            if not (isinstance(value, str) or (value is None and key in ("reference", "local_file"))):
                raise ValueError(f"{where}: {key} must be a string, got {value!r}")
        if not isinstance(self.source, Mapping) or not isinstance(self.source.get("kind"), str) \
                or self.source.get("kind") not in SOURCES:
            raise ValueError(
                f"{where}: source must be a mapping with kind one of {sorted(SOURCES)}, got {self.source!r}"
            )
        try:
            self._make_source()  # validates the source arguments
        except TypeError as error:  # an unknown or missing argument of the source kind
            raise ValueError(f"{where}: bad source arguments {self.source!r}: {error}") from None
        if not isinstance(self.templates, Mapping) or not self.templates:
            raise ValueError(f"{where}: templates must map a model family to a template string")
        if not isinstance(self.truncate_words, Mapping):
            raise ValueError(f"{where}: truncate_words must map field names to word limits")
        for family, template in self.templates.items():
            if not isinstance(family, str) or family not in FAMILIES:
                raise ValueError(f"{where}: template for unknown family {family!r}; families: {list(FAMILIES)}")
            if not isinstance(template, str):
                raise ValueError(f"{where}: the {family} template must be a string")
            unknown = [n for n in _template_fields(template) if n not in self.fields]
            if unknown:
                raise ValueError(
                    f"{where}: the {family} template references unknown field(s) {unknown}; "
                    f"declared fields: {sorted(self.fields)}. Add them under `fields` or fix the template."
                )
        if self.reference is not None and self.reference not in self.fields:
            raise ValueError(
                f"{where}: reference {self.reference!r} is not a declared field; declared: {sorted(self.fields)}"
            )
        for name, limit in self.truncate_words.items():
            if not isinstance(name, str) or name not in self.fields:
                raise ValueError(f"{where}: truncate_words names unknown field {name!r}")
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
                raise ValueError(f"{where}: truncate_words[{name!r}] must be a positive integer, got {limit!r}")
        if self.metric not in METRICS:
            raise ValueError(f"{where}: unknown metric {self.metric!r}; expected one of {sorted(METRICS)}")
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise ValueError(f"{where}: max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.sample_seed, int) or isinstance(self.sample_seed, bool) or self.sample_seed < 0:
            raise ValueError(f"{where}: sample seed must be a non-negative integer, got {self.sample_seed!r}")
        _check_size(self.sample_size, where)

    def _make_source(self) -> Source:
        args = {k: v for k, v in self.source.items() if k != "kind"}
        return SOURCES[self.source["kind"]](**args)

    def replace(self, **changes: Any) -> "Recipe":
        """A copy with some keys changed (validated). ``template=`` sets every family's template;
        ``fields`` may map to a column name or a list of candidates; ``seed``/``size`` change the
        default sample."""
        if "template" in changes:
            template = changes.pop("template")
            changes["templates"] = {family: template for family in FAMILIES}
        if "seed" in changes:
            changes["sample_seed"] = changes.pop("seed")
        if "size" in changes:
            changes["sample_size"] = changes.pop("size")
        valid = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - valid
        if unknown:
            raise ValueError(f"cannot override {sorted(unknown)}; overridable: {sorted(valid - {'origin'})}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a YAML-ready mapping (inverse of :meth:`from_dict`)."""
        return {
            "name": self.name,
            "description": self.description,
            "source": dict(self.source),
            "split": self.split,
            "local_file": self.local_file,
            "fields": {k: (v[0] if len(v) == 1 else list(v)) for k, v in self.fields.items()},
            "truncate_words": dict(self.truncate_words),
            "templates": dict(self.templates),
            "reference": self.reference,
            "metric": self.metric,
            "max_new_tokens": self.max_new_tokens,
            "sample": {"seed": self.sample_seed, "size": self.sample_size},
        }

    # -------------------------------------------------------------- loading data

    def _resolve_files(self, data_files, data_dir) -> list[Path]:
        if data_files is not None and data_dir is not None:
            raise ValueError("pass either data_files or data_dir, not both")
        if data_dir is not None:
            if not self.local_file:
                raise ValueError(
                    f"recipe {self.name!r} names no local_file to look for in data_dir; pass data_files= instead"
                )
            folder = Path(data_dir).expanduser()
            path = folder / self.local_file
            if not path.is_file():
                raise FileNotFoundError(
                    f"recipe {self.name!r} expects {self.local_file!r} in the data folder {folder}, but it is not there"
                )
            return [path]
        return as_file_list(data_files)

    def _row_values(self, row: Mapping[str, Any], index: int, source_label: str) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, candidates in self.fields.items():
            value = _MISSING
            for column in candidates:
                value = index if column == INDEX_COLUMN else _lookup(row, column)
                if value is not _MISSING:
                    break
            if value is _MISSING:
                keys = sorted(row) if isinstance(row, Mapping) else type(row).__name__
                raise ValueError(
                    f"recipe {self.name!r}: field {name!r} is missing in row {index} of {source_label} "
                    f"(looked for {list(candidates)}; the row has {keys}). Map the field to one of the "
                    f"row's columns, e.g. load_recipe({self.name!r}, fields={{..., {name!r}: 'column'}})."
                )
            values[name] = value
        return values

    def _normalise(self, name: str, value: Any, index: int) -> Any:
        """Template fields become str; the reference may be a str or a list of str."""
        if name == self.reference and isinstance(value, (list, tuple)):
            if not all(isinstance(v, str) for v in value):
                raise ValueError(
                    f"recipe {self.name!r}: reference field {name!r} in row {index} holds non-text items"
                )
            value = list(value)
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = str(value)
        else:
            raise ValueError(
                f"recipe {self.name!r}: field {name!r} in row {index} is a {type(value).__name__}, "
                "expected text (only the reference field may hold a list of texts)"
            )
        if name in self.truncate_words and isinstance(value, str):
            value = _truncate_words(value, self.truncate_words[name])
        return value

    def load(
        self,
        *,
        size: int | str | None = None,
        seed: int | None = None,
        data_files=None,
        data_dir: str | os.PathLike[str] | None = None,
        split: str | None = None,
        family: str = "decoder-only",
        tokenizer: Any = None,
    ) -> CalibrationSet:
        """Read the data, drop unusable rows, sample deterministically and format the prompts.

        ``size``/``seed``: override the recipe's sample (size None: the recipe's; "all" or the
        recipe's None: all rows, in the seeded order). A size larger than the usable rows warns and
        uses all of them.
        ``data_files``: local file(s) in the source's format instead of the package / hub data;
        ``data_dir``: a folder holding the recipe's ``local_file``. ``split`` overrides the
        recipe's split. ``family``: "t5" or "decoder-only"; with a ``tokenizer`` that has a chat
        template, decoder-only prompts are rendered through it
        (:func:`ltt_exit.models.prompting.format_prompt`).

        Rows whose template fields or reference are empty are skipped (counted in
        ``n_skipped``). Duplicate ids, a missing field, a non-text field and an empty result are
        errors.
        """
        if family not in FAMILIES:
            raise ValueError(f"unknown model family {family!r}; expected one of {list(FAMILIES)}")
        if family not in self.templates:
            raise ValueError(
                f"recipe {self.name!r} has no template for the {family} family; it has {sorted(self.templates)}"
            )
        where = f"recipe {self.name!r}"
        seed = self.sample_seed if seed is None else seed
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"{where}: seed must be a non-negative integer, got {seed!r}")
        size = self.sample_size if size is None else (None if size == "all" else size)
        _check_size(size, where)
        split = self.split if split is None else split
        files = self._resolve_files(data_files, data_dir)
        source = self._make_source()
        source_label = source.describe(split, files)
        template = self.templates[family]
        used = set(_template_fields(template)) | ({self.reference} if self.reference else set())

        rows: list[tuple[str, dict[str, Any]]] = []
        skipped = 0
        seen: dict[str, int] = {}
        for index, row in enumerate(source.rows(split, files)):
            values = self._row_values(row, index, source_label)
            values = {
                name: self._normalise(name, value, index) if name in used or name == "id" else value
                for name, value in values.items()
            }
            if any(_is_blank(values[name]) for name in used):
                skipped += 1
                continue
            example_id = str(values["id"]) if "id" in values else str(index)
            if example_id in seen:
                raise ValueError(
                    f"{where}: duplicate id {example_id!r} (rows {seen[example_id]} and {index}) in "
                    f"{source_label}; ids must be unique. Map id to another column or to '{INDEX_COLUMN}'."
                )
            seen[example_id] = index
            rows.append((example_id, values))
        if not rows:
            raise ValueError(
                f"{where}: empty calibration set: {source_label} gave no usable rows "
                f"({skipped} skipped for empty fields). Check the data files and the field mapping."
            )

        n_available = len(rows)
        if size is not None and size > n_available:
            warnings.warn(
                f"{where}: asked for {size} examples but only {n_available} are usable; using all of them",
                stacklevel=2,
            )
            size = n_available
        order = np.random.default_rng(int(seed)).permutation(n_available)
        if size is not None:
            order = order[:size]

        use_chat = False
        if tokenizer is not None and family == "decoder-only":
            from ..models.prompting import format_prompt, has_chat_template

            use_chat = has_chat_template(tokenizer)
        examples = []
        for position in order:
            example_id, values = rows[int(position)]
            text = template.format(**values)
            prompt = format_prompt(tokenizer, family, text) if use_chat else text
            reference = values.get(self.reference) if self.reference else None
            examples.append(Example(id=example_id, prompt=prompt, reference=reference, fields=values))

        content = hashlib.sha256()
        for example in examples:
            content.update(_canonical([example.id, example.prompt, example.reference]))
        fingerprint = "sha256:" + hashlib.sha256(
            _canonical(
                {
                    "version": CALIBRATION_FINGERPRINT_VERSION,
                    "recipe": self.name,
                    "source": self.source,
                    "split": split,
                    "family": family,
                    "template": template,
                    "truncate_words": self.truncate_words,
                    "reference": self.reference,
                    "ids": [example.id for example in examples],
                    "content_sha256": content.hexdigest(),
                }
            )
        ).hexdigest()
        return CalibrationSet(
            recipe=self.name,
            examples=examples,
            metric=self.metric,
            max_new_tokens=self.max_new_tokens,
            fingerprint=fingerprint,
            family=family,
            split=split,
            source=source_label,
            template=template,
            seed=int(seed),
            n_available=n_available,
            n_skipped=skipped,
            chat_template_applied=use_chat,
        )


def _check_size(size: Any, where: str) -> None:
    if size is None:
        return
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f"{where}: sample size must be a positive integer or None (all rows), got {size!r}")


# ------------------------------------------------------------------------------ finding recipes


def recipe_search_path() -> list[Path]:
    """Folders searched for recipes by name, in order.

    1. every folder in ``$LTT_EXIT_RECIPES`` (``os.pathsep``-separated);
    2. the package's built-in recipes, ``ltt_exit/recipes/builtin`` — a symbolic link to the
       repository's ``calibration_sets/`` (so an editable install and a built wheel both see the
       same files, with no copy in the repository);
    3. ``calibration_sets/`` beside the package in a source checkout (used if the link is lost,
       e.g. on a file system without symbolic links).
    """
    folders = [Path(p).expanduser() for p in os.environ.get("LTT_EXIT_RECIPES", "").split(os.pathsep) if p]
    here = Path(__file__).resolve().parent
    folders.append(Path(__file__).parent / "builtin")
    folders.append(here.parent.parent / "calibration_sets")
    unique: list[Path] = []
    for folder in folders:
        if folder.is_dir() and all(folder.resolve() != seen.resolve() for seen in unique):
            unique.append(folder)
    return unique


def available_recipes() -> dict[str, Path]:
    """Recipe name -> file, for every recipe on the search path (earlier folders win)."""
    found: dict[str, Path] = {}
    for folder in recipe_search_path():
        for path in sorted(folder.iterdir()):
            if path.suffix in RECIPE_SUFFIXES and path.stem not in found:
                found[path.stem] = path
    return found


def _read_recipe_file(path: Path) -> Recipe:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"recipe file {path} is not UTF-8 text: {error}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"recipe file {path} is not valid YAML: {error}") from None
    recipe = Recipe.from_dict(data, origin=str(path))
    return recipe


def load_recipe(name_or_path: str | os.PathLike[str], **overrides: Any) -> Recipe:
    """A recipe by name (see :func:`recipe_search_path`) or by YAML file path, with overrides.

    ``overrides`` are passed to :meth:`Recipe.replace`, e.g.
    ``load_recipe("jsonl", fields={"text": "question"}, template="Answer: {text}")``.
    """
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path:
        raise TypeError(f"name_or_path must be a recipe name or a file path, got {name_or_path!r}")
    path = Path(name_or_path).expanduser()
    if path.suffix in RECIPE_SUFFIXES or os.sep in name_or_path or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        recipe = _read_recipe_file(path)
    else:
        known = available_recipes()
        if name_or_path not in known:
            raise ValueError(
                f"unknown recipe {name_or_path!r}; available: {sorted(known)} (or pass a path to a YAML file)"
            )
        recipe = _read_recipe_file(known[name_or_path])
    return recipe.replace(**overrides) if overrides else recipe
