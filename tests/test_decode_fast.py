"""FastEarlyExitDecoder (static buffers, CUDA graphs, lagged host reads): token for token, exit layer for
exit layer and cost for cost equal to the reference-checked EarlyExitDecoder, on both families.

On CPU the same pieces run eagerly (no graphs). Set LTT_FAST_TEST_DEVICE=cuda to run these checks on a
GPU, where every step is replayed from captured CUDA graphs (float64, so kernel differences between the
static and the dynamic cache stay far below every decision margin)."""
import math
import os

import pytest
import torch

from ltt_exit.decode import EarlyExitDecoder, FastEarlyExitDecoder
from ltt_exit.decode.fast_buffers import StackedKV
from ltt_exit.decode.reference import reference_generate
from ltt_exit.decode.tiny_models import tiny_llama, tiny_mistral, tiny_qwen2, tiny_t5

DEVICE = os.environ.get("LTT_FAST_TEST_DEVICE", "cpu")
DTYPE = torch.float64

BUILDERS = {
    "t5-tied-relu-3L": lambda: tiny_t5(tied=True, num_layers=3, num_heads=2, dtype=DTYPE),
    "t5-untied-gated-6L": lambda: tiny_t5(tied=False, feed_forward_proj="gated-gelu", num_layers=6, num_heads=4,
                                          seed=1, dtype=DTYPE),
    "llama-gqa-6L": lambda: tiny_llama(num_layers=6, num_heads=4, num_key_value_heads=2, dtype=DTYPE),
    "qwen2-bias-tied-5L": lambda: tiny_qwen2(num_layers=5, num_heads=8, num_key_value_heads=2, seed=3, dtype=DTYPE),
    "mistral-sliding-4L": lambda: tiny_mistral(num_layers=4, sliding_window=5, seed=4, dtype=DTYPE),
}
SCORER_PRUNING = [
    ("softmax-margin", "none"),
    ("softmax-max", ("fixed", {"k": 6})),
    ("softmax-margin", ("decaying", {"k_max": 60, "k_min": 4})),
    ("hidden-cosine", "none"),
    ("hidden-cosine", ("fixed", {"k": 6})),
    ("weighted-contrastive", ("fixed", {"k": 6})),  # not fused: the eager exit_rule.consult
    ("jsd-contrastive", "none"),
    ("softmax-margin", ("shortlist", {"rank": 8, "k": 40, "k_min": 4})),  # not fused: the eager exit_rule.consult
]


pytestmark = pytest.mark.usefixtures("one_thread")


def model_for(name):
    return BUILDERS[name]().to(DEVICE)


def prompts_for(decoder, batch, seed=0, width=8):
    """Random prompts of different lengths, padded on the family's side: (ids (B, P), mask (B, P))."""
    generator = torch.Generator().manual_seed(seed)
    vocab = decoder.backend.vocab_size
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row in range(batch):
        length = width - (3 * row) % (width - 1)
        span = slice(width - length, width) if decoder.backend.padding_side == "left" else slice(0, length)
        ids[row, span] = torch.randint(3, vocab, (length,), generator=generator)
        mask[row, span] = 1
    return ids, mask


def assert_same(expected, got):
    assert len(expected) == len(got)
    for row, (a, b) in enumerate(zip(expected, got)):
        assert b.token_ids == a.token_ids, row
        assert b.exit_layers == a.exit_layers, row
        assert b.confidences == pytest.approx(a.confidences, abs=1e-9, nan_ok=True), row
        assert b.cost == a.cost, row
        assert b.threshold == a.threshold


def both(model, **kwargs):
    fast_options = {k: kwargs.pop(k) for k in ("lookahead", "compile", "length_bucket") if k in kwargs}
    return EarlyExitDecoder(model, **kwargs), FastEarlyExitDecoder(model, **kwargs, **fast_options)


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("scorer,pruning", SCORER_PRUNING)
def test_matches_generic_decoder_per_row_thresholds(name, scorer, pruning):
    model = model_for(name)
    generic, fast = both(model, scorer=scorer, pruning=pruning, min_exit_layer=2, tau=0.7)
    ids, mask = prompts_for(generic, 4, seed=1)
    thresholds = [0.0, 0.3, 0.8, math.inf] if scorer != "hidden-cosine" else [0.1, 0.6, 0.95, 1.0]
    kwargs = dict(input_ids=ids, attention_mask=mask, threshold=thresholds, max_new_tokens=9, eos_token_id=[])
    expected = generic.generate(**kwargs)
    assert_same(expected, fast.generate(**kwargs))
    # some rows must actually have left early for this to test anything
    assert any(layer < generic.num_layers for s in expected[:3] for layer in s.exit_layers[1:])


@pytest.mark.parametrize("name", ["t5-untied-gated-6L", "llama-gqa-6L"])
@pytest.mark.parametrize("lookahead", [0, 1, 3])
def test_lookahead_changes_no_output(name, lookahead):
    """A layer queued after every row exited runs on the frozen states: outputs do not depend on the lag."""
    model = model_for(name)
    generic, fast = both(model, pruning=("fixed", {"k": 8}), min_exit_layer=1, lookahead=lookahead)
    ids, mask = prompts_for(generic, 3, seed=2)
    for threshold in (0.0, 0.2, 0.5):  # 0.0: every token exits at layer 1, the longest K/V tail
        kwargs = dict(input_ids=ids, attention_mask=mask, threshold=threshold, max_new_tokens=8, eos_token_id=[])
        assert_same(generic.generate(**kwargs), fast.generate(**kwargs))


@pytest.mark.parametrize("name", ["t5-tied-relu-3L", "qwen2-bias-tied-5L"])
def test_matches_slow_reference(name):
    model = model_for(name)
    fast = FastEarlyExitDecoder(model, pruning=("decaying", {"k_max": 60, "k_min": 4}), tau=1.0)
    ids, mask = prompts_for(fast, 2, seed=3)
    rows = [ids[i][mask[i].bool()].tolist() for i in range(2)]
    for threshold in (0.0, 0.4, 0.8):
        got = fast.generate(input_ids=ids, attention_mask=mask, threshold=threshold, max_new_tokens=7, eos_token_id=[])
        for prompt, sequence in zip(rows, got):
            reference = reference_generate(fast, prompt, threshold, 7, eos_token_id=[])
            assert sequence.token_ids == reference.token_ids
            assert sequence.exit_layers == reference.exit_layers
            assert sequence.confidences == pytest.approx(reference.confidences, abs=1e-9, nan_ok=True)


@pytest.mark.parametrize("name", ["t5-untied-gated-6L", "llama-gqa-6L", "mistral-sliding-4L"])
def test_full_model_equals_library_generate(name):
    model = model_for(name)
    fast = FastEarlyExitDecoder(model)
    ids, mask = prompts_for(fast, 3, seed=4)
    got = fast.generate(input_ids=ids, attention_mask=mask, threshold=1.0, max_new_tokens=10, eos_token_id=[])
    model.generation_config.eos_token_id = None  # never stop (min_new_tokens would mask EOS instead)
    out = model.generate(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), do_sample=False, num_beams=1,
                         max_new_tokens=10, pad_token_id=0)
    start = 1 if fast.backend.family == "t5" else ids.shape[1]
    assert [s.token_ids for s in got] == out[:, start:].tolist()
    assert all(s.exit_layers == [fast.num_layers] * 10 for s in got)


@pytest.mark.parametrize("name", ["t5-tied-relu-3L", "qwen2-bias-tied-5L"])
def test_eos_ends_rows_like_the_generic_decoder(name):
    model = model_for(name)
    generic, fast = both(model, min_exit_layer=1)
    ids, mask = prompts_for(generic, 4, seed=5)
    free = generic.generate(input_ids=ids, attention_mask=mask, threshold=0.3, max_new_tokens=10, eos_token_id=[])
    eos = free[1].token_ids[3]  # makes row 1 stop after 4 tokens (others wherever the id occurs)
    kwargs = dict(input_ids=ids, attention_mask=mask, threshold=[0.3, 0.3, 1.0, 0.0], max_new_tokens=10,
                  eos_token_id=eos)
    expected = generic.generate(**kwargs)
    got = fast.generate(**kwargs)
    assert_same(expected, got)
    assert got[1].token_ids[-1] == eos and len(got[1].token_ids) <= 4
    # every row ending on EOS: the loop stops early (within one step of the last row finishing)
    single = fast.generate(input_ids=ids[1:2], attention_mask=mask[1:2], threshold=0.3, max_new_tokens=10,
                           eos_token_id=eos)
    assert single[0].token_ids == got[1].token_ids
    assert fast.last_stats["steps"] <= len(single[0].token_ids) + 1


def test_graphs_are_reused_across_calls_of_the_same_shape():
    model = model_for("llama-gqa-6L")
    generic, fast = both(model, pruning=("fixed", {"k": 8}), min_exit_layer=2, length_bucket=16)
    for seed, threshold in [(6, 0.2), (7, 0.6), (8, 1.0)]:  # second and third call: same batch / bucket
        ids, mask = prompts_for(generic, 2, seed=seed, width=7 if seed == 6 else 9)
        kwargs = dict(input_ids=ids, attention_mask=mask, threshold=threshold, max_new_tokens=6, eos_token_id=[])
        assert_same(generic.generate(**kwargs), fast.generate(**kwargs))
    assert len(fast._sessions) == 1


def test_max_new_tokens_one_and_first_token_eos():
    model = model_for("llama-gqa-6L")
    generic, fast = both(model)
    ids, mask = prompts_for(generic, 2, seed=9)
    assert_same(generic.generate(input_ids=ids, attention_mask=mask, threshold=0.1, max_new_tokens=1),
                fast.generate(input_ids=ids, attention_mask=mask, threshold=0.1, max_new_tokens=1))
    first = generic.generate(input_ids=ids, attention_mask=mask, threshold=0.1, max_new_tokens=1)
    eos = [s.token_ids[0] for s in first]
    kwargs = dict(input_ids=ids, attention_mask=mask, threshold=0.1, max_new_tokens=5, eos_token_id=eos)
    assert_same(generic.generate(**kwargs), fast.generate(**kwargs))


def test_compiled_decision_matches():
    """The fused decision through torch.compile's tracing (aot_eager: no code generation, fast on CPU)."""
    model = model_for("t5-untied-gated-6L")
    generic, fast = both(model, pruning=("fixed", {"k": 8}), min_exit_layer=2, compile="aot_eager")
    ids, mask = prompts_for(generic, 2, seed=10)
    kwargs = dict(input_ids=ids, attention_mask=mask, threshold=[0.1, 0.5], max_new_tokens=6, eos_token_id=[])
    assert_same(generic.generate(**kwargs), fast.generate(**kwargs))


@pytest.mark.parametrize("name", ["t5-untied-gated-6L", "qwen2-bias-tied-5L"])
def test_forced_exit_layers(name):
    model = model_for(name)
    fast = FastEarlyExitDecoder(model, min_exit_layer=2)
    L = fast.num_layers
    ids, mask = prompts_for(fast, 2, seed=11)
    forced = [[2 + (t + row) % (L - 1) for t in range(8)] for row in range(2)]  # layers 2..L
    got = fast.generate(input_ids=ids, attention_mask=mask, threshold=0.5, max_new_tokens=8, eos_token_id=[],
                        force_exit_layers=forced)
    first = 1 if fast.backend.first_token_from_prompt else 0
    for row, sequence in enumerate(got):
        assert sequence.exit_layers[first:] == forced[row][first:]
        # the confidences are still the scorer's, and NaN exactly where no early exit happened
        assert [math.isnan(c) for c in sequence.confidences[first:]] == [x == L for x in forced[row][first:]]
    everything = fast.generate(input_ids=ids, attention_mask=mask, threshold=0.5, max_new_tokens=8, eos_token_id=[],
                               force_exit_layers=[[L] * 8] * 2)
    full = fast.generate(input_ids=ids, attention_mask=mask, threshold=1.0, max_new_tokens=8, eos_token_id=[])
    assert [s.token_ids for s in everything] == [s.token_ids for s in full]
    with pytest.raises(ValueError, match="forced exit layers"):
        fast.generate(input_ids=ids, attention_mask=mask, threshold=0.5, max_new_tokens=2,
                      force_exit_layers=[[1, 1], [2, 2]])
    with pytest.raises(ValueError, match="threshold below 1"):
        fast.generate(input_ids=ids, attention_mask=mask, threshold=1.0, max_new_tokens=2,
                      force_exit_layers=[[2, 2], [2, 2]])


@pytest.mark.parametrize("name", ["t5-untied-gated-6L", "qwen2-bias-tied-5L", "mistral-sliding-4L"])
def test_stacked_kv_equals_each_layers_own_projection(name):
    """The batched K/V tail equals ExitBackend.propagate_kv layer by layer (norm, K/V, RoPE at the position)."""
    model = model_for(name)
    backend = EarlyExitDecoder(model).backend
    stacked = StackedKV(backend)
    generator = torch.Generator().manual_seed(12)
    hidden = torch.randn(3, 1, backend.hidden_size, generator=generator, dtype=DTYPE).to(DEVICE)
    cos = sin = None
    if backend.family == "decoder-only":
        position_ids = torch.tensor([[4], [9], [17]], device=DEVICE)
        cos, sin = backend.base.rotary_emb(hidden, position_ids)
    start = 1
    keys, values = stacked.project(hidden, start, cos, sin)
    for offset, index in enumerate(range(start, backend.num_layers)):
        captured = {}

        class Recorder:
            def update(self, k, v, layer_index, *args, **kwargs):
                captured["k"], captured["v"] = k, v
                return k, v

        if backend.family == "t5":
            state = type("S", (), {"cache": type("C", (), {"self_attention_cache": Recorder()})()})()
        else:
            state = type("S", (), {"cache": Recorder(), "position_embeddings": (cos, sin)})()
        backend.propagate_kv(state, index, hidden)
        torch.testing.assert_close(keys[offset], captured["k"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(values[offset], captured["v"], rtol=1e-12, atol=1e-12)


def test_bad_settings():
    model = model_for("llama-gqa-6L")
    with pytest.raises(ValueError, match="lookahead"):
        FastEarlyExitDecoder(model, lookahead=-1)
    with pytest.raises(ValueError, match="length_bucket"):
        FastEarlyExitDecoder(model, length_bucket=0)
    with pytest.raises(TypeError, match="compile"):
        FastEarlyExitDecoder(model, compile=3)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="CUDA"):
            FastEarlyExitDecoder(model, cuda_graphs=True)
    contrastive = FastEarlyExitDecoder(model, scorer="weighted-contrastive")
    assert not contrastive.uses_fused_decision
    ids, mask = prompts_for(contrastive, 1)
    with pytest.raises(ValueError, match="fused"):
        contrastive.generate(input_ids=ids, attention_mask=mask, threshold=0.5, max_new_tokens=2,
                             force_exit_layers=[[3, 3]])
    assert FastEarlyExitDecoder(model).config_dict() == EarlyExitDecoder(model).config_dict()


@pytest.mark.parametrize("name", ["llama-gqa-6L", "t5-untied-gated-6L"])
@pytest.mark.parametrize("scorer,pruning", [
    ("softmax-margin", ("decaying", {"k_max": 60, "k_min": 4})),
    ("exit-classifier", ("decaying", {"k_max": 60, "k_min": 4})),
    ("weighted-contrastive", ("fixed", {"k": 6})),
])
def test_matches_generic_decoder_with_exit_adapters(name, scorer, pruning):
    """Exit adapters (and the classifier they can hold) on the fast path, captured into CUDA graphs on a
    GPU: the same tokens, exits, confidences and cost accounts (adapter FLOPs included)."""
    from adapter_helpers import random_adapters

    from ltt_exit.decode.scorers import EXIT_FEATURES, LogisticExitModel

    model = model_for(name)
    num_layers = EarlyExitDecoder(model).num_layers
    adapters = random_adapters(model, "affine", scale=0.3, seed=5)
    if scorer == "exit-classifier":
        layers = list(range(2, num_layers))
        adapters = adapters.with_exit_classifier(LogisticExitModel(
            EXIT_FEATURES, layers, torch.full((len(layers), len(EXIT_FEATURES)), 0.3, dtype=torch.float64),
            torch.linspace(-0.5, 0.5, len(layers), dtype=torch.float64)))
    adapters = adapters.to(DEVICE)
    generic, fast = both(model, scorer=scorer, pruning=pruning, min_exit_layer=2, tau=0.7, exit_adapters=adapters)
    ids, mask = prompts_for(generic, 3, seed=6)
    kwargs = dict(input_ids=ids, attention_mask=mask, threshold=[0.3, 0.7, 0.95], max_new_tokens=8, eos_token_id=[])
    expected = generic.generate(**kwargs)
    assert_same(expected, fast.generate(**kwargs))
    assert any(layer < num_layers for s in expected for layer in s.exit_layers[1:])
    assert all(s.cost.adapter_flops > 0 for s in expected)
