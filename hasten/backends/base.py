"""The scorer interface: score tokens under a tree mask at given positions, then keep some of them.

A second backend (llama.cpp, a compiled or bf16 PyTorch path) only has to implement this protocol; the
proposers, the verifier and the generation loop never see the model itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Scores:
    """Target outputs for the scored tokens: logits (n, V) and, when asked for, last-layer hidden states (n, H)."""

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

    def score(self, tokens: list[int], offsets: list[int], mask: torch.Tensor | None) -> Scores:
        """Score ``tokens`` after the cache, token i at position ``cache_len + offsets[i]``.

        ``mask`` is a bool (n, n) matrix, True where token i may attend to token j (besides the whole
        cache); ``None`` means plain causal order.
        """
        ...

    def commit(self, keep: list[int]) -> None:
        """Keep the cache entries of these scored tokens (in this order) and drop the rest of the last pass."""
        ...

    def truncate(self, length: int) -> None:
        """Drop cache entries from ``length`` on (a draft model rolling back rejected guesses)."""
        ...
