"""Reading llama.cpp's real KV cache state, for tests and debugging: which cells are used, at which positions,
in which sequences, and how that differs from the layout plain decoding gives. Nothing here runs while
generating: ``kv_cells`` copies every cell's K/V data out of llama.cpp."""

from __future__ import annotations

import collections
import ctypes
from collections.abc import Sequence
from typing import Any

import numpy as np

Cell = tuple[int, tuple[int, ...]]  # (position, sequence ids)


def sequence_end(lib: Any, memory: Any, seq: int) -> int:
    """One past the last position sequence ``seq`` holds (0 when it holds none)."""
    return int(lib.llama_memory_seq_pos_max(memory, seq)) + 1


def kv_cells(lib: Any, ctx: Any, seq: int) -> list[Cell]:
    """(position, sequence ids) of every used cell of a context (or of sequence ``seq``'s cells), in cell order,
    from llama.cpp's state serialisation."""
    size = lib.llama_state_seq_get_size(ctx, seq)
    data = (ctypes.c_uint8 * size)()
    lib.llama_state_seq_get_data(ctx, data, size, seq)
    raw = np.frombuffer(data, dtype=np.uint8)
    _magic, _seq, n_stream, count = raw[:16].view(np.int32)  # a header, then the KV cache's own state
    cells: list[Cell] = []
    if n_stream != 1:
        raise RuntimeError(f"expected a unified cache (1 stream), found {n_stream}")
    offset = 16
    for _ in range(int(count)):
        pos, n_ids = raw[offset:offset + 8].view(np.int32)
        offset += 8
        ids = tuple(int(s) for s in raw[offset:offset + 4 * int(n_ids)].view(np.int32))
        offset += 4 * int(n_ids)
        cells.append((int(pos), ids))
    return cells


def layout_problems(cells: Sequence[Cell], length: int, home: int) -> list[str]:
    """How a sequence's cells (in cell order) differ from "positions 0..length-1, each once, in this order,
    all in sequence ``home``"."""
    problems: list[str] = []
    positions = sorted(pos for pos, _ in cells)
    if positions != list(range(length)):
        extra = collections.Counter(positions) - collections.Counter(range(length))
        missing = collections.Counter(range(length)) - collections.Counter(positions)
        problems.append(f"cells: {len(cells)} used; extra positions {sorted(extra.elements())[:10]}, "
                        f"missing {sorted(missing.elements())[:10]}")
    elif [pos for pos, _ in cells] != positions:
        problems.append("cells are out of position order (not the layout plain decoding gives)")
    outside = [pos for pos, ids in cells if home not in ids]
    if outside:
        problems.append(f"cells outside sequence {home} at positions {outside[:10]}")
    return problems


def caught_up_problems(lib: Any, memory: Any, ids: Sequence[int], synced: Sequence[int]) -> list[str]:
    """How the ends of sequences ``ids`` differ from the committed positions recorded for them (``synced``)."""
    problems: list[str] = []
    for seq, expected in zip(ids, synced, strict=True):
        end = sequence_end(lib, memory, seq)
        if end != expected:
            problems.append(f"sequence {seq} ends at {end}, expected {expected}")
    return problems


__all__ = ["Cell", "caught_up_problems", "kv_cells", "layout_problems", "sequence_end"]
