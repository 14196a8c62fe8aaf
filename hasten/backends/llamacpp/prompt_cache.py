"""A llama.cpp model's prompt cache: the KV cells of recent prompts, reused by prompts that begin the same way.

Every prefill stores its prompt's cells (llama.cpp's sequence state: positions and K/V bytes, about 12 KB a
token for the default model with its Q8_0 cache), and a finished generation its whole conversation (prompt and
answer, as llama.cpp's server keeps a slot's tokens). A later prefill restores the stored sequence with which
it shares the longest prefix, drops the cells after that prefix, and runs only the rest of its prompt. A chat
prompt of the default model shares its first 24 tokens (the template's system turn) with every other one, a
repeated prompt all of it, and the next turn of a conversation everything up to the end of the last answer.
A stored sequence that another one extends is dropped: the longer one serves both.

Exactness. With a quantized KV cache and flash attention on, ggml's CPU kernels treat every row on its own
(``model.LlamaCppModel``), so a token's cells and logits do not depend on which decode computed the
tokens before it: restoring a prefix and running the rest gives bit-identical cells and logits to running the
whole prompt at once (tested on the shipped prompts). With an F16 cache, passes of 64 or more tokens take a
tiled kernel that rounds differently, so the cache is off there, as it is without flash attention.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from typing import Any

MIN_SHARED = 4  # a shorter shared prefix is not worth restoring a stored prompt for
DEFAULT_BUDGET_BYTES = 64 << 20


def shared_prefix(a: tuple[int, ...], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` have in common."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PromptCache:
    """Stored prompt states, least recently used first, within ``budget_bytes``."""

    def __init__(self, lib: Any, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self._lib = lib
        self.budget_bytes = budget_bytes
        self.bytes = 0
        self.hits = 0  # prefills that restored a stored prefix
        self.reused_tokens = 0  # prompt tokens they did not run
        self._entries: OrderedDict[tuple[int, ...], Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def restore(self, context: Any, tokens: list[int]) -> int:
        """Put the longest stored prefix of ``tokens`` (short of the last token, whose logits the prefill
        needs) into sequence 0 of an empty ``context``; how many tokens it covers (0: nothing restored)."""
        best, length = None, 0
        for key in self._entries:
            shared = shared_prefix(key, tokens)
            if shared > length:
                best, length = key, shared
        length = min(length, len(tokens) - 1)
        if best is None or length < MIN_SHARED:
            return 0
        lib, data = self._lib, self._entries[best]
        self._entries.move_to_end(best)
        if lib.llama_state_seq_set_data(context, data, len(data), 0) != len(data):
            lib.llama_memory_clear(lib.llama_get_memory(context), True)
            return 0
        if not lib.llama_memory_seq_rm(lib.llama_get_memory(context), 0, length, -1):
            lib.llama_memory_clear(lib.llama_get_memory(context), True)
            return 0
        self.hits += 1
        self.reused_tokens += length
        return length

    def store(self, context: Any, tokens: list[int], seq: int = 0) -> None:
        """Keep the cells of sequence ``seq`` of ``context``, which holds exactly ``tokens``."""
        key = tuple(tokens)
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        if any(len(other) > len(key) and other[: len(key)] == key for other in self._entries):
            return  # a longer stored prompt covers this one
        lib = self._lib
        size = lib.llama_state_seq_get_size(context, seq)
        if size > self.budget_bytes:
            return
        data = (ctypes.c_uint8 * size)()
        if lib.llama_state_seq_get_data(context, data, size, seq) != size:
            return
        for other in [other for other in self._entries if len(other) < len(key) and key[: len(other)] == other]:
            self.bytes -= len(self._entries.pop(other))  # this one covers the shorter one
        while self._entries and self.bytes + size > self.budget_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= len(dropped)
        self._entries[key] = data
        self.bytes += size


__all__ = ["DEFAULT_BUDGET_BYTES", "MIN_SHARED", "PromptCache", "shared_prefix"]
