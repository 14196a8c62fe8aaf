"""The scorer interface: score a token tree hanging below the root in one pass, then keep a path of it.

Every pass hasten makes is a tree: token 0 is the root (the last context token, not yet cached), and every
other token names its parent among the tokens before it. A token sits at position ``cache_len + depth`` and
attends to the whole cache, its ancestors and itself. transformers turns that into a 4-D mask; llama.cpp
into sequence ids. Proposers, the verifier and the loop never see a model library's objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from transformers import PretrainedConfig


class LogitRows(Protocol):
    """Logits rows a backend reads out of its own buffer on demand (``Scores`` wraps them); row indices as in
    ``Scores``, negative ones from the end."""

    def __len__(self) -> int: ...

    def row(self, i: int) -> torch.Tensor:
        """Row ``i``, float32 (V,), a tensor of the caller's own."""
        ...

    def argmax(self, i: int) -> int:
        """The index of row ``i``'s largest logit (the first of ties), read in place."""
        ...

    def rows(self, index: Sequence[int]) -> torch.Tensor:
        """Rows ``index``, float32 (len(index), V), a tensor of the caller's own."""
        ...

    def release(self) -> None:
        """The reader is done: the backend may reuse its buffer (reading afterwards raises)."""
        ...


class Scores:
    """Target outputs for the rows that were asked for, in that order: logits (r, V) float32 and, when the
    target was made with ``want_hidden``, last-layer hidden states after the final norm (r, H).

    A backend may hand its logits over as ``LogitRows`` read on demand, so that a step touches only the rows it
    visits: ``argmax(i)`` reads row ``i`` in place and ``row(i)`` copies that row alone, while ``logits`` copies
    every row (once). Such rows stay valid across the target's next pass (a ``Scores`` still held then is copied
    out at that point); ``release()`` says they will not be read again, so nothing is copied.
    """

    def __init__(self, logits: torch.Tensor | LogitRows, hidden: torch.Tensor | None = None) -> None:
        self._tensor: torch.Tensor | None = logits if isinstance(logits, torch.Tensor) else None
        self._reader: LogitRows | None = None if isinstance(logits, torch.Tensor) else logits
        self.hidden = hidden
        self._best: list[int] | None = None  # every row's argmax, on a device where one sync is cheaper than many

    @property
    def logits(self) -> torch.Tensor:
        """Every row, float32 (r, V)."""
        if self._tensor is None:
            assert self._reader is not None
            self._tensor, self._reader = self._reader.rows(range(len(self._reader))), None
        return self._tensor

    def __len__(self) -> int:
        return self._tensor.shape[0] if self._tensor is not None else len(self._reader or ())

    def row(self, i: int) -> torch.Tensor:
        """Row ``i``, float32 (V,) (with rows read on demand, a copy of that row alone)."""
        return self._tensor[i] if self._tensor is not None else self._reader_().row(i)

    def rows(self, index: Sequence[int]) -> torch.Tensor:
        """Rows ``index``, float32 (len(index), V)."""
        if self._tensor is not None:
            return self._tensor[list(index)]
        return self._reader_().rows(index)

    def argmax(self, i: int) -> int:
        """The index of row ``i``'s largest logit, the first of ties (as ``torch.argmax``): in place with rows
        read on demand; on the CPU through numpy (a vectorised scan); elsewhere every row's at once, in one
        device sync, kept for the next call."""
        tensor = self._tensor
        if tensor is None:
            return self._reader_().argmax(i)
        if tensor.device.type == "cpu" and tensor.dtype == torch.float32:
            return int(tensor[i].detach().numpy().argmax())
        if self._best is None:
            self._best = tensor.argmax(-1).tolist()
        return self._best[i]

    def release(self) -> None:
        """Done with the rows read on demand: the backend may reuse its buffer (no effect on a tensor)."""
        if self._reader is not None:
            self._reader.release()

    def _reader_(self) -> LogitRows:
        assert self._reader is not None
        return self._reader


class Target(Protocol):
    """One sequence's view of the target model and its KV cache."""

    vocab_size: int
    max_context: int
    cache_len: int

    def start(self, context: list[int]) -> Scores:
        """Reset the cache and run ``context`` into it; scores for its last position (empty if no context)."""
        ...

    def score(self, tokens: list[int], parents: list[int], logits_rows: Sequence[int] | None = None) -> Scores:
        """Score a tree after the cache: token 0 is the root (parent -1), token i's parent is ``parents[i] < i``.

        Only ``logits_rows`` (default: every token) get logits (and hidden states), in the order given.
        """
        ...

    def commit(self, keep: list[int]) -> None:
        """Keep the cache entries of ``keep``, a path from the root (0 first, each the parent of the next),
        and drop the rest of the last pass."""
        ...

    def truncate(self, length: int) -> None:
        """Drop cache entries from ``length`` on (a draft model rolling back rejected guesses)."""
        ...


class ModelBackend(Protocol):
    """A loaded model on one inference engine: makes targets and answers questions about the model."""

    backend: str  # "transformers" or "llamacpp"
    architecture: str  # e.g. "llama"
    vocab_size: int
    max_context: int
    hidden_size: int
    eos_token_ids: frozenset[int]

    def new_target(self, want_hidden: bool = False) -> Target:
        """A fresh sequence (its own KV cache) on this model."""
        ...

    def input_embeddings(self) -> torch.Tensor:
        """The token embedding table (V, E), float32, for drafters that borrow it."""
        ...

    def output_embeddings(self) -> torch.Tensor:
        """The output projection (V, H), float32, for drafters that borrow it."""
        ...

    def transformers_config(self) -> PretrainedConfig:
        """The model's configuration in transformers' terms (drafters built on the target's shapes need it)."""
        ...
