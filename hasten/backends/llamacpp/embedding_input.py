"""A llama.cpp model fed input embeddings instead of token ids: the reduced-vocabulary distilled draft.

The exported draft (``hasten/draft/gguf_export.py``) holds only its 8192 output rows; its inputs are the target GGUF's
token embeddings, read here and passed through ``llama_batch.embd``.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hasten.backends.llamacpp.gguf_config import read_gguf
from hasten.backends.llamacpp.model import LlamaCppModel
from hasten.backends.llamacpp.target import LlamaCppTarget
from hasten.errors import HastenError

DRAFT_SEQUENCES = 16  # sequence ids of the draft's context: a drafted tree has at most 15 leaves


class EmbeddingInputTarget(LlamaCppTarget):
    """A llama.cpp sequence fed input embeddings (``llama_batch.embd``) instead of token ids: the reduced draft
    reads the target's embedding of each token, which its own 8192-row table cannot hold."""

    def __init__(self, model: LlamaCppModel, context: Any, embed: Callable[[Sequence[int]], np.ndarray]) -> None:
        self._embed = embed
        self._width = model.n_embd
        super().__init__(model, context)

    def _grow(self, capacity: int) -> None:
        self._embd = np.zeros((capacity, self._width), np.float32)
        super()._grow(capacity)

    def _batch_at(self, start: int) -> Any:
        batch = super()._batch_at(start)
        batch.token = None
        batch.embd = ctypes.cast(self._embd.ctypes.data + 4 * self._width * start, ctypes.POINTER(ctypes.c_float))
        return batch

    def _fill_chain(self, tokens: Sequence[int], rows: Sequence[int]) -> None:
        super()._fill_chain(tokens, rows)
        self._embd[: len(tokens)] = self._embed(tokens)

    def _fill_tree(self, tokens: Sequence[int], depths: Sequence[int], seqs: list[list[int]],
                   rows: Sequence[int]) -> None:
        super()._fill_tree(tokens, depths, seqs, rows)
        self._embd[: len(tokens)] = self._embed(tokens)

    @property
    def max_leaves(self) -> int:
        """The most leaves a scored tree may have (one sequence id each, one id kept spare)."""
        return self.model.n_seq_max - 1


class ReducedDraftModel:
    """The reduced-layout draft GGUF on llama.cpp, its inputs the target GGUF's token embeddings.

    A ``ModelBackend`` for ``DraftModelProposer``: ``vocab_size`` is the draft vocabulary (its logits' rows).
    """

    backend = "llamacpp"

    def __init__(self, path: str | Path, target: str | Path, threads: int | None = None) -> None:
        # no prompt cache: the draft's prefill costs little, and the benchmark's runs stay independent
        self.model = LlamaCppModel(path, threads=threads, n_seq_max=DRAFT_SEQUENCES, prompt_cache_bytes=0,
                                   verifies=False)
        self.vocab_size = self.model.vocab_size
        self.max_context = self.model.max_context
        self.hidden_size = self.model.hidden_size
        self.architecture = self.model.architecture
        self.eos_token_ids: frozenset[int] = frozenset()
        self._table = read_gguf(target)
        if self._table.tensors["token_embd.weight"].shape[-1] != self.model.n_embd:
            raise HastenError(f"{Path(path).name} does not fit the target's embedding width")

    def embed(self, tokens: Sequence[int]) -> np.ndarray:
        """The target's input embeddings of ``tokens`` (n, E), float32."""
        return self._table.rows("token_embd.weight", list(tokens)).numpy()

    def new_target(self, want_hidden: bool = False) -> EmbeddingInputTarget:
        if want_hidden:
            raise HastenError("the draft gives no hidden states")
        return EmbeddingInputTarget(self.model, self.model.acquire_context(), self.embed)


__all__ = ["EmbeddingInputTarget", "ReducedDraftModel"]
