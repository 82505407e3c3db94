"""The engine's KV cache: one preallocated slot per running row, written in place.

    per layer: keys, values [slots, kv_heads, capacity, head_dim], allocated once (zeros)
    prefill:   one prompt, alone, into its slot's columns [0, P)
    decode:    each row's new key and value into column lens[row] (one indexed write for all
               rows); attention reads columns [0, width) of slots [0, rows), a view, no copy
    a row that leaves: the last row's columns move into its slot (rows stay packed at the front)

It is a transformers `Cache`, so any attention-only decoder that takes `past_key_values` runs
on it unchanged: the model never sees the slots, only the keys and values to attend to, and the
4-D mask and position ids the engine passes. Capacity grows (one reallocation, by half again at
least) only when an admitted row needs more columns than any before it.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _Where:
    """What the next forward pass writes: a prefill or a decode step."""

    prefill: tuple[int, int, int] | None = None  # (first slot, rows, first column)
    rows = 0  # decode: rows in the forward pass (running rows and padding)
    width = 0  # decode: columns attended to
    lens: torch.Tensor  # decode: [slots] the column each row's new token goes to
    order: torch.Tensor  # [slots] 0, 1, 2, ...


class _SlotLayer(CacheLayerMixin):
    is_sliding = False

    def __init__(self, where: _Where, slots: int, capacity: int):
        super().__init__()
        self.where, self.slots, self.capacity = where, slots, capacity

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        shape = (self.slots, key_states.shape[1], self.capacity)
        self.keys = key_states.new_zeros(*shape, key_states.shape[-1])
        self.values = value_states.new_zeros(*shape, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        w = self.where
        if w.prefill is not None:  # rows [first, first + n) take columns [start, start + q)
            first, n, start = w.prefill
            end = start + key_states.shape[2]
            self.keys[first : first + n, :, start:end] = key_states
            self.values[first : first + n, :, start:end] = value_states
            return self.keys[first : first + n, :, :end], self.values[first : first + n, :, :end]
        rows, cols = w.order[: w.rows], w.lens[: w.rows]
        self.keys[rows, :, cols] = key_states[:, :, 0]
        self.values[rows, :, cols] = value_states[:, :, 0]
        return self.keys[: w.rows, :, : w.width], self.values[: w.rows, :, : w.width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.where.width, 0  # unused: the engine always passes its own 4-D mask

    def get_seq_length(self) -> int:
        return 0  # positions and masks always come from the engine

    def get_max_length(self) -> int:
        return self.capacity

    def grow(self, capacity: int) -> None:
        if self.is_initialized:
            for name in ("keys", "values"):
                old = getattr(self, name)
                new = old.new_zeros(*old.shape[:2], capacity, old.shape[-1])
                new[:, :, : self.capacity] = old
                setattr(self, name, new)
        self.capacity = capacity

    def move(self, src: torch.Tensor, dst: torch.Tensor, columns: int) -> None:
        if self.is_initialized:
            self.keys[dst, :, :columns] = self.keys[src, :, :columns]
            self.values[dst, :, :columns] = self.values[src, :, :columns]


class SlotCache(Cache):
    def __init__(self, layers: int, slots: int, capacity: int, device: torch.device):
        self.where = _Where()
        self.where.order = torch.arange(slots, device=device)
        self.where.lens = torch.zeros(slots, dtype=torch.long, device=device)
        super().__init__(layers=[_SlotLayer(self.where, slots, capacity) for _ in range(layers)])
        self.slots, self.capacity = slots, capacity

    def grow(self, capacity: int) -> None:
        for layer in self.layers:
            layer.grow(capacity)
        self.capacity = capacity

    def move(self, src: list[int], dst: list[int], columns: int) -> None:
        """Copy rows `src` into slots `dst` (their first `columns` columns)."""
        device = self.where.order.device
        s, d = torch.tensor(src, device=device), torch.tensor(dst, device=device)
        for layer in self.layers:
            layer.move(s, d, columns)

    def copy_prefix(self, slot: int, first: int, rows: int, columns: int) -> None:
        """Slot `slot`'s first `columns` columns into slots [first, first + rows)."""
        for layer in self.layers:
            if layer.is_initialized:
                for name in ("keys", "values"):
                    t = getattr(layer, name)
                    t[first : first + rows, :, :columns] = t[slot : slot + 1, :, :columns]
