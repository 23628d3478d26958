"""K/V cache layers for batches whose rows come and go: preallocated slots, in-place appends, and row
selection that copies only the rows that move.

The eager decoders (``EarlyExitDecoder.generate`` and the sweep's shared-history grid decode) rebuild their
batch often: rows leave at EOS, and the grid copies a row whenever candidates that shared it split. With
the library's ``DynamicLayer`` every generated position concatenates (a copy of the whole cache) and every
row selection indexes (another copy of the whole cache), once per layer: on the CPU that was 60 % of the
grid decode's time (``benchmarks/profile_grid.py``, SmolLM2-135M, 16 prompts × 20 candidates), far more
than the model's arithmetic.

:class:`SlottedLayer` is a ``DynamicLayer`` (the library's attention, masks and cache container use it
unchanged) whose K/V live in buffers of (row capacity, heads, position capacity, head dim), grown
geometrically. ``keys`` / ``values`` are views of the live rows and positions, so

* appending a position writes it in place (the position capacity grows by ``position_chunk`` at a time,
  one copy per chunk instead of one per position), and
* selecting rows ``keep`` copies only the slots whose content changes (``keep[i] != i``, or new slots):
  a batch that drops its last rows copies nothing, a split copies only the new rows.

:func:`select_cache_rows` applies one selection to every layer of a cache (an ``EncoderDecoderCache``:
both), computing the moves once on the host. The decoders choose row orders that keep rows in place
(``ltt_exit.decode.grid``), which is what makes the selection cheap.
"""
from __future__ import annotations

from typing import Any, TypeVar

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache

__all__ = ["SlottedLayer", "slotted_cache", "select_cache_rows", "row_moves", "fill_holes"]

T = TypeVar("T")


class SlottedLayer(DynamicLayer):
    """A ``DynamicLayer`` over preallocated slots (see the module docstring).

    position_chunk: the position capacity grows in multiples of this (default 64).
    """

    def __init__(self, position_chunk: int = 64, **kwargs: Any):
        super().__init__(**kwargs)
        if isinstance(position_chunk, bool) or not isinstance(position_chunk, int) or position_chunk < 1:
            raise ValueError(f"position_chunk must be a positive int, got {position_chunk!r}")
        self.position_chunk = position_chunk
        self._key_slots: torch.Tensor | None = None  # (row capacity, heads, position capacity, head dim)
        self._value_slots: torch.Tensor | None = None
        self._rows = 0
        self._length = 0

    # ---- the library's layer interface ----------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        rows = key_states.shape[0]
        self._key_slots = key_states.new_empty((rows, key_states.shape[1], 0, key_states.shape[3]))
        self._value_slots = value_states.new_empty((rows, value_states.shape[1], 0, value_states.shape[3]))
        self._rows = rows
        self._length = 0
        self.is_initialized = True
        self._refresh()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append key/value states (B, heads, q, head dim) of the live rows at the next q positions."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows, added = key_states.shape[0], key_states.shape[-2]
        if rows != self._rows:
            raise ValueError(f"the cache holds {self._rows} rows, the update has {rows}: select rows first")
        start = self._length
        self._reserve(rows, start + added)
        self._key_slots[:rows, :, start:start + added] = key_states
        self._value_slots[:rows, :, start:start + added] = value_states
        self._length = start + added
        self._refresh()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length if self.is_initialized else 0

    def reset(self) -> None:
        self._key_slots = self._value_slots = None
        self._rows = self._length = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of positions to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self._length = max(0, self._length + tokens_to_remove)
        self._refresh()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        keep = [int(i) for i in indices.tolist()]
        self.move_rows(*row_moves(keep, self._rows, self.device), rows=len(keep))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(self._rows).repeat_interleave(repeats))

    def offload(self):
        raise NotImplementedError("SlottedLayer keeps its K/V on its device (no offloading)")

    # ---- slots -------------------------------------------------------------------------------------
    def move_rows(self, targets: torch.Tensor, sources: torch.Tensor, *, rows: int) -> None:
        """Slot targets[i] takes slot sources[i]'s K/V (all read before any is written); then the live rows
        are the first ``rows`` slots."""
        if not self.is_initialized:
            return
        self._reserve(rows, self._length)
        if targets.numel():
            length = self._length
            for slots in (self._key_slots, self._value_slots):
                slots[targets, :, :length] = slots[sources, :, :length]
        self._rows = rows
        self._refresh()

    def _reserve(self, rows: int, length: int) -> None:
        """Grow the slots to hold ``rows`` rows of ``length`` positions, keeping the live content."""
        row_capacity, length_capacity = self._key_slots.shape[0], self._key_slots.shape[2]
        if rows <= row_capacity and length <= length_capacity:
            return
        if rows > row_capacity:
            row_capacity = max(rows, row_capacity + row_capacity // 2)
        if length > length_capacity:
            length_capacity = -(-length // self.position_chunk) * self.position_chunk
        live_rows, live_length = self._rows, self._length
        grown = []
        for slots in (self._key_slots, self._value_slots):
            new = slots.new_empty((row_capacity, slots.shape[1], length_capacity, slots.shape[3]))
            new[:live_rows, :, :live_length] = slots[:live_rows, :, :live_length]
            grown.append(new)
        self._key_slots, self._value_slots = grown

    def _refresh(self) -> None:
        self.keys = self._key_slots[: self._rows, :, : self._length]
        self.values = self._value_slots[: self._rows, :, : self._length]


def row_moves(keep: list[int], rows: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The slot copies that turn ``rows`` live rows into rows ``keep`` (new row i = old row keep[i]):
    (targets, sources), both (M,) long on ``device``, for every i with keep[i] != i or i >= rows."""
    moves = [(target, source) for target, source in enumerate(keep) if source != target or target >= rows]
    for _, source in moves:
        if not 0 <= source < rows:
            raise IndexError(f"row {source} selected from a cache of {rows} rows")
    targets = torch.tensor([t for t, _ in moves], dtype=torch.long, device=device)
    sources = torch.tensor([s for _, s in moves], dtype=torch.long, device=device)
    return targets, sources


def slotted_cache(config: Any) -> DynamicCache:
    """The library's ``DynamicCache`` for ``config`` with each plain ``DynamicLayer`` replaced by a
    :class:`SlottedLayer` (sliding-window and other special layers are kept as the library made them)."""
    cache = DynamicCache(config=config)
    cache.layers = [SlottedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def select_cache_rows(cache: Any, keep: torch.Tensor) -> None:
    """Rebuild every layer of ``cache`` as rows ``keep`` (1-D long; repeats duplicate a row). Slotted
    layers copy only the rows that move (moves computed once); other layers use their own selection."""
    if isinstance(cache, EncoderDecoderCache):
        select_cache_rows(cache.self_attention_cache, keep)
        select_cache_rows(cache.cross_attention_cache, keep)
        return
    keep_list = [int(i) for i in keep.tolist()]
    moves: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # by live row count (all layers share it)
    for layer in cache.layers:
        if isinstance(layer, SlottedLayer):
            if not layer.is_initialized:
                continue
            if layer._rows not in moves:
                moves[layer._rows] = row_moves(keep_list, layer._rows, layer.device)
            layer.move_rows(*moves[layer._rows], rows=len(keep_list))
        else:
            layer.batch_select_indices(keep)


def fill_holes(rows: list[T | None]) -> list[T]:
    """The batch's next row order: ``rows`` without its holes (None), each hole filled by the last row, so
    every row before the holes keeps its slot (a slotted cache then copies only the rows that move)."""
    rows = list(rows)
    index = 0
    while index < len(rows):
        if rows[index] is None:
            last = rows.pop()
            if index < len(rows):
                rows[index] = last  # a hole taken from the end is filled on the next pass
        else:
            index += 1
    return rows
