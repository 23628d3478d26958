"""generate_grid (the sweep's shared decoding): every candidate equals decoding it alone with generate —
tokens, exit layers, confidences and cost account — for T5 and decoder-only models, every scorer and
pruning, with and without threshold decay, padded batches and EOS; rows are shared while candidates
agree; K/V overwrite and row duplication of both backends. Random-weight models, offline."""
import functools
import math

import numpy as np
import pytest
import torch

from ltt_exit.decode import PRUNINGS, SCORERS, EarlyExitDecoder
from ltt_exit.decode.grid import GridStats
from ltt_exit.decode.tiny_models import tiny_llama, tiny_mistral, tiny_qwen2, tiny_t5, tiny_word_tokenizer

GRID = (1.0, 0.95, 0.9, 0.8, 0.6, 0.4, 0.2, 0.0)
F64 = torch.float64
MODELS = {
    "t5-untied-gated-4L": lambda: tiny_t5(tied=False, feed_forward_proj="gated-gelu", num_layers=4, num_heads=4,
                                          dtype=F64),
    "t5-tied-relu-3L": lambda: tiny_t5(tied=True, num_layers=3, num_heads=2, seed=2, dtype=F64),
    "llama-gqa-4L": lambda: tiny_llama(num_layers=4, num_heads=4, num_key_value_heads=2, dtype=F64),
    "qwen2-tied-4L": lambda: tiny_qwen2(num_layers=4, seed=3, dtype=F64),
    "mistral-sliding-4L": lambda: tiny_mistral(num_layers=4, sliding_window=4, seed=4, dtype=F64),
}
PRUNING_SPECS = {"none": "none", "fixed": ("fixed", {"k": 12}), "decaying": ("decaying", {"k_max": 60, "k_min": 4}),
                 "shortlist": ("shortlist", {"rank": 8, "k": 40, "k_min": 4})}


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def model(name):
    return MODELS[name]()


def make_prompts(name, batch=3, seed=0, max_len=8):
    """Random prompts of different lengths, padded on the family's side: (ids (B, P), mask (B, P))."""
    left = not name.startswith("t5")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, max_len, dtype=torch.long)
    mask = torch.zeros(batch, max_len, dtype=torch.long)
    for row in range(batch):
        length = max_len - (3 * row) % max_len
        span = slice(max_len - length, max_len) if left else slice(0, length)
        ids[row, span] = torch.randint(3, 90, (length,), generator=generator)
        mask[row, span] = 1
    return ids, mask


def rows_of(ids, mask):
    return [ids[i][mask[i].bool()].tolist() for i in range(ids.shape[0])]


def assert_same(got, alone, threshold):
    assert got.token_ids == alone.token_ids, threshold
    assert got.exit_layers == alone.exit_layers, threshold
    assert got.confidences == pytest.approx(alone.confidences, abs=1e-9, nan_ok=True), threshold
    assert got.cost == alone.cost, threshold  # every CostAccount field
    assert got.threshold == threshold


def check_grid_against_alone(decoder, ids, mask, grid=GRID, max_new_tokens=8, eos_token_id=None):
    full, early = decoder.generate_grid(input_ids=ids, attention_mask=mask, lambdas=list(grid),
                                        max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
    assert len(full) == len(early) == ids.shape[0]
    for row, prompt in enumerate(rows_of(ids, mask)):
        assert len(early[row]) == len(grid)
        for threshold, got in zip((math.inf, *grid), (full[row], *early[row])):
            alone = decoder.generate(input_ids=[prompt], threshold=threshold, max_new_tokens=max_new_tokens,
                                     eos_token_id=eos_token_id)[0]
            assert_same(got, alone, threshold)
    return full, early


# every scorer x pruning on each family; τ alternates so that each family and each scorer and pruning
# meets both a constant and a decaying threshold
CASES = [
    (name, scorer, pruning, 1.5 if (i + j + k) % 2 else 0.0)
    for k, name in enumerate(["t5-untied-gated-4L", "llama-gqa-4L", "qwen2-tied-4L"])
    for i, scorer in enumerate(sorted(SCORERS))
    for j, pruning in enumerate(sorted(PRUNINGS))
]


@pytest.mark.parametrize("name, scorer, pruning, tau", CASES)
def test_every_candidate_equals_decoding_it_alone(name, scorer, pruning, tau):
    min_exit_layer = 2 if pruning == "fixed" else 1  # fixed: amateur heads below j are computed too
    decoder = EarlyExitDecoder(model(name), scorer=scorer, pruning=PRUNING_SPECS[pruning],
                               min_exit_layer=min_exit_layer, tau=tau)
    ids, mask = make_prompts(name, seed=len(scorer) + len(pruning))
    full, early = check_grid_against_alone(decoder, ids, mask)
    stats = decoder.last_grid_stats
    # the candidates really differ from one another, so rows were split and K/V overwritten
    assert len({tuple(s.exit_layers) for row in early for s in row}) > 2
    assert stats.rows_split > 0
    assert stats.rows_decoded < stats.candidate_rows


@pytest.mark.parametrize("name", ["t5-tied-relu-3L", "mistral-sliding-4L"])
def test_other_architectures(name):
    decoder = EarlyExitDecoder(model(name), scorer="softmax-max", pruning=PRUNING_SPECS["decaying"], tau=0.5)
    ids, mask = make_prompts(name, batch=4, seed=11, max_len=7)
    check_grid_against_alone(decoder, ids, mask, max_new_tokens=10)  # mistral: longer than its window
    assert decoder.last_grid_stats.rows_split > 0


@pytest.mark.parametrize("name", ["t5-untied-gated-4L", "llama-gqa-4L"])
def test_eos_stops_candidates_at_different_steps(name):
    decoder = EarlyExitDecoder(model(name), scorer="softmax-margin", pruning=PRUNING_SPECS["fixed"],
                               min_exit_layer=2)
    ids, mask = make_prompts(name, batch=3, seed=5)
    # an EOS id that some candidate emits early: its group leaves the batch while the others go on
    no_eos = decoder.generate_grid(input_ids=ids, attention_mask=mask, lambdas=list(GRID), max_new_tokens=10,
                                   eos_token_id=[])[1]
    eos = no_eos[0][-1].token_ids[2]
    full, early = check_grid_against_alone(decoder, ids, mask, max_new_tokens=10, eos_token_id=eos)
    lengths = {len(s.token_ids) for row in early for s in row} | {len(s.token_ids) for s in full}
    assert early[0][-1].token_ids[-1] == eos and len(early[0][-1].token_ids) <= 3
    assert len(lengths) > 1 and max(lengths) == 10


@pytest.mark.parametrize("name", ["t5-untied-gated-4L", "qwen2-tied-4L"])
def test_rows_are_shared_while_candidates_agree(name):
    ids, mask = make_prompts(name, batch=3, seed=2)
    steps = 6
    # min_exit_layer = L: nobody can exit, so all 9 candidates of a prompt share one row throughout
    decoder = EarlyExitDecoder(model(name), min_exit_layer=4)
    full, early = decoder.generate_grid(input_ids=ids, attention_mask=mask, lambdas=list(GRID),
                                        max_new_tokens=steps, eos_token_id=[])
    stats = decoder.last_grid_stats
    assert isinstance(stats, GridStats)
    assert stats.rows_per_step == [3] * steps and stats.rows_split == 0
    assert stats.candidate_rows_per_step == [3 * (len(GRID) + 1)] * steps
    assert stats.sharing == len(GRID) + 1
    assert all(s.token_ids == f.token_ids for f, row in zip(full, early) for s in row)
    # with early exit the groups split, but rows stay fewer than the naive sweep's K + 1 per prompt
    decoder = EarlyExitDecoder(model(name), pruning=PRUNING_SPECS["decaying"])
    decoder.generate_grid(input_ids=ids, attention_mask=mask, lambdas=list(GRID), max_new_tokens=steps,
                          eos_token_id=[])
    stats = decoder.last_grid_stats
    assert stats.rows_per_step[0] == 3  # every candidate starts from the same state
    assert all(rows < 3 * (len(GRID) + 1) for rows in stats.rows_per_step)
    assert max(stats.rows_per_step) > 3 and stats.rows_split == max(stats.rows_per_step) - 3
    assert 1.0 < stats.sharing < len(GRID) + 1


def test_duplicate_and_unordered_thresholds():
    decoder = EarlyExitDecoder(model("llama-gqa-4L"), pruning=PRUNING_SPECS["none"], tau=1.0)
    ids, mask = make_prompts("llama-gqa-4L", batch=2, seed=7)
    check_grid_against_alone(decoder, ids, mask, grid=(0.3, 0.9, 0.3, 2.0, 0.0))


def test_text_prompts_and_the_sweep_use_the_grid():
    from ltt_exit.sweep.run import decode_candidates

    tokenizer = tiny_word_tokenizer(96, eos_id=1, add_eos=True)
    decoder = EarlyExitDecoder(model("t5-untied-gated-4L"), tokenizer, pruning=PRUNING_SPECS["fixed"],
                               min_exit_layer=2)
    prompts = ["w5 w9 w17 w30", "w44 w2 w3", "w60 w61 w62 w63 w64 w65"]
    lambdas = [1.0, 0.9, 0.7, 0.5, 0.3]
    full, early = decode_candidates(decoder, prompts, lambdas, 8)
    assert decoder.last_grid_stats is not None  # the sweep took the shared path
    naive = decoder.generate([p for p in prompts for _ in range(len(lambdas) + 1)],
                             threshold=[t for _ in prompts for t in (math.inf, *lambdas)], max_new_tokens=8)
    for i in range(len(prompts)):
        expected = naive[i * (len(lambdas) + 1):(i + 1) * (len(lambdas) + 1)]
        for got, want in zip((full[i], *early[i]), expected):
            assert (got.text, got.token_ids, got.exit_layers, got.cost) == (want.text, want.token_ids,
                                                                            want.exit_layers, want.cost)


def test_the_rows_sweep_on_the_fast_path_equals_the_grid_sweep(tmp_path):
    """SweepSpec.decoding "rows" (K + 1 rows per prompt through FastEarlyExitDecoder.generate) writes the
    same loss table, under the same key, as the shared grid decode."""
    from types import SimpleNamespace

    from ltt_exit.decode import FastEarlyExitDecoder
    from ltt_exit.sweep.run import SweepSpec, run_sweep

    tokenizer = tiny_word_tokenizer(96, eos_id=1, add_eos=True)
    examples = [SimpleNamespace(id=str(i), prompt=prompt, reference="w5 w9")
                for i, prompt in enumerate(["w5 w9 w17 w30", "w44 w2 w3", "w60 w61 w62 w63 w64 w65"])]
    calibration_set = SimpleNamespace(examples=examples, fingerprint="sha256:test")
    tables = {}
    for decoding in ("grid", "rows"):
        decoder = FastEarlyExitDecoder(model("llama-gqa-4L"), tokenizer, pruning=PRUNING_SPECS["decaying"],
                                       min_exit_layer=2)
        spec = SweepSpec(lambdas=(1.0, 0.9, 0.7, 0.5, 0.3), max_new_tokens=6, prompts_per_batch=2,
                         decoding=decoding)
        decoder.last_grid_stats = None
        tables[decoding] = run_sweep(decoder, calibration_set, spec, out_path=tmp_path / f"{decoding}.parquet",
                                     model_fingerprint="sha256:m", progress=False).table
        assert (decoder.last_grid_stats is not None) == (decoding == "grid")
    grid, rows = tables["grid"], tables["rows"]
    assert grid.metadata["sweep_config_key"] == rows.metadata["sweep_config_key"]
    assert np.array_equal(grid.losses, rows.losses)
    for column in ("mean_layers", "flops", "text", "exit_layers"):
        assert np.array_equal(grid.candidate_columns[column], rows.candidate_columns[column]), column
    assert np.array_equal(grid.example_columns["full_text"], rows.example_columns["full_text"])
    with pytest.raises(ValueError, match="decoding must be one of"):
        SweepSpec(decoding="naive")


@pytest.mark.parametrize("lambdas, error", [
    ([], ValueError), ([0.5, math.nan], ValueError), ([0.5, -0.1], ValueError), ("0.5", TypeError), (0.5, TypeError),
])
def test_bad_grid(lambdas, error):
    decoder = EarlyExitDecoder(model("llama-gqa-4L"))
    with pytest.raises(error, match="lambdas|threshold"):
        decoder.generate_grid(input_ids=[[3, 4, 5]], lambdas=lambdas, max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.generate_grid(input_ids=[[3, 4, 5]], lambdas=[0.5], max_new_tokens=0)


# ---- backend pieces ---------------------------------------------------------------------------------

def _one_step(backend, state, tokens, hidden_for_layer):
    """Run one step: every layer on its input from hidden_for_layer(index, h) (B, 1, d); returns h_L."""
    h = backend.begin_step(state, tokens)
    for index in range(backend.num_layers):
        h = backend.run_layer(state, index, hidden_for_layer(index, h))
    backend.end_step(state)
    return h


@pytest.mark.parametrize("name", ["t5-untied-gated-4L", "qwen2-tied-4L", "mistral-sliding-4L"])
def test_select_rows_duplicates_and_overwrite_equals_propagation(name):
    from ltt_exit.decode.backends import PromptBatch

    decoder = EarlyExitDecoder(model(name))
    backend = decoder.backend
    ids, mask = make_prompts(name, batch=2, seed=3)
    prompt = PromptBatch(ids, mask)
    tokens = torch.tensor([5, 6])
    frozen = torch.randn(2, 1, backend.hidden_size, dtype=F64)
    exit_layer = 1  # rows freeze at h_1: layers 2..L append the projections of the frozen state

    # (a) decoded with state propagation: layers above the exit run on the frozen state
    propagated = backend.start(prompt)
    if backend.first_token_from_prompt:
        tokens = backend.first_inputs(propagated)
    _one_step(backend, propagated, tokens, lambda index, h: frozen if index >= exit_layer else h)

    # (b) decoded in full, rows duplicated (1, 0, 1), then the copies' K/V overwritten above the exit layer
    shared = backend.start(prompt)
    _one_step(backend, shared, tokens, lambda index, h: h)
    backend.select_rows(shared, torch.tensor([1, 0, 1]))
    rows = torch.tensor([0, 1])  # new rows 0 and 1 stand for original rows 1 and 0
    for index in range(exit_layer, backend.num_layers):
        backend.overwrite_last_kv(shared, index, rows, frozen[[1, 0]])

    def self_cache(state):
        return state.cache.self_attention_cache if backend.family == "t5" else state.cache

    for index in range(backend.num_layers):
        a, b = self_cache(propagated).layers[index], self_cache(shared).layers[index]
        assert b.keys.shape[0] == 3
        for new_row, old_row in ((0, 1), (1, 0)):
            assert torch.allclose(b.keys[new_row], a.keys[old_row], atol=1e-12)
            assert torch.allclose(b.values[new_row], a.values[old_row], atol=1e-12)
        # the third row is an untouched copy of row 1 of the full pass: it differs above the exit layer
        differs = not torch.allclose(b.keys[2, :, -1], a.keys[1, :, -1])
        assert differs == (index >= exit_layer)
    if backend.family == "t5":
        cross = shared.cache.cross_attention_cache.layers[0]
        assert torch.equal(cross.keys[0], cross.keys[2]) and shared.encoder_hidden.shape[0] == 3
        assert shared.batch_size == 3
    else:
        assert torch.equal(shared.attention_mask, propagated.attention_mask[[1, 0, 1]])
        assert torch.equal(shared.positions, propagated.positions[[1, 0, 1]])
    # the duplicated batch decodes on: the next step of the copies equals the propagated states' next step
    next_tokens = torch.tensor([7, 8])
    h_propagated = _one_step(backend, propagated, next_tokens, lambda index, h: h)
    h_shared = _one_step(backend, shared, next_tokens[[1, 0, 1]], lambda index, h: h)
    assert torch.allclose(h_shared[0], h_propagated[1], atol=1e-10)
    assert torch.allclose(h_shared[1], h_propagated[0], atol=1e-10)
    assert not torch.allclose(h_shared[2], h_propagated[1], atol=1e-6)


@pytest.mark.parametrize("name", ["t5-untied-gated-4L", "llama-gqa-4L", "qwen2-tied-4L", "mistral-sliding-4L"])
def test_run_layer_for_some_rows_matches_the_library_layer(name):
    from ltt_exit.decode.backends import PromptBatch

    backend = EarlyExitDecoder(model(name)).backend
    ids, mask = make_prompts(name, batch=4, seed=9)
    whole, part = backend.start(PromptBatch(ids, mask)), backend.start(PromptBatch(ids, mask))
    tokens = torch.tensor([5, 6, 7, 8])
    h_whole, h_part = backend.begin_step(whole, tokens), backend.begin_step(part, tokens)
    rows = torch.tensor([0, 2, 3])
    for index in range(backend.num_layers):
        out_whole = backend.run_layer(whole, index, h_whole)
        out_part = backend.run_layer(part, index, h_part, rows if index > 0 else None)
        assert torch.allclose(out_part[rows], out_whole[rows], atol=1e-12)
        h_whole = h_part = out_whole  # both go on from the same states
    self_whole = whole.cache.self_attention_cache if backend.family == "t5" else whole.cache
    self_part = part.cache.self_attention_cache if backend.family == "t5" else part.cache
    for a, b in zip(self_whole.layers, self_part.layers):  # every row's K/V appended, skipped rows included
        assert a.keys.shape == b.keys.shape
        assert torch.allclose(a.keys, b.keys, atol=1e-12) and torch.allclose(a.values, b.values, atol=1e-12)


@pytest.mark.parametrize("name", ["t5-untied-gated-4L", "llama-gqa-4L"])
def test_skipping_feed_forward_of_exited_rows_changes_nothing(name):
    decoder = EarlyExitDecoder(model(name), scorer="softmax-max", pruning=PRUNING_SPECS["decaying"], tau=1.0)
    ids, mask = make_prompts(name, batch=4, seed=12)
    thresholds = [0.2, 0.5, 0.8, 1.0]
    fast = decoder.generate(input_ids=ids, attention_mask=mask, threshold=thresholds, max_new_tokens=8)
    decoder.frozen_rows_skip_feed_forward = False
    slow = decoder.generate(input_ids=ids, attention_mask=mask, threshold=thresholds, max_new_tokens=8)
    for a, b in zip(fast, slow):
        assert (a.token_ids, a.exit_layers, a.cost) == (b.token_ids, b.exit_layers, b.cost)
        assert a.confidences == pytest.approx(b.confidences, abs=1e-12, nan_ok=True)
    assert len({layer for s in fast for layer in s.exit_layers}) > 2  # rows of the batch exited apart


def test_a_fixed_vocabulary_set_is_gathered_once_per_step(monkeypatch):
    decoder = EarlyExitDecoder(model("llama-gqa-4L"), scorer="weighted-contrastive", pruning=("fixed", {"k": 9}),
                               min_exit_layer=2)
    gathered = []
    original = decoder.backend.head_weights
    monkeypatch.setattr(decoder.backend, "head_weights", lambda ids: gathered.append(ids) or original(ids))
    sequence = decoder.generate(input_ids=[[5, 6, 7]], threshold=1.0 - 1e-9, max_new_tokens=6, eos_token_id=[])[0]
    # token 0 comes from the prefill; each later token consults layers 2 (full head) and 3 (the set, with
    # the expert and the amateur heads computed from one gather)
    assert sequence.exit_layers[1:] == [4] * 5
    assert len(gathered) == 5


@pytest.mark.parametrize("name", ["t5-untied-gated-4L", "qwen2-tied-4L"])
def test_a_one_token_budget(name):
    decoder = EarlyExitDecoder(model(name))
    ids, mask = make_prompts(name, batch=2, seed=13)
    check_grid_against_alone(decoder, ids, mask, max_new_tokens=1)
    assert len(decoder.last_grid_stats.rows_per_step) == 1
