"""Decoder-only backend (Llama / Qwen2 / Mistral): exactness against the library's greedy generate with
left padding, fast path against the slow reference, rotary K/V propagation. Random weights, offline."""
import math

import pytest
import torch

from ltt_exit.decode import PRUNINGS, SCORERS, EarlyExitDecoder
from ltt_exit.decode.backends import DecoderOnlyBackend
from ltt_exit.decode.reference import reference_generate
from ltt_exit.decode.tiny_models import tiny_llama, tiny_mistral, tiny_qwen2, tiny_t5, tiny_word_tokenizer

VOCAB = 128
BUILDERS = {
    "llama-untied-gqa": lambda **kw: tiny_llama(tied=False, num_heads=4, num_key_value_heads=2, **kw),
    "llama-tied-mha-4L": lambda **kw: tiny_llama(tied=True, num_heads=4, num_key_value_heads=4, num_layers=4, seed=1, **kw),
    "llama-untied-mqa-2L": lambda **kw: tiny_llama(tied=False, num_heads=4, num_key_value_heads=1, num_layers=2, seed=2, **kw),
    "qwen2-tied-gqa": lambda **kw: tiny_qwen2(tied=True, num_heads=4, num_key_value_heads=2, **kw),
    "qwen2-untied-gqa-5L": lambda **kw: tiny_qwen2(tied=False, num_heads=8, num_key_value_heads=2, num_layers=5, seed=3, **kw),
    "mistral-sliding-window": lambda **kw: tiny_mistral(sliding_window=5, seed=4, **kw),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_prompts(batch, seed=0, max_len=8):
    """Left-padded random prompts of different lengths: (ids (B, P), mask (B, P))."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, max_len, dtype=torch.long)
    mask = torch.zeros(batch, max_len, dtype=torch.long)
    for row in range(batch):
        length = max_len - (3 * row) % max_len
        ids[row, max_len - length :] = torch.randint(3, VOCAB, (length,), generator=generator)
        mask[row, max_len - length :] = 1
    return ids, mask


def rows_of(ids, mask):
    return [ids[i][mask[i].bool()].tolist() for i in range(ids.shape[0])]


def library_greedy(model, ids, mask, max_new_tokens, eos=None):
    out = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
        eos_token_id=eos, pad_token_id=0,
    )
    sequences = []
    for row in out[:, ids.shape[1]:].tolist():
        sequence = []
        for token in row:
            sequence.append(token)
            if token == eos:
                break
        sequences.append(sequence)
    return sequences


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("threshold", [1.0, math.inf])
def test_no_exit_reproduces_library_generate(name, threshold):
    model = BUILDERS[name]()
    decoder = EarlyExitDecoder(model)
    ids, mask = make_prompts(4, seed=1)
    expected = library_greedy(model, ids, mask, 10)
    batch = decoder.generate(input_ids=ids, attention_mask=mask, threshold=threshold, max_new_tokens=10, eos_token_id=[])
    assert [s.token_ids for s in batch] == expected
    assert all(s.exit_layers == [decoder.num_layers] * 10 for s in batch)
    for row, prompt in enumerate(rows_of(ids, mask)):
        alone = decoder.generate(input_ids=torch.tensor([prompt]), threshold=threshold, max_new_tokens=10, eos_token_id=[])
        assert alone[0].token_ids == library_greedy(model, torch.tensor([prompt]), None, 10)[0] == expected[row]


def test_no_exit_with_eos_matches_generate():
    model = BUILDERS["qwen2-tied-gqa"]()
    decoder = EarlyExitDecoder(model)
    ids, mask = make_prompts(4, seed=2)
    eos = library_greedy(model, ids, mask, 10)[1][4]
    expected = library_greedy(model, ids, mask, 10, eos=eos)
    got = decoder.generate(input_ids=ids, attention_mask=mask, threshold=2.0, max_new_tokens=10, eos_token_id=eos)
    assert [s.token_ids for s in got] == expected
    assert got[1].token_ids[-1] == eos and len(got[1].token_ids) <= 5


def check_against_reference(decoder, ids, mask, thresholds, max_new_tokens=9):
    batch = decoder.generate(
        input_ids=ids, attention_mask=mask, threshold=thresholds, max_new_tokens=max_new_tokens, eos_token_id=[]
    )
    for row, (prompt, sequence) in enumerate(zip(rows_of(ids, mask), batch)):
        reference = reference_generate(decoder, prompt, thresholds[row], max_new_tokens, eos_token_id=[])
        assert sequence.token_ids == reference.token_ids, (row, thresholds[row])
        assert sequence.exit_layers == reference.exit_layers, (row, thresholds[row])
        assert sequence.confidences == pytest.approx(reference.confidences, abs=1e-9, nan_ok=True)
    return batch


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.6, 0.9])
def test_fast_path_matches_reference(name, threshold):
    decoder = EarlyExitDecoder(BUILDERS[name](dtype=torch.float64))
    ids, mask = make_prompts(4, seed=4)
    batch = check_against_reference(decoder, ids, mask, [threshold] * 4)
    for sequence in batch:
        # the first token comes from the prompt prefill: always the full model
        assert sequence.exit_layers[0] == decoder.num_layers and math.isnan(sequence.confidences[0])
        if threshold == 0.0:
            assert sequence.exit_layers[1:] == [1] * 8


def test_reference_comparison_is_not_vacuous():
    decoder = EarlyExitDecoder(BUILDERS["qwen2-untied-gqa-5L"](dtype=torch.float64))
    ids, mask = make_prompts(4, seed=4)
    layers = {
        layer
        for threshold in (0.3, 0.6)
        for s in decoder.generate(input_ids=ids, attention_mask=mask, threshold=threshold, max_new_tokens=9)
        for layer in s.exit_layers[1:]
    }
    assert layers == {1, 2, 3, 4, 5}


PRUNING_SPECS = {"none": "none", "fixed": ("fixed", {"k": 16}), "decaying": ("decaying", {"k_max": 80, "k_min": 6}),
                 "shortlist": ("shortlist", {"rank": 8, "k": 48, "k_min": 6})}


@pytest.mark.parametrize("scorer", sorted(SCORERS))
@pytest.mark.parametrize("pruning", sorted(PRUNINGS))
def test_every_scorer_and_pruning_matches_reference(scorer, pruning):
    model = BUILDERS["qwen2-tied-gqa"](dtype=torch.float64)
    min_exit_layer = 2 if pruning == "decaying" else 1
    decoder = EarlyExitDecoder(model, scorer=scorer, pruning=PRUNING_SPECS[pruning], min_exit_layer=min_exit_layer, tau=2.0)
    ids, mask = make_prompts(4, seed=6)
    check_against_reference(decoder, ids, mask, [0.15, 0.4, 0.7, 0.95])


def test_per_row_thresholds_match_rows_decoded_alone():
    decoder = EarlyExitDecoder(BUILDERS["llama-tied-mha-4L"](dtype=torch.float64), scorer="weighted-contrastive")
    ids, mask = make_prompts(4, seed=8)
    thresholds = [0.1, 0.35, 0.7, 1.0]
    batch = decoder.generate(input_ids=ids, attention_mask=mask, threshold=thresholds, max_new_tokens=9)
    for row, prompt in enumerate(rows_of(ids, mask)):
        alone = decoder.generate(input_ids=torch.tensor([prompt]), threshold=thresholds[row], max_new_tokens=9)[0]
        assert (alone.token_ids, alone.exit_layers) == (batch[row].token_ids, batch[row].exit_layers)


@pytest.mark.parametrize("name", ["llama-untied-gqa", "qwen2-tied-gqa", "mistral-sliding-window"])
def test_rotary_kv_only_propagation_equals_running_the_layers(name):
    decoder = EarlyExitDecoder(BUILDERS[name](dtype=torch.float64))
    ids, mask = make_prompts(3, seed=10)
    for threshold in (0.2, 0.5):
        fast = decoder.generate(input_ids=ids, attention_mask=mask, threshold=threshold, max_new_tokens=12, eos_token_id=[])
        decoder.kv_only_when_all_exited = False
        slow = decoder.generate(input_ids=ids, attention_mask=mask, threshold=threshold, max_new_tokens=12, eos_token_id=[])
        decoder.kv_only_when_all_exited = True
        for a, b in zip(fast, slow):
            assert (a.token_ids, a.exit_layers) == (b.token_ids, b.exit_layers)
    # batch 1 exercises the K/V-only path on every early exit
    one = decoder.generate(input_ids=ids[:1], attention_mask=mask[:1], threshold=0.2, max_new_tokens=12, eos_token_id=[])[0]
    assert min(one.exit_layers) < decoder.num_layers


def test_propagated_keys_are_rotated_at_the_token_position():
    # The K/V-only path must append exactly what the library layer itself appends for the same state.
    model = BUILDERS["qwen2-untied-gqa-5L"](dtype=torch.float64)
    backend = DecoderOnlyBackend(model)
    ids, mask = make_prompts(2, seed=11)
    from ltt_exit.decode.backends import PromptBatch

    by_layer, by_projection = backend.start(PromptBatch(ids, mask)), backend.start(PromptBatch(ids, mask))
    tokens = torch.tensor([5, 9])
    hidden_a = backend.begin_step(by_layer, tokens)
    backend.begin_step(by_projection, tokens)  # the same step opened on the second state
    frozen = torch.randn_like(hidden_a)
    for index in range(backend.num_layers):
        backend.run_layer(by_layer, index, frozen)
        backend.propagate_kv(by_projection, index, frozen)
    for index in range(backend.num_layers):
        a, b = by_layer.cache.layers[index], by_projection.cache.layers[index]
        assert torch.allclose(a.keys, b.keys, atol=1e-12) and torch.allclose(a.values, b.values, atol=1e-12)
    # written out: K = k_proj(norm(h)) rotated by the rotary angles of the token's own position
    layer = backend.layers[0]
    keys = layer.self_attn.k_proj(layer.input_layernorm(frozen)).view(2, 1, -1, backend.head_dim).transpose(1, 2)
    cos, sin = backend.base.rotary_emb(frozen, by_projection.position_ids)
    cos, sin = cos[:, None], sin[:, None]
    half = backend.head_dim // 2
    rotated_half = torch.cat([-keys[..., half:], keys[..., :half]], dim=-1)
    expected = keys * cos + rotated_half * sin
    assert by_projection.position_ids.tolist() == [[mask[0].sum().item()], [mask[1].sum().item()]]
    assert torch.allclose(by_projection.cache.layers[0].keys[:, :, -1:], expected, atol=1e-12)
    assert not torch.allclose(expected, keys)


def llama_layer_flops(config, context):
    d, head_dim = config.hidden_size, config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return 2 * d * q * 2 + 2 * d * kv * 2 + 2 * 2 * q * context + 3 * 2 * d * config.intermediate_size


def test_cost_account():
    model = BUILDERS["llama-untied-gqa"]()
    config, L, d = model.config, 3, model.config.hidden_size
    decoder = EarlyExitDecoder(model, min_exit_layer=1)
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    n = 7
    full = decoder.generate(input_ids=prompt, threshold=2.0, max_new_tokens=n, eos_token_id=[])[0]
    # token t comes from the pass of position 5 + t, which attends over 6 + t positions
    expected_full = sum(L * llama_layer_flops(config, 6 + t) + 2 * d * VOCAB for t in range(n))
    assert full.cost.full_flops == pytest.approx(expected_full)
    # λ >= 1 consults no intermediate head: one full head per token (the first from the prefill)
    assert full.cost.head_rows == n * VOCAB
    assert full.cost.flops == pytest.approx(full.cost.full_flops)
    assert full.cost.layers_run == L * n
    assert full.cost.prefill_flops == pytest.approx(sum(L * llama_layer_flops(config, p + 1) for p in range(5)))
    early = decoder.generate(input_ids=prompt, threshold=0.0, max_new_tokens=n, eos_token_id=[])[0]
    kv = 2 * 2 * d * config.num_key_value_heads * (d // config.num_attention_heads)
    expected = L * llama_layer_flops(config, 6) + 2 * d * VOCAB + sum(
        llama_layer_flops(config, 6 + t) + (L - 1) * kv + 2 * d * VOCAB for t in range(1, n)
    )
    assert early.exit_layers == [L] + [1] * (n - 1)
    assert early.cost.flops == pytest.approx(expected)
    assert early.cost.kv_propagations == (L - 1) * (n - 1)
    assert EarlyExitDecoder.mean_layers([full, early]) == pytest.approx((L * n + L + (n - 1)) / (2 * n))


def test_prompts_as_text_are_left_padded():
    model = BUILDERS["llama-untied-gqa"]()
    tokenizer = tiny_word_tokenizer(VOCAB, pad_id=0, bos_id=1, eos_id=2, add_bos=True)
    decoder = EarlyExitDecoder(model, tokenizer)
    texts = ["w5 w17 w33 w40 w41", "w8"]
    got = decoder.generate(texts, threshold=0.4, max_new_tokens=6)
    for text, sequence in zip(texts, got):
        alone = decoder.generate(input_ids=torch.tensor([tokenizer(text)["input_ids"]]), threshold=0.4, max_new_tokens=6)[0]
        assert (sequence.token_ids, sequence.exit_layers) == (alone.token_ids, alone.exit_layers)
        assert sequence.text == tokenizer.decode(sequence.token_ids, skip_special_tokens=True)


def test_config_dict_and_backend_choice():
    decoder = EarlyExitDecoder(BUILDERS["qwen2-tied-gqa"](), scorer="hidden-cosine", pruning=("decaying", {"k_max": 40, "k_min": 4}))
    config = decoder.config_dict()
    assert config["backend"] == "decoder-only" and config["model_type"] == "qwen2"
    assert config["scorer"] == {"name": "hidden-cosine", "params": {}}
    assert config["pruning"] == {"name": "decaying", "params": {"k_max": 40, "k_min": 4}}
    assert isinstance(decoder.backend, DecoderOnlyBackend)
    assert EarlyExitDecoder(tiny_t5()).config_dict()["backend"] == "t5"


def test_bad_input():
    decoder = EarlyExitDecoder(BUILDERS["llama-untied-gqa"]())
    ids, mask = make_prompts(2)
    right_padded = torch.tensor([[5, 6, 7], [8, 9, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        decoder.generate(input_ids=right_padded, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    with pytest.raises(ValueError, match="min_exit_layer"):
        EarlyExitDecoder(decoder.model, min_exit_layer=4)
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        DecoderOnlyBackend(tiny_t5())
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2))
    with pytest.raises(TypeError, match="Qwen2ForCausalLM"):
        EarlyExitDecoder(gpt2)


def test_an_older_transformers_is_refused_with_a_clear_message():
    """Before 5.24 the library's layers take the cache as ``past_key_values``: the decoder must not import
    there (it would decode without a cache)."""
    import subprocess
    import sys

    code = ("import transformers; transformers.__version__ = '5.17.0'\n"
            "import ltt_exit.decode\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "needs transformers >= 5.24, found 5.17.0" in done.stderr
