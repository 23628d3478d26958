"""The threshold sweep on random-weight models: exactness at λ = 1, resume after a failure, errors."""
from __future__ import annotations

import numpy as np
import pytest

from ltt_exit.decode import EarlyExitDecoder
from ltt_exit.decode.tiny_models import tiny_llama, tiny_t5, tiny_word_tokenizer
from ltt_exit.loss_table import LossTable
from ltt_exit.recipes.recipe import CalibrationSet, Example
from ltt_exit.sweep import SweepSpec, run_sweep
from ltt_exit.sweep.run import partial_path

VOCAB = 96
GRID = (1.0, 0.9, 0.6, 0.3, 0.0)


def _calibration_set(n: int, *, seed: int = 0, with_reference: bool = True) -> CalibrationSet:
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        words = " ".join(f"w{w}" for w in rng.integers(3, VOCAB - 1, size=rng.integers(3, 9)))
        reference = " ".join(f"w{w}" for w in rng.integers(3, VOCAB - 1, size=5)) if with_reference else None
        examples.append(Example(id=f"ex{i}", prompt=words, reference=reference, fields={}))
    return CalibrationSet(recipe="synthetic", examples=examples, metric="rouge-l", max_new_tokens=8,
                          fingerprint=f"sha256:synthetic-{n}-{seed}", family="t5", split="test",
                          source="test", template="{text}", seed=seed, n_available=n)


def _decoder(kind: str) -> EarlyExitDecoder:
    tokenizer = tiny_word_tokenizer(VOCAB, add_eos=(kind == "t5"))
    if kind == "t5":
        model = tiny_t5(vocab_size=VOCAB, num_layers=4)
    else:
        model = tiny_llama(vocab_size=VOCAB, num_layers=4)
    return EarlyExitDecoder(model, tokenizer, scorer="softmax-max", min_exit_layer=1)


@pytest.mark.parametrize("kind", ["t5", "decoder-only"])
def test_most_conservative_candidate_has_zero_loss_and_outputs_match_generate(tmp_path, kind):
    decoder = _decoder(kind)
    calset = _calibration_set(5)
    spec = SweepSpec(lambdas=GRID, max_new_tokens=8, metric="rouge-l", loss="textual")
    result = run_sweep(decoder, calset, spec, out_path=tmp_path / "t.parquet",
                       model_fingerprint="sha256:m", progress=False)
    table = LossTable.load(tmp_path / "t.parquet")
    assert table.n == 5 and table.K == len(GRID)
    # λ = 1 reproduces the full model exactly: text identical, loss 0, every token at the last layer
    assert np.all(table.losses[:, 0] == 0.0)
    texts = table.candidate_columns["text"]
    full = table.example_columns["full_text"]
    assert all(texts[i, 0] == full[i] for i in range(table.n))
    assert np.all(table.candidate_columns["mean_layers"][:, 0] == decoder.num_layers)
    # λ = 0 exits every token at min_exit_layer (the first new token of a decoder-only model comes
    # from the prefill, i.e. the full model)
    for cell in table.candidate_columns["exit_layers"][:, -1]:
        layers = [int(x) for x in cell.split()]
        tail = layers[1:] if kind == "decoder-only" else layers
        assert all(layer == 1 for layer in tail)
    # the table's recorded outputs are the decoder's outputs at those thresholds
    again = decoder.generate([calset.examples[2].prompt], threshold=GRID[2], max_new_tokens=8)[0]
    assert texts[2, 2] == again.text
    assert result.table.metadata["decoder"] == decoder.config_dict()
    assert not partial_path(tmp_path / "t.parquet").exists()


def test_losses_are_per_example_metric_values(tmp_path):
    from ltt_exit import metrics

    decoder = _decoder("t5")
    calset = _calibration_set(4)
    spec = SweepSpec(lambdas=GRID, max_new_tokens=8, metric="rouge-l", loss="risk")
    table = run_sweep(decoder, calset, spec, out_path=tmp_path / "t.parquet",
                      model_fingerprint="sha256:m", progress=False).table
    texts = table.candidate_columns["text"]
    full = table.example_columns["full_text"]
    for i, ex in enumerate(calset.examples):
        for j in range(len(GRID)):
            expected = max(0.0, (1 - metrics.similarity("rouge-l", texts[i, j], ex.reference))
                           - (1 - metrics.similarity("rouge-l", full[i], ex.reference)))
            assert table.losses[i, j] == pytest.approx(expected)
            assert table.candidate_columns["loss_textual"][i, j] == pytest.approx(
                1 - metrics.similarity("rouge-l", texts[i, j], full[i]))


class _Boom(RuntimeError):
    pass


def test_interrupted_sweep_resumes_to_the_same_table(tmp_path):
    decoder = _decoder("decoder-only")
    calset = _calibration_set(6, seed=3)
    spec = SweepSpec(lambdas=GRID, max_new_tokens=6, metric="rouge-l")
    reference = run_sweep(decoder, calset, spec, out_path=tmp_path / "ref.parquet",
                          model_fingerprint="sha256:m", progress=False).table

    def fail_after_three(k):
        if k == 3:
            raise _Boom("injected failure")

    out = tmp_path / "resumed.parquet"
    with pytest.raises(_Boom):
        run_sweep(decoder, calset, spec, out_path=out, model_fingerprint="sha256:m", progress=False,
                  after_example=fail_after_three)
    assert not out.exists()  # nothing half-written
    assert partial_path(out).exists()
    result = run_sweep(decoder, calset, spec, out_path=out, model_fingerprint="sha256:m", progress=False)
    assert result.resumed_examples == 3 and result.decoded_examples == 3
    resumed = LossTable.load(out)
    assert resumed.example_ids == reference.example_ids
    np.testing.assert_array_equal(resumed.losses, reference.losses)
    for name, column in reference.candidate_columns.items():
        np.testing.assert_array_equal(resumed.candidate_columns[name], column)


def test_resume_under_another_configuration_is_refused(tmp_path):
    decoder = _decoder("t5")
    calset = _calibration_set(3)
    spec = SweepSpec(lambdas=GRID, max_new_tokens=4)
    out = tmp_path / "t.parquet"
    with pytest.raises(_Boom):
        def boom(k):
            raise _Boom()
        run_sweep(decoder, calset, spec, out_path=out, model_fingerprint="sha256:m", progress=False,
                  after_example=boom)
    other = SweepSpec(lambdas=GRID, max_new_tokens=5)
    with pytest.raises(ValueError, match="another configuration"):
        run_sweep(decoder, calset, other, out_path=out, model_fingerprint="sha256:m", progress=False)


def test_bad_specs_and_sets_are_refused():
    with pytest.raises(ValueError, match="strictly decreasing"):
        SweepSpec(lambdas=(0.5, 0.9))
    with pytest.raises(ValueError, match="empty"):
        SweepSpec(lambdas=())
    with pytest.raises(ValueError, match="loss"):
        SweepSpec(loss="corpus")
    decoder = _decoder("t5")
    empty = _calibration_set(0)
    with pytest.raises(ValueError, match="empty"):
        run_sweep(decoder, empty, SweepSpec(), out_path="/nonexistent/x.parquet", model_fingerprint="m",
                  progress=False)
    no_refs = _calibration_set(2, with_reference=False)
    with pytest.raises(ValueError, match="reference"):
        run_sweep(decoder, no_refs, SweepSpec(loss="risk"), out_path="/nonexistent/x.parquet",
                  model_fingerprint="m", progress=False)
