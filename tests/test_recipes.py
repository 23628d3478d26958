"""Recipe mechanics on small files the tests write: mapping, sampling, fingerprints, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ltt_exit.recipes import DataUnavailableError, Recipe, load_recipe
from ltt_exit.recipes.recipe import available_recipes, recipe_search_path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def qa_file(tmp_path):
    rows = [{"qid": f"q{i}", "question": f"What is {i}?", "gold": f"answer {i}"} for i in range(20)]
    return write_jsonl(tmp_path / "qa.jsonl", rows)


def qa_recipe(**changes):
    base = load_recipe(
        "jsonl",
        fields={"id": "qid", "text": "question", "answer": "gold"},
        reference="answer",
        template="Answer briefly.\n\n{text}",
        metric="token-f1",
    )
    return base.replace(**changes) if changes else base


class ChatTokenizer:
    """Stands in for a tokenizer with a chat template (format_prompt only calls this method)."""

    chat_template = "<fake>"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt is True and tokenize is False
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_jsonl_mapping_template_and_reference(qa_file):
    calibration = qa_recipe().load(data_files=qa_file, size=5)
    assert len(calibration) == 5
    assert calibration.metric == "token-f1" and calibration.max_new_tokens == 64
    example = calibration.examples[0]
    number = int(example.id[1:])
    assert example.prompt == f"Answer briefly.\n\nWhat is {number}?"
    assert example.reference == f"answer {number}"
    assert example.fields == {"id": example.id, "text": f"What is {number}?", "answer": f"answer {number}"}
    assert calibration.has_references
    assert "qa.jsonl" in calibration.source and "5 of 20" in calibration.describe()


def test_sample_is_the_seeded_permutation_of_the_source_order(qa_file):
    calibration = qa_recipe().load(data_files=qa_file, size=7, seed=3)
    expected = [f"q{i}" for i in np.random.default_rng(3).permutation(20)[:7]]
    assert calibration.ids == expected
    again = qa_recipe().load(data_files=qa_file, size=7, seed=3)
    assert again.ids == calibration.ids and again.fingerprint == calibration.fingerprint
    other = qa_recipe().load(data_files=qa_file, size=7, seed=4)
    assert other.ids != calibration.ids and other.fingerprint != calibration.fingerprint
    everything = qa_recipe().load(data_files=qa_file)  # jsonl recipe: size null = all rows
    assert sorted(everything.ids) == sorted(f"q{i}" for i in range(20))
    assert everything.ids[:7] == qa_recipe().load(data_files=qa_file, size=7).ids  # nested samples


def test_size_larger_than_available_warns_and_uses_all(qa_file):
    with pytest.warns(UserWarning, match="only 20 are usable"):
        calibration = qa_recipe().load(data_files=qa_file, size=50)
    assert len(calibration) == 20
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="sample size"):
            qa_recipe().load(data_files=qa_file, size=bad)
    with pytest.raises(ValueError, match="seed"):
        qa_recipe().load(data_files=qa_file, seed=-1)


def test_fingerprint_follows_content_family_and_template(tmp_path, qa_file):
    base = qa_recipe().load(data_files=qa_file, size=5)
    rows = [json.loads(line) for line in qa_file.read_text().splitlines()]
    rows[int(base.ids[0][1:])]["question"] = "A changed question?"
    changed_file = write_jsonl(tmp_path / "changed.jsonl", rows)
    changed = qa_recipe().load(data_files=changed_file, size=5)
    assert changed.ids == base.ids and changed.fingerprint != base.fingerprint
    moved = write_jsonl(tmp_path / "moved.jsonl", [json.loads(l) for l in qa_file.read_text().splitlines()])
    assert qa_recipe().load(data_files=moved, size=5).fingerprint == base.fingerprint  # path-independent
    assert qa_recipe().load(data_files=qa_file, size=5, family="t5").fingerprint != base.fingerprint
    other_template = qa_recipe(template="Q: {text}").load(data_files=qa_file, size=5)
    assert other_template.fingerprint != base.fingerprint


def test_chat_template_applied_for_decoder_only_with_tokenizer(qa_file):
    plain = qa_recipe().load(data_files=qa_file, size=3)
    chat = qa_recipe().load(data_files=qa_file, size=3, tokenizer=ChatTokenizer())
    assert chat.chat_template_applied and not plain.chat_template_applied
    for raw, formatted in zip(plain.examples, chat.examples):
        assert formatted.prompt == f"<user>{raw.prompt}</user><assistant>"
    assert chat.fingerprint != plain.fingerprint
    t5 = qa_recipe().load(data_files=qa_file, size=3, family="t5", tokenizer=ChatTokenizer())
    assert t5.prompts == plain.prompts and not t5.chat_template_applied


def test_candidate_columns_nested_paths_and_row_index(tmp_path):
    rows = [
        {"q": "first?", "answers": {"text": ["a", "b"], "answer_start": [0, 5]}},
        {"q": "second?", "answers": ["c"]},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    recipe = load_recipe(
        "jsonl",
        fields={"id": ["id", "@index"], "text": "q", "answers": ["answers.text", "answers"]},
        reference="answers",
    )
    calibration = recipe.load(data_files=path, seed=0)
    by_id = {example.id: example for example in calibration}
    assert by_id["0"].reference == ["a", "b"] and by_id["1"].reference == ["c"]
    with pytest.raises(ValueError, match="only be used for the id field"):
        recipe.replace(fields={"text": ["q", "@index"]})


def test_truncate_words_keeps_spacing(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": "one two\nthree  four five six"}])
    recipe = load_recipe("jsonl").replace(truncate_words={"text": 4})
    assert recipe.load(data_files=path).examples[0].prompt == "one two\nthree  four"
    with pytest.raises(ValueError, match="unknown field"):
        load_recipe("jsonl").replace(truncate_words={"nope": 3})


def test_blank_rows_are_skipped_and_counted(tmp_path):
    rows = [{"text": "kept"}, {"text": "   "}, {"text": ""}, {"text": "also kept"}]
    calibration = load_recipe("jsonl").load(data_files=write_jsonl(tmp_path / "b.jsonl", rows))
    assert sorted(calibration.prompts) == ["also kept", "kept"]
    assert calibration.n_skipped == 2 and calibration.n_available == 2


def test_missing_field_names_the_field_and_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"body": "hello"}])
    with pytest.raises(ValueError, match=r"field 'text' is missing in row 0.*\['body'\]"):
        load_recipe("jsonl").load(data_files=path)


def test_non_text_field_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": ["a", "list"]}])
    with pytest.raises(ValueError, match="expected text"):
        load_recipe("jsonl").load(data_files=path)


def test_empty_set_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty calibration set"):
        load_recipe("jsonl").load(data_files=empty)
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": " "}])
    with pytest.raises(ValueError, match="empty calibration set.*1 skipped"):
        load_recipe("jsonl").load(data_files=blank)


def test_duplicate_ids_are_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}])
    with pytest.raises(ValueError, match="duplicate id 'a'"):
        load_recipe("jsonl").load(data_files=path)


def test_invalid_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        load_recipe("jsonl").load(data_files=path)


def test_template_errors():
    with pytest.raises(ValueError, match=r"references unknown field\(s\) \['nope'\]"):
        load_recipe("jsonl", template="Say {nope}")
    with pytest.raises(ValueError, match="plain field names"):
        load_recipe("jsonl", template="Say {text.upper}")
    with pytest.raises(ValueError, match="not a valid format string"):
        load_recipe("jsonl", template="Say {text")
    braces = load_recipe("jsonl", template="{{literal}} {text}")
    assert braces.templates["t5"] == "{{literal}} {text}"


def test_family_errors(qa_file):
    only_decoder = qa_recipe().replace(templates={"decoder-only": "{text}"})
    with pytest.raises(ValueError, match="no template for the t5 family"):
        only_decoder.load(data_files=qa_file, family="t5")
    with pytest.raises(ValueError, match="unknown model family"):
        qa_recipe().load(data_files=qa_file, family="encoder")
    with pytest.raises(ValueError, match="unknown family"):
        qa_recipe().replace(templates={"gpt": "{text}"})


def test_recipe_validation_errors(tmp_path):
    good = load_recipe("jsonl").to_dict()
    for key, value, message in [
        ("metric", "rouge", "unknown metric"),
        ("max_new_tokens", 0, "max_new_tokens"),
        ("reference", "answer", "not a declared field"),
        ("source", {"kind": "ftp"}, "source must be a mapping"),
        ("source", {"kind": "hub"}, "needs `path`"),
        ("source", {"kind": "gensim", "flie": "x"}, "does not take"),
        ("fields", {}, "fields must be a non-empty mapping"),
    ]:
        with pytest.raises(ValueError, match=message):
            Recipe.from_dict({**good, key: value})
    with pytest.raises(ValueError, match="unknown keys"):
        Recipe.from_dict({**good, "metrics": "bleu"})
    with pytest.raises(ValueError, match="missing the required key 'templates'"):
        Recipe.from_dict({k: v for k, v in good.items() if k != "templates"})
    with pytest.raises(ValueError, match="cannot override"):
        load_recipe("jsonl", colour="blue")


def test_to_dict_round_trip():
    for name in ("squad", "jsonl", "aclsum-summary"):
        recipe = load_recipe(name)
        assert Recipe.from_dict(recipe.to_dict(), origin=recipe.origin) == recipe


def test_recipe_files_and_names(tmp_path, monkeypatch):
    import yaml

    data = load_recipe("jsonl").to_dict()
    data["name"] = "mine"
    data["description"] = "my own"
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "mine.yaml").write_text(yaml.safe_dump(data))
    assert load_recipe(str(folder / "mine.yaml")).description == "my own"
    with pytest.raises(ValueError, match="unknown recipe 'mine'"):
        load_recipe("mine")
    monkeypatch.setenv("LTT_EXIT_RECIPES", str(folder))
    assert recipe_search_path()[0] == folder
    assert load_recipe("mine").description == "my own"
    assert "squad" in available_recipes()  # built-ins still found after the user's folders
    (folder / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(str(folder / "broken.yaml"))
    with pytest.raises(FileNotFoundError):
        load_recipe(str(folder / "absent.yaml"))


def test_data_file_arguments(tmp_path, qa_file):
    recipe = load_recipe("samsum")
    with pytest.raises(ValueError, match="either data_files or data_dir"):
        recipe.load(data_files=qa_file, data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="expects 'samsum_validation.jsonl'"):
        recipe.load(data_dir=tmp_path)
    with pytest.raises(ValueError, match="names no local_file"):
        load_recipe("multi-news").load(data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="data file not found"):
        recipe.load(data_files=tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="pass data_files="):
        load_recipe("jsonl").load()


def test_hub_recipe_reads_local_files_in_the_dataset_format(tmp_path):
    # The hub layout of SQuAD (answers as a dict) and a flat layout both fit the squad recipe.
    hub_rows = [
        {"id": f"h{i}", "title": "T", "context": f"Context {i}.", "question": f"Q{i}?",
         "answers": {"text": [f"A{i}"], "answer_start": [0]}}
        for i in range(4)
    ]
    calibration = load_recipe("squad").load(data_files=write_jsonl(tmp_path / "hub.jsonl", hub_rows), family="t5", size=4)
    assert len(calibration) == 4
    first = calibration.examples[0]
    number = first.id[1:]
    assert first.prompt == f"question: Q{number}? context: Context {number}."
    assert first.reference == [f"A{number}"]

    csv_file = tmp_path / "samsum.csv"
    csv_file.write_text('id,dialogue,summary\n1,"A: hi\nB: hello",They greet.\n2,"A: bye",A leaves.\n')
    samsum = load_recipe("samsum").load(data_files=csv_file, family="t5", size=2)
    assert sorted(samsum.prompts) == ["summarize: A: bye", "summarize: A: hi\nB: hello"]


def test_hub_recipe_offline_says_to_pass_data_files():
    code = (
        "from ltt_exit.recipes import load_recipe\n"
        "try:\n"
        "    load_recipe('samsum').load()\n"
        "except Exception as error:\n"
        "    print(type(error).__name__); print(error)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert lines and lines[0] == DataUnavailableError.__name__, out.stdout + out.stderr
    assert "data_files=" in lines[1] and "'samsum'" in lines[1]


def test_recipes_do_not_import_torch(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    code = (
        "import sys; from ltt_exit.recipes import load_recipe\n"
        f"load_recipe('jsonl').load(data_files={str(path)!r}); load_recipe('gensim-lee').load(size=3)\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
