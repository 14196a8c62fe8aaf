"""A GGUF model loaded by llama.cpp: its llama contexts (a small pool of them for its targets), the shared
context in which several targets are scored together, and its tensors dequantized for drafters."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hasten.backends.base import Scores
from hasten.backends.llamacpp.library import clear_log, first_logged_error, load_llama_cpp
from hasten.backends.llamacpp.prompt_cache import DEFAULT_BUDGET_BYTES as DEFAULT_PROMPT_CACHE_BYTES
from hasten.backends.llamacpp.prompt_cache import PromptCache
from hasten.backends.llamacpp.shared_context import SharedCache, score_many
from hasten.backends.llamacpp.shared_exactness import attention_is_batch_invariant, kv_types
from hasten.backends.llamacpp.target import LlamaCppTarget
from hasten.backends.llamacpp.weight_invariance import rows_are_batch_invariant
from hasten.errors import HastenError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

DEFAULT_THREADS = 2
DEFAULT_N_CTX = 4096
DEFAULT_N_SEQ_MAX = 64
DEFAULT_N_BATCH = 512
DEFAULT_KV_TYPE = "q8_0/f16"  # keys Q8_0, values F16 (class docstring): one attention kernel for every pass
FALLBACK_KV_TYPE = "f16"  # llama.cpp's own default, where a quantized cache cannot be made
POOL_SIZE = 4  # idle llama contexts a model keeps for its next targets (creating one costs tens of ms)


class LlamaCppModel:
    """A GGUF model loaded by llama.cpp; makes targets (each with its own llama context) on it.

    ``extra_buffers`` (llama.cpp's ``use_extra_bufts``: repacked / AMX weight layouts) defaults to off on CPUs
    that report AMX, whose batched AMX kernels crash in this build, and elsewhere to on where a probe finds each
    row of a wide pass bit-identical to a one-token pass (``weight_invariance``), off where not; a model that
    only drafts (``verifies=False``) skips the probe, its rows deciding nothing. ``flash_attn`` (None:
    llama.cpp decides, which is on for the CPU) should stay on: its CPU kernel treats every query row on its
    own, so passes are batch-invariant, while without it the real default model's logits move by ~0.5 with
    the number of tokens in a pass. ``score_many`` scores several targets' passes in one ``llama_decode`` in a
    shared context of ``shared_cells`` cells and ``shared_seq_max`` sequence ids (see ``shared_context``).

    ``kv_type`` is the KV cache's type, ``"K/V"`` or one type for both; by default Q8_0 keys and F16 values,
    falling back to F16 (llama.cpp's default) where a quantized cache cannot be made (head sizes not a multiple of
    32, flash attention off). ggml's CPU flash attention takes other kernels for other passes only where keys are
    F16/F32 and values have the keys' type: a one-token pass over 512 or more cached cells then splits the cells
    across threads, and a pass of 64 or more tokens is tiled, so a verification pass and plain decoding round
    differently past 256 cached tokens (a max logit difference of 0.35 on the default model at 700 tokens,
    2 threads) and greedy outputs can part at near-ties. Any other pair takes one kernel for every pass, so rows
    are bit-identical at any cache length and thread count (``attention_is_batch_invariant``). Of those, Q8_0 keys
    with F16 values is the fastest on a 2-core CPU (AMD EPYC, AVX-512, default model, 600-token prompt: prefill
    3.5 against 4.1 ms a token for Q8_0/Q8_0, one-token pass 9.2 against 10.3 ms, four tokens 24.7 against 29.8;
    an F16/F16 cache prefills at 3.5 too, but is not exact).

    ``prompt_cache`` keeps the cells of recent prompts (``prompt_cache_bytes``, 64 MiB by default; 0 turns it
    off) so that a prefill runs only what its prompt does not share with one of them (``prompt_cache``);
    it exists only where that is bit-exact: with a quantized KV cache.
    """

    backend = "llamacpp"

    def __init__(self, path: str | Path, *, threads: int | None = None, n_ctx: int | None = None,
                 n_seq_max: int = DEFAULT_N_SEQ_MAX, n_batch: int = DEFAULT_N_BATCH,
                 extra_buffers: bool | None = None, flash_attn: bool | None = None,
                 shared_cells: int | None = None, shared_seq_max: int | None = None,
                 kv_type: str | None = None, prompt_cache_bytes: int | None = None,
                 verifies: bool = True) -> None:
        self.path = Path(path).expanduser()
        self._model: Any = None  # llama.cpp's model handle
        self._shared: SharedCache | None = None
        self._pool: list[Any] = []  # idle llama contexts, emptied
        self._lock = threading.Lock()
        self._tensors: dict[str, torch.Tensor] = {}
        self.extra_buffers = self._load(extra_buffers)
        lib = self.lib
        self.architecture = self._metadata("general.architecture")
        self.vocab_size = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self._model)))
        self.hidden_size = int(lib.llama_model_n_embd_out(self._model))
        self.n_embd = int(lib.llama_model_n_embd(self._model))
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(self._model))
        self.threads = threads or DEFAULT_THREADS
        self.n_seq_max = max(1, min(n_seq_max, int(lib.llama_max_parallel_sequences())))
        self.n_batch = n_batch
        self.flash_attn = flash_attn
        self.kv_type = kv_type
        self._n_ctx_request = n_ctx or min(self.n_ctx_train or DEFAULT_N_CTX, DEFAULT_N_CTX)
        vocab, is_eog = lib.llama_model_get_vocab(self._model), lib.llama_vocab_is_eog
        self.eos_token_ids = frozenset(i for i in range(self.vocab_size) if is_eog(vocab, i))
        context = self.new_context()  # the first context settles kv_type and the context size
        self.max_context = int(lib.llama_n_ctx(context))
        self._pool.append(context)
        self.shared_cells = shared_cells or 2 * self.max_context  # cells of the context targets share
        self.shared_seq_max = min(shared_seq_max or 256, int(lib.llama_max_parallel_sequences()))  # and its ids
        budget = DEFAULT_PROMPT_CACHE_BYTES if prompt_cache_bytes is None else prompt_cache_bytes
        exact = attention_is_batch_invariant(self.kv_type or FALLBACK_KV_TYPE) and self.flash_attn is not False
        self.prompt_cache = PromptCache(lib, budget) if budget > 0 and exact else None
        # None, or a list where each llama_decode a target of this model runs alone appends (tokens, seconds):
        # how scripts time llama.cpp's own share of a step (scripts/llamacpp_parity.py)
        self.decode_log: list[tuple[int, float]] | None = None
        if verifies and extra_buffers is None and self.extra_buffers and not rows_are_batch_invariant(self):
            self._reload_without_extra_buffers()

    def _reload_without_extra_buffers(self) -> None:
        """The model again, with plain weight layouts (``weight_invariance``); nothing else has used it yet."""
        lib = self.lib
        for context in self._pool:
            lib.llama_free(context)
        self._pool.clear()
        lib.llama_model_free(self._model)
        self._model = None
        self.extra_buffers = self._load(False)
        self._pool.append(self.new_context())
        self.forget_prompts()

    def _load(self, extra_buffers: bool | None) -> bool:
        """Load the GGUF file into llama.cpp; refuse what is not a decoder-only attention model. Returns whether
        extra buffers are on."""
        if not self.path.is_file():
            raise HastenError(f"model file {str(self.path)!r} not found")
        with open(self.path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise HastenError(f"{self.path} is not a GGUF file")
        lib = self.lib = load_llama_cpp()
        if extra_buffers is None:
            extra_buffers = b"AMX_INT8 = 1" not in lib.llama_print_system_info()
        params = lib.llama_model_default_params()
        params.use_extra_bufts = extra_buffers
        clear_log()
        self._model = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise HastenError(f"llama.cpp cannot load {self.path.name}: {first_logged_error('unknown error')}")
        if lib.llama_model_has_encoder(self._model) or lib.llama_model_is_recurrent(self._model) \
                or lib.llama_model_is_hybrid(self._model):
            raise HastenError(f"{self.path.name}: only decoder-only attention models can verify token trees")
        return extra_buffers

    def _metadata(self, key: str) -> str:
        """A GGUF metadata value as a string ("" when absent)."""
        buf = ctypes.create_string_buffer(256)
        n = self.lib.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else ""

    # -- llama contexts

    def new_context(self, n_ctx: int | None = None, n_seq_max: int | None = None) -> Any:
        """A new llama context (the model's own size and sequence ids unless given); the first one made also
        settles ``kv_type`` when it was not given: Q8_0 where llama.cpp can make it, F16 otherwise."""
        lib = self.lib
        kv_type = self.kv_type or DEFAULT_KV_TYPE
        params = self._context_params(n_ctx, n_seq_max, kv_type)
        clear_log()
        context = lib.llama_init_from_model(self._model, params)
        if not context and self.kv_type is None and kv_type != FALLBACK_KV_TYPE:
            self.kv_type = FALLBACK_KV_TYPE  # a quantized cache needs head sizes in whole blocks (and flash attention)
            return self.new_context(n_ctx, n_seq_max)
        if not context:
            raise HastenError(f"llama.cpp could not create a context for {self.path.name}: "
                              f"{first_logged_error('out of memory?')}")
        if self.kv_type is None:
            self.kv_type = kv_type
        return context

    def _context_params(self, n_ctx: int | None, n_seq_max: int | None, kv_type: str) -> Any:
        lib = self.lib
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx or self._n_ctx_request
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = n_seq_max or self.n_seq_max
        params.n_outputs_max = max(self.n_batch, params.n_seq_max)  # llama.cpp reserves at least n_seq_max rows
        params.n_threads = params.n_threads_batch = self.threads
        params.kv_unified = True  # sequences coupled in one batch (a tree) need one shared cell buffer
        keys, values = kv_types(kv_type)
        params.type_k = getattr(lib, f"GGML_TYPE_{keys.upper()}")
        params.type_v = getattr(lib, f"GGML_TYPE_{values.upper()}")
        params.swa_full = True  # sliding-window layers keep every cell, so rolling back never fails
        params.pooling_type = lib.LLAMA_POOLING_TYPE_NONE
        params.embeddings = False
        params.flash_attn_type = {None: lib.LLAMA_FLASH_ATTN_TYPE_AUTO, True: lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                  False: lib.LLAMA_FLASH_ATTN_TYPE_DISABLED}[self.flash_attn]
        params.no_perf = True
        return params

    def acquire_context(self) -> Any:
        """An empty llama context: an idle one from the pool, or a new one."""
        with self._lock:
            if self._pool:
                return self._pool.pop()
        return self.new_context()

    def release_context(self, context: Any) -> None:
        """Empty a context and keep it for the next target (or free it when the pool is full). Only its cells
        are emptied: their K/V bytes stay, as a commit's dropped cells' do, and count for nothing in a pass that
        does not attend to them (flash attention skips masked cells; without it they weigh exactly 0). Zeroing
        the default model's 4096 cells took 1.2 ms, twice a generation."""
        lib = self.lib
        lib.llama_memory_clear(lib.llama_get_memory(context), False)
        with self._lock:
            if len(self._pool) < POOL_SIZE:
                self._pool.append(context)
                return
        lib.llama_free(context)

    def forget_prompts(self) -> None:
        """Empty the prompt cache: the next prefills run their whole prompts (as the benchmark wants)."""
        if self.prompt_cache is not None:
            self.prompt_cache.clear()

    # -- targets

    def new_target(self, want_hidden: bool = False) -> LlamaCppTarget:
        """A fresh sequence with its own llama context (reused from a small pool)."""
        return LlamaCppTarget(self, self.acquire_context(), want_hidden)

    def score_many(self, passes: Sequence[tuple[Any, Any]]) -> list[Scores]:
        """Score the passes (target, layout with tokens, parents, logits_rows) of several targets of this model,
        as far as exactness allows in shared llama_decode calls; see ``shared_context``."""
        targets = [target for target, _layout in passes]
        if len({id(target) for target in targets}) != len(targets):
            raise ValueError("score_many takes each target at most once")
        for target in targets:
            if not isinstance(target, LlamaCppTarget) or target.model is not self:
                raise ValueError("score_many takes targets of this model only")
            target.check_open()
        return score_many(self, [(target, layout.tokens, layout.parents, layout.logits_rows)
                                 for target, layout in passes])

    def shared_cache(self) -> SharedCache:
        """The one llama context (created on first use) in which targets are scored together."""
        if self._shared is None:
            self._shared = SharedCache(self, self.shared_cells)
        return self._shared

    @property
    def shared_cache_if_made(self) -> SharedCache | None:
        """The shared context if one was made, without making it."""
        return self._shared

    # -- tensors, for drafters built on the target's weights

    def _dequantized(self, *names: str) -> torch.Tensor:
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
        return self._dequantized("token_embd.weight")

    def output_embeddings(self) -> torch.Tensor:
        """The output projection (V, H), float32 (the token embeddings when they are tied)."""
        return self._dequantized("output.weight", "token_embd.weight")

    def transformers_config(self) -> PretrainedConfig:
        """The GGUF's llama metadata as a transformers ``LlamaConfig`` (drafters built on the target's shapes)."""
        from hasten.backends.llamacpp.gguf_config import llama_config, read_gguf

        return llama_config(read_gguf(self.path))

    def __del__(self) -> None:
        # Every context of the model before the model itself: the shared one, then the pool.
        try:
            lib = self.lib
            if self._shared is not None:
                self._shared.close()
                self._shared = None
            for context in self._pool:
                lib.llama_free(context)
            self._pool.clear()
            if self._model:
                lib.llama_model_free(self._model)
                self._model = None
        except Exception:  # interpreter shutdown: the library may already be gone
            pass


__all__ = ["DEFAULT_KV_TYPE", "DEFAULT_N_BATCH", "DEFAULT_N_CTX", "DEFAULT_N_SEQ_MAX", "DEFAULT_THREADS",
           "FALLBACK_KV_TYPE", "POOL_SIZE", "LlamaCppModel"]
