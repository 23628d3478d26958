"""Exit adapters (issue 7): the closed-form fit, the trained low-rank maps, the file format and its
checks, the decoder and reference hooks, disjointness of fitting and calibration examples, the
certificate path and the CLI. Tiny random models and files the tests write; offline."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ltt_exit.decode import EarlyExitDecoder
from ltt_exit.decode.adapters import (
    AdapterMismatch,
    AffineMap,
    CalibrationOverlap,
    ExitAdapters,
    ExitFitData,
    LowRankMap,
    RidgeStatistics,
    StateBatch,
    TokenReservoir,
    check_disjoint,
    collect_states,
    fitting_set,
    head_logits,
    resolve_exit_adapters,
    train_low_rank,
)
from ltt_exit.decode.backends import backend_for
from ltt_exit.decode.reference import reference_generate
from ltt_exit.decode.tiny_models import tiny_llama, tiny_t5, tiny_word_tokenizer
from ltt_exit.models import LoadedModel, model_fingerprint
from ltt_exit.recipes import load_recipe

from adapter_helpers import random_adapters

VOCAB = 128


pytestmark = pytest.mark.usefixtures("one_thread")


def llama(**kw):
    return tiny_llama(num_layers=4, vocab_size=VOCAB, **kw)


def t5(**kw):
    return tiny_t5(num_layers=3, vocab_size=96, **kw)


def tokenizer_for(model):
    if model.config.model_type == "t5":
        return tiny_word_tokenizer(model.config.vocab_size, pad_id=0, eos_id=1, add_eos=True)
    return tiny_word_tokenizer(model.config.vocab_size, pad_id=0, bos_id=1, eos_id=2, add_bos=True)


def prompts(n, seed=0, low=3, high=90):
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(low, high, size=rng.integers(3, 9))) for _ in range(n)]


def loaded_of(model):
    tok = tokenizer_for(model)
    family = "t5" if model.config.model_type == "t5" else "decoder-only"
    return LoadedModel(model=model, tokenizer=tok, family=family, name="tiny", source="test",
                       fingerprint=model_fingerprint(model, tok))


def assert_same_sequences(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        assert x.exit_layers == y.exit_layers
        assert np.array_equal(np.array(x.confidences), np.array(y.confidences), equal_nan=True)


# ------------------------------------------------------------------------------ closed-form fit


def synthetic_batches(w, b, *, batches=5, per_batch=80, noise=0.0, seed=0, layers=(1, 2)):
    """Correlated, off-centre inputs x and targets y = x Wᵀ + b (+ noise), split into StateBatches."""
    rng = np.random.default_rng(seed)
    d = w.shape[0]
    mixing = rng.normal(size=(d, d))
    out = []
    for _ in range(batches):
        x = rng.normal(size=(per_batch, d)) @ mixing + 3.0
        y = x @ w.T + b + noise * rng.normal(size=(per_batch, d))
        out.append((x, y))
    state_batches = [
        StateBatch(hidden={layer: torch.tensor(x * (layer + 1)) for layer in layers}, final=torch.tensor(y),
                   tokens=[0] * len(x), teacher_top=torch.zeros(len(x), 1, dtype=torch.long))
        for x, y in out
    ]
    return out, state_batches


def test_ridge_recovers_a_known_linear_map():
    rng = np.random.default_rng(1)
    d = 8
    w, b = rng.normal(size=(d, d)), rng.normal(size=d)
    _, batches = synthetic_batches(w, b)
    statistics = RidgeStatistics([1, 2], d, target="final")
    for batch in batches:  # streamed batch by batch
        statistics.update(batch)
    maps = statistics.solve(ridge=0.0)
    # layer ℓ sees x·(ℓ+1), so its map is W/(ℓ+1) with the same bias
    for layer in (1, 2):
        np.testing.assert_allclose(maps[layer].weight.double().numpy(), w / (layer + 1), atol=1e-4)
        np.testing.assert_allclose(maps[layer].bias.double().numpy(), b, atol=1e-3)
    assert statistics.count == 400


def test_streamed_ridge_equals_least_squares_on_all_tokens():
    rng = np.random.default_rng(2)
    d = 6
    w, b = rng.normal(size=(d, d)), rng.normal(size=d)
    raw, batches = synthetic_batches(w, b, noise=0.5, batches=7, per_batch=23)
    x = np.concatenate([r[0] for r in raw]) * 2  # layer 1 sees x·2
    y = np.concatenate([r[1] for r in raw])
    design = np.hstack([x, np.ones((len(x), 1))])
    for target, y_fit in (("final", y), ("final-normalized", y / np.sqrt((y**2).mean(axis=1, keepdims=True)))):
        coef, *_ = np.linalg.lstsq(design, y_fit, rcond=None)  # (d+1, d): Wᵀ over b
        statistics = RidgeStatistics([1], d, target=target)
        for batch in batches:
            statistics.update(batch)
        layer_map = statistics.solve(ridge=0.0)[1]
        np.testing.assert_allclose(layer_map.weight.double().numpy(), coef[:d].T, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(layer_map.bias.double().numpy(), coef[d], rtol=1e-4, atol=1e-4)


def test_strong_ridge_shrinks_to_the_best_multiple_of_the_identity():
    rng = np.random.default_rng(3)
    d = 5
    w, b = rng.normal(size=(d, d)), rng.normal(size=d)
    raw, batches = synthetic_batches(w, b, noise=0.1, layers=(1,))
    x = np.concatenate([r[0] for r in raw]) * 2
    y = np.concatenate([r[1] for r in raw])
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    s = np.trace(xc.T @ yc) / np.trace(xc.T @ xc)
    statistics = RidgeStatistics([1], d, target="final")
    for batch in batches:
        statistics.update(batch)
    weight = statistics.solve(ridge=1e9)[1].weight.double().numpy()
    np.testing.assert_allclose(weight, s * np.eye(d), atol=1e-5)
    moderate = statistics.solve(ridge=1.0)[1].weight.double().numpy()
    plain = statistics.solve(ridge=0.0)[1].weight.double().numpy()
    # the penalty pulls towards s·I: the moderate fit lies between the plain fit and s·I
    assert np.linalg.norm(moderate - s * np.eye(d)) < np.linalg.norm(plain - s * np.eye(d))


def test_ridge_rejects_bad_settings():
    with pytest.raises(ValueError, match="target"):
        RidgeStatistics([1], 4, target="logits")
    statistics = RidgeStatistics([1], 4)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        statistics.solve()
    with pytest.raises(ValueError, match="ridge"):
        statistics.solve(ridge=-1.0)


# ------------------------------------------------------------------------------ hooks in the decoders


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("kind", ["affine", "low-rank"])
def test_identity_adapters_reproduce_the_raw_heads_exactly(family, kind):
    model = llama() if family == "llama" else t5()
    tok = tokenizer_for(model)
    backend = backend_for(model)
    identity = ExitAdapters.identity(kind, num_layers=backend.num_layers, hidden_size=backend.hidden_size,
                                     model_fingerprint="sha256:x")
    texts = prompts(4, seed=5)
    for scorer, pruning in (("softmax-margin", "none"), ("weighted-contrastive", ("fixed", {"k": 12})),
                            ("hidden-cosine", ("decaying", {"k_max": 60, "k_min": 5}))):
        raw = EarlyExitDecoder(model, tok, scorer=scorer, pruning=pruning, min_exit_layer=2)
        adapted = EarlyExitDecoder(model, tok, scorer=scorer, pruning=pruning, min_exit_layer=2,
                                   exit_adapters=identity)
        thresholds = [0.2, 0.5, 0.8, 0.95]
        a = raw.generate(texts, threshold=thresholds, max_new_tokens=8, eos_token_id=[])
        b = adapted.generate(texts, threshold=thresholds, max_new_tokens=8, eos_token_id=[])
        assert_same_sequences(a, b)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_adapters_change_exits_and_fast_path_matches_reference(family):
    model = (llama if family == "llama" else t5)(dtype=torch.float64)
    tok = tokenizer_for(model)
    adapters = random_adapters(model, "affine", scale=0.3)
    raw = EarlyExitDecoder(model, tok, min_exit_layer=1)
    adapted = EarlyExitDecoder(model, tok, min_exit_layer=1, exit_adapters=adapters)
    texts = prompts(3, seed=7)
    changed = False
    for threshold in (0.3, 0.6, 0.9):
        got = adapted.generate(texts, threshold=threshold, max_new_tokens=7, eos_token_id=[])
        base = raw.generate(texts, threshold=threshold, max_new_tokens=7, eos_token_id=[])
        changed |= any(g.exit_layers != r.exit_layers or g.token_ids != r.token_ids for g, r in zip(got, base))
        for text, sequence in zip(texts, got):
            ids = tok(text)["input_ids"]
            reference = reference_generate(adapted, ids, threshold, 7, eos_token_id=[])
            assert sequence.token_ids == reference.token_ids
            assert sequence.exit_layers == reference.exit_layers
            assert sequence.confidences == pytest.approx(reference.confidences, abs=1e-9, nan_ok=True)
    assert changed  # the adapters were not a no-op
    # the full model is untouched: λ = 1 gives the same output with and without adapters
    assert_same_sequences(adapted.generate(texts, threshold=1.0, max_new_tokens=7),
                          raw.generate(texts, threshold=1.0, max_new_tokens=7))


def test_config_dict_records_the_adapter_description():
    model = llama()
    adapters = random_adapters(model, "low-rank", layers=[2, 3])
    decoder = EarlyExitDecoder(model, exit_adapters=adapters)
    record = decoder.config_dict()["exit_adapters"]
    assert record == adapters.describe()
    assert record["fingerprint"] == adapters.fingerprint and record["model_fingerprint"] == "sha256:test"
    assert record["layers"] == [2, 3] and record["kind"] == "low-rank"
    json.dumps(record)  # JSON-able


# ------------------------------------------------------------------------------ collecting states


class _Recorder:
    """An exit-adapter stand-in that records what the decoder feeds its exit heads."""

    def __init__(self):
        self.seen: dict[int, list[torch.Tensor]] = {}

    def apply(self, layer, hidden):
        self.seen.setdefault(layer, []).append(hidden.clone())
        return hidden

    def describe(self):
        return {"kind": "recorder"}


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_collected_states_are_what_the_exit_heads_see(family):
    model = (llama if family == "llama" else t5)(dtype=torch.float64)
    tok = tokenizer_for(model)
    text = prompts(1, seed=11)[0]
    recorder = _Recorder()
    decoder = EarlyExitDecoder(model, tok, scorer="softmax-max", min_exit_layer=1, exit_adapters=recorder)
    (sequence,) = decoder.generate([text], threshold=0.999999, max_new_tokens=6, eos_token_id=[])
    L = decoder.num_layers
    assert sequence.exit_layers == [L] * 6  # nothing exited, so every position's states are the full model's
    (batch,) = collect_states(model, tok, [text], max_new_tokens=6, eos_token_id=[])
    assert batch.tokens == sequence.token_ids  # the full model's greedy output
    first = 1 if family == "llama" else 0  # decoder-only: token 0 comes from the prefill (no exit head)
    for layer in range(1, L):
        recorded = torch.cat(recorder.seen[layer]).float()
        torch.testing.assert_close(batch.hidden[layer][first:], recorded, atol=1e-5, rtol=1e-5)
    backend = backend_for(model)
    # the final state is the pre-norm one: the head applied to it gives the emitted tokens
    assert backend.head(batch.final.double()).argmax(-1).tolist() == batch.tokens
    assert (batch.teacher_top[:, 0] == torch.tensor(batch.tokens)).all()


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_batched_collection_equals_one_prompt_at_a_time(family):
    model = (llama if family == "llama" else t5)(dtype=torch.float64)
    tok = tokenizer_for(model)
    texts = prompts(5, seed=21)  # of different lengths, so batches are padded
    single = list(collect_states(model, tok, texts, max_new_tokens=6, eos_token_id=[]))
    # an EOS that one prompt produces at its third token: that row stops there, the others go on
    eos = single[1].tokens[2]
    single = list(collect_states(model, tok, texts, max_new_tokens=6, eos_token_id=eos))
    batched = list(collect_states(model, tok, texts, max_new_tokens=6, eos_token_id=eos, batch_size=3))
    assert len(batched) == len(texts)
    assert any(len(b.tokens) < 6 for b in single) and any(len(b.tokens) == 6 for b in single)
    for one, many in zip(single, batched, strict=True):
        assert many.tokens == one.tokens
        torch.testing.assert_close(many.final, one.final, atol=1e-9, rtol=1e-9)
        assert torch.equal(many.teacher_top, one.teacher_top)
        for layer in one.hidden:
            torch.testing.assert_close(many.hidden[layer], one.hidden[layer], atol=1e-9, rtol=1e-9)
    with pytest.raises(ValueError, match="batch_size"):
        next(collect_states(model, tok, texts, max_new_tokens=2, batch_size=0))


def test_head_logits_on_a_shared_subset_equals_the_backend_head():
    for model in (llama(), t5(), tiny_t5(tied=False, num_layers=2)):
        backend = backend_for(model)
        hidden = torch.randn(5, backend.hidden_size)
        ids = torch.tensor([3, 17, 40, 2])
        torch.testing.assert_close(head_logits(backend, hidden, ids), backend.head(hidden)[:, ids])


def test_reservoir_keeps_a_bounded_sample_of_streamed_tokens():
    d = 4
    reservoir = TokenReservoir([1], d, capacity=10, teacher_top_k=2, seed=0)
    rows = []
    for i in range(6):
        x = torch.arange(i * 7 * d, (i + 1) * 7 * d, dtype=torch.float32).reshape(7, d)
        rows.append(x)
        reservoir.update(StateBatch(hidden={1: x}, final=-x, tokens=[0] * 7,
                                    teacher_top=torch.zeros(7, 2, dtype=torch.long)))
    assert reservoir.size == 10 and reservoir.seen == 42
    streamed = {tuple(r.tolist()) for r in torch.cat(rows)}
    kept = [tuple(r.tolist()) for r in reservoir.hidden[1]]
    assert all(k in streamed for k in kept) and len(set(kept)) == 10
    torch.testing.assert_close(reservoir.final, -reservoir.hidden[1])  # rows stay aligned
    assert any(k[0] >= 10 * d for k in kept)  # later tokens replaced early ones


# ------------------------------------------------------------------------------ trained low-rank maps


@pytest.mark.parametrize("vocabulary", ["sampled", "full"])
def test_distillation_lowers_the_kl_and_leaves_the_model_alone(vocabulary):
    model = llama()
    loaded = loaded_of(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    examples = [type("E", (), {"id": str(i), "prompt": p, "fields": {}})() for i, p in enumerate(prompts(12, seed=3))]
    data = ExitFitData.collect(loaded, examples, {"recipe": "t", "split": "s", "source": "x"}, max_new_tokens=8,
                               layers=[1, 2, 3], max_train_tokens=64, teacher_top_k=8)
    adapters = data.low_rank(rank=4, steps=60, batch_size=32, learning_rate=1e-2, vocabulary=vocabulary,
                             teacher_top_k=8, negatives=16)
    method = adapters.fit_info["method"]
    assert method["final_loss"] < 0.8 * method["first_loss"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert adapters.kind == "low-rank" and adapters.layers == [1, 2, 3]
    assert adapters.fit_info["n_tokens"] == 96 and adapters.model_fingerprint == loaded.fingerprint


def _mean_kl(model, reservoir, adapters):
    """Mean over reservoir tokens and layers of KL(p_L || p_adapted), full vocabulary."""
    backend = backend_for(model)
    n = reservoir.size
    with torch.no_grad():
        teacher = torch.log_softmax(backend.head(reservoir.final[:n]), dim=-1)
        kls = [(teacher.exp() * (teacher - torch.log_softmax(backend.head(adapters.apply(layer, reservoir.hidden[layer][:n])),
                                                              dim=-1))).sum(-1).mean()
               for layer in reservoir.layers]
    return float(torch.stack(kls).mean())


def test_distilled_affine_starts_from_the_ridge_maps_and_lowers_their_kl():
    model = llama()
    loaded = loaded_of(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples = [type("E", (), {"id": str(i), "prompt": p, "fields": {}})() for i, p in enumerate(prompts(12, seed=5))]
    data = ExitFitData.collect(loaded, examples, {"recipe": "t", "split": "s", "source": "x"}, max_new_tokens=8,
                               layers=[1, 2, 3], max_train_tokens=96, teacher_top_k=8)
    ridge = data.affine(ridge=0.1)
    tuned = data.affine(ridge=0.1, distill={"steps": 80, "batch_size": 32, "learning_rate": 3e-3,
                                            "vocabulary": "full"})
    assert tuned.kind == "affine" and tuned.layers == ridge.layers
    method = tuned.fit_info["method"]
    assert method["name"] == "ridge+distill" and method["distill"]["start"] == "given"
    # the closed form is where training starts: one step of a tiny learning rate barely moves it
    nudged = data.affine(ridge=0.1, distill={"steps": 1, "learning_rate": 1e-9, "vocabulary": "full"})
    for layer in ridge.layers:
        torch.testing.assert_close(nudged.maps[layer].weight, ridge.maps[layer].weight, atol=1e-6, rtol=0)
    assert _mean_kl(model, data.reservoir, tuned) < 0.9 * _mean_kl(model, data.reservoir, ridge)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for m in tuned.maps.values() for p in m.parameters())
    no_reservoir = ExitFitData.collect(loaded, examples[:2], {"recipe": "t", "split": "s", "source": "x"},
                                       max_new_tokens=2, layers=[1, 2, 3], max_train_tokens=0)
    with pytest.raises(ValueError, match="reservoir"):
        no_reservoir.affine(distill={"steps": 1})


def test_adapter_flops_are_two_per_multiply_add():
    affine = ExitAdapters.identity("affine", num_layers=4, hidden_size=8, model_fingerprint="m", layers=[2])
    low_rank = ExitAdapters.identity("low-rank", num_layers=4, hidden_size=8, model_fingerprint="m", rank=3)
    assert affine.flops(2) == 2 * 8 * 8 and affine.flops(1) == 0  # W h: 64 multiply-adds
    assert low_rank.flops(3) == 2 * (3 * 8 + 8 * 3)  # D h then U (D h)


def test_low_rank_map_starts_as_the_identity_and_checks_its_rank():
    layer_map = LowRankMap(8, rank=3)
    x = torch.randn(4, 8)
    assert torch.equal(layer_map(x), x)
    with pytest.raises(ValueError, match="rank"):
        LowRankMap(8, rank=9)
    with pytest.raises(ValueError, match="vocabulary"):
        train_low_rank(llama(), TokenReservoir([1], 32, 4), vocabulary="some")


# ------------------------------------------------------------------------------ files and refusals


def test_save_load_round_trip(tmp_path):
    model = llama()
    adapters = random_adapters(model, "low-rank", layers=[1, 3])
    path = adapters.save(tmp_path / "a.safetensors")
    loaded = ExitAdapters.load(path, model_fingerprint="sha256:test", num_layers=4, hidden_size=32)
    assert loaded.fingerprint == adapters.fingerprint and loaded.layers == [1, 3]
    x = torch.randn(3, 32)
    torch.testing.assert_close(loaded.apply(3, x), adapters.apply(3, x))
    assert loaded.apply(2, x) is x  # no map for layer 2: unchanged
    assert loaded.describe()["path"] == str(path.resolve())


def test_an_adapter_file_for_another_model_is_refused(tmp_path):
    model_a, model_b = llama(seed=0), llama(seed=1)
    loaded_a, loaded_b = loaded_of(model_a), loaded_of(model_b)
    assert loaded_a.fingerprint != loaded_b.fingerprint
    adapters = ExitAdapters.identity("affine", num_layers=4, hidden_size=32, model_fingerprint=loaded_a.fingerprint)
    path = adapters.save(tmp_path / "a.safetensors")
    ExitAdapters.load(path, model_fingerprint=loaded_a.fingerprint)  # its own model: fine
    with pytest.raises(AdapterMismatch, match="fitted for the model"):
        ExitAdapters.load(path, model_fingerprint=loaded_b.fingerprint)
    with pytest.raises(AdapterMismatch, match="fitted for the model"):
        resolve_exit_adapters(path, model=model_b, tokenizer=loaded_b.tokenizer, num_layers=4, hidden_size=32)
    assert resolve_exit_adapters(path, model=model_a, tokenizer=loaded_a.tokenizer).fingerprint == adapters.fingerprint
    with pytest.raises(AdapterMismatch, match="this decoder has 5 layers"):
        ExitAdapters.load(path, num_layers=5, hidden_size=32)


def test_an_edited_adapter_file_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    adapters = ExitAdapters.identity("affine", num_layers=4, hidden_size=32, model_fingerprint="sha256:m")
    path = adapters.save(tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    tensors["layer.2.bias"][0] += 1.0
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=metadata)
    with pytest.raises(AdapterMismatch, match="changed after it was written"):
        ExitAdapters.load(tmp_path / "edited.safetensors")
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    with pytest.raises(AdapterMismatch, match="not an ltt-exit exit-adapter file"):
        ExitAdapters.load(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError):
        ExitAdapters.load(tmp_path / "missing.safetensors")


def test_bad_adapter_sets_are_refused():
    with pytest.raises(ValueError, match="last layer"):
        ExitAdapters({4: AffineMap(8)}, num_layers=4, hidden_size=8, model_fingerprint="m")
    with pytest.raises(ValueError, match="one kind"):
        ExitAdapters({1: AffineMap(8), 2: LowRankMap(8, 2)}, num_layers=4, hidden_size=8, model_fingerprint="m")
    with pytest.raises(TypeError, match="exit_adapters"):
        resolve_exit_adapters(3.0)
    with pytest.raises(ValueError, match="fingerprint"):
        resolve_exit_adapters("some/path.safetensors")
    adapters = ExitAdapters.identity("affine", num_layers=4, hidden_size=8, model_fingerprint="m")
    with pytest.raises(AdapterMismatch, match="width"):
        adapters.apply(1, torch.zeros(2, 9))


# ------------------------------------------------------------------------------ fitting vs calibration


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def dialogue(i):
    return f"w{3 + i % 50} w{5 + i % 40} " + " ".join(f"w{(7 * i + k) % 80 + 3}" for k in range(12))


def test_fitting_on_the_calibration_split_is_refused_unless_the_sample_is_excluded(tmp_path):
    data = write_rows(tmp_path / "rows.jsonl", [{"id": f"r{i}", "text": dialogue(i)} for i in range(30)])
    recipe = load_recipe("jsonl")
    with pytest.raises(CalibrationOverlap, match="calibrates on"):
        fitting_set(recipe, size=10, data_files=data)
    calibration = recipe.load(size=12, seed=0, data_files=data)
    examples, info = fitting_set(recipe, size=10, seed=1, data_files=data, exclude=calibration)
    assert len(examples) == 10
    assert not {e.id for e in examples} & set(calibration.ids)
    assert info["excluded"][0]["fingerprint"] == calibration.fingerprint
    # the adapters remember their fitting examples: this calibration sample passes, a larger one does not
    model = llama()
    fit = ExitFitData.collect(loaded_of(model), examples, info, max_new_tokens=3, max_train_tokens=0)
    adapters = fit.affine()
    check_disjoint(adapters, calibration)
    everything = recipe.load(size=None, data_files=data)
    with pytest.raises(CalibrationOverlap, match="10 of 30 calibration examples"):
        check_disjoint(adapters, everything)
    # the same documents under another template and recipe name are recognised by their text
    other = load_recipe("jsonl", name="other", template="Summarise: {text}").load(size=None, data_files=data)
    with pytest.raises(CalibrationOverlap):
        adapters.check_disjoint(other)
    # and the record survives the file
    path = adapters.save(tmp_path / "a.safetensors")
    with pytest.raises(CalibrationOverlap):
        ExitAdapters.load(path).check_disjoint(everything)


def test_another_split_needs_no_exclusion_and_is_disjoint(tmp_path):
    test_file = write_rows(tmp_path / "test.jsonl", [{"id": f"t{i}", "text": dialogue(i)} for i in range(8)])
    calibration_file = write_rows(tmp_path / "val.jsonl", [{"id": f"v{i}", "text": dialogue(100 + i)} for i in range(8)])
    recipe = load_recipe("jsonl")
    examples, info = fitting_set(recipe, size=5, split="test", data_files=test_file)
    assert info["split"] == "test" and len(examples) == 5
    fit = ExitFitData.collect(loaded_of(llama()), examples, info, max_new_tokens=2, max_train_tokens=0)
    check_disjoint(fit.affine(), recipe.load(data_files=calibration_file))
    check_disjoint(None, recipe.load(data_files=calibration_file))  # no adapters: nothing to check


def test_the_fitting_pool_is_the_whole_split_not_the_recipes_sample_size(tmp_path):
    rows = write_rows(tmp_path / "test.jsonl", [{"id": f"t{i}", "text": dialogue(i)} for i in range(12)])
    recipe = tmp_path / "small.yaml"
    recipe.write_text(
        "name: small\nsource: {kind: jsonl}\nsplit: validation\nfields: {id: id, text: text}\n"
        "templates: {decoder-only: '{text}'}\nmetric: rouge-l\nmax_new_tokens: 4\nsample: {seed: 0, size: 4}\n",
        encoding="utf-8")
    recipe = load_recipe(str(recipe))
    assert len(recipe.load(data_files=rows, split="test")) == 4  # the recipe's own sample size
    assert len(recipe.load(data_files=rows, split="test", size="all")) == 12
    pool, _ = fitting_set(recipe, size=None, split="test", data_files=rows)
    assert len(pool) == 12  # every row, though the recipe samples 4
    more, _ = fitting_set(recipe, size=9, split="test", data_files=rows)
    assert len(more) == 9 and [e.id for e in more] == [e.id for e in pool[:9]]


# ------------------------------------------------------------------------------ certificates


def make_certificate(decoder, loaded, tmp_path):
    from ltt_exit.certify import certify

    metadata = {"model_fingerprint": loaded.fingerprint, "decoder": decoder.config_dict(), "max_new_tokens": 6,
                "model": {"name": "tiny"}}
    certificate = certify(np.zeros((200, 3)), [1.0, 0.9, 0.8], delta=0.1, epsilon=0.05, metadata=metadata)
    path = tmp_path / "certificate.json"
    certificate.save(path)
    return path


def test_certified_decoder_loads_and_checks_the_adapter_file(tmp_path):
    from ltt_exit.apply import CertificateMismatch, CertifiedDecoder

    model = llama()
    loaded = loaded_of(model)
    adapters = random_adapters(model, "affine", scale=0.2)
    adapters.model_fingerprint = loaded.fingerprint
    adapters._fingerprint = None
    file = adapters.save(tmp_path / "adapters.safetensors")
    decoder = EarlyExitDecoder(model, loaded.tokenizer, min_exit_layer=2,
                               exit_adapters=ExitAdapters.load(file, model_fingerprint=loaded.fingerprint))
    certificate = make_certificate(decoder, loaded, tmp_path)
    texts = prompts(2, seed=9)
    certified = CertifiedDecoder(certificate, loaded)
    assert certified.decoder.exit_adapters.fingerprint == adapters.fingerprint
    expected = decoder.generate(texts, threshold=certified.threshold, max_new_tokens=6)
    assert_same_sequences(certified.generate(texts, formatted=True), expected)
    # the fast decoder under the same certificate: same configuration, same outputs
    from ltt_exit.decode import FastEarlyExitDecoder

    fast = CertifiedDecoder(certificate, loaded, fast=True)
    assert isinstance(fast.decoder, FastEarlyExitDecoder) and not isinstance(certified.decoder, FastEarlyExitDecoder)
    assert fast.decoder.config_dict() == certified.decoder.config_dict()
    assert [q.token_ids for q in fast.generate(texts, formatted=True)] == [q.token_ids for q in expected]
    # and where tokens do exit (a lower threshold than this certificate's, set on both); float32: the static
    # cache's attention kernels round differently, so confidences agree to float32 precision, not bit for bit
    fast.threshold = certified.threshold = 0.05
    exiting = certified.generate(texts, formatted=True)
    assert any(layer < decoder.num_layers for seq in exiting for layer in seq.exit_layers)
    for x, y in zip(fast.generate(texts, formatted=True), exiting, strict=True):
        assert x.token_ids == y.token_ids and x.exit_layers == y.exit_layers
        assert x.confidences == pytest.approx(y.confidences, rel=1e-5, nan_ok=True)
    # a moved file is still the certified one
    moved = tmp_path / "moved.safetensors"
    file.rename(moved)
    with pytest.raises(CertificateMismatch, match="not there"):
        CertifiedDecoder(certificate, loaded)
    CertifiedDecoder(certificate, loaded, exit_adapters=moved)
    # other adapters are refused, and so are adapters for a certificate made without them
    other = random_adapters(model, "affine", scale=0.2, seed=5)
    other.model_fingerprint = loaded.fingerprint
    other._fingerprint = None
    with pytest.raises(CertificateMismatch, match="not the certified"):
        CertifiedDecoder(certificate, loaded, exit_adapters=other.save(tmp_path / "other.safetensors"))
    plain = make_certificate(EarlyExitDecoder(model, loaded.tokenizer, min_exit_layer=2), loaded, tmp_path / "..")
    with pytest.raises(CertificateMismatch, match="without them"):
        CertifiedDecoder(plain, loaded, exit_adapters=moved)


# ------------------------------------------------------------------------------ the CLI


def test_cli_help_teaches_and_the_cli_refuses_then_fits(tmp_path, capsys):
    from ltt_exit.cli.fit_exits import build_parser, main, parse_layers

    text = build_parser().format_help()
    for needle in ("calibration", "affine", "low-rank", "--calibration-size", "--split"):
        assert needle in text
    assert parse_layers("all", 5) == [1, 2, 3, 4] and parse_layers("2-3,1", 5) == [1, 2, 3]
    with pytest.raises(ValueError, match="layers"):
        parse_layers("0-4", 5)

    model = llama()
    tok = tokenizer_for(model)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    data = write_rows(tmp_path / "rows.jsonl", [{"id": f"r{i}", "text": dialogue(i)} for i in range(20)])
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(
        "name: mine\nsource: {kind: jsonl}\nsplit: all\nfields: {id: id, text: text}\n"
        "templates: {decoder-only: '{text}'}\nmetric: rouge-l\nmax_new_tokens: 4\n", encoding="utf-8")
    common = ["--model", str(folder), "--recipe", str(recipe), "--data-files", str(data), "--size", "6",
              "--quiet", "--device", "cpu"]
    out = tmp_path / "a.safetensors"
    assert main(common + ["--out", str(out)]) == 2
    assert "refused" in capsys.readouterr().err and not out.exists()
    assert main(common + ["--out", str(out), "--batch-prompts", "0"]) == 2
    assert "--batch-prompts" in capsys.readouterr().err and not out.exists()
    code = main(common + ["--out", str(out), "--calibration-size", "8", "--calibration-data-files", str(data),
                          "--layers", "2-3"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    adapters = ExitAdapters.load(out)
    assert summary["fingerprint"] == adapters.fingerprint and adapters.layers == [2, 3]
    assert summary["batch_prompts"] == 8  # the CPU default
    # one prompt at a time: the same prompts, tokens and (up to rounding) the same maps
    assert main(common + ["--out", str(tmp_path / "one.safetensors"), "--calibration-size", "8",
                          "--calibration-data-files", str(data), "--layers", "2-3", "--batch-prompts", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["n_tokens"] == summary["n_tokens"]
    one = ExitAdapters.load(tmp_path / "one.safetensors")
    for layer in (2, 3):
        torch.testing.assert_close(one.maps[layer].weight, adapters.maps[layer].weight, atol=1e-3, rtol=1e-3)
    assert adapters.fit_info["n_prompts"] == 6 and adapters.fit_info["excluded"][0]["n"] == 8
    calibration = load_recipe(str(recipe)).load(size=8, data_files=data)
    adapters.check_disjoint(calibration)
    # --distill-steps: the closed form fine-tuned; only with --kind affine
    named = ["--calibration-size", "8", "--calibration-data-files", str(data), "--layers", "2-3"]
    tuned = tmp_path / "tuned.safetensors"
    assert main(common + named + ["--out", str(tuned), "--distill-steps", "3", "--batch-size", "8"]) == 0
    capsys.readouterr()
    method = ExitAdapters.load(tuned).fit_info["method"]
    assert method["name"] == "ridge+distill" and method["distill"]["steps"] == 3
    bad = tmp_path / "bad.safetensors"
    assert main(common + named + ["--out", str(bad), "--distill-steps", "3", "--kind", "low-rank"]) == 2
    assert "--distill-steps" in capsys.readouterr().err and not bad.exists()


@pytest.mark.parametrize("scorer, extra_layers", [
    ("softmax-margin", lambda layer: set()),
    (("weighted-contrastive", {"amateur_layer": 1}), lambda layer: {1}),
])
def test_cost_account_charges_each_read_adapter_once_per_token(scorer, extra_layers):
    """Identity adapters leave every exit unchanged, so the FLOPs differ from the raw decoder's by exactly
    one map application (2·d² for an affine map) per adapted layer whose head a token read: the consulted
    layers j..min(exit, L-1) and the scorer's amateur; nothing for λ = 1 or the prefill's first token."""
    model = llama()
    tok = tokenizer_for(model)
    backend = backend_for(model)
    d, num_layers, min_exit = backend.hidden_size, backend.num_layers, 2
    identity = ExitAdapters.identity("affine", num_layers=num_layers, hidden_size=d, model_fingerprint="sha256:test")
    raw = EarlyExitDecoder(model, tok, scorer=scorer, min_exit_layer=min_exit)
    adapted = EarlyExitDecoder(model, tok, scorer=scorer, min_exit_layer=min_exit, exit_adapters=identity)
    texts = prompts(3, seed=4)
    for threshold in (1.0, 0.6, 0.3):
        plain = raw.generate(texts, threshold=threshold, max_new_tokens=6)
        with_maps = adapted.generate(texts, threshold=threshold, max_new_tokens=6)
        for a, b in zip(plain, with_maps):
            assert a.token_ids == b.token_ids and a.exit_layers == b.exit_layers
            expected = 0.0
            if threshold < 1.0:
                for exit_layer in b.exit_layers[1:]:  # token 0 comes from the prompt prefill
                    read = set(range(min_exit, min(exit_layer, num_layers - 1) + 1))
                    read |= {extra for layer in read for extra in extra_layers(layer)}
                    expected += 2.0 * d * d * len(read)
            assert b.cost.adapter_flops == pytest.approx(expected)
            assert a.cost.adapter_flops == 0.0
            assert b.cost.flops - a.cost.flops == pytest.approx(expected)
        if threshold == 0.3:
            assert any(layer < num_layers for s in with_maps for layer in s.exit_layers)


def test_a_certificate_of_the_first_jsd_revision_is_refused(tmp_path):
    # jsd-contrastive revision 1 (recorded without "revision") lost underflowing candidates in float32: its
    # certificates do not apply to revision 2, and say why
    from ltt_exit.apply import CertificateMismatch, CertifiedDecoder

    model = llama()
    loaded = loaded_of(model)
    decoder = EarlyExitDecoder(model, loaded.tokenizer, min_exit_layer=2, scorer="jsd-contrastive")
    assert decoder.config_dict()["scorer"]["params"]["revision"] == 2
    current = make_certificate(decoder, loaded, tmp_path)
    CertifiedDecoder(current, loaded)  # this revision's certificate applies
    config = decoder.config_dict()
    del config["scorer"]["params"]["revision"]
    decoder.config_dict = lambda: config  # as revision 1 recorded it
    (tmp_path / "old").mkdir()
    old = make_certificate(decoder, loaded, tmp_path / "old")
    with pytest.raises(CertificateMismatch, match="revision"):
        CertifiedDecoder(old, loaded)
