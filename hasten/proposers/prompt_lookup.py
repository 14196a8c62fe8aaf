"""Prompt lookup (``pld``): guess that the text continues as it did after an earlier copy of its tail."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from hasten.adaptive.chooser import DraftPolicy, Feature
from hasten.errors import HastenError
from hasten.proposers.base import Proposal, Proposer, StepOutcome, accepted_if_drafted, last_accepted_capped
from hasten.tree import TokenTree, merge_paths

FREQUENCY_MATCHES = 64  # the most recent matches a continuation's frequency is counted among


@dataclass
class LookupMatch:
    """The continuations of the context's longest matching tail n-gram, with how often each has followed it."""

    ngram: int  # the matched tail's length (0: no match)
    paths: list[list[int]]  # distinct continuations, the most recent match's first
    frequency: list[list[int]]  # per path and depth: ``frequency_bucket`` of its prefix among all matches


def frequency_bucket(agreeing: int, seen: int) -> int:
    """How often a continuation's prefix followed the tail among the ``seen`` matches long enough to tell (after
    SuffixDecoding's counts): 0 for a single match, else 1 to 4 by quarter of the share ``agreeing / seen``."""
    return 0 if seen <= 1 else 1 + min(3, 4 * agreeing // seen)


def frequencies(paths: list[list[int]], follows: list[list[int]]) -> list[list[int]]:
    """Per path and depth, ``frequency_bucket`` of its prefix among ``follows`` (every match's continuation)."""
    prefixes: Counter[tuple[int, ...]] = Counter()
    seen: Counter[int] = Counter()
    for follow in follows:
        for d in range(1, len(follow) + 1):
            prefixes[tuple(follow[:d])] += 1
            seen[d] += 1
    return [[frequency_bucket(prefixes[tuple(path[:d])], seen[d]) for d in range(1, len(path) + 1)] for path in paths]


def lookup_features(match: LookupMatch, last: int) -> list[list[Feature]]:
    """Each path's per-depth acceptance features: depth, match length, rank, the last step's acceptance and the
    prefix's frequency (the coarser feature leaves the frequency out)."""
    return [[("pld", d, match.ngram, min(rank, 2), last, match.frequency[rank][d - 1]) for d in range(1, len(path) + 1)]
            for rank, path in enumerate(match.paths)]


class PromptLookupProposer(Proposer):
    """Find the longest recent n-gram match of the context's tail and propose what followed it.

    With ``branches > 1`` several matches with different continuations are merged into one tree (each
    shared prefix verified once).

    With a ``policy`` the sizes are adaptive: the candidates (up to ``branches`` continuations of
    ``num_tokens``) are pruned each step to what is expected to pay on the target's cost curve, by the
    acceptance learned per depth, match length, branch rank and how the last step went. Without one, every
    candidate is sent (the fixed sizes: 8 tokens, one branch, a match of at least 2 tokens).
    """

    name = "pld"

    def __init__(self, num_tokens: int = 8, max_ngram: int = 3, min_ngram: int = 2, branches: int = 1,
                 policy: DraftPolicy | None = None) -> None:
        if num_tokens < 1 or not 1 <= min_ngram <= max_ngram or branches < 1:
            raise HastenError("pld needs num_tokens >= 1, 1 <= min_ngram <= max_ngram and branches >= 1")
        self.num_tokens = num_tokens
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.branches = branches
        self.policy = policy
        self._offered: tuple[TokenTree, list[list[Feature]]] | None = None  # the tree and features verified
        self._last_accepted: int | None = None  # the last step's accepted count (None: it drafted nothing)
        self.reference: list[int] = []  # the expected answer (``expect``), searched after the context

    def start(self, context: list[int], hidden: torch.Tensor | None) -> None:
        self._offered, self._last_accepted = None, None

    def propose(self, context: list[int], max_depth: int) -> Proposal:
        self._offered = None
        depth = min(self.num_tokens, max_depth)
        if depth <= 0:
            return Proposal(TokenTree())
        match = self.lookup(context, depth)
        if self.policy is None:
            return Proposal(TokenTree.from_paths(match.paths))
        features = lookup_features(match, last_accepted_capped(self._last_accepted))
        tree, node_features = merge_paths(match.paths, features)
        tree, node_features = self.policy.choose(tree, node_features)
        self._offered = (tree, node_features)
        return Proposal(tree)

    def update(self, outcome: StepOutcome) -> None:
        if self._offered is None:
            self._last_accepted = None
            return
        tree, features = self._offered
        if self.policy is not None:
            self.policy.learn(tree, features, outcome)
        self._last_accepted = accepted_if_drafted(tree, outcome)

    def expect(self, tokens: list[int]) -> None:
        self.reference = list(tokens)

    def matches(self, context: list[int], depth: int) -> tuple[int, list[list[int]]]:
        """The longest matching tail n-gram's length and the continuations after its most recent matches (in the
        context, then in the expected answer, if one was given)."""
        match = self.lookup(context, depth)
        return match.ngram, match.paths

    def lookup(self, context: list[int], depth: int) -> LookupMatch:
        """``matches`` with each path's frequency per depth among every match of the tail."""
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            follows = [follow for follow in self._continuations(context[-n:], context, depth) if follow]
            paths: list[list[int]] = []
            for follow in follows:
                if not any(p[: len(follow)] == follow for p in paths):
                    paths.append(follow)
                    if len(paths) == self.branches:
                        break
            if paths:
                return LookupMatch(n, paths, frequencies(paths, follows[:FREQUENCY_MATCHES]))
        return LookupMatch(0, [], [])

    def _continuations(self, tail: list[int], context: list[int], depth: int) -> Iterator[list[int]]:
        """What followed each earlier occurrence of ``tail``: the context's, most recent first (the tail itself
        excluded), then the expected answer's, first occurrence first."""
        n, first = len(tail), tail[0]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start] == first and context[start : start + n] == tail:
                yield context[start + n : start + n + depth]
        reference = self.reference
        for start in range(len(reference) - n + 1):
            if reference[start] == first and reference[start : start + n] == tail:
                yield reference[start + n : start + n + depth]
