"""Where a recipe's rows come from: one small class per source kind, selected by name.

Every source yields plain ``dict`` rows in a fixed order; the recipe maps their keys to its fields.

* ``aclsum``: the ACLSum JSONL files inside the registry package ``aclsum`` (read directly; the
  package is never imported). Rows: id, title, abstract, introduction, conclusion, challenge,
  approach, outcome, summary (the three aspect summaries joined). Splits train / val / test / all.
* ``gensim``: a one-document-per-line corpus from gensim's test data (``gensim/test/test_data``),
  e.g. ``lee_background.cor`` (300 news articles) or ``lee.cor`` (50). Rows: id, text, lead (the
  first ``lead_sentences`` sentences).
* ``hub``: ``datasets.load_dataset(path, name, split=split)``. With ``data_files`` the same
  recipe reads local files in the dataset's own format instead
  (``load_dataset("json" | "csv" | "parquet", data_files=...)``).
* ``jsonl``: local JSON Lines files (one object per line), read with the standard library.

None of these imports torch.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "SOURCES",
    "Source",
    "AclsumSource",
    "GensimSource",
    "HubSource",
    "JsonlSource",
    "DataUnavailableError",
    "as_file_list",
]


class DataUnavailableError(OSError):
    """The data cannot be read here (hub unreachable, package missing): use local files."""


def as_file_list(data_files) -> list[Path]:
    """``data_files`` (a path or a list of paths) as existing files; clear error otherwise."""
    if data_files is None:
        return []
    if isinstance(data_files, (str, os.PathLike)):
        data_files = [data_files]
    elif isinstance(data_files, dict):
        raise TypeError(
            "data_files must be a path or a list of paths (the recipe's split names the split); "
            f"got a dict with keys {sorted(data_files)}"
        )
    files = [Path(f).expanduser() for f in data_files]
    if not files:
        raise ValueError("data_files is an empty list: give at least one file")
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"data file not found: {file}")
    return files


def _package_folder(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError(
            f"the package {pip_name!r} is not installed; install it with `pip install {pip_name}` "
            "or pass data_files= pointing at local files in its format"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _read_json_lines(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        first = handle.read(1)
        handle.seek(0)
        if first == "[" and path.suffix == ".json":  # a JSON array of objects
            rows = json.load(handle)
            if not isinstance(rows, list):
                raise ValueError(f"{path}: expected a JSON array of objects")
            for index, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: item {index} is not a JSON object")
                yield row
            return
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}, line {line_number}: not valid JSON ({error.msg}); expected one JSON "
                    "object per line (JSON Lines)"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {line_number}: expected a JSON object, got {type(row).__name__}")
            yield row


class Source:
    """A kind of data source. ``args`` are the recipe's ``source`` keys other than ``kind``."""

    kind: str = ""
    allowed_args: frozenset[str] = frozenset()

    def __init__(self, **args: Any) -> None:
        unknown = set(args) - self.allowed_args
        if unknown:
            raise ValueError(
                f"source kind {self.kind!r} does not take {sorted(unknown)}; allowed: {sorted(self.allowed_args)}"
            )
        self.args = args

    def rows(self, split: str, data_files: Sequence[Path]) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def describe(self, split: str, data_files: Sequence[Path]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.args})"


def detokenize_ptb(text: str) -> str:
    """Undo the spacing of PTB-style tokenised text ("word , word ( x )" -> "word, word (x)")."""
    text = re.sub(r" ([,.;:!?%)\]}])", r"\1", text)
    text = re.sub(r"([(\[{$]) ", r"\1", text)
    text = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)
    return text


class AclsumSource(Source):
    kind = "aclsum"
    allowed_args = frozenset({"detokenize"})
    SPLITS = ("train", "val", "test")
    SECTIONS = ("abstract", "introduction", "conclusion")
    ASPECTS = ("challenge", "approach", "outcome")

    def _files(self, split: str, data_files: Sequence[Path]) -> list[Path]:
        if data_files:
            return list(data_files)
        folder = _package_folder("aclsum", "aclsum") / "dataset"
        if split == "validation":
            split = "val"
        if split == "all":
            names = self.SPLITS
        elif split in self.SPLITS:
            names = (split,)
        else:
            raise ValueError(f"aclsum split must be one of {list(self.SPLITS) + ['all']}, got {split!r}")
        return [folder / f"{name}.jsonl" for name in names]

    def rows(self, split: str, data_files: Sequence[Path]) -> Iterator[dict[str, Any]]:
        detokenize = self.args.get("detokenize", True)
        for path in self._files(split, data_files):
            for raw in _read_json_lines(path):
                row: dict[str, Any] = {"id": raw.get("id"), "title": raw.get("title")}
                for section in self.SECTIONS:
                    sentences = (raw.get("sentences") or {}).get(section)
                    if sentences is not None:
                        text = " ".join(sentences)
                        row[section] = detokenize_ptb(text) if detokenize else text
                summaries = raw.get("summary") or {}
                for aspect in self.ASPECTS:
                    if aspect in summaries:
                        row[aspect] = summaries[aspect]
                if all(aspect in summaries for aspect in self.ASPECTS):
                    row["summary"] = " ".join(summaries[a].strip() for a in self.ASPECTS)
                yield row

    def describe(self, split: str, data_files: Sequence[Path]) -> str:
        where = ", ".join(map(str, data_files)) if data_files else "the aclsum package"
        return f"ACLSum, split {split!r}, from {where}"


# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) before a space
# and a capital letter or digit.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")


class GensimSource(Source):
    kind = "gensim"
    allowed_args = frozenset({"file", "lead_sentences"})

    def _file(self, data_files: Sequence[Path]) -> list[Path]:
        if data_files:
            return list(data_files)
        name = self.args.get("file", "lee_background.cor")
        folder = _package_folder("gensim", "gensim") / "test" / "test_data"
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"gensim test corpus {name!r} not found in {folder}")
        return [path]

    def rows(self, split: str, data_files: Sequence[Path]) -> Iterator[dict[str, Any]]:
        lead_sentences = int(self.args.get("lead_sentences", 2))
        if lead_sentences < 1:
            raise ValueError(f"lead_sentences must be at least 1, got {lead_sentences}")
        for path in self._file(data_files):
            stem = path.name.split(".")[0]
            with open(path, encoding="utf-8", errors="replace") as handle:
                for number, line in enumerate(handle):
                    text = line.strip()
                    sentences = _SENTENCE_END.split(text)
                    yield {
                        "id": f"{stem}-{number:04d}",
                        "text": text,
                        "lead": " ".join(sentences[:lead_sentences]),
                    }

    def describe(self, split: str, data_files: Sequence[Path]) -> str:
        where = ", ".join(map(str, data_files)) if data_files else f"gensim test data {self.args.get('file', 'lee_background.cor')}"
        return f"one document per line from {where}"


_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


class HubSource(Source):
    kind = "hub"
    allowed_args = frozenset({"path", "name", "format"})

    def __init__(self, **args: Any) -> None:
        super().__init__(**args)
        if not isinstance(self.args.get("path"), str):
            raise ValueError("a hub source needs `path`, the dataset id (e.g. squad)")

    def _local_format(self, data_files: Sequence[Path]) -> str:
        if "format" in self.args:
            return self.args["format"]
        formats = {_LOCAL_FORMATS.get(f.suffix.lower()) for f in data_files}
        if len(formats) != 1 or None in formats:
            raise ValueError(
                f"cannot tell the format of {[str(f) for f in data_files]}: use files ending in "
                f"{sorted(_LOCAL_FORMATS)} (all the same kind), or set `format` in the recipe's source"
            )
        return formats.pop()

    def rows(self, split: str, data_files: Sequence[Path]) -> Iterator[dict[str, Any]]:
        import datasets

        if data_files:
            dataset = datasets.load_dataset(
                self._local_format(data_files),
                data_files={split: [str(f) for f in data_files]},
                split=split,
            )
        else:
            path, name = self.args["path"], self.args.get("name")
            try:
                dataset = datasets.load_dataset(path, name, split=split)
            except OSError as error:  # ConnectionError, offline mode, not in the local cache
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise DataUnavailableError(
                    f"cannot load the hub dataset {path!r}"
                    + (f" (config {name!r})" if name else "")
                    + f", split {split!r}: {reason}. The hub is unreachable (or offline mode is on) "
                    "and the dataset is not in the local datasets cache. Pass data_files= pointing "
                    "at local files of this split in the dataset's own format (JSON Lines, CSV or "
                    "Parquet with the dataset's columns), e.g. recipe.load(data_files='test.jsonl')."
                ) from error
        yield from dataset

    def describe(self, split: str, data_files: Sequence[Path]) -> str:
        if data_files:
            return f"local files {', '.join(map(str, data_files))} (in the format of hub dataset {self.args['path']!r})"
        name = f", config {self.args['name']!r}" if self.args.get("name") else ""
        return f"hub dataset {self.args['path']!r}{name}, split {split!r}"


class JsonlSource(Source):
    kind = "jsonl"
    allowed_args = frozenset({"path"})

    def _files(self, data_files: Sequence[Path]) -> list[Path]:
        if data_files:
            return list(data_files)
        if "path" in self.args:
            return as_file_list(self.args["path"])
        raise ValueError(
            "this recipe reads local JSON Lines files: pass data_files='my_data.jsonl' "
            "(one JSON object per line)"
        )

    def rows(self, split: str, data_files: Sequence[Path]) -> Iterator[dict[str, Any]]:
        for path in self._files(data_files):
            yield from _read_json_lines(path)

    def describe(self, split: str, data_files: Sequence[Path]) -> str:
        return f"JSON Lines {', '.join(map(str, self._files(data_files)))}"


SOURCES: dict[str, type[Source]] = {
    AclsumSource.kind: AclsumSource,
    GensimSource.kind: GensimSource,
    HubSource.kind: HubSource,
    JsonlSource.kind: JsonlSource,
}
