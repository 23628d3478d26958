"""Exit cost on small-d, large-vocabulary models: a threshold that cannot exit consults no exit head on
any path, and the ``shortlist`` pruning (low-rank ranking of the vocabulary, exact logits on its top k)
is exact against an independent computation, on the generic, grid and fast paths, with its cost counted."""
import math

import numpy as np
import pytest
import torch

from ltt_exit.decode import EarlyExitDecoder, FastEarlyExitDecoder, ThresholdSchedule
from ltt_exit.decode.pruning import LowRankHead, ShortlistPruning, resolve_pruning
from ltt_exit.decode.reference import reference_generate
from ltt_exit.decode.tiny_models import tiny_llama, tiny_t5

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPE = torch.float64
SHORTLIST = ("shortlist", {"rank": 8, "k": 40, "k_min": 4})
MODELS = {
    "llama-6L": lambda: tiny_llama(num_layers=6, num_heads=4, num_key_value_heads=2, dtype=DTYPE),
    "t5-untied-4L": lambda: tiny_t5(tied=False, feed_forward_proj="gated-gelu", num_layers=4, num_heads=4, seed=1,
                                    dtype=DTYPE),
}
PROMPTS = [[5, 6, 7, 8, 9], [11, 3, 40, 17, 22]]


def assert_same(expected, got):
    for a, b in zip(expected, got):
        assert b.token_ids == a.token_ids
        assert b.exit_layers == a.exit_layers
        assert b.confidences == pytest.approx(a.confidences, abs=1e-9, nan_ok=True)
        assert b.cost == a.cost


# ---- λ >= 1 costs nothing ------------------------------------------------------------------------------
def test_schedule_cannot_exit_exactly_at_lambda_one_for_every_decay():
    for tau in (0.0, 0.5, 4.0):
        schedule = ThresholdSchedule(tau)
        assert not schedule.can_exit(1.0) and not schedule.can_exit(1.5)
        assert schedule.can_exit(0.999)
        # the decay only lowers λ_t (so a base below 1 stays below 1, and 1 is never cleared by decay)
        values = [schedule.value(0.95, t, 20) for t in range(20)]
        assert all(v <= 0.95 for v in values) and all(math.isfinite(v) for v in values)
        assert all(math.isinf(schedule.value(1.0, t, 20)) for t in range(20))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("pruning", ["none", ("decaying", {"k_max": 60, "k_min": 4}), SHORTLIST])
def test_lambda_one_consults_no_exit_head_on_any_path(name, pruning):
    model = MODELS[name]()
    generic = EarlyExitDecoder(model, pruning=pruning, min_exit_layer=1, tau=0.7)
    fast = FastEarlyExitDecoder(model, pruning=pruning, min_exit_layer=1, tau=0.7)
    vocab = generic.backend.vocab_size
    heads = []
    original = generic.backend.head

    def counting_head(hidden, ids=None, weights=None):
        heads.append(ids is None)
        return original(hidden, ids, weights)

    generic.backend.head = fast.backend.head = fast._head = counting_head
    heads.clear()
    full = generic.generate(input_ids=PROMPTS, threshold=1.0, max_new_tokens=7, eos_token_id=[])
    assert all(heads) and heads  # only the last layer's full head ran
    heads.clear()
    quick = fast.generate(input_ids=PROMPTS, threshold=1.0, max_new_tokens=7, eos_token_id=[])
    assert all(heads) and heads
    assert fast.last_stats["head_consults"] == 0
    assert_same(full, quick)
    for row, sequence in enumerate(full):
        reference = reference_generate(generic, PROMPTS[row], 1.0, 7, eos_token_id=[])  # the full model
        assert sequence.token_ids == reference.token_ids
        assert sequence.exit_layers == [generic.num_layers] * 7
        assert sequence.cost.flops == sequence.cost.full_flops
        assert sequence.cost.head_rows == vocab * len(sequence.token_ids)
        assert sequence.cost.shortlist_flops == 0.0
    # the counter is not vacuous: one row that can exit makes the fast path consult heads
    fast.generate(input_ids=PROMPTS, threshold=[1.0, 0.5], max_new_tokens=7, eos_token_id=[])
    assert fast.last_stats["head_consults"] > 0


# ---- the shortlist -------------------------------------------------------------------------------------
def slow_shortlist(weight: np.ndarray, normed: np.ndarray, rank: int, k: int) -> np.ndarray:
    """The top-k vocabulary ids of normed (d,) by the rank-``rank`` truncated SVD of weight (V, d), in numpy."""
    u, s, vt = np.linalg.svd(weight, full_matrices=False)
    approx = (u[:, :rank] * s[:rank]) @ (vt[:rank] @ normed)
    return np.argsort(-approx, kind="stable")[:k]


def test_low_rank_head_is_the_truncated_svd():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 12, generator=generator, dtype=DTYPE)
    x = torch.randn(3, 12, generator=generator, dtype=DTYPE)
    full = LowRankHead(weight, None, 12)
    assert torch.allclose(full.scores(x), x @ weight.t(), atol=1e-10)  # full rank: the head itself
    u, s, vt = np.linalg.svd(weight.numpy(), full_matrices=False)
    low = LowRankHead(weight, None, 4)
    expected = x.numpy() @ ((u[:, :4] * s[:4]) @ vt[:4]).T
    assert np.allclose(low.scores(x).numpy(), expected, atol=1e-10)
    assert low.flops() == 2.0 * (12 * 4 + 4 * 50)
    with pytest.raises(ValueError, match="rank"):
        LowRankHead(weight, None, 13)


@pytest.mark.parametrize("name", list(MODELS))
@torch.no_grad()
def test_first_consulted_layer_equals_an_independent_slow_shortlist(name):
    decoder = EarlyExitDecoder(MODELS[name](), pruning=SHORTLIST, min_exit_layer=2)
    backend = decoder.backend
    weight = decoder.model.lm_head.weight.detach()
    hidden = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    normed = backend.head_input(hidden)
    pruned = decoder.pruning.select(2, min_exit_layer=2, num_layers=decoder.num_layers, prev_ids=None,
                                    head=lambda ids: backend.head(hidden, ids), head_input=lambda: normed)
    keep = decoder.pruning.k_at(2, decoder.num_layers)
    assert pruned.rows_computed == 40 and pruned.ids.shape == (3, keep)
    for row in range(3):
        candidates = slow_shortlist(weight.numpy(), normed[row].numpy(), 8, 40)
        exact = weight.numpy()[candidates] @ normed[row].numpy()
        best = candidates[np.argsort(-exact, kind="stable")[:keep]]
        assert pruned.ids[row].tolist() == best.tolist()
        assert np.allclose(pruned.logits[row].numpy(), weight.numpy()[best] @ normed[row].numpy(), atol=1e-10)
    # at full rank the ranking is the head itself: the shortlist's first id is the full head's argmax
    exact = EarlyExitDecoder(MODELS[name](), pruning=("shortlist", {"rank": weight.shape[1], "k": 5, "k_min": 5}))
    assert exact.pruning.shortlist(normed)[:, 0].tolist() == backend.head(hidden).argmax(dim=-1).tolist()


@pytest.mark.parametrize("name", list(MODELS))
def test_generic_decoder_matches_the_slow_reference_and_counts_the_shortlist(name):
    decoder = EarlyExitDecoder(MODELS[name](), pruning=SHORTLIST, min_exit_layer=2, tau=0.7)
    L, j, vocab, d = decoder.num_layers, 2, decoder.backend.vocab_size, decoder.backend.hidden_size
    thresholds = [0.2, 0.6]
    batch = decoder.generate(input_ids=PROMPTS, threshold=thresholds, max_new_tokens=8, eos_token_id=[])
    exited = 0
    for row, sequence in enumerate(batch):
        reference = reference_generate(decoder, PROMPTS[row], thresholds[row], 8, eos_token_id=[])
        assert sequence.token_ids == reference.token_ids
        assert sequence.exit_layers == reference.exit_layers
        assert sequence.confidences == pytest.approx(reference.confidences, abs=1e-9, nan_ok=True)
        # cost: the low-rank ranking once per consulting token, k exact rows at j, then k(ℓ) rows per layer
        first = 1 if decoder.backend.first_token_from_prompt else 0
        consulting = len(sequence.token_ids) - first
        assert sequence.cost.shortlist_flops == consulting * 2.0 * (d * 8 + 8 * vocab)
        rows = vocab * first
        for layer in sequence.exit_layers[first:]:
            widths = [40] + [decoder.pruning.k_at(a - 1, L) for a in range(j + 1, min(layer, L - 1) + 1)]
            rows += sum(widths) + (vocab if layer == L else 0)
            exited += layer < L
        assert sequence.cost.head_rows == rows
    assert exited > 0  # the checks above saw tokens that exited


@pytest.mark.parametrize("name", list(MODELS))
def test_grid_candidates_equal_decoding_alone_with_the_shortlist(name):
    decoder = EarlyExitDecoder(MODELS[name](), pruning=SHORTLIST, min_exit_layer=1, tau=1.0)
    lambdas = [1.0, 0.8, 0.5, 0.2]
    full, early = decoder.generate_grid(input_ids=PROMPTS, lambdas=lambdas, max_new_tokens=8, eos_token_id=[])
    for row, prompt in enumerate(PROMPTS):
        alone_full = decoder.generate(input_ids=[prompt], threshold=1.0, max_new_tokens=8, eos_token_id=[])
        assert_same(alone_full, [full[row]])
        for column, lam in enumerate(lambdas):
            alone = decoder.generate(input_ids=[prompt], threshold=lam, max_new_tokens=8, eos_token_id=[])
            assert_same(alone, [early[row][column]])


@pytest.mark.parametrize("name", list(MODELS))
def test_fast_path_falls_back_to_the_eager_decision_and_matches(name):
    model = MODELS[name]()
    generic = EarlyExitDecoder(model, pruning=SHORTLIST, min_exit_layer=2, tau=0.7)
    fast = FastEarlyExitDecoder(model, pruning=SHORTLIST, min_exit_layer=2, tau=0.7)
    assert not fast.uses_fused_decision
    for thresholds in ([0.3, 0.3], [0.6, 1.0]):
        expected = generic.generate(input_ids=PROMPTS, threshold=thresholds, max_new_tokens=8, eos_token_id=[])
        got = fast.generate(input_ids=PROMPTS, threshold=thresholds, max_new_tokens=8, eos_token_id=[])
        assert_same(expected, got)


def test_config_dict_distinguishes_the_shortlist_and_factors_are_cached_on_the_decoder():
    model = MODELS["llama-6L"]()
    base = EarlyExitDecoder(model).config_dict()
    shortlist = EarlyExitDecoder(model, pruning=SHORTLIST)
    other_rank = EarlyExitDecoder(model, pruning=("shortlist", {"rank": 4, "k": 40, "k_min": 4}))
    assert base["pruning"] == {"name": "none", "params": {}}
    assert shortlist.config_dict()["pruning"] == {"name": "shortlist", "params": {"rank": 8, "k": 40, "k_min": 4}}
    assert shortlist.config_dict() != other_rank.config_dict()
    assert shortlist.pruning.low_rank is not None and shortlist.pruning.low_rank.rank == 8
    factors = shortlist.pruning.low_rank.down
    shortlist.generate(input_ids=PROMPTS[:1], threshold=0.5, max_new_tokens=3)
    assert shortlist.pruning.low_rank.down is factors  # computed once, at construction
    # a shared unbound instance stays unbound; each decoder holds its own factors
    shared = ShortlistPruning(rank=8, k=40, k_min=4)
    EarlyExitDecoder(model, pruning=shared)
    assert shared.low_rank is None


def test_bad_shortlist_settings():
    model = MODELS["llama-6L"]()
    d = model.config.hidden_size
    with pytest.raises(ValueError, match="rank"):
        EarlyExitDecoder(model, pruning=("shortlist", {"rank": d + 1}))
    with pytest.raises(ValueError, match="k_min"):
        resolve_pruning(("shortlist", {"k": 5, "k_min": 6}))
    with pytest.raises(ValueError, match="rank"):
        resolve_pruning(("shortlist", {"rank": 0}))
    with pytest.raises(RuntimeError, match="not bound"):
        ShortlistPruning().shortlist(torch.zeros(1, d))


@torch.no_grad()
def test_exit_classifier_samples_see_the_shortlisted_head():
    """Fitting an exit classifier for a shortlist decoder labels each layer with the shortlist's prediction."""
    from ltt_exit.decode.adapters import collect_states, exit_classifier_samples
    from ltt_exit.decode.backends import backend_for
    from ltt_exit.decode.tiny_models import tiny_word_tokenizer

    model = MODELS["llama-6L"]()
    vocab = model.config.vocab_size
    tok = tiny_word_tokenizer(vocab, pad_id=0, bos_id=1, eos_id=2, add_bos=True)
    (batch,) = collect_states(model, tok, ["w5 w9 w30 w41"], max_new_tokens=6, layers=[1, 2, 3, 4, 5],
                              eos_token_id=[])
    backend = backend_for(model)
    x, y = exit_classifier_samples(backend, batch, None, pruning=SHORTLIST, min_exit_layer=2)
    weight = model.lm_head.weight.numpy()
    normed = backend.head_input(batch.hidden[2].to(DTYPE)).numpy()
    predicted = []
    for row in range(normed.shape[0]):
        candidates = slow_shortlist(weight, normed[row], 8, 40)
        predicted.append(candidates[np.argmax(weight[candidates] @ normed[row])])
    assert y[:, 0].tolist() == (np.array(predicted) == np.array(batch.tokens))[1:].tolist()
