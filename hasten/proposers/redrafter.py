"""ReDrafter (``redrafter``): beam search over a recurrent draft head, beams merged into one token tree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hasten.adaptive.chooser import DraftPolicy, Feature
from hasten.adaptive.costly import CostlySource
from hasten.backends.base import ModelBackend
from hasten.errors import HastenError
from hasten.per_model import once_per_model
from hasten.proposers.base import Proposal, Proposer, StepOutcome, last_hidden
from hasten.redrafter.beam import beam_search
from hasten.redrafter.head import ReDrafterHead
from hasten.tree import TokenTree, merge_paths

SHIPPED_HEAD = Path(__file__).resolve().parent.parent / "artifacts" / "redrafter"


@dataclass
class TreeStats:
    """How much merging shared beam prefixes saves: beam tokens drafted vs tree nodes verified."""

    steps: int = 0
    beam_tokens: int = 0
    tree_tokens: int = 0

    @property
    def saving(self) -> float:
        """Fraction of beam tokens that merging removed from the verification passes."""
        return 1 - self.tree_tokens / self.beam_tokens if self.beam_tokens else 0.0


class HeadDrafter:
    """Adapts a ``ReDrafterHead`` with a fixed hidden state to beam search's ``Drafter`` protocol."""

    def __init__(self, head: ReDrafterHead, hidden: torch.Tensor) -> None:
        self.head = head
        self.hidden = hidden.reshape(1, -1)
        self.prepared = head.prepare(self.hidden)

    @property
    def vocab(self) -> torch.Tensor:
        return self.head.draft_ids

    def start(self, rows: int) -> torch.Tensor:
        return self.head.init_state(rows)

    def advance(self, state: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head.advance(self.prepared, state, tokens)


class ReDrafterProposer(Proposer):
    """Draft ``beam_width`` beams of ``beam_length - 1`` tokens after the root (Apple's convention: the length
    counts the root) from the target's hidden state, and verify their merged prefix tree in one pass.

    Beams come from a top-k search, not from sampling, so the tree carries no draft distributions and the
    verifier treats every node as a point-mass guess: greedy and sampled output stay exactly the target's.
    """

    name = "redrafter"
    needs_hidden = True

    def __init__(self, head: ReDrafterHead, beam_width: int = 2, beam_length: int = 5,
                 policy: DraftPolicy | None = None) -> None:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (beam_width, beam_length)) or \
                beam_width < 1 or beam_length < 2:
            raise HastenError("redrafter needs --beam-width >= 1 and --beam-length >= 2 (the length counts the root)")
        if head.output is None:
            raise ValueError("attach() the head to the target first")
        self.head = head.eval()
        self.beam_width = beam_width
        self.beam_length = beam_length
        self.tree_stats = TreeStats()
        self.policy = policy
        self._hidden: torch.Tensor | None = None
        self._offered: tuple[TokenTree, list[list[Feature]]] | None = None  # the tree and features verified
        self.search = CostlySource("head")  # the beam search runs while its tokens are worth its time

    def start(self, context: list[int], hidden: torch.Tensor | None) -> None:
        self._hidden = last_hidden(hidden)
        self.search.restart()

    @torch.inference_mode()
    def propose(self, context: list[int], max_depth: int) -> Proposal:
        self._offered = None
        paths, features = self.draft_beams(context, max_depth)
        if not paths:
            if self.policy is not None:
                self.policy.plain()
            return Proposal(TokenTree())
        tree, node_features = merge_paths(paths, features)
        if self.policy is not None:
            tree, node_features = self.policy.choose(tree, node_features)
            self._offered = (tree, node_features)
        self.tree_stats.steps += 1
        self.tree_stats.beam_tokens += sum(len(path) for path in paths)
        self.tree_stats.tree_tokens += len(tree)
        return Proposal(tree)

    def draft_beams(self, context: list[int], depth: int) -> tuple[list[list[int]], list[list[Feature]]]:
        """The beams after the root, no longer than ``depth``, and each token's feature: its depth and its own
        draft probability, in tenths. None without a hidden state, or while the search does not pay."""
        length = min(self.beam_length - 1, depth)
        if length <= 0 or self._hidden is None or not self.search.should_run(self.policy):
            return [], []
        with self.search.timed():  # the read-back inside: on CUDA the search only queues work until it
            beams = beam_search(HeadDrafter(self.head, self._hidden), context[-1], self.beam_width, length)
            tokens = beams.tokens.tolist()
            tenths = (beams.token_log_probs.exp() * 10).long().clamp(max=9).tolist()
        return tokens, [[("head", d + 1, bucket) for d, bucket in enumerate(row)] for row in tenths]

    def stats(self) -> dict[str, float]:
        steps = max(self.tree_stats.steps, 1)
        return {
            "beam_tokens_per_step": self.tree_stats.beam_tokens / steps,
            "tree_tokens_per_step": self.tree_stats.tree_tokens / steps,
            "tree_saving": self.tree_stats.saving,
        } | super().stats()

    def update(self, outcome: StepOutcome) -> None:
        if self.policy is not None and self._offered is not None:
            self.policy.learn(*self._offered, outcome)
            self.search.credit(self.policy, len(outcome.accepted))
        self._offered = None
        self._hidden = last_hidden(outcome.hidden)


@once_per_model
def _shipped_head(target: ModelBackend) -> ReDrafterHead:
    return ReDrafterHead.load(SHIPPED_HEAD).attach(target)


def load_head(target_name: str, target: ModelBackend, head: str | Path | ReDrafterHead | None) -> ReDrafterHead:
    """The head to use: the one given (a path or a head), else the shipped one for the default model (read and
    attached once per target model)."""
    if head is None:
        if target_name != "default":
            raise HastenError(
                f"--method redrafter needs a head trained for {target_name!r} (--head DIR; train one with "
                "'hasten train redrafter'); the shipped head fits only the default model"
            )
        return _shipped_head(target)
    if not isinstance(head, ReDrafterHead):
        head = ReDrafterHead.load(head)
    return head.attach(target)
