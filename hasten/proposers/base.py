"""The proposer plug-in interface: something cheap that guesses a token tree for the target to verify."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from hasten.tree import TokenTree

if TYPE_CHECKING:
    from hasten.adaptive.chooser import DraftPolicy


@dataclass
class ExtraBranch:
    """Tokens a proposer wants scored in the same target pass, outside the verified tree (lookahead's window).

    ``tree`` hangs below the root like the verified tree but never sees it (nor does the verified tree see
    it). Only the nodes in ``read_rows`` get logits, handed back in ``StepOutcome.extra_logits`` in that order.
    """

    tree: TokenTree
    read_rows: list[int]


@dataclass
class Proposal:
    tree: TokenTree
    extra: ExtraBranch | None = None


@dataclass
class StepOutcome:
    """What one verification step decided, for the proposer to learn from."""

    accepted: list[int]  # drafted tokens the target accepted, in order
    next_token: int  # the target's own token after them: the new root
    hidden: torch.Tensor | None  # target hidden state (1, H) at the position that produced ``next_token``
    extra_logits: torch.Tensor | None  # target logits at the extra branch's ``read_rows``, if one was proposed
    accepted_nodes: list[int] = field(default_factory=list)  # tree indices of the accepted tokens
    pass_width: int = 1  # tokens the target pass scored (root, tree and extra branch)
    pass_ms: float = 0.0  # wall time of that pass
    # how many of the proposer's nodes, in index order, the pass could score (None: all); those after were cut
    # for the room left in the context, never verified, and are neither accepted nor rejected
    scored_nodes: int | None = None


class Proposer:
    """Base class; ``ar`` is this class itself: it never guesses, so each pass yields one token."""

    name = "ar"
    needs_hidden = False  # ask the target for last-layer hidden states
    policy: DraftPolicy | None = None  # an adaptive proposer's policy (None: fixed sizes)

    def start(self, context: list[int], hidden: torch.Tensor | None) -> None:
        """A new sequence: ``context`` ends with the root; ``hidden`` is the target's state before the root."""

    def expect(self, tokens: list[int]) -> None:
        """Tokens the answer is expected to resemble (OpenAI's predicted output), given before ``start``: a
        source of drafts, never of output. Drafters that cannot draft from it ignore it."""

    def propose(self, context: list[int], max_depth: int) -> Proposal:
        """Guess continuations of ``context`` (which ends with the root), no deeper than ``max_depth``."""
        return Proposal(TokenTree())

    def update(self, outcome: StepOutcome) -> None:
        """Learn what was accepted (roll back caches, advance windows, collect n-grams)."""

    def stats(self) -> dict[str, float]:
        """Method-specific statistics of the generation so far (reported beside the common ones)."""
        return self.policy.stats() if self.policy is not None else {}


def accepted_if_drafted(tree: TokenTree, outcome: StepOutcome) -> int | None:
    """A step's accepted count, None when it drafted nothing (what the next step's features are told)."""
    return len(outcome.accepted) if len(tree) else None


def last_accepted_capped(accepted: int | None) -> int:
    """The last step's accepted count as a feature: -1 when it drafted nothing, else capped at 3."""
    return -1 if accepted is None else min(accepted, 3)


def last_hidden(hidden: torch.Tensor | None) -> torch.Tensor | None:
    """The target's hidden state at the last scored row, None if it gave none."""
    return None if hidden is None or hidden.numel() == 0 else hidden[-1]
