"""Deterministic beam search over a recurrent drafter.

Beams start from the root token; each step scores every (beam, token) extension by the beam's summed draft
log-probability and keeps the ``width`` best (a top-k, never a sample), so the drafted tokens are point-mass
guesses for the verifier. The first step grows the single root beam; later steps spread over all beams.
Everything stays on the drafter's device (its ``vocab``'s): no tensor is made on the host and nothing is read
back, so the search queues its work without waiting for any of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class Drafter(Protocol):
    """What beam search needs: a recurrent state, its update by target tokens and log-probs over a vocabulary."""

    def start(self, rows: int) -> torch.Tensor:
        """The initial state of ``rows`` beams."""
        ...

    def advance(self, state: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed target ids ``tokens`` (n,); return the new state and log-probs (n, len(vocab)) of the next token."""
        ...

    @property
    def vocab(self) -> torch.Tensor:
        """Target id of every column of ``advance``'s log-probs."""
        ...


@dataclass
class Beams:
    """``tokens`` (n, length) drafted target ids after the root, best beam first; ``scores`` (n,) their log-probs;
    ``token_log_probs`` (n, length) each token's own draft log-prob given the tokens before it."""

    tokens: torch.Tensor
    scores: torch.Tensor
    token_log_probs: torch.Tensor


def beam_search(drafter: Drafter, root: int, width: int, length: int) -> Beams:
    """The ``width`` most likely continuations of ``root`` with ``length`` tokens each (fewer beams if the
    vocabulary cannot fill them)."""
    if width < 1 or length < 1:
        raise ValueError("beam search needs width >= 1 and length >= 1")
    vocab = drafter.vocab
    scores = torch.zeros(1, device=vocab.device)
    state = drafter.start(1)
    last = vocab.new_full((1,), root)  # a fill on the device, not a copy from the host
    picks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per step: parent beam, column, score
    for _ in range(length):
        state, log_probs = drafter.advance(state, last)
        columns = log_probs.shape[1]
        best = (scores[:, None] + log_probs).flatten().topk(min(width, log_probs.numel()))
        beam, column = best.indices.div(columns, rounding_mode="floor"), best.indices.remainder(columns)
        picks.append((beam, column, best.values))
        last = vocab[column]
        state = state[beam]
        scores = best.values
    # Follow the parent pointers back from the last step: each beam's columns and running scores.
    rows = torch.arange(len(scores), device=vocab.device)
    path_columns, path_scores = [], []
    for beam, column, values in reversed(picks):
        path_columns.append(column[rows])
        path_scores.append(values[rows])
        rows = beam[rows]
    tokens = vocab[torch.stack(path_columns[::-1], dim=1)]
    running = torch.stack(path_scores[::-1], dim=1)
    steps = torch.diff(running, dim=1, prepend=running.new_zeros(len(scores), 1))
    return Beams(tokens, scores, steps)
