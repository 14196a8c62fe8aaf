"""A llama_batch over numpy arrays: a pass is written into the arrays with vector operations, and the batch
only points into them, so nothing is copied token by token through ctypes; and its output rows read back."""

from __future__ import annotations

import ctypes
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


def copy_rows(pointer: Any, total: int, width: int, local: Any) -> torch.Tensor:
    """Copy output rows out of llama.cpp's buffer of ``total`` rows: all of them (``local`` a slice) or those
    listed."""
    if not pointer:
        raise HastenError("llama.cpp returned no outputs for the pass")
    if isinstance(local, slice):  # one memmove: right after a forward pass every Python step is slow
        out = torch.empty(total, width)
        ctypes.memmove(out.data_ptr(), pointer, 4 * total * width)
        return out
    return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(total, width))[local])


__all__ = ["BatchArrays", "copy_rows"]
