"""T5 backend: exactness against the library's greedy generate, fast path against the slow reference,
cost account, per-row thresholds, bad input. Random-weight T5 models built from T5Config, offline."""
import json
import math

import pytest
import torch

from ltt_exit.decode import PRUNINGS, SCORERS, EarlyExitDecoder
from ltt_exit.decode.backends import T5Backend
from ltt_exit.decode.reference import reference_generate
from ltt_exit.decode.tiny_models import tiny_llama, tiny_t5, tiny_word_tokenizer

VOCAB = 96
T5_CONFIGS = {
    "tied-relu-2L-2H": dict(tied=True, num_layers=2, num_heads=2),
    "untied-gatedgelu-4L-4H": dict(tied=False, feed_forward_proj="gated-gelu", num_layers=4, num_heads=4),
    "tied-gatedgelu-6L-8H": dict(tied=True, feed_forward_proj="gated-gelu", num_layers=6, num_heads=8, d_kv=4),
    "untied-relu-3L-1H": dict(tied=False, num_layers=3, num_heads=1, d_kv=16, seed=3),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_prompts(batch, seed=0, max_len=9):
    """Right-padded random prompts of different lengths: (ids (B, P), mask (B, P))."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [max_len - (3 * i) % max_len for i in range(batch)]
    ids = torch.zeros(batch, max_len, dtype=torch.long)
    mask = torch.zeros(batch, max_len, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(2, VOCAB, (length,), generator=generator)
        mask[row, :length] = 1
    return ids, mask


def rows_of(ids, mask):
    return [ids[i][mask[i].bool()].tolist() for i in range(ids.shape[0])]


def library_greedy(model, ids, mask, max_new_tokens, eos=1):
    out = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos
    )
    sequences = []
    for row in out[:, 1:].tolist():  # drop the decoder start token
        sequence = []
        for token in row:
            sequence.append(token)
            if token == eos:
                break
        sequences.append(sequence)
    return sequences


@pytest.mark.parametrize("config_name", list(T5_CONFIGS))
@pytest.mark.parametrize("threshold", [1.0, 1.5, math.inf])
def test_no_exit_reproduces_library_generate(config_name, threshold):
    model = tiny_t5(**T5_CONFIGS[config_name])
    decoder = EarlyExitDecoder(model, min_exit_layer=1)
    ids, mask = make_prompts(4, seed=1)
    expected = library_greedy(model, ids, mask, 10)
    batch = decoder.generate(input_ids=ids, attention_mask=mask, threshold=threshold, max_new_tokens=10)
    assert [s.token_ids for s in batch] == expected
    for row, sequence in enumerate(batch):
        assert sequence.exit_layers == [decoder.num_layers] * len(sequence.token_ids)
        assert all(math.isnan(c) for c in sequence.confidences)
        # batch 1, unpadded
        alone = decoder.generate(input_ids=torch.tensor([rows_of(ids, mask)[row]]), threshold=threshold, max_new_tokens=10)
        single = library_greedy(model, torch.tensor([rows_of(ids, mask)[row]]), None, 10)
        assert alone[0].token_ids == single[0] == expected[row]


def test_no_exit_with_eos_matches_generate():
    model = tiny_t5(**T5_CONFIGS["untied-gatedgelu-4L-4H"])
    decoder = EarlyExitDecoder(model)
    ids, mask = make_prompts(4, seed=2)
    free = library_greedy(model, ids, mask, 10, eos=None)
    eos = free[0][3]  # a token row 0 produces at its 4th step: stopping must happen there
    expected = library_greedy(model, ids, mask, 10, eos=eos)
    got = decoder.generate(input_ids=ids, attention_mask=mask, threshold=2.0, max_new_tokens=10, eos_token_id=eos)
    assert [s.token_ids for s in got] == expected
    assert got[0].token_ids[-1] == eos and len(got[0].token_ids) <= 4


def check_against_reference(decoder, ids, mask, thresholds, max_new_tokens=8):
    batch = decoder.generate(input_ids=ids, attention_mask=mask, threshold=thresholds, max_new_tokens=max_new_tokens)
    for row, (prompt, sequence) in enumerate(zip(rows_of(ids, mask), batch)):
        reference = reference_generate(decoder, prompt, thresholds[row], max_new_tokens)
        assert sequence.token_ids == reference.token_ids, (row, thresholds[row])
        assert sequence.exit_layers == reference.exit_layers, (row, thresholds[row])
        assert sequence.confidences == pytest.approx(reference.confidences, abs=1e-9, nan_ok=True)
    return batch


@pytest.mark.parametrize("config_name", list(T5_CONFIGS))
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.6, 0.9])
def test_fast_path_matches_reference(config_name, threshold):
    model = tiny_t5(**T5_CONFIGS[config_name], dtype=torch.float64)
    decoder = EarlyExitDecoder(model, scorer="softmax-margin", min_exit_layer=1)
    ids, mask = make_prompts(4, seed=4)
    batch = check_against_reference(decoder, ids, mask, [threshold] * 4)
    if threshold == 0.0:  # everything exits at the minimum exit layer
        assert all(layer == 1 for s in batch for layer in s.exit_layers)


def test_reference_comparison_is_not_vacuous():
    model = tiny_t5(**T5_CONFIGS["untied-gatedgelu-4L-4H"], dtype=torch.float64)
    decoder = EarlyExitDecoder(model)
    ids, mask = make_prompts(4, seed=4)
    layers = {
        layer
        for threshold in (0.3, 0.6, 0.9)
        for s in decoder.generate(input_ids=ids, attention_mask=mask, threshold=threshold, max_new_tokens=8)
        for layer in s.exit_layers
    }
    assert layers == {1, 2, 3, 4}
    distinct_tokens = {t for s in decoder.generate(input_ids=ids, attention_mask=mask, threshold=2.0) for t in s.token_ids}
    assert len(distinct_tokens) >= 5


PRUNING_SPECS = {"none": "none", "fixed": ("fixed", {"k": 12}), "decaying": ("decaying", {"k_max": 60, "k_min": 4}),
                 "shortlist": ("shortlist", {"rank": 8, "k": 40, "k_min": 4})}


@pytest.mark.parametrize("scorer", sorted(SCORERS))
@pytest.mark.parametrize("pruning", sorted(PRUNINGS))
def test_every_scorer_and_pruning_matches_reference(scorer, pruning):
    model = tiny_t5(**T5_CONFIGS["untied-gatedgelu-4L-4H"], dtype=torch.float64)
    min_exit_layer = 2 if pruning == "fixed" else 1
    decoder = EarlyExitDecoder(model, scorer=scorer, pruning=PRUNING_SPECS[pruning], min_exit_layer=min_exit_layer, tau=1.5)
    ids, mask = make_prompts(4, seed=6)
    check_against_reference(decoder, ids, mask, [0.2, 0.5, 0.8, 0.95])


@pytest.mark.parametrize("min_exit_layer", [1, 2, 3, 4])
def test_threshold_zero_exits_at_min_exit_layer(min_exit_layer):
    model = tiny_t5(**T5_CONFIGS["untied-gatedgelu-4L-4H"])
    decoder = EarlyExitDecoder(model, min_exit_layer=min_exit_layer, pruning=("fixed", {"k": 5}))
    ids, mask = make_prompts(3, seed=7)
    for sequence in decoder.generate(input_ids=ids, attention_mask=mask, threshold=0.0, max_new_tokens=6):
        assert sequence.exit_layers == [min_exit_layer] * len(sequence.token_ids)
        if min_exit_layer < 4:
            assert all(0.0 <= c <= 1.0 for c in sequence.confidences)


def test_per_row_thresholds_match_rows_decoded_alone():
    model = tiny_t5(**T5_CONFIGS["tied-gatedgelu-6L-8H"], dtype=torch.float64)
    decoder = EarlyExitDecoder(model, scorer="softmax-max", pruning=("decaying", {"k_max": 50, "k_min": 5}), tau=2.0)
    ids, mask = make_prompts(4, seed=8)
    thresholds = [0.25, 0.55, 0.85, 1.0]
    batch = decoder.generate(input_ids=ids, attention_mask=mask, threshold=thresholds, max_new_tokens=9)
    for row, prompt in enumerate(rows_of(ids, mask)):
        alone = decoder.generate(input_ids=torch.tensor([prompt]), threshold=thresholds[row], max_new_tokens=9)[0]
        assert (alone.token_ids, alone.exit_layers) == (batch[row].token_ids, batch[row].exit_layers)
        assert batch[row].threshold == thresholds[row]
        assert alone.cost == batch[row].cost  # each row is charged as if decoded on its own
    # the λ = 1 row never consults an intermediate head, even while the other rows of its batch do
    assert batch[3].cost.head_rows == VOCAB * len(batch[3].token_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_prompt_many_thresholds_as_rows(dtype):
    # how the calibration sweep batches the candidate thresholds of one prompt
    model = tiny_t5(**T5_CONFIGS["untied-gatedgelu-4L-4H"], dtype=dtype)
    decoder = EarlyExitDecoder(model, scorer="jsd-contrastive")
    prompt = make_prompts(1, seed=9)[0]
    grid = [1.0, 0.9, 0.7, 0.5, 0.3, 0.0]
    batch = decoder.generate(input_ids=prompt.repeat(len(grid), 1), threshold=grid, max_new_tokens=8)
    for threshold, sequence in zip(grid, batch):
        alone = decoder.generate(input_ids=prompt, threshold=threshold, max_new_tokens=8)[0]
        assert (alone.token_ids, alone.exit_layers) == (sequence.token_ids, sequence.exit_layers)
    assert batch[0].exit_layers == [4] * len(batch[0].token_ids)
    assert batch[-1].exit_layers == [1] * len(batch[-1].token_ids)


@pytest.mark.parametrize("threshold", [0.4, 0.8])
def test_kv_only_propagation_equals_running_the_layers(threshold):
    model = tiny_t5(**T5_CONFIGS["untied-gatedgelu-4L-4H"], dtype=torch.float64)
    decoder = EarlyExitDecoder(model)
    ids, mask = make_prompts(2, seed=10)
    fast = decoder.generate(input_ids=ids[:1], attention_mask=mask[:1], threshold=threshold, max_new_tokens=10)
    decoder.kv_only_when_all_exited = False
    slow = decoder.generate(input_ids=ids[:1], attention_mask=mask[:1], threshold=threshold, max_new_tokens=10)
    assert fast[0].token_ids == slow[0].token_ids and fast[0].exit_layers == slow[0].exit_layers
    assert fast[0].confidences == pytest.approx(slow[0].confidences, abs=1e-12, nan_ok=True)
    assert min(fast[0].exit_layers) < decoder.num_layers  # the K/V-only path was taken


def t5_layer_flops(config, context, source):
    """One decoder position, written out from the T5 shapes (2 FLOPs per multiply-add)."""
    d, inner, ff = config.d_model, config.num_heads * config.d_kv, config.d_ff
    ffn = (3 if config.is_gated_act else 2) * 2 * d * ff
    return 4 * 2 * d * inner + 2 * 2 * inner * context + 2 * 2 * d * inner + 2 * 2 * inner * source + ffn


def test_cost_account_full_model_and_threshold_zero():
    model = tiny_t5(**T5_CONFIGS["untied-gatedgelu-4L-4H"])
    config, L, V, d = model.config, 4, VOCAB, model.config.d_model
    decoder = EarlyExitDecoder(model, min_exit_layer=2)
    prompt = torch.randint(2, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    full = decoder.generate(input_ids=prompt, threshold=2.0, max_new_tokens=6, eos_token_id=[])[0]
    n = len(full.token_ids)
    assert n == 6
    assert full.cost.tokens == n and full.cost.layers_run == L * n and full.cost.kv_propagations == 0
    # λ >= 1 cannot exit: no intermediate head is consulted, only the final one
    assert full.cost.head_rows == n * V
    expected_full = sum(L * t5_layer_flops(config, t + 1, 7) + 2 * d * V for t in range(n))
    assert full.cost.full_flops == pytest.approx(expected_full)
    assert full.cost.flops == pytest.approx(expected_full)
    early = decoder.generate(input_ids=prompt, threshold=0.0, max_new_tokens=6, eos_token_id=[])[0]
    kv = 2 * 2 * d * config.num_heads * config.d_kv
    assert early.cost.layers_run == 2 * n and early.cost.kv_propagations == 2 * n and early.cost.head_rows == n * V
    expected = sum(2 * t5_layer_flops(config, t + 1, 7) + 2 * kv + 2 * d * V for t in range(n))
    assert early.cost.flops == pytest.approx(expected)
    assert early.cost.full_flops == pytest.approx(expected_full)
    assert early.cost.flops_ratio < 1.0 and early.mean_layers == 2.0
    assert early.cost.prefill_flops == full.cost.prefill_flops > 0


V_ = VOCAB


@pytest.mark.parametrize(
    "scorer, pruning, rows_for_exit_layer",
    [
        # L = 4, j = 1, V = 96. A token exiting at e < 4 consulted layers 1..e; one reaching 4 consulted
        # 1, 2, 3 and then used the final full head.
        # fixed k = 10: the full head at 1, then 10 rows per layer
        ("softmax-margin", ("fixed", {"k": 10}), lambda e: V_ + 10 * (min(e, 3) - 1) + (V_ if e == 4 else 0)),
        # decaying: k(1) = 40*4*4 // (4*4 + 36*1) = 12, k(2) = 640 // 88 = 7: layer 2 evaluates the 12 ids
        # kept at layer 1, layer 3 the 7 kept at layer 2
        ("softmax-margin", ("decaying", {"k_max": 40, "k_min": 4}),
         lambda e: V_ + (12 if e >= 2 else 0) + (7 if e >= 3 else 0) + (V_ if e == 4 else 0)),
        # hidden-cosine evaluates the head only where the token leaves: once, on the full vocabulary
        ("hidden-cosine", "none", lambda e: V_),
        # experts on the full vocabulary at 1..min(e, 3); amateur ⌊ℓ/2⌋: layer 0 at ℓ = 1 (new), layer 1 at
        # ℓ = 2, 3 (the layer-1 expert, already computed)
        ("weighted-contrastive", "none", lambda e: V_ * min(e, 3) + V_ + (V_ if e == 4 else 0)),
        # fixed k = 10, expert 1 on the full vocabulary, later experts on the 10 ids. Amateurs on the 10 ids:
        # at 1: layer 0 (10 rows); at 2: 0 (memo), 1 (taken from layer 1's full head: free);
        # at 3: 0, 1 (memo), 2 (the layer-2 expert: memo)
        ("jsd-contrastive", ("fixed", {"k": 10}), lambda e: V_ + 10 + 10 * (min(e, 3) - 1) + (V_ if e == 4 else 0)),
    ],
)
def test_head_rows_account(scorer, pruning, rows_for_exit_layer):
    model = tiny_t5(**T5_CONFIGS["untied-gatedgelu-4L-4H"])
    decoder = EarlyExitDecoder(model, scorer=scorer, pruning=pruning, min_exit_layer=1)
    prompts = torch.randint(2, VOCAB, (3, 5), generator=torch.Generator().manual_seed(1))
    layers_seen = set()
    for threshold in (0.3, 0.6, 0.9):
        for sequence in decoder.generate(input_ids=prompts, threshold=threshold, max_new_tokens=6, eos_token_id=[]):
            layers_seen.update(sequence.exit_layers)
            assert sequence.cost.head_rows == sum(rows_for_exit_layer(e) for e in sequence.exit_layers)
    assert len(layers_seen) >= 3  # several exit layers were exercised


def test_hidden_cosine_charges_the_head_only_when_exiting():
    model = tiny_t5(**T5_CONFIGS["untied-gatedgelu-4L-4H"])
    decoder = EarlyExitDecoder(model, scorer="hidden-cosine", min_exit_layer=2)
    prompt = torch.randint(2, VOCAB, (1, 5), generator=torch.Generator().manual_seed(1))
    sequence = decoder.generate(input_ids=prompt, threshold=0.0, max_new_tokens=5, eos_token_id=[])[0]
    assert sequence.exit_layers == [2] * 5 and sequence.cost.head_rows == 5 * VOCAB


def test_prompts_as_text_with_tokenizer():
    model = tiny_t5(**T5_CONFIGS["untied-gatedgelu-4L-4H"])
    tokenizer = tiny_word_tokenizer(VOCAB, add_eos=True)
    decoder = EarlyExitDecoder(model, tokenizer)
    texts = ["w5 w17 w33 w40", "w8 w9"]
    got = decoder.generate(texts, threshold=0.5, max_new_tokens=6)
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    by_ids = decoder.generate(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], threshold=0.5, max_new_tokens=6)
    for a, b in zip(got, by_ids):
        assert a.token_ids == b.token_ids and a.exit_layers == b.exit_layers
        assert a.text == tokenizer.decode(a.token_ids, skip_special_tokens=True) and a.text
    # without a tokenizer the text is empty
    assert EarlyExitDecoder(model).generate(input_ids=encoded["input_ids"][:1], max_new_tokens=2)[0].text == ""


def test_config_dict_describes_the_decoder():
    model = tiny_t5(**T5_CONFIGS["untied-gatedgelu-4L-4H"])
    decoder = EarlyExitDecoder(
        model, scorer=("weighted-contrastive", {"amateur_layer": 0, "alpha": 0.2}), pruning=("fixed", {"k": 7}),
        min_exit_layer=2, tau=3.0,
    )
    config = json.loads(json.dumps(decoder.config_dict()))
    assert config["backend"] == "t5" and config["num_layers"] == 4 == decoder.num_layers
    assert config["scorer"] == {"name": "weighted-contrastive", "params": {"amateur_layer": 0, "alpha": 0.2}}
    assert config["pruning"] == {"name": "fixed", "params": {"k": 7}}
    assert config["min_exit_layer"] == 2 and config["tau"] == 3.0
    assert config["rescale_head_input"] is False and config["dtype"] == "float32"
    other = EarlyExitDecoder(model, scorer=("weighted-contrastive", {"amateur_layer": 1, "alpha": 0.2}),
                             pruning=("fixed", {"k": 7}), min_exit_layer=2, tau=3.0)
    assert other.config_dict() != decoder.config_dict()


def test_tied_model_rescales_the_head_input():
    tied = EarlyExitDecoder(tiny_t5(**T5_CONFIGS["tied-relu-2L-2H"]))
    assert tied.config_dict()["rescale_head_input"] is True
    model = tied.model
    hidden = torch.randn(3, model.config.d_model)
    expected = model.lm_head(model.decoder.final_layer_norm(hidden) * model.config.d_model**-0.5)
    assert torch.allclose(tied.backend.head(hidden), expected)
    ids = torch.tensor([[4, 9], [0, 95], [50, 51]])
    assert torch.allclose(tied.backend.head(hidden, ids), expected.gather(-1, ids), atol=1e-5)


def test_bad_input():
    model = tiny_t5(**T5_CONFIGS["tied-relu-2L-2H"])
    for bad_layer in (0, 3, -1):
        with pytest.raises(ValueError, match="min_exit_layer"):
            EarlyExitDecoder(model, min_exit_layer=bad_layer)
    with pytest.raises(TypeError, match="min_exit_layer"):
        EarlyExitDecoder(model, min_exit_layer=1.0)
    with pytest.raises(ValueError, match="unknown scorer"):
        EarlyExitDecoder(model, scorer="entropy")
    with pytest.raises(ValueError, match="unknown pruning"):
        EarlyExitDecoder(model, pruning="random")
    for k in (0, -5):
        with pytest.raises(ValueError, match="k"):
            EarlyExitDecoder(model, pruning=("fixed", {"k": k}))
    with pytest.raises(ValueError, match="tau"):
        EarlyExitDecoder(model, tau=-1.0)
    with pytest.raises(ValueError, match="amateur_layer"):
        EarlyExitDecoder(model, scorer=("weighted-contrastive", {"amateur_layer": 1}), min_exit_layer=1)
    with pytest.raises(TypeError, match="T5ForConditionalGeneration"):
        T5Backend(tiny_llama())
    with pytest.raises(TypeError, match="supported model classes"):
        EarlyExitDecoder(torch.nn.Linear(3, 3))
    decoder = EarlyExitDecoder(model)
    ids, mask = make_prompts(2)
    with pytest.raises(ValueError, match="one per row"):
        decoder.generate(input_ids=ids, attention_mask=mask, threshold=[0.5])
    with pytest.raises(ValueError, match="tokenizer"):
        decoder.generate(["w3 w4"])
    with pytest.raises(ValueError, match="exactly one"):
        decoder.generate()
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.generate(input_ids=ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="vocabulary"):
        decoder.generate(input_ids=torch.tensor([[5, VOCAB]]))
    with pytest.raises(ValueError, match="real"):
        decoder.generate(input_ids=ids, attention_mask=torch.zeros_like(mask))
    with pytest.raises(ValueError, match=">= 0"):
        decoder.generate(input_ids=ids, threshold=-0.1)


def test_exit_rule_is_confidence_at_least_threshold():
    model = tiny_t5(**T5_CONFIGS["untied-gatedgelu-4L-4H"])
    decoder = EarlyExitDecoder(model, min_exit_layer=2)
    prompt = torch.randint(2, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    at_zero = decoder.generate(input_ids=prompt, threshold=0.0, max_new_tokens=1)[0]
    confidence = at_zero.confidences[0]  # the layer-2 confidence of the first token
    assert 0.0 < confidence < 1.0
    exactly = decoder.generate(input_ids=prompt, threshold=confidence, max_new_tokens=1)[0]
    assert exactly.exit_layers == [2] and exactly.confidences == [confidence]
    above = decoder.generate(input_ids=prompt, threshold=math.nextafter(confidence, 1.0) + 1e-7, max_new_tokens=1)[0]
    assert above.exit_layers[0] > 2


def test_decoder_deeper_than_encoder():
    # the decoder's own depth counts (the library's generate cannot run this config in transformers 5.24:
    # its cache is sized from the encoder depth); checked against the reference instead
    model = tiny_t5(num_layers=2, num_decoder_layers=5, feed_forward_proj="gated-gelu", tied=False, dtype=torch.float64)
    decoder = EarlyExitDecoder(model, scorer="softmax-margin", min_exit_layer=2)
    assert decoder.num_layers == 5
    ids, mask = make_prompts(3, seed=12)
    batch = check_against_reference(decoder, ids, mask, [0.3, 0.7, 2.0])
    assert batch[2].exit_layers == [5] * len(batch[2].token_ids)
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        EarlyExitDecoder(model, min_exit_layer=6)
