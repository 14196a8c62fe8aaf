"""The scorer interface: score a token tree hanging below the root in one pass, then keep a path of it.

Every pass hasten makes is a tree: token 0 is the root (the last context token, not yet cached), and every
other token names its parent among the tokens before it. A token sits at position ``cache_len + depth`` and
attends to the whole cache, its ancestors and itself. transformers turns that into a 4-D mask; llama.cpp
into sequence ids. Proposers, the verifier and the loop never see a model library's objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PretrainedConfig


@dataclass
class Scores:
    """Target outputs for the rows that were asked for, in that order: logits (r, V) float32 and, when the
    target was made with ``want_hidden``, last-layer hidden states after the final norm (r, H)."""

    logits: torch.Tensor
    hidden: torch.Tensor | None = None


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
