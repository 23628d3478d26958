"""The learned exit classifier (scorer "exit-classifier"): its confidence against a hand computation, the
logistic fit on synthetic data, the decoder at λ = 1, storage in the adapter file and its refusals, and the
ltt-fit-exits option. Tiny random models and files the tests write; offline."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ltt_exit.decode import EarlyExitDecoder
from ltt_exit.decode.adapters import (
    DEFAULT_CLASSIFIER_FEATURES,
    AdapterMismatch,
    ExitAdapters,
    collect_states,
    exit_classifier_samples,
    fit_exit_classifier,
    fit_logistic_exit_model,
)
from ltt_exit.decode.backends import backend_for
from ltt_exit.decode.scorers import EXIT_FEATURES, ExitClassifier, ExitView, LogisticExitModel, exit_features
from ltt_exit.decode.tiny_models import tiny_llama, tiny_word_tokenizer

from adapter_helpers import random_adapters

VOCAB = 96
LAYERS = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def model_and_tokenizer(seed=0):
    torch.manual_seed(seed)
    model = tiny_llama(num_layers=LAYERS, vocab_size=VOCAB).double()
    tok = tiny_word_tokenizer(VOCAB, pad_id=0, bos_id=1, eos_id=2, add_bos=True)
    return model, tok


def random_affine(model, seed=0, scale=0.3):
    return random_adapters(model, "affine", scale=scale, seed=seed)


def random_classifier(layers, seed=0, features=EXIT_FEATURES):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(len(layers), len(features), generator=generator, dtype=torch.float64)
    bias = torch.randn(len(layers), generator=generator, dtype=torch.float64)
    return LogisticExitModel(features, layers, weight, bias)


def texts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(3, VOCAB - 3, size=rng.integers(3, 8))) for _ in range(n)]


# ------------------------------------------------------------------------------ hand computation


def hand_head(model, adapters, hidden, layer):
    """Logits of the (adapted) exit head written out: RMS norm with the model's weight, then lm_head."""
    h = hidden.double().numpy()
    if layer in adapters.maps:
        weight = adapters.maps[layer].weight.detach().double().numpy()
        h = h @ weight.T + adapters.maps[layer].bias.detach().double().numpy()
    norm = model.model.norm
    normed = h / np.sqrt((h**2).mean(-1, keepdims=True) + norm.variance_epsilon) * norm.weight.detach().double().numpy()
    return normed @ model.lm_head.weight.detach().double().numpy().T


def hand_confidence(model, adapters, classifier, h_prev, h, layer, ids=None):
    """σ(b + w · f) with every feature computed by hand with numpy (rows: positions)."""
    logits, prev_logits = hand_head(model, adapters, h, layer), hand_head(model, adapters, h_prev, layer - 1)
    if ids is not None:
        logits = np.take_along_axis(logits, ids, -1)
        prev_logits = np.take_along_axis(prev_logits, ids, -1)

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(logits), softmax(prev_logits)
    order = np.argsort(-p, -1)
    top, second = np.take_along_axis(p, order[:, :1], -1)[:, 0], np.take_along_axis(p, order[:, 1:2], -1)[:, 0]
    q_sorted = -np.sort(-q, -1)
    q_top = np.take_along_axis(q, order[:, :1], -1)[:, 0]
    a, b = h.double().numpy(), h_prev.double().numpy()
    columns = {
        "top1-log-odds": np.log(top / (1 - top)),
        "margin": top - second,
        "entropy": -(p * np.log(p)).sum(-1),
        "previous-agrees": (q.argmax(-1) == order[:, 0]).astype(float),
        "previous-top1-log-odds": np.log(q_top / (1 - q_top)),
        "previous-margin": q_sorted[:, 0] - q_sorted[:, 1],
        "hidden-cosine": (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1),
    }
    f = np.stack([columns[name] for name in classifier.features], -1)
    row = classifier.layers.index(layer)
    z = f @ classifier.weight[row].numpy() + classifier.bias[row].item()
    return 1 / (1 + np.exp(-z))


@pytest.mark.parametrize("pruning", ["none", ("fixed", {"k": 9})])
def test_confidence_equals_a_hand_computed_logistic_model(pruning):
    model, tok = model_and_tokenizer()
    adapters = random_affine(model)
    classifier = random_classifier([2, 3])
    adapters = adapters.with_exit_classifier(classifier)
    backend = backend_for(model)
    prompt = texts(1, seed=3)
    # float64 states of every position of the prompt followed by the full model's first token
    ids = tok(prompt[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        first = model(ids).logits[0, -1].argmax()
        states = model(torch.cat([ids, first.view(1, 1)], 1), output_hidden_states=True).hidden_states
    hidden = {layer: states[layer][0] for layer in (1, 2)}
    scorer = ExitClassifier(classifier)
    # at the first consulted layer (2): fixed pruning keeps the top-k ids of layer 2's (adapted) logits
    kept = None
    if pruning != "none":
        kept = np.argsort(-hand_head(model, adapters, hidden[2], 2), -1)[:, :9]
    kept_t = None if kept is None else torch.from_numpy(kept)
    with torch.no_grad():
        view = ExitView(layer=2, logits=backend.head(adapters.apply(2, hidden[2]), kept_t), hidden=hidden[2],
                        hidden_prev=hidden[1], logits_at=lambda a: backend.head(adapters.apply(a, hidden[a]), kept_t))
        confidence = scorer.score(view).numpy()
    expected = hand_confidence(model, adapters, classifier, hidden[1], hidden[2], 2, kept)
    # the library's RMS norm computes in float32 even for a float64 model, the hand computation in float64
    np.testing.assert_allclose(confidence, expected, rtol=1e-5)

    # the decoder passes the same view: at λ = 0 the second token (the first exit decision; the states
    # of the earlier positions are the full model's) exits at layer 2 with that confidence
    decoder = EarlyExitDecoder(model, tok, scorer="exit-classifier", pruning=pruning, min_exit_layer=2,
                               exit_adapters=adapters)
    (sequence,) = decoder.generate(prompt, threshold=0.0, max_new_tokens=2)
    assert sequence.token_ids[0] == int(first) and sequence.exit_layers[1] == 2
    assert sequence.confidences[1] == pytest.approx(confidence[-1], rel=1e-9)


def test_features_handle_a_one_token_set_and_unknown_names():
    logits = torch.tensor([[2.0], [0.5]], dtype=torch.float64)
    hidden = torch.randn(2, 8, dtype=torch.float64)
    view = ExitView(layer=3, logits=logits, hidden=hidden, hidden_prev=hidden, logits_at=lambda a: logits)
    f = exit_features(view, ("margin", "entropy", "previous-agrees", "top1-log-odds"))
    # one candidate: p1 = 1, margin 1, entropy 0, the previous layer agrees, log-odds clipped (finite)
    assert f[:, 0].tolist() == [1.0, 1.0] and f[:, 1].tolist() == [0.0, 0.0] and f[:, 2].tolist() == [1.0, 1.0]
    assert torch.isfinite(f).all()
    with pytest.raises(ValueError, match="unknown exit-classifier features"):
        exit_features(view, ("margin", "nope"))
    with pytest.raises(ValueError, match="logits_at"):
        exit_features(ExitView(layer=3, logits=logits, hidden=hidden, hidden_prev=hidden), ("previous-margin",))


# ------------------------------------------------------------------------------ the fit


@pytest.mark.parametrize("per_layer", [False, True])
def test_fit_recovers_a_known_separable_rule(per_layer):
    rng = np.random.default_rng(0)
    n, layers, g = 4000, 3, 4
    true_w = rng.normal(size=(layers if per_layer else 1, g)) * 3
    true_w = np.broadcast_to(true_w, (layers, g))
    true_b = np.array([-1.0, 0.0, 1.5])

    def sample(count):
        x = rng.normal(size=(count, layers, g)) * np.array([1.0, 2.0, 0.5, 1.0]) + np.array([0.0, 1.0, -1.0, 3.0])
        return x, np.einsum("nlg,lg->nl", x, true_w) + true_b > 0

    x, y = sample(n)
    model, facts = fit_logistic_exit_model(x, y, layers=[5, 6, 7], names=EXIT_FEATURES[:g], l2=1e-5,
                                           per_layer=per_layer)
    assert facts["converged"] and facts["samples"] == n * layers
    fresh_x, fresh_y = sample(2000)
    logit = np.stack([model.logit(layer, torch.from_numpy(fresh_x[:, i])).numpy() for i, layer in enumerate([5, 6, 7])], 1)
    assert ((logit > 0) == fresh_y).mean() > 0.99
    for i in range(layers):  # the rule's direction (w, b) up to scale
        fitted = np.concatenate([model.weight[i].numpy(), [model.bias[i].item()]])
        truth = np.concatenate([true_w[i], [true_b[i]]])
        assert fitted @ truth / np.linalg.norm(fitted) / np.linalg.norm(truth) > 0.99
    if not per_layer:
        assert torch.equal(model.weight[0], model.weight[2])


def test_fit_rejects_bad_input():
    x, y = np.zeros((5, 2, 3)), np.zeros((5, 2), dtype=bool)
    with pytest.raises(ValueError, match="layer numbers"):
        fit_logistic_exit_model(x, y, layers=[1], names=EXIT_FEATURES[:3])
    with pytest.raises(ValueError, match="l2"):
        fit_logistic_exit_model(x, y, layers=[1, 2], names=EXIT_FEATURES[:3], l2=0)
    x[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_logistic_exit_model(x, y, layers=[1, 2], names=EXIT_FEATURES[:3])
    model, tok = model_and_tokenizer()
    with pytest.raises(ValueError, match="no prompts"):
        fit_exit_classifier(type("L", (), {"model": model, "tokenizer": tok})(), random_affine(model), [], {},
                            max_new_tokens=2, min_exit_layer=1)


def test_samples_label_whether_the_pruned_prediction_is_the_full_models_token():
    model, tok = model_and_tokenizer()
    backend = backend_for(model)
    adapters = random_affine(model)
    (batch,) = collect_states(model, tok, texts(1, seed=4), max_new_tokens=5, layers=[1, 2, 3])
    batch.hidden = {layer: h.double() for layer, h in batch.hidden.items()}
    x, y = exit_classifier_samples(backend, batch, adapters, pruning="none", min_exit_layer=2)
    assert x.shape == (len(batch.tokens) - 1, 2, len(DEFAULT_CLASSIFIER_FEATURES))  # position 0: the prefill's
    for i, layer in enumerate([2, 3]):
        predicted = hand_head(model, adapters, batch.hidden[layer], layer).argmax(-1)
        assert y[:, i].tolist() == (predicted == np.array(batch.tokens))[1:].tolist()
    with pytest.raises(ValueError, match="min_exit_layer"):
        exit_classifier_samples(backend, batch, adapters, pruning="none", min_exit_layer=1)


# ------------------------------------------------------------------------------ decoder, file, refusals


def test_decoder_at_lambda_one_is_the_full_model():
    model, tok = model_and_tokenizer(seed=1)
    adapters = random_affine(model, seed=2).with_exit_classifier(random_classifier([2, 3], seed=4))
    decoder = EarlyExitDecoder(model, tok, scorer="exit-classifier", pruning="decaying", min_exit_layer=2,
                               exit_adapters=adapters)
    prompts = texts(3, seed=7)
    sequences = decoder.generate(prompts, threshold=1.0, max_new_tokens=6, eos_token_id=[])
    for prompt, sequence in zip(prompts, sequences):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                   num_beams=1, eos_token_id=None, pad_token_id=0)
        assert sequence.token_ids == reference[0, ids.shape[1]:].tolist()
        assert sequence.exit_layers == [LAYERS] * 6
    # below 1 the classifier is really consulted (some tokens leave early)
    low = decoder.generate(prompts, threshold=0.0, max_new_tokens=6, eos_token_id=[])
    assert all(layer == 2 for s in low for layer in s.exit_layers[1:])


def test_the_scorer_refuses_to_run_without_fitted_parameters(tmp_path):
    model, tok = model_and_tokenizer()
    plain = random_affine(model)
    file = plain.save(tmp_path / "plain.safetensors")
    loaded = ExitAdapters.load(file)
    assert loaded.exit_classifier is None
    with pytest.raises(ValueError, match="hold no fitted classifier.*ltt-fit-exits --exit-classifier"):
        EarlyExitDecoder(model, tok, scorer="exit-classifier", min_exit_layer=2, exit_adapters=loaded)
    with pytest.raises(ValueError, match="no exit adapters were given"):
        EarlyExitDecoder(model, tok, scorer="exit-classifier", min_exit_layer=2)
    view = ExitView(layer=2, logits=torch.zeros(1, 4), hidden=torch.ones(1, 3), hidden_prev=torch.ones(1, 3))
    with pytest.raises(ValueError, match="no fitted parameters"):
        ExitClassifier().score(view)
    # a classifier that does not cover every consulted layer is refused too
    partial = plain.with_exit_classifier(random_classifier([3]))
    with pytest.raises(ValueError, match="missing"):
        EarlyExitDecoder(model, tok, scorer="exit-classifier", min_exit_layer=2, exit_adapters=partial)


def test_the_classifier_is_stored_in_the_adapter_file_and_covered_by_its_fingerprint(tmp_path):
    from ltt_exit.decode.adapters import ExampleHashes

    model, tok = model_and_tokenizer()
    plain = random_affine(model)
    classifier = random_classifier([2, 3], seed=1)

    class Example:
        def __init__(self, i):
            self.id, self.prompt, self.fields = f"c{i}", f"prompt {i}", {}

    hashes = ExampleHashes.of([Example(0), Example(1)], recipe="mine", source="here")
    with_classifier = plain.with_exit_classifier(classifier, {"n_prompts": 2}, hashes)
    assert with_classifier.fingerprint != plain.fingerprint
    file = with_classifier.save(tmp_path / "clf.safetensors")
    loaded = ExitAdapters.load(file)
    assert loaded.fingerprint == with_classifier.fingerprint
    assert torch.equal(loaded.exit_classifier.weight, classifier.weight)
    assert torch.equal(loaded.exit_classifier.bias, classifier.bias)
    assert loaded.exit_classifier.features == classifier.features
    assert loaded.describe()["exit_classifier"]["layers"] == [2, 3]
    assert "exit_classifier" not in plain.describe()
    # another classifier on the same maps is another file
    other = plain.with_exit_classifier(random_classifier([2, 3], seed=2), {"n_prompts": 2}, hashes)
    assert other.fingerprint != with_classifier.fingerprint
    # the classifier's fitting prompts count for check_disjoint
    from ltt_exit.decode.adapters import CalibrationOverlap

    class Calibration:
        recipe, source, examples = "mine", "here", [Example(1)]

    with pytest.raises(CalibrationOverlap):
        loaded.check_disjoint(Calibration())
    # an edited classifier weight is refused on load
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(file))
    tensors["exit_classifier.weight"] = tensors["exit_classifier.weight"] + 1e-3
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=metadata)
    with pytest.raises(AdapterMismatch, match="changed"):
        ExitAdapters.load(tmp_path / "edited.safetensors")
    del tensors["exit_classifier.weight"]
    save_file(tensors, str(tmp_path / "missing.safetensors"), metadata=metadata)
    with pytest.raises(AdapterMismatch, match="tensors are missing"):
        ExitAdapters.load(tmp_path / "missing.safetensors")


def test_bad_classifier_models_are_refused():
    with pytest.raises(ValueError, match="features"):
        LogisticExitModel(("nope",), [2], torch.zeros(1, 1), torch.zeros(1))
    with pytest.raises(ValueError, match="weight must be"):
        LogisticExitModel(("margin",), [2, 3], torch.zeros(1, 1), torch.zeros(2))
    with pytest.raises(ValueError, match="ascending"):
        LogisticExitModel(("margin",), [3, 2], torch.zeros(2, 1), torch.zeros(2))
    model = LogisticExitModel(("margin",), [2], torch.ones(1, 1), torch.zeros(1))
    with pytest.raises(ValueError, match="not layer 5"):
        model.probability(5, torch.zeros(1, 1))


# ------------------------------------------------------------------------------ the CLI


def test_cli_fits_a_classifier_on_prompts_the_adapters_did_not_see(tmp_path, capsys):
    from ltt_exit.cli.fit_exits import main
    from ltt_exit.recipes import load_recipe

    model, tok = model_and_tokenizer()
    model = model.float()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    rows = [{"id": f"r{i}", "text": " ".join(f"w{(i * 7 + j) % 80 + 3}" for j in range(12))} for i in range(24)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(
        "name: mine\nsource: {kind: jsonl}\nsplit: all\nfields: {id: id, text: text}\n"
        "templates: {decoder-only: '{text}'}\nmetric: rouge-l\nmax_new_tokens: 4\n", encoding="utf-8")
    common = ["--model", str(folder), "--recipe", str(recipe), "--data-files", str(data), "--quiet",
              "--device", "cpu", "--calibration-size", "6", "--calibration-data-files", str(data)]
    adapters_file = tmp_path / "a.safetensors"
    assert main(common + ["--size", "6", "--layers", "1-3", "--out", str(adapters_file)]) == 0
    capsys.readouterr()
    out = tmp_path / "clf.safetensors"
    code = main(common + ["--adapters", str(adapters_file), "--classifier-size", "8", "--min-exit-layer", "2",
                          "--pruning", "fixed", "--pruning-params", '{"k": 10}', "--out", str(out)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    plain, fitted = ExitAdapters.load(adapters_file), ExitAdapters.load(out)
    assert summary["fingerprint"] == fitted.fingerprint != plain.fingerprint
    assert summary["exit_classifier"]["n_prompts"] == 8
    record = fitted.fit_info["exit_classifier"]
    assert record["pruning"] == {"name": "fixed", "params": {"k": 10}} and record["min_exit_layer"] == 2
    # the maps are the file's; the classifier's prompts are neither the adapters' nor the calibration sample's
    assert all(torch.equal(fitted.maps[x].weight, plain.maps[x].weight) for x in plain.layers)
    assert not (fitted.example_hashes.prompts - plain.example_hashes.prompts) & plain.example_hashes.prompts
    assert len(fitted.example_hashes.prompts) == 6 + 8
    calibration = load_recipe(str(recipe)).load(size=6, data_files=data)
    fitted.check_disjoint(calibration)
    decoder = EarlyExitDecoder(model, tok, scorer="exit-classifier", pruning=("fixed", {"k": 10}), min_exit_layer=2,
                               exit_adapters=fitted)
    assert len(decoder.generate(["w3 w4"], threshold=0.5, max_new_tokens=3)[0].token_ids) == 3


def test_decoder_paths_agree_with_the_classifier_scorer():
    """Batched decoding = the slow reference, the sweep's grid = each candidate alone, and the fast path = the
    generic decoder, with the classifier scorer behind decaying pruning and adapters."""
    from ltt_exit.decode import FastEarlyExitDecoder
    from ltt_exit.decode.reference import reference_generate

    model, tok = model_and_tokenizer(seed=3)
    adapters = random_affine(model, seed=1).with_exit_classifier(
        LogisticExitModel(DEFAULT_CLASSIFIER_FEATURES, [2, 3], torch.full((2, 7), 0.3, dtype=torch.float64),
                          torch.tensor([0.0, 0.5], dtype=torch.float64)))
    settings = dict(scorer="exit-classifier", pruning=("decaying", {"k_max": 40, "k_min": 4}), min_exit_layer=2,
                    exit_adapters=adapters, tau=1.0)
    decoder = EarlyExitDecoder(model, tok, **settings)
    prompts = texts(3, seed=11)
    ids = [tok(p)["input_ids"] for p in prompts]
    thresholds = [0.6, 0.8, 0.95]
    batch = decoder.generate(input_ids=ids, threshold=thresholds, max_new_tokens=7, eos_token_id=[])
    exits = [layer for s in batch for layer in s.exit_layers[1:]]
    assert len(set(exits)) > 1  # not vacuous: tokens leave at different layers
    for row, sequence in enumerate(batch):
        reference = reference_generate(decoder, ids[row], thresholds[row], 7, eos_token_id=[])
        assert (sequence.token_ids, sequence.exit_layers) == (reference.token_ids, reference.exit_layers)
        assert sequence.confidences == pytest.approx(reference.confidences, abs=1e-9, nan_ok=True)
    lambdas = [1.0, 0.95, 0.8, 0.6, 0.3]
    full, early = decoder.generate_grid(input_ids=ids, lambdas=lambdas, max_new_tokens=7, eos_token_id=[])
    for row in range(len(ids)):
        for j, lam in enumerate(lambdas):
            (alone,) = decoder.generate(input_ids=[ids[row]], threshold=lam, max_new_tokens=7, eos_token_id=[])
            assert (early[row][j].token_ids, early[row][j].exit_layers) == (alone.token_ids, alone.exit_layers)
    fast = FastEarlyExitDecoder(model, tok, **settings)
    for got, want in zip(fast.generate(input_ids=ids, threshold=thresholds, max_new_tokens=7, eos_token_id=[]), batch):
        assert (got.token_ids, got.exit_layers) == (want.token_ids, want.exit_layers)


def test_adding_a_classifier_leaves_the_original_adapters_alone():
    model, tok = model_and_tokenizer()
    adapters = random_affine(model)
    hidden = torch.randn(2, backend_for(model).hidden_size, dtype=torch.float64)
    before = adapters.apply(2, hidden)  # moves the maps to float64
    copy = adapters.with_exit_classifier(random_classifier([2, 3]))
    assert copy.maps[2] is not adapters.maps[2]
    assert torch.equal(adapters.apply(2, hidden), before)
    assert copy.fingerprint != adapters.fingerprint and adapters.exit_classifier is None
