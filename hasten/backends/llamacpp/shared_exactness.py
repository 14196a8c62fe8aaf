"""Which passes score bit-identically in a llama.cpp context shared by several targets.

A shared decode is exact where ggml's CPU kernels treat each query row on its own and walk the cells in cell
order (``shared_context``). Three things cannot be bit-identical in a shared context; they run in the
target's own context, where its cells sit exactly as in plain decoding (the cache migrates by a K/V copy of its
cells, nothing evaluated twice):
- a decode of 64+ tokens (a long prefill, a huge tree): flash attention tiles its queries (``GGML_FA_TILE_Q``)
  and then its cells by cell index. Shared decodes are therefore cut to at most ``MAX_TOKENS``.
- with more than one thread, a one-token pass once the target alone would see 512+ cells (llama.cpp pads
  ``n_kv`` to 256, so once its cache holds 256 cells): ggml splits a lone query's cells across threads by cell
  index (its split-KV path). A shared decode of two or more tokens never takes that path and so cannot
  reproduce it. Likewise a shared decode of one token while the shared cache is 256+ cells long.
- ``start`` (the prefill).
The first two happen only where the keys are F16/F32 and the values have their type
(``attention_is_batch_invariant``); with the default cache (Q8_0 keys, F16 values) every pass takes one kernel,
and only the cut to ``MAX_TOKENS`` (the shared batch's size) and ``start`` remain.
Without flash attention (``flash_attn=False``) attention reduces over every cell, masked ones too, in blocks, so
nothing is shared. F32/F16 weights are not batch-invariant in llama.cpp at all (trees and chains differ by
~1e-3 there too); the standard stays "as exact as a tree pass is".
"""

from __future__ import annotations

from typing import Protocol

MAX_TOKENS = 63  # ggml's CPU flash attention tiles passes of GGML_FA_TILE_Q = 64 tokens and more
KV_PAD = 256  # llama.cpp pads the cells a pass attends over (n_kv) to a multiple of this
SPLIT_KV_CELLS = 512  # from this n_kv on, a one-token pass splits its cells across threads (split-KV path)


class Attention(Protocol):
    """What exactness depends on in a model (``model.LlamaCppModel``): its KV cache's type, its threads and
    whether flash attention is on (None: llama.cpp decides)."""

    kv_type: str | None
    threads: int
    flash_attn: bool | None


def kv_types(kv_type: str) -> tuple[str, str]:
    """The (key, value) cache types of ``kv_type``: ``"K/V"``, or one type for both."""
    keys, _, values = kv_type.lower().partition("/")
    return keys, values or keys


def attention_is_batch_invariant(kv_type: str) -> bool:
    """Whether ggml's CPU flash attention takes one kernel for every pass over a cache of ``kv_type``: it tiles
    wide passes and splits a lone query's cells across threads only where the keys are F16/F32 (BF16 counted
    with them here, untested) and the values have the keys' type."""
    keys, values = kv_types(kv_type)
    return not (keys in ("f16", "f32", "bf16") and values == keys)


def n_kv(cells: int) -> int:
    """The number of cells llama.cpp's attention spans when ``cells`` cells are in use."""
    return max(KV_PAD, -(-cells // KV_PAD) * KV_PAD)


def lone_token_splits(model: Attention, cells: int) -> bool:
    """Whether a one-token pass over ``cells`` cached cells takes the split-KV path (cells split across threads)."""
    if attention_is_batch_invariant(model.kv_type or "f16"):
        return False
    return model.threads > 1 and n_kv(cells + 1) >= SPLIT_KV_CELLS


def shareable(model: Attention, cache_len: int, n: int) -> bool:
    """Whether an ``n``-token pass of a target of ``model`` with ``cache_len`` cached tokens scores bit-identically
    in a shared decode."""
    if model.flash_attn is False or n > MAX_TOKENS:
        return False
    return not (n == 1 and lone_token_splits(model, cache_len))


__all__ = ["KV_PAD", "MAX_TOKENS", "SPLIT_KV_CELLS", "Attention", "attention_is_batch_invariant", "kv_types",
           "lone_token_splits", "n_kv", "shareable"]
