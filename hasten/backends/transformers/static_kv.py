"""A static KV cache and an incremental tree mask for the transformers backend.

The K/V of every layer live in one tensor preallocated for a fixed number of slots (gpt-fast's layout, all
layers in one so that a commit moves rows of every layer in one copy). A pass writes its rows at the slots the
target names (``slots``, on the device) and attends to the first ``span`` slots; rolling back is a change of
length on the host, and committing a path that is not a prefix moves only the accepted rows.

The mask is kept on the device and changed incrementally each pass: columns below the committed length are
open to every row, the pass's own block ``[cache_len, cache_len + width)`` holds its ancestor mask, and every
other column is closed. Nothing about the mask is rebuilt on the host as the context grows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import Cache

from hasten.tree import ancestor_mask


def padded_ancestor_mask(parents: Sequence[int], width: int) -> torch.Tensor:
    """``hasten.tree.ancestor_mask`` (bool (n, n)) padded to (width, width): pad rows attend only to themselves."""
    n = len(parents)
    if width == n:
        return ancestor_mask(parents)
    mask = torch.eye(width, dtype=torch.bool)
    mask[:n, :n] = ancestor_mask(parents)
    return mask


class StaticKV(Cache):
    """K/V of all layers in one (layers, 2, 1, kv_heads, slots, head_dim) tensor, allocated on first use.

    Implements the part of transformers' public ``Cache`` interface a forward pass uses (``update``,
    ``get_seq_length``), so no library internals are touched. Before each forward the target sets ``slots``
    (where the pass's rows go) and ``span`` (how many slots its attention reads).
    """

    def __init__(self, num_layers: int, num_slots: int, zero_fill: bool) -> None:
        super().__init__(layers=[])
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.zero_fill = zero_fill  # slots read while never written (a static span) must hold finite values
        self.kv: torch.Tensor | None = None
        self.slots: torch.Tensor | None = None
        self.span = 0
        self.length = 0  # committed tokens (kept by the target; answers get_seq_length)

    def __len__(self) -> int:
        return self.num_layers

    def get_seq_length(self, layer_idx: int = 0, *args: Any, **kwargs: Any) -> int:
        return self.length

    def _allocate(self, keys: torch.Tensor) -> torch.Tensor:
        batch, heads, _, dim = keys.shape
        shape = (self.num_layers, 2, batch, heads, self.num_slots, dim)
        make = torch.zeros if self.zero_fill else torch.empty
        self.kv = make(shape, dtype=keys.dtype, device=keys.device)
        return self.kv

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this pass's keys and values at ``slots``; return the first ``span`` slots of the layer."""
        kv = self.kv if self.kv is not None else self._allocate(key_states)
        keys, values = kv[layer_idx, 0], kv[layer_idx, 1]
        keys.index_copy_(2, self.slots, key_states)
        values.index_copy_(2, self.slots, value_states)
        return keys[:, :, : self.span], values[:, :, : self.span]

    def move(self, source: torch.Tensor, destination: torch.Tensor) -> None:
        """Copy the rows at slots ``source`` to slots ``destination``, in every layer at once."""
        if self.kv is not None:
            self.kv.index_copy_(4, destination, self.kv.index_select(4, source))


class TreeMask:
    """The additive attention mask of the passes, (rows, slots), kept on the device and updated in place.

    ``open_to`` columns are open to every row (the committed cache); the last pass's block is remembered so the
    next update closes it again. Rows grow when a wider pass comes (``generation`` then changes, so captured
    graphs, which hold the old buffer, know to be dropped).
    """

    def __init__(self, num_slots: int, dtype: torch.dtype, device: torch.device, rows: int = 1) -> None:
        self.num_slots, self.dtype, self.device = num_slots, dtype, device
        self.closed = torch.finfo(dtype).min
        self.buffer = torch.full((rows, num_slots), self.closed, dtype=dtype, device=device)
        self.arange = torch.arange(num_slots, device=device)
        self.slot_positions = self.arange.clone()  # the position of the token held in each slot
        self.open_to = 0
        self.block = (0, 0)
        self.generation = 0

    def reset(self) -> None:
        self.buffer.fill_(self.closed)
        self.slot_positions.copy_(self.arange)  # the last pass's block held tree positions
        self.open_to, self.block = 0, (0, 0)

    def _ensure_rows(self, rows: int) -> None:
        if rows <= self.buffer.shape[0]:
            return
        grown = torch.full((rows, self.num_slots), self.closed, dtype=self.dtype, device=self.device)
        grown[:, : self.open_to] = 0
        self.buffer = grown  # the last block stays remembered: ``update`` restores its slots' positions
        self.generation += 1

    def update(self, cache_len: int, block: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Open columns below ``cache_len``, close the previous block, write ``block`` (bool (w, w), on the
        device) at ``[cache_len, cache_len + w)``; return the rows' (w, slots) view. ``positions`` (w,), for
        sliding windows, records the positions of the block's tokens in ``slot_positions``."""
        width = block.shape[0]
        self._ensure_rows(width)
        start, old = self.block
        if old:
            self.buffer[:, start : start + old] = self.closed
            self.slot_positions[start : start + old] = self.arange[start : start + old]
        if positions is not None:
            self.slot_positions[cache_len : cache_len + width] = positions
        if cache_len > self.open_to:
            self.buffer[:, self.open_to : cache_len] = 0
        elif cache_len < self.open_to:
            self.buffer[:, cache_len : self.open_to] = self.closed
        self.open_to = cache_len
        rows = self.buffer[:width]
        rows[:, cache_len : cache_len + width] = torch.where(block, 0.0, self.closed).to(self.dtype)
        self.block = (cache_len, width)
        return rows


def causal_block(width: int, device: torch.device) -> torch.Tensor:
    """Bool (w, w) lower triangle: a chain (the prefill)."""
    return torch.ones(width, width, dtype=torch.bool, device=device).tril()


def window_mask(mask: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor,
                window: int) -> torch.Tensor:
    """``mask`` (w, span) with the keys ``window`` or more positions before each query closed as well."""
    near = key_positions[None, :] > query_positions[:, None] - window
    return torch.where(near, mask, torch.finfo(mask.dtype).min)
