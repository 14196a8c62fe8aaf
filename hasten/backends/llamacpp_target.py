"""The llama.cpp backend: a GGUF model through llama-cpp-python's low-level API, a token tree as sequence ids.

A pass lays the tree out with one sequence id per leaf: a token carries the id of every leaf below it, so each
sequence is one root-to-leaf path and a token attends exactly to the cache and its own ancestors. The
committed context must be visible in every sequence of the pass; with ``kv_unified`` this only tags cells, and
the tags are kept lazily (a sequence is caught up from sequence 0 when a pass first needs it), so a step costs
a few scans of the cell array and never work proportional to the context. After ``commit`` exactly the
committed cells remain, all in sequence 0; nothing is ever evaluated twice.

``LlamaCppModel.score_many`` scores several targets' passes in one ``llama_decode``: their caches then live in
one shared context, each under its own sequence ids (``llamacpp_shared``, which also says exactly which passes
can be bit-identical there and which run in the target's own context). A target used on its own never leaves
its own context.
"""

from __future__ import annotations

import collections
import ctypes
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hasten.backends.base import Scores, tree_depths
from hasten.backends.llamacpp_prompt_cache import DEFAULT_BUDGET_BYTES as DEFAULT_PROMPT_CACHE_BYTES
from hasten.backends.llamacpp_prompt_cache import PromptCache
from hasten.errors import HastenError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from hasten.backends.llamacpp_shared import SharedCache

DEFAULT_THREADS = 2
DEFAULT_N_CTX = 4096
DEFAULT_N_SEQ_MAX = 64
DEFAULT_N_BATCH = 512
DEFAULT_KV_TYPE = "q8_0"  # see the class docstring: every pass width then uses one attention kernel
FALLBACK_KV_TYPE = "f16"  # llama.cpp's own default, where a quantized cache cannot be made
POOL_SIZE = 4  # idle llama contexts a model keeps for its next targets (creating one costs tens of ms)

_LOG_WARN, _LOG_ERROR, _LOG_CONT = 3, 4, 5
_log_lines: collections.deque[tuple[int, str]] = collections.deque(maxlen=32)
_log_callback: Any = None  # the ctypes callback must outlive every llama.cpp call
_init_lock = threading.Lock()


def _lib() -> Any:
    """llama_cpp, initialised once, with its logging captured instead of printed."""
    global _log_callback
    try:
        import llama_cpp
    except ImportError as error:
        raise HastenError("the llama.cpp backend needs llama-cpp-python: pip install llama-cpp-python") from error
    with _init_lock:
        if _log_callback is None:
            def record(level: int, text: bytes | None, _user: Any) -> None:
                if text and level in (_LOG_WARN, _LOG_ERROR, _LOG_CONT):
                    _log_lines.append((level, text.decode("utf-8", "replace")))

            _log_callback = llama_cpp.llama_log_callback(record)
            llama_cpp.llama_log_set(_log_callback, None)
            llama_cpp.llama_backend_init()
    return llama_cpp


def _first_error(default: str) -> str:
    """The first error llama.cpp logged since the log was last cleared (its function-name prefix dropped)."""
    for level, text in _log_lines:
        if level == _LOG_ERROR:
            return text.strip().split(": ", 1)[-1]
    return default


def tree_sequences(parents: Sequence[int]) -> tuple[list[list[int]], int]:
    """Sequence ids of a pass: leaf j (in index order) is sequence j, and a token carries the ids of every leaf
    below it, ascending. Returns (ids per token, number of sequences). A chain is one sequence, 0."""
    tree_depths(parents)  # validates
    n = len(parents)
    has_child = [False] * n
    for parent in parents[1:]:
        has_child[parent] = True
    seqs: list[list[int]] = [[] for _ in range(n)]
    leaf = 0
    for i in range(n):
        if not has_child[i]:
            node = i
            while node != -1:
                seqs[node].append(leaf)
                node = parents[node]
            leaf += 1
    return seqs, leaf


def commit_source(seqs: Sequence[Sequence[int]], keep: Sequence[int]) -> int:
    """The sequence whose path holds the whole kept path: that of the first leaf below its last node."""
    return seqs[keep[-1]][0] if keep else 0


def _check_keep(parents: Sequence[int], keep: Sequence[int]) -> None:
    if keep and (keep[0] != 0 or max(keep) >= len(parents)
                 or any(parents[b] != a for a, b in zip(keep, keep[1:], strict=False))):
        raise ValueError(f"keep {list(keep)} is not a path down from the root of the last pass")


class BatchArrays:
    """Numpy arrays that a llama_batch points into (filled with vector operations), for ``capacity`` tokens."""

    def __init__(self, lib: Any, capacity: int, n_seq_max: int) -> None:
        self._lib = lib
        self.capacity = capacity
        self.tok = np.zeros(capacity, np.int32)
        self.pos = np.zeros(capacity, np.int32)
        self.nseq = np.ones(capacity, np.int32)
        self.seq = np.zeros((capacity, n_seq_max), np.int32)
        self.out = np.zeros(capacity, np.int8)
        self.arange = np.arange(capacity, dtype=np.int32)
        row, base = self.seq.strides[0], self.seq.ctypes.data
        self.seq_ptrs = (ctypes.POINTER(lib.llama_seq_id) * capacity)(
            *[ctypes.cast(base + i * row, ctypes.POINTER(lib.llama_seq_id)) for i in range(capacity)])

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


class LlamaCppModel:
    """A GGUF model loaded by llama.cpp; makes targets (each with its own llama context) on it.

    ``extra_buffers`` (llama.cpp's ``use_extra_bufts``: repacked / AMX weight layouts) defaults to off on CPUs
    that report AMX, whose batched AMX kernels crash in this build, and on elsewhere. ``flash_attn`` (None:
    llama.cpp decides, which is on for the CPU) should stay on: its CPU kernel treats every query row on its
    own, so passes are batch-invariant, while without it the real default model's logits move by ~0.5 with
    the number of tokens in a pass. ``score_many`` scores several targets' passes in one ``llama_decode`` in a
    shared context of ``shared_cells`` cells and ``shared_seq_max`` sequence ids (see ``llamacpp_shared``).

    ``kv_type`` is the KV cache's type; by default Q8_0, falling back to F16 (llama.cpp's default) where a
    quantized cache cannot be made (head sizes not a multiple of 32, flash attention off). With an F16 cache,
    ggml's CPU flash attention switches kernels with the pass: a one-token pass over 512 or more cached cells
    splits the cells across threads, and a pass of 64 or more tokens is tiled, so a verification pass and plain
    decoding round differently past 256 cached tokens (a max logit difference of 0.35 on the default model at
    700 tokens, 2 threads) and greedy outputs can part at near-ties. A Q8_0 cache takes one kernel for every
    pass, so rows are bit-identical at any cache length and thread count, and on this 2-core CPU it is faster
    too (default model, 700 cached tokens: 13.2 ms against 19.1 ms for one token, 51.8 against 93.6 ms for 8).

    ``prompt_cache`` keeps the cells of recent prompts (``prompt_cache_bytes``, 64 MiB by default; 0 turns it
    off) so that a prefill runs only what its prompt does not share with one of them (``llamacpp_prompt_cache``);
    it exists only where that is bit-exact: with a quantized KV cache.
    """

    backend = "llamacpp"

    def __init__(self, path: str | Path, *, threads: int | None = None, n_ctx: int | None = None,
                 n_seq_max: int = DEFAULT_N_SEQ_MAX, n_batch: int = DEFAULT_N_BATCH,
                 extra_buffers: bool | None = None, flash_attn: bool | None = None,
                 shared_cells: int | None = None, shared_seq_max: int | None = None,
                 kv_type: str | None = None, prompt_cache_bytes: int | None = None) -> None:
        self.path = Path(path).expanduser()
        self._model: Any = None
        self._shared: SharedCache | None = None
        self._pool: list[Any] = []
        self._lock = threading.Lock()
        self._tensors: dict[str, torch.Tensor] = {}
        if not self.path.is_file():
            raise HastenError(f"model file {str(self.path)!r} not found")
        with open(self.path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise HastenError(f"{self.path} is not a GGUF file")
        lib = self._lib = _lib()
        if extra_buffers is None:
            extra_buffers = b"AMX_INT8 = 1" not in lib.llama_print_system_info()
        params = lib.llama_model_default_params()
        params.use_extra_bufts = extra_buffers
        _log_lines.clear()
        self._model = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise HastenError(f"llama.cpp cannot load {self.path.name}: {_first_error('unknown error')}")
        if lib.llama_model_has_encoder(self._model) or lib.llama_model_is_recurrent(self._model) \
                or lib.llama_model_is_hybrid(self._model):
            raise HastenError(f"{self.path.name}: only decoder-only attention models can verify token trees")
        self.architecture = self._meta("general.architecture")
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.vocab_size = int(lib.llama_vocab_n_tokens(self._vocab))
        self.hidden_size = int(lib.llama_model_n_embd_out(self._model))
        self.n_embd = int(lib.llama_model_n_embd(self._model))
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(self._model))
        self.threads = threads or DEFAULT_THREADS
        self.n_seq_max = max(1, min(n_seq_max, int(lib.llama_max_parallel_sequences())))
        self.n_batch = n_batch
        self.flash_attn = flash_attn
        self.kv_type = kv_type
        self._n_ctx_request = n_ctx or min(self.n_ctx_train or DEFAULT_N_CTX, DEFAULT_N_CTX)
        is_eog = lib.llama_vocab_is_eog
        self.eos_token_ids = frozenset(i for i in range(self.vocab_size) if is_eog(self._vocab, i))
        context = self._new_context()
        self.max_context = int(lib.llama_n_ctx(context))
        self._pool.append(context)
        self.shared_cells = shared_cells or 2 * self.max_context  # cells of the context targets share
        self.shared_seq_max = min(shared_seq_max or 256, int(lib.llama_max_parallel_sequences()))  # and its ids
        budget = DEFAULT_PROMPT_CACHE_BYTES if prompt_cache_bytes is None else prompt_cache_bytes
        exact = (self.kv_type or "").lower() not in ("f16", "f32", "bf16") and self.flash_attn is not False
        self.prompt_cache = PromptCache(lib, budget) if budget > 0 and exact else None

    def _meta(self, key: str) -> str:
        buf = ctypes.create_string_buffer(256)
        n = self._lib.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else ""

    def _new_context(self, n_ctx: int | None = None, n_seq_max: int | None = None) -> Any:
        lib = self._lib
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx or self._n_ctx_request
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = n_seq_max or self.n_seq_max
        params.n_outputs_max = max(self.n_batch, params.n_seq_max)  # llama.cpp reserves at least n_seq_max rows
        params.n_threads = params.n_threads_batch = self.threads
        params.kv_unified = True  # sequences coupled in one batch (a tree) need one shared cell buffer
        kv_type = self.kv_type or DEFAULT_KV_TYPE
        params.type_k = params.type_v = getattr(lib, f"GGML_TYPE_{kv_type.upper()}")
        params.swa_full = True  # sliding-window layers keep every cell, so rolling back never fails
        params.pooling_type = lib.LLAMA_POOLING_TYPE_NONE
        params.embeddings = False
        params.flash_attn_type = {None: lib.LLAMA_FLASH_ATTN_TYPE_AUTO, True: lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                  False: lib.LLAMA_FLASH_ATTN_TYPE_DISABLED}[self.flash_attn]
        params.no_perf = True
        _log_lines.clear()
        context = lib.llama_init_from_model(self._model, params)
        if not context and self.kv_type is None and kv_type != FALLBACK_KV_TYPE:
            self.kv_type = FALLBACK_KV_TYPE  # a quantized cache needs head sizes in whole blocks (and flash attention)
            return self._new_context(n_ctx, n_seq_max)
        if not context:
            raise HastenError(f"llama.cpp could not create a context for {self.path.name}: "
                              f"{_first_error('out of memory?')}")
        if self.kv_type is None:
            self.kv_type = kv_type
        return context

    def _acquire(self) -> Any:
        with self._lock:
            if self._pool:
                return self._pool.pop()
        return self._new_context()

    def _release(self, context: Any) -> None:
        lib = self._lib
        lib.llama_memory_clear(lib.llama_get_memory(context), True)
        with self._lock:
            if len(self._pool) < POOL_SIZE:
                self._pool.append(context)
                return
        lib.llama_free(context)

    def forget_prompts(self) -> None:
        """Empty the prompt cache: the next prefills run their whole prompts (as the benchmark wants)."""
        if self.prompt_cache is not None:
            self.prompt_cache.clear()

    def new_target(self, want_hidden: bool = False) -> LlamaCppTarget:
        """A fresh sequence with its own llama context (reused from a small pool)."""
        return LlamaCppTarget(self, self._acquire(), want_hidden)

    def score_many(self, passes: Sequence[tuple[Any, Any]]) -> list[Scores]:
        """Score the passes (target, layout with tokens, parents, logits_rows) of several targets of this model,
        as far as exactness allows in shared llama_decode calls; see ``llamacpp_shared``."""
        from hasten.backends.llamacpp_shared import score_many

        return score_many(self, [(target, layout.tokens, layout.parents, layout.logits_rows)
                                 for target, layout in passes])

    def shared_cache(self) -> SharedCache:
        """The one llama context (created on first use) in which targets are scored together."""
        if self._shared is None:
            from hasten.backends.llamacpp_shared import SharedCache

            self._shared = SharedCache(self, self.shared_cells)
        return self._shared

    def _tensor(self, *names: str) -> torch.Tensor:
        """The first of ``names`` present in the GGUF, dequantized to a float32 (rows, cols) tensor, cached."""
        key = "|".join(names)
        if key in self._tensors:
            return self._tensors[key]
        import gguf

        reader = gguf.GGUFReader(str(self.path))
        by_name = {tensor.name: tensor for tensor in reader.tensors}
        for name in names:
            if name in by_name:
                tensor = by_name[name]
                values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
                rows = int(tensor.shape[-1]) if len(tensor.shape) > 1 else 1
                weight = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(rows, -1))
                self._tensors[key] = weight
                return weight
        raise HastenError(f"{self.path.name} has none of the tensors {', '.join(names)}")

    def input_embeddings(self) -> torch.Tensor:
        """The token embedding table (V, E), float32, dequantized from the GGUF."""
        return self._tensor("token_embd.weight")

    def output_embeddings(self) -> torch.Tensor:
        """The output projection (V, H), float32 (the token embeddings when they are tied)."""
        return self._tensor("output.weight", "token_embd.weight")

    def transformers_config(self) -> PretrainedConfig:
        """The GGUF's llama metadata as a transformers ``LlamaConfig`` (drafters built on the target's shapes)."""
        from hasten.backends.gguf_config import llama_config, read_gguf

        return llama_config(read_gguf(self.path))

    def __del__(self) -> None:
        try:
            lib = self._lib
            for context in self._pool:
                lib.llama_free(context)
            self._pool.clear()
            if self._model:
                lib.llama_model_free(self._model)
                self._model = None
        except Exception:  # interpreter shutdown: the library may already be gone
            pass


class LlamaCppTarget:
    """One sequence on a llama.cpp model: a llama context whose KV cache holds exactly the committed tokens."""

    def __init__(self, model: LlamaCppModel, context: Any, want_hidden: bool = False) -> None:
        self.model = model
        self.want_hidden = want_hidden
        self.vocab_size = model.vocab_size
        self.hidden_size = model.hidden_size
        self.max_context = model.max_context
        self.cache_len = 0
        self._lib = lib = model._lib
        self._ctx = context
        self._mem = lib.llama_get_memory(context)
        lib.llama_set_embeddings(context, want_hidden)
        self._n_seq_max = model.n_seq_max
        self._n_batch = model.n_batch
        # _synced[s]: sequence s carries the committed positions [0, _synced[s]); sequence 0 always all of them.
        self._synced = [0] * self._n_seq_max
        self._pending: tuple[list[int], list[list[int]] | None] | None = None  # (parents, seq ids or None)
        self._capacity = 0
        self._grow(max(64, self._n_batch))
        self._state = (ctypes.c_uint8 * 0)()  # scratch for moving kept cells
        self._shared: SharedCache | None = None  # set while the cache lives in the model's shared context
        self._ids: list[int] = []  # there: this target's sequence ids, its home (all committed cells) first

    # -- the batch: numpy arrays that a llama_batch points into, filled with vector operations

    def _grow(self, capacity: int) -> None:
        arrays = self._arrays = BatchArrays(self._lib, capacity, self._n_seq_max)
        self._capacity = capacity
        self._tok, self._pos, self._nseq, self._seq = arrays.tok, arrays.pos, arrays.nseq, arrays.seq
        self._out, self._arange = arrays.out, arrays.arange
        self._batch = self._batch_at(0)

    def _batch_at(self, start: int) -> Any:
        return self._arrays.batch_at(start)

    def _decode(self, n: int, wanted: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode the n filled tokens in chunks of n_batch; (logits, hidden) of the ascending rows ``wanted``.

        With embeddings on, llama.cpp outputs every token (it overrides the flags), so rows are picked here.
        """
        lib = self._lib
        logits: list[torch.Tensor] = []
        hidden: list[torch.Tensor] = []
        start = 0
        first = 0  # index into wanted of the first row at or after start
        while start < n:
            m = min(self._n_batch, n - start)
            batch = self._batch if start == 0 else self._batch_at(start)
            batch.n_tokens = m
            _log_lines.clear()
            rc = lib.llama_decode(self._ctx, batch)
            if rc != 0:
                if rc == 1:
                    raise HastenError(f"the llama.cpp KV cache ({self.max_context} cells) has no room for the pass")
                raise HastenError(f"llama_decode failed ({rc}): {_first_error('see llama.cpp')}")
            last = first
            while last < len(wanted) and wanted[last] < start + m:
                last += 1
            if last > first:
                if self.want_hidden:  # every token of the chunk is an output row
                    local: Any = [row - start for row in wanted[first:last]]
                    total = m
                else:  # exactly the flagged rows are outputs, in order
                    local, total = slice(None), last - first
                logits.append(self._rows(lib.llama_get_logits(self._ctx), total, self.vocab_size, local))
                if self.want_hidden:
                    hidden.append(self._rows(lib.llama_get_embeddings(self._ctx), total, self.hidden_size, local))
            first = last
            start += m
        out_h = None
        if len(logits) == 1:
            return logits[0], (hidden[0] if self.want_hidden else None)
        if self.want_hidden:
            out_h = torch.cat(hidden) if hidden else torch.empty(0, self.hidden_size)
        out = torch.cat(logits) if logits else torch.empty(0, self.vocab_size)
        return out, out_h

    @staticmethod
    def _rows(pointer: Any, total: int, width: int, local: Any) -> torch.Tensor:
        """Copy output rows out of llama.cpp's buffer: all ``total`` of them (a slice) or those listed."""
        if not pointer:
            raise HastenError("llama.cpp returned no outputs for the pass")
        if isinstance(local, slice):  # one memmove: right after a forward pass every Python step is slow
            out = torch.empty(total, width)
            ctypes.memmove(out.data_ptr(), pointer, 4 * total * width)
            return out
        return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(total, width))[local])

    # -- the Target protocol

    def start(self, context: list[int]) -> Scores:
        """Clear the cache and prefill ``context`` (what the model's prompt cache holds of it is restored, not
        run); scores for its last position."""
        if self._shared is not None:  # a prefill runs in a context of its own, as plain decoding runs it
            self._shared.leave(self, keep=False)
        self._check_open()
        self._lib.llama_memory_clear(self._mem, True)
        self.cache_len = 0
        self._synced = [0] * self._n_seq_max
        self._pending = None
        n = len(context)
        if n > self.max_context:
            raise HastenError(f"the context of {n} tokens exceeds the model's context of {self.max_context}")
        if n == 0:
            hidden = torch.empty(0, self.hidden_size) if self.want_hidden else None
            return Scores(torch.empty(0, self.vocab_size), hidden)
        cache = self.model.prompt_cache
        self.cache_len = cache.restore(self._ctx, context) if cache is not None else 0
        rest = context[self.cache_len:]
        if self.want_hidden and len(rest) > 1:  # only the last position's hidden state is wanted
            self._run_without_outputs(rest[:-1])
            rest = rest[-1:]
        self._fill_chain(rest, [len(rest) - 1])
        logits, hidden = self._decode(len(rest), [len(rest) - 1])
        self.cache_len = self._synced[0] = n
        if cache is not None:
            cache.store(self._ctx, context)
        return Scores(logits, hidden)

    def _run_without_outputs(self, tokens: list[int]) -> None:
        """Run a chain into the cache with embeddings off: with them on, llama.cpp would compute the logits of
        every row. The cells are the same either way (rows do not depend on the decode they are in)."""
        lib = self._lib
        lib.llama_set_embeddings(self._ctx, False)
        self.want_hidden = False
        try:
            self._fill_chain(tokens, [len(tokens) - 1])
            self._decode(len(tokens), [])
        finally:
            self.want_hidden = True
            lib.llama_set_embeddings(self._ctx, True)
        self.cache_len += len(tokens)

    def score(self, tokens: list[int], parents: list[int], logits_rows: Sequence[int] | None = None) -> Scores:
        """Score a tree below the cache (token 0 the root); logits (and hidden states) for ``logits_rows``."""
        if self._shared is not None:
            from hasten.backends.llamacpp_shared import score_many

            return score_many(self.model, [(self, tokens, parents, logits_rows)])[0]
        self._check_open()
        rows, depths, seqs, n_seqs = self._check_pass(tokens, parents, logits_rows)
        n = len(tokens)
        if seqs is None:
            self._fill_chain(tokens, rows)
        else:
            if n_seqs >= self._n_seq_max:
                raise HastenError(f"a tree with {n_seqs} leaves needs n_seq_max > {n_seqs}; "
                                  f"this model has n_seq_max={self._n_seq_max}")
            assert depths is not None
            self._sync(n_seqs)
            self._fill_tree(tokens, depths, seqs, rows)
        ascending = logits_rows is None or all(b > a for a, b in zip(rows, rows[1:], strict=False))
        wanted = rows if ascending else sorted(set(rows))
        logits, hidden = self._decode(n, wanted)
        self._pending = (list(parents), seqs)
        if not ascending:  # llama.cpp returns rows in batch order, once each: reorder (and repeat) them as asked
            rank = {row: j for j, row in enumerate(wanted)}
            index = [rank[row] for row in rows]
            logits = logits[index]
            hidden = None if hidden is None else hidden[index]
        return Scores(logits, hidden)

    def _check_pass(self, tokens: list[int], parents: list[int], logits_rows: Sequence[int] | None
                    ) -> tuple[Sequence[int], list[int] | None, list[list[int]] | None, int]:
        """Validate a pass: (rows, depths, sequence ids per token, number of sequences); None, None, 1 for a chain."""
        if self._pending is not None:
            raise RuntimeError("commit() the previous pass before scoring again")
        n = len(tokens)
        if n == 0 or len(parents) != n:
            raise ValueError("a pass needs tokens and one parent per token")
        rows: Sequence[int] = range(n) if logits_rows is None else [int(row) for row in logits_rows]
        if rows and (min(rows) < 0 or max(rows) >= n):
            raise ValueError(f"logits_rows must lie in [0, {n})")
        if all(parent == i - 1 for i, parent in enumerate(parents)):
            depths, seqs, n_seqs, depth = None, None, 1, n - 1
        else:
            depths = tree_depths(parents)
            seqs, n_seqs = tree_sequences(parents)
            depth = max(depths)
        if self.cache_len + depth >= self.max_context:
            raise HastenError(f"the sequence would exceed the model's context of {self.max_context} tokens")
        return rows, depths, seqs, n_seqs

    def commit(self, keep: list[int]) -> None:
        """Keep the root-down path ``keep`` of the last pass in sequence 0 and drop everything else it added.

        When the kept tokens are not the first ones of the pass, their cells are moved (llama.cpp's sequence
        state copy: K/V rows of just those cells) to the slots right after the context, so the cache is laid
        out exactly as plain decoding lays it out: attention then sums over the cells in the same order, and
        later scores are bit-identical to decoding the committed tokens one by one wherever llama.cpp's
        passes are batch-invariant (flash attention on, quantized weights, passes under 64 tokens).
        """
        if self._shared is not None:
            self._shared.commit(self, keep)
            return
        self._check_open()
        if self._pending is None:
            raise RuntimeError("commit() needs a scored pass")
        parents, seqs = self._pending
        _check_keep(parents, keep)
        lib, mem, old, k = self._lib, self._mem, self.cache_len, len(keep)
        new = old + k
        source = 0  # a sequence other than 0 that holds the whole new context afterwards
        if seqs is None:
            self._rm(0, new)
        elif all(node == i for i, node in enumerate(keep)):  # the kept cells are the pass's first: no move
            source = commit_source(seqs, keep)
            for s in range(seqs[0][-1] + 1):  # the root carries every sequence of the pass
                if s != source:
                    self._rm(s, old)
            self._rm(source, new)
            if source != 0:
                lib.llama_memory_seq_cp(mem, source, 0, old, new)
        else:
            scratch = self._n_seq_max - 1  # never used by a pass
            lib.llama_memory_seq_cp(mem, commit_source(seqs, keep), scratch, old, new)
            size = lib.llama_state_seq_get_size(self._ctx, scratch)
            if len(self._state) < size:
                self._state = (ctypes.c_uint8 * max(size, 2 * len(self._state)))()
            lib.llama_state_seq_get_data(self._ctx, self._state, size, scratch)
            self._rm(-1, old)  # every cell of the pass, in every sequence
            if lib.llama_state_seq_set_data(self._ctx, self._state, size, scratch) != size:
                raise HastenError("llama.cpp could not move the kept cache entries")
            lib.llama_memory_seq_cp(mem, scratch, 0, -1, -1)
            self._rm(scratch, 0)
        for s in range(1, self._n_seq_max):  # the other sequences hold the context up to at most old
            if self._synced[s] > old:
                self._synced[s] = old
        if source:
            self._synced[source] = new
        self._synced[0] = new
        self.cache_len = new
        self._pending = None

    def truncate(self, length: int) -> None:
        """Drop the cache entries from ``length`` on (in every sequence)."""
        if self._shared is not None:
            self._shared.truncate(self, length)
            return
        self._check_open()
        if self._pending is not None:
            raise RuntimeError("commit() the previous pass before truncating")
        if not 0 <= length <= self.cache_len:
            raise ValueError(f"cannot truncate a cache of {self.cache_len} tokens to {length}")
        self._rm(-1, length)
        self.cache_len = length
        self._synced = [min(synced, length) for synced in self._synced]

    def remember(self, tokens: list[int]) -> None:
        """Offer the committed cells, which hold ``tokens`` (a finished conversation), to the model's prompt cache."""
        cache = self.model.prompt_cache
        if cache is None or self._pending is not None or len(tokens) != self.cache_len or not tokens:
            return
        if self._shared is not None:
            cache.store(self._shared.ctx, tokens, self._ids[0])
        elif self._ctx:
            cache.store(self._ctx, tokens)

    def close(self) -> None:
        """Give the llama context back to the model's pool; the target cannot be used afterwards."""
        shared = getattr(self, "_shared", None)
        if shared is not None:
            shared.leave(self, keep=False, reopen=False)
        context, self._ctx = getattr(self, "_ctx", None), None
        if context:
            self.model._release(context)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    # -- helpers

    def _check_open(self) -> None:
        if not self._ctx and self._shared is None:
            raise RuntimeError("this target was closed")

    def _rm(self, seq: int, start: int) -> None:
        if not self._lib.llama_memory_seq_rm(self._mem, seq, start, -1):
            raise HastenError(f"llama.cpp could not drop cache entries from position {start}")

    def _sync(self, n_seqs: int) -> None:
        """Make sequences 1..n_seqs-1 carry the whole committed context (tags only: kv_unified)."""
        for s in range(1, n_seqs):
            if self._synced[s] < self.cache_len:
                self._lib.llama_memory_seq_cp(self._mem, 0, s, self._synced[s], -1)
                self._synced[s] = self.cache_len

    def _ensure(self, n: int) -> None:
        if n > self._capacity:
            self._grow(max(n, 2 * self._capacity))

    def _fill_chain(self, tokens: Sequence[int], rows: Sequence[int]) -> None:
        n = len(tokens)
        self._ensure(n)
        self._tok[:n] = tokens
        self._pos[:n] = self._arange[:n] + self.cache_len
        self._nseq[:n] = 1
        self._seq[:n, 0] = 0
        self._flag(n, rows)

    def _fill_tree(self, tokens: Sequence[int], depths: Sequence[int], seqs: list[list[int]],
                   rows: Sequence[int]) -> None:
        n = len(tokens)
        self._ensure(n)
        self._tok[:n] = tokens
        self._pos[:n] = depths
        self._pos[:n] += self.cache_len
        seq = self._seq
        for i, ids in enumerate(seqs):
            self._nseq[i] = len(ids)
            seq[i, : len(ids)] = ids
        self._flag(n, rows)

    def _flag(self, n: int, rows: Sequence[int]) -> None:
        if self.want_hidden or (isinstance(rows, range) and rows == range(n)):
            self._out[:n] = 1
        else:
            self._out[:n] = 0
            self._out[list(rows)] = 1

    # -- inspection (tests, debugging): read llama.cpp's real cache state

    def real_cache_len(self) -> int:
        """One past the last position llama.cpp holds in sequence 0 (in the shared context: in its home)."""
        if self._shared is not None:
            return int(self._lib.llama_memory_seq_pos_max(self._shared.mem, self._ids[0])) + 1
        return int(self._lib.llama_memory_seq_pos_max(self._mem, 0)) + 1

    def kv_cells(self, seq: int = -1) -> list[tuple[int, tuple[int, ...]]]:
        """(position, sequence ids) of every used cell (or of sequence ``seq``'s cells), from llama.cpp's state
        serialisation; copies the cells' K/V data, so it is for tests and debugging only."""
        lib = self._lib
        ctx = self._ctx
        if self._shared is not None:  # this target's sequences there (-1: all of its cells, its home's)
            ctx, seq = self._shared.ctx, self._ids[0] if seq == -1 else self._ids[seq]
        return kv_cells(lib, ctx, seq)

    def cache_problems(self) -> list[str]:
        """Every way the real cache differs from "exactly positions 0..cache_len-1, each once, in this order,
        in sequence 0" (in the shared context: in its home sequence) (empty when all is well). Checks, never
        asserts."""
        if self._shared is not None:
            return self._shared.problems(self)
        return self._private_problems()

    def _private_problems(self) -> list[str]:
        problems: list[str] = []
        if self._pending is not None:
            problems.append("a pass is pending (not committed)")
        if self.real_cache_len() != self.cache_len:
            problems.append(f"sequence 0 ends at {self.real_cache_len()}, cache_len is {self.cache_len}")
        problems += layout_problems(self.kv_cells(), self.cache_len, 0)
        for s in range(1, self._n_seq_max):
            end = int(self._lib.llama_memory_seq_pos_max(self._mem, s)) + 1
            if end != self._synced[s]:
                problems.append(f"sequence {s} ends at {end}, expected {self._synced[s]}")
        return problems


def kv_cells(lib: Any, ctx: Any, seq: int) -> list[tuple[int, tuple[int, ...]]]:
    """(position, sequence ids) of every used cell of a context (or of sequence ``seq``'s cells), in cell order,
    from llama.cpp's state serialisation; copies the cells' K/V data, so it is for tests and debugging only."""
    size = lib.llama_state_seq_get_size(ctx, seq)
    data = (ctypes.c_uint8 * size)()
    lib.llama_state_seq_get_data(ctx, data, size, seq)
    raw = np.frombuffer(data, dtype=np.uint8)
    _magic, _seq, n_stream, count = raw[:16].view(np.int32)  # a header, then the KV cache's own state
    cells: list[tuple[int, tuple[int, ...]]] = []
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


def layout_problems(cells: Sequence[tuple[int, tuple[int, ...]]], length: int, home: int) -> list[str]:
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


__all__ = ["BatchArrays", "LlamaCppModel", "LlamaCppTarget", "commit_source", "kv_cells", "layout_problems",
           "tree_sequences"]
