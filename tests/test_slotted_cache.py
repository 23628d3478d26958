"""Slotted K/V cache layers: the same keys and values as the library's DynamicLayer through any sequence of
appends and row selections (drops, reorders, repeats, growth past both capacities); selections copy only
the rows that move; the decoders' batch order keeps rows in their slots; both backends use the slots."""
import pytest
import torch
from transformers.cache_utils import DynamicLayer, EncoderDecoderCache

from ltt_exit.decode import EarlyExitDecoder
from ltt_exit.decode.backends.slotted_cache import (
    SlottedLayer,
    fill_holes,
    row_moves,
    select_cache_rows,
    slotted_cache,
)
from ltt_exit.decode.tiny_models import tiny_llama, tiny_mistral, tiny_t5

HEADS, HEAD_DIM = 2, 3


def states(rows, positions, generator):
    shape = (rows, HEADS, positions, HEAD_DIM)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def assert_same_layer(slotted, dynamic):
    assert slotted.get_seq_length() == dynamic.get_seq_length()
    assert torch.equal(slotted.keys, dynamic.keys)
    assert torch.equal(slotted.values, dynamic.values)


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_slotted_layer_matches_dynamic_layer_through_appends_and_selections(chunk):
    generator = torch.Generator().manual_seed(0)
    slotted, dynamic = SlottedLayer(position_chunk=chunk), DynamicLayer()
    keys, values = states(3, 5, generator)  # a prefill of 3 rows, 5 positions
    for layer in (slotted, dynamic):
        returned = layer.update(keys, values)
    assert torch.equal(returned[0], keys)
    selections = [
        [0, 1, 2],              # unchanged
        [0, 0, 1, 2, 1, 1],     # splits: repeated rows, grows the row capacity
        [5, 1, 2, 3],           # drops and a move from the end
        [2, 0, 3, 1, 1, 1, 1, 0, 2],  # a permutation with repeats, grows again
        [4],                    # one row left
    ]
    for keep in selections:
        for _ in range(3):  # append a few positions between selections (crosses the position chunks)
            k, v = states(slotted.keys.shape[0], 1, generator)
            got = slotted.update(k, v)
            dynamic.update(k, v)
            assert torch.equal(got[0], dynamic.keys) and torch.equal(got[1], dynamic.values)
        index = torch.tensor(keep)
        slotted.batch_select_indices(index)
        dynamic.batch_select_indices(index)
        assert_same_layer(slotted, dynamic)
    # a write through the view lands in the slots (the decoders' K/V overwrite of the last position)
    slotted.keys[0, :, -1:] = 7.0
    assert bool((slotted.keys[0, :, -1] == 7.0).all())


def test_update_with_the_wrong_row_count_names_the_fix():
    layer = SlottedLayer()
    layer.update(torch.zeros(2, HEADS, 1, HEAD_DIM), torch.zeros(2, HEADS, 1, HEAD_DIM))
    with pytest.raises(ValueError, match="holds 2 rows, the update has 3: select rows first"):
        layer.update(torch.zeros(3, HEADS, 1, HEAD_DIM), torch.zeros(3, HEADS, 1, HEAD_DIM))


def test_row_moves_are_only_the_slots_that_change():
    targets, sources = row_moves([0, 1, 2], 3, "cpu")
    assert targets.numel() == 0 and sources.numel() == 0  # unchanged batch: nothing copied
    targets, sources = row_moves([0, 1], 3, "cpu")
    assert targets.numel() == 0  # dropping the last row copies nothing
    targets, sources = row_moves([0, 2, 1, 1], 3, "cpu")
    assert targets.tolist() == [1, 2, 3] and sources.tolist() == [2, 1, 1]
    with pytest.raises(IndexError, match="row 3 selected from a cache of 3 rows"):
        row_moves([0, 3], 3, "cpu")


def test_selection_copies_only_moved_rows(monkeypatch):
    """A drop of the last rows and a split appended at the end move only the new rows' K/V."""
    layer = SlottedLayer()
    layer.update(*states(4, 6, torch.Generator().manual_seed(1)))
    moved = []
    original = SlottedLayer.move_rows

    def spy(self, targets, sources, *, rows):
        moved.append((targets.tolist(), sources.tolist()))
        return original(self, targets, sources, rows=rows)

    monkeypatch.setattr(SlottedLayer, "move_rows", spy)
    layer.batch_select_indices(torch.tensor([0, 1, 2, 3, 1]))
    layer.batch_select_indices(torch.tensor([0, 1, 4]))
    assert moved == [([4], [1]), ([2], [4])]


def test_fill_holes_keeps_rows_before_the_holes_in_place():
    assert fill_holes([0, 1, 2]) == [0, 1, 2]
    assert fill_holes([0, None, 2, 3]) == [0, 3, 2]
    assert fill_holes([None, None, 2, 3, None]) == [3, 2]
    assert fill_holes([0, 1, None, None]) == [0, 1]
    assert fill_holes([None, None]) == []


def test_select_cache_rows_selects_both_caches_of_an_encoder_decoder_cache():
    config = tiny_t5(num_layers=2).config.get_text_config(decoder=True)
    cache = EncoderDecoderCache(slotted_cache(config), slotted_cache(config))
    generator = torch.Generator().manual_seed(2)
    for index in range(2):
        cache.self_attention_cache.update(*states(3, 1, generator), index)
        cache.cross_attention_cache.update(*states(3, 7, generator), index)
    expected = [(layer.keys[[2, 0, 0]].clone(), layer.values[[2, 0, 0]].clone())
                for part in (cache.self_attention_cache, cache.cross_attention_cache) for layer in part.layers]
    select_cache_rows(cache, torch.tensor([2, 0, 0]))
    got = [(layer.keys, layer.values) for part in (cache.self_attention_cache, cache.cross_attention_cache)
           for layer in part.layers]
    for (want_k, want_v), (k, v) in zip(expected, got):
        assert torch.equal(k, want_k) and torch.equal(v, want_v)


@pytest.mark.parametrize("factory,slotted", [
    (lambda: tiny_llama(num_layers=3), True),
    (lambda: tiny_t5(num_layers=3), True),
    (lambda: tiny_mistral(num_layers=3, sliding_window=4), False),  # sliding-window layers stay the library's
])
def test_backends_decode_on_slotted_layers(factory, slotted):
    decoder = EarlyExitDecoder(factory(), min_exit_layer=1)
    seen = []
    original = decoder.backend.start

    def start(prompt):
        state = original(prompt)
        seen.append(state.cache)
        return state

    decoder.backend.start = start
    decoder.generate(input_ids=[[5, 6, 7], [8, 9]], threshold=0.5, max_new_tokens=4, eos_token_id=[])
    cache = seen[0]
    layers = (cache.self_attention_cache.layers + cache.cross_attention_cache.layers
              if isinstance(cache, EncoderDecoderCache) else cache.layers)
    assert all(isinstance(layer, SlottedLayer) == slotted for layer in layers)
