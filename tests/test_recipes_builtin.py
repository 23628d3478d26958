"""The shipped recipes: every file is valid, the offline ones load from their packages, and the
hub ones read the shared evaluation files (skipped when ../shared/data is absent)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from ltt_exit.recipes import load_recipe
from ltt_exit.recipes.recipe import _template_fields, available_recipes

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SHIPPED = {
    "aclsum-summary", "gensim-lee", "gensim-lee-continue", "squad", "samsum", "cnn-dailymail",
    "xsum", "multi-news", "big-patent", "iwslt2017-en-de", "jsonl",
}


def test_every_shipped_recipe_is_valid_and_named_after_its_file():
    found = available_recipes()
    assert SHIPPED <= set(found)
    for name in SHIPPED:
        recipe = load_recipe(name)
        assert recipe.name == name == Path(found[name]).stem
        assert recipe.description
        assert "decoder-only" in recipe.templates


def test_recipes_live_in_calibration_sets():
    # The packaged folder is a link to the repository's calibration_sets/ (no second copy).
    files = {p.stem for p in (REPO / "calibration_sets").glob("*.yaml")}
    assert SHIPPED <= files
    builtin = REPO / "ltt_exit" / "recipes" / "builtin"
    assert builtin.resolve() == (REPO / "calibration_sets").resolve()


def test_t5_prefixes_follow_the_seed_study():
    assert load_recipe("squad").templates["t5"] == "question: {question} context: {context}"
    assert load_recipe("samsum").templates["t5"] == "summarize: {dialogue}"
    assert load_recipe("iwslt2017-en-de").templates["t5"] == "translate English to German: {en}"
    assert load_recipe("samsum").templates["decoder-only"] == (
        "Summarize the following dialogue in one sentence.\n\n{dialogue}"
    )


def test_metrics_match_the_tasks():
    assert load_recipe("squad").metric == "token-f1"
    assert load_recipe("iwslt2017-en-de").metric == "bleu"
    for name in ("samsum", "cnn-dailymail", "xsum", "multi-news", "big-patent", "aclsum-summary"):
        assert load_recipe(name).metric == "rouge-l"


@pytest.mark.skipif(importlib.util.find_spec("aclsum") is None, reason="aclsum not installed")
def test_aclsum_summary_offline():
    calibration = load_recipe("aclsum-summary").load(family="t5")
    dataset = Path(importlib.util.find_spec("aclsum").submodule_search_locations[0]) / "dataset"
    rows = [json.loads(line) for name in ("train", "val", "test")
            for line in (dataset / f"{name}.jsonl").read_text().splitlines() if line.strip()]
    assert len(calibration) == len(rows) == calibration.n_available
    by_id = {row["id"]: row for row in rows}
    example = calibration.examples[0]
    row = by_id[example.id]
    assert example.prompt.startswith("summarize: ")
    # The abstract's first sentence, with the PTB spacing before commas and periods undone.
    first_sentence = row["sentences"]["abstract"][0].replace(" ,", ",").replace(" .", ".")
    assert first_sentence.split(" (")[0][:40] in example.prompt
    assert example.reference == " ".join(row["summary"][a] for a in ("challenge", "approach", "outcome"))
    test_ids = {json.loads(line)["id"] for line in (dataset / "test.jsonl").read_text().splitlines() if line.strip()}
    small = load_recipe("aclsum-summary").load(size=10, split="test")
    assert len(small) == 10 and set(small.ids) <= test_ids


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="gensim not installed")
def test_gensim_lee_offline():
    calibration = load_recipe("gensim-lee").load()
    corpus = Path(importlib.util.find_spec("gensim").submodule_search_locations[0]) / "test" / "test_data"
    lines = (corpus / "lee_background.cor").read_text(encoding="utf-8", errors="replace").splitlines()
    assert len(calibration) == len(lines) == 300
    assert not calibration.has_references and calibration.references == [None] * 300
    example = calibration.examples[0]
    number = int(example.id.rsplit("-", 1)[1])
    assert example.prompt.endswith(lines[number].strip())

    continuation = load_recipe("gensim-lee-continue").load(size=20)
    for example in continuation:
        article = lines[int(example.id.rsplit("-", 1)[1])].strip()
        lead = example.fields["lead"]
        assert article.startswith(lead) and len(lead) < len(article)
    with pytest.raises(ValueError, match="no template for the t5 family"):
        load_recipe("gensim-lee-continue").load(family="t5")


SHARED_CASES = [
    # recipe, file, rows, reference kind
    ("squad", "squad_v1.1_dev.jsonl", 10570, list),
    ("samsum", "samsum_validation.jsonl", 818, str),
    ("cnn-dailymail", "cnndm_test_frank250.jsonl", 250, str),
    ("xsum", "xsum_test_helm1000.jsonl", 1000, str),
    ("iwslt2017-en-de", "iwslt2017_en-de_tst2017.jsonl", 1138, str),
]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")
@pytest.mark.parametrize("name,filename,rows,reference_type", SHARED_CASES)
def test_shared_data(name, filename, rows, reference_type):
    recipe = load_recipe(name)
    assert recipe.local_file == filename
    calibration = recipe.load(data_dir=SHARED_DATA, size=40)
    assert calibration.n_available == rows and len(calibration) == 40
    assert all(isinstance(r, reference_type) and r for r in calibration.references)
    same = recipe.load(data_files=SHARED_DATA / filename, size=40)
    assert same.fingerprint == calibration.fingerprint and same.ids == calibration.ids

    source_rows = {}
    with open(SHARED_DATA / filename, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            source_rows[row["id"]] = row
    example = calibration.examples[0]
    row = source_rows[example.id]
    template = recipe.templates["decoder-only"]
    values = {field: row[field] for field in _template_fields(template)}
    for field, limit in recipe.truncate_words.items():
        if field in values:
            values[field] = " ".join(values[field].split()[:limit])
    # Truncation keeps the original spacing, so compare word sequences.
    assert example.prompt.split() == template.format(**values).split()


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")
def test_samsum_test_split_file_through_data_files():
    calibration = load_recipe("samsum").load(data_files=SHARED_DATA / "samsum_test.jsonl", split="test", size=30)
    assert calibration.n_available == 819 and calibration.split == "test"
