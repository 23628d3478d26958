"""The configuration space (YAML / inline, product and explicit lists) and its sweep on a tiny
random model: every configuration matches decoding it on its own, λ = 1 has zero loss, the table
round-trips, a killed sweep resumes, a time budget stops early and bad spaces are refused."""
from __future__ import annotations

import numpy as np
import pytest

from ltt_exit.decode import EarlyExitDecoder
from ltt_exit.decode.tiny_models import tiny_llama, tiny_word_tokenizer
from ltt_exit.recipes.recipe import CalibrationSet, Example
from ltt_exit.space_table import SpaceTable, SpaceTableError, is_space_table
from ltt_exit.sweep.partial import PartialSweepMismatch
from ltt_exit.sweep.run import partial_path
from ltt_exit.sweep.space import assemble_partial_space_table, load_space, run_space_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96
DEFAULTS = {"lambdas": (1.0, 0.5), "min_exit_layer": 1, "pruning": "none", "scorer": "softmax-margin", "tau": 0.0}


def _calibration_set(n: int) -> CalibrationSet:
    rng = np.random.default_rng(0)
    examples = [
        Example(id=f"ex{i}", prompt=" ".join(f"w{w}" for w in rng.integers(3, VOCAB - 1, size=5)),
                reference=" ".join(f"w{w}" for w in rng.integers(3, VOCAB - 1, size=4)), fields={})
        for i in range(n)
    ]
    return CalibrationSet(recipe="synthetic", examples=examples, metric="rouge-l", max_new_tokens=5,
                          fingerprint=f"sha256:synthetic-{n}", family="decoder-only", split="test",
                          source="test", template="{text}", seed=0, n_available=n)


SPACE = """
lambdas: [1.0, 0.6, 0.2]
min_exit_layer: [1, 2]
pruning: [none, {name: fixed, k: 20}]
scorer: [softmax-margin, softmax-max]
"""


def test_product_space_from_file_and_inline(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    space = load_space(path, DEFAULTS)
    assert len(space.settings) == 8 and len(space) == 24
    assert load_space(SPACE, DEFAULTS) == space
    configs = space.configurations()
    assert configs[0] == {"lambda": 1.0, "setting": 0, "min_exit_layer": 1, "pruning": {"name": "none", "params": {}},
                          "scorer": {"name": "softmax-margin", "params": {}}, "tau": 0.0}
    assert configs[6]["pruning"] == {"name": "fixed", "params": {"k": 20}}
    # knobs left out come from the defaults (the command line)
    only_layers = load_space("min_exit_layer: [1, 3]", DEFAULTS)
    assert [c["min_exit_layer"] for c in only_layers.configurations()] == [1, 1, 3, 3]


def test_explicit_settings_and_configurations():
    space = load_space("settings:\n - {min_exit_layer: 2, lambdas: [1.0, 0.3]}\n - {scorer: softmax-max}\n", DEFAULTS)
    assert space.lambdas == ((1.0, 0.3), (1.0, 0.5))
    space = load_space("configurations:\n - {lambda: 0.5}\n - {lambda: 1.0}\n - {lambda: 0.9, min_exit_layer: 3}\n", DEFAULTS)
    assert space.lambdas == ((1.0, 0.5), (0.9,))


@pytest.mark.parametrize(
    "text, message",
    [
        ("min_exit_layer: [1, 1]", "same setting twice"),
        ("lambdas: [0.5, 1.0]", "strictly decreasing"),
        ("colour: red", "unknown key"),
        ("settings: []", "non-empty list"),
        ("settings:\n - {min_exit_layer: 0}", r"settings\[0\].*min_exit_layer"),
        ("configurations:\n - {min_exit_layer: 2}", "needs a lambda"),
        ("pruning: [{k: 3}]", "pruning must be a name"),
        ("[1, 2]", "a space is a mapping"),
        ("a: [", "not valid YAML"),
    ],
)
def test_bad_spaces_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        load_space(text, DEFAULTS)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_space("missing.yaml", DEFAULTS)


def test_sweep_matches_each_configuration_decoded_alone_and_resumes(tmp_path):
    model = tiny_llama(vocab_size=VOCAB, num_layers=4, seed=0)
    model.generation_config.eos_token_id = 1
    tokenizer = tiny_word_tokenizer(VOCAB)
    calset = _calibration_set(6)
    space = load_space("lambdas: [1.0, 0.6, 0.2]\nmin_exit_layer: [1, 2]\npruning: [none, {name: fixed, k: 20}]", DEFAULTS)
    out = tmp_path / "space.parquet"

    class Stop(RuntimeError):
        pass

    def fail_after(k):
        if k == 4:
            raise Stop

    with pytest.raises(Stop):
        run_space_sweep(model, tokenizer, calset, space, max_new_tokens=5, metric="rouge-l", out_path=out,
                        model_fingerprint="sha256:m", prompts_per_batch=3, progress=False, after_example=fail_after)
    assert partial_path(out).exists() and not out.exists()
    # a zero time budget stops before decoding anything new, without writing the table
    stopped = run_space_sweep(model, tokenizer, calset, space, max_new_tokens=5, metric="rouge-l", out_path=out,
                              model_fingerprint="sha256:m", progress=False, time_budget_s=0.0)
    assert stopped.table is None and stopped.remaining_examples == 2 and stopped.resumed_examples == 4
    # the prompts swept so far can be analysed as a table of their own, leaving the sweep resumable
    arguments = dict(max_new_tokens=5, metric="rouge-l", out_path=out, model_fingerprint="sha256:m")
    partial_table = assemble_partial_space_table(model, tokenizer, calset, space, **arguments)
    assert partial_table.example_ids == [f"ex{i}" for i in range(4)]
    assert partial_table.metadata["partial"] == {"n_swept": 4, "n_planned": 6}
    assert partial_path(out).exists() and not out.exists()
    with pytest.raises(PartialSweepMismatch):  # the partial file of another calibration set is refused
        assemble_partial_space_table(model, tokenizer, _calibration_set(5), space, **arguments)
    result = run_space_sweep(model, tokenizer, calset, space, max_new_tokens=5, metric="rouge-l", out_path=out,
                             model_fingerprint="sha256:m", prompts_per_batch=3, progress=False)
    assert result.resumed_examples == 4 and result.decoded_examples == 2 and not partial_path(out).exists()

    assert is_space_table(out)
    table = SpaceTable.load(out)
    np.testing.assert_array_equal(partial_table.losses(["textual", "risk"]), table.losses(["textual", "risk"])[:4])
    assert "partial" not in table.metadata
    assert table.n == 6 and table.K == 12 and table.risks == ["textual", "risk"]
    assert table.example_ids == [f"ex{i}" for i in range(6)]
    losses = table.losses(["textual", "risk"])
    assert losses.shape == (6, 12, 2)
    lambda_one = [j for j, c in enumerate(table.configurations) if c["lambda"] == 1.0]
    assert np.all(losses[:, lambda_one, 0] == 0.0) and np.all(table.values["mean_layers"][:, lambda_one] == 4)
    assert table.metadata["full_mismatches"] == 0
    # every configuration's column is what decoding that configuration on its own gives
    prompts = [ex.prompt for ex in calset.examples]
    for s, (setting, grid) in enumerate(zip(space.settings, space.lambdas)):
        decoder = EarlyExitDecoder(model, tokenizer, **setting.decoder_kwargs())
        alone = decoder.generate([p for lam in grid for p in prompts], threshold=[lam for lam in grid for _ in prompts],
                                 max_new_tokens=5)
        columns = [j for j, c in enumerate(table.configurations) if c["setting"] == s]
        assert [table.configurations[j]["lambda"] for j in columns] == list(grid)
        for g, j in enumerate(columns):
            rows = alone[g * len(prompts):(g + 1) * len(prompts)]
            assert [seq.text for seq in rows] == list(table.values["text"][:, j])
            np.testing.assert_allclose([np.mean(seq.exit_layers) for seq in rows], table.values["mean_layers"][:, j])
        assert table.settings[s] == decoder.config_dict()
    assert table.cost("flops").shape == (6, 12)
    full = table.full_configurations()
    assert full[5]["decoder"]["min_exit_layer"] == full[5]["min_exit_layer"]


def test_space_table_refuses_other_files(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"not parquet")
    assert not is_space_table(path)
    with pytest.raises(SpaceTableError, match="x.parquet"):
        SpaceTable.load(path)
