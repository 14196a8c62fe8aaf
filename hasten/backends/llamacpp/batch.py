"""A llama_batch over numpy arrays: a pass is written into the arrays with vector operations, and the batch
only points into them, so nothing is copied token by token through ctypes; and its output rows, read on demand."""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hasten.errors import HastenError


class BatchArrays:
    """Numpy arrays that a llama_batch points into, for ``capacity`` tokens of up to ``n_seq_max`` ids each."""

    def __init__(self, lib: Any, capacity: int, n_seq_max: int) -> None:
        self._lib = lib
        self.capacity = capacity
        self.tok = np.zeros(capacity, np.int32)  # token ids
        self.pos = np.zeros(capacity, np.int32)  # positions
        self.nseq = np.ones(capacity, np.int32)  # how many sequence ids each token carries
        self.seq = np.zeros((capacity, n_seq_max), np.int32)  # the ids, one row per token
        self.out = np.zeros(capacity, np.int8)  # 1: an output row
        self.arange = np.arange(capacity, dtype=np.int32)
        # llama_batch.seq_id: a pointer to each token's row, written as addresses by numpy (a list of ctypes casts
        # took 14 ms for 512 rows, paid by every new target); the ctypes array shares and keeps that buffer
        row, base = self.seq.strides[0], self.seq.ctypes.data
        addresses = base + row * np.arange(capacity, dtype=np.uintp)
        self.seq_ptrs = (ctypes.POINTER(lib.llama_seq_id) * capacity).from_buffer(addresses)

    def batch_at(self, start: int) -> Any:
        """A llama_batch over the tokens from ``start`` on (set its n_tokens before decoding)."""
        lib = self._lib
        batch = lib.llama_batch()
        i32 = ctypes.POINTER(ctypes.c_int32)
        batch.token = ctypes.cast(self.tok.ctypes.data + 4 * start, ctypes.POINTER(lib.llama_token))
        batch.embd = None
        batch.pos = ctypes.cast(self.pos.ctypes.data + 4 * start, ctypes.POINTER(lib.llama_pos))
        batch.n_seq_id = ctypes.cast(self.nseq.ctypes.data + 4 * start, i32)
        batch.seq_id = ctypes.cast(ctypes.addressof(self.seq_ptrs) + ctypes.sizeof(ctypes.c_void_p) * start,
                                   ctypes.POINTER(ctypes.POINTER(lib.llama_seq_id)))
        batch.logits = ctypes.cast(self.out.ctypes.data + start, ctypes.POINTER(ctypes.c_int8))
        return batch


class OutputRows:
    """Output rows of a decode read on demand out of llama.cpp's buffer (``LogitRows``): an argmax in place, a
    copy of just the rows asked for. Valid until the context's next decode, which ``detach``es them first."""

    def __init__(self, view: np.ndarray, index: Sequence[int]) -> None:
        self._view: np.ndarray | None = view  # (rows, V) over llama.cpp's buffer, or a copy of our own
        self._index = index  # buffer row of each row, in order
        self._own = False  # the view is a copy of our own

    @classmethod
    def joined(cls, parts: Sequence[OutputRows], width: int) -> OutputRows:
        """The rows of several decodes, one after another, copied into an array of our own."""
        arrays = [part._buffer()[list(part._index)] for part in parts]
        data = np.concatenate(arrays) if arrays else np.zeros((0, width), np.float32)
        rows = cls(data, range(len(data)))
        rows._own = True
        return rows

    def __len__(self) -> int:
        return len(self._index)

    def pick(self, index: Sequence[int]) -> None:
        """Keep rows ``index`` (in that order, repeats allowed) of these rows."""
        self._index = [self._index[i] for i in index]

    def _buffer(self) -> np.ndarray:
        if self._view is None:
            raise RuntimeError("these logits were released; read them before release()")
        return self._view

    def row(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self._buffer()[self._index[i]].copy())

    def argmax(self, i: int) -> int:
        return int(self._buffer()[self._index[i]].argmax())

    def rows(self, index: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(self._buffer()[[self._index[i] for i in index]])  # a fancy index copies

    def release(self) -> None:
        self._view = None

    def detach(self) -> None:
        """Copy the rows out of llama.cpp's buffer (before it is overwritten or freed), unless released."""
        if self._view is not None and not self._own:
            self._view, self._index, self._own = self._view[list(self._index)], range(len(self._index)), True


class LiveRows:
    """The ``OutputRows`` a llama context handed out since its last decode, held weakly: before it decodes again
    (or is freed, or goes back to the pool) those still held unreleased are copied out; the rest cost nothing."""

    def __init__(self) -> None:
        self._live: list[weakref.ref[OutputRows]] = []
        self._view: tuple[int, int, np.ndarray] | None = None  # (address, rows, view): llama.cpp keeps its buffer

    def hand_out(self, pointer: Any, total: int, width: int, index: Sequence[int]) -> OutputRows:
        """Rows ``index`` of llama.cpp's buffer of ``total`` output rows (just decoded), read on demand."""
        if not pointer:
            raise HastenError("llama.cpp returned no outputs for the pass")
        address = ctypes.addressof(pointer.contents)
        if self._view is None or self._view[:2] != (address, total) or self._view[2].shape[1] != width:
            self._view = (address, total, np.ctypeslib.as_array(pointer, shape=(total, width)))
        rows = OutputRows(self._view[2], index)
        self._live.append(weakref.ref(rows))
        return rows

    def detach(self) -> None:
        """Before the buffer is overwritten or freed: the rows still held are copied out."""
        for ref in self._live:
            rows = ref()
            if rows is not None:
                rows.detach()
        self._live.clear()


def copy_rows(pointer: Any, total: int, width: int, local: Sequence[int]) -> torch.Tensor:
    """Copy the listed output rows out of llama.cpp's buffer of ``total`` rows."""
    if not pointer:
        raise HastenError("llama.cpp returned no outputs for the pass")
    return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(total, width))[list(local)])


__all__ = ["BatchArrays", "LiveRows", "OutputRows", "copy_rows"]
