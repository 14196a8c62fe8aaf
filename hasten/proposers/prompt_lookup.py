"""Prompt lookup (``pld``): guess that the text continues as it did after an earlier copy of its tail."""

from __future__ import annotations

from hasten.errors import HastenError
from hasten.proposers.base import Proposal, Proposer
from hasten.tree import TokenTree


class PromptLookupProposer(Proposer):
    """Find the longest recent n-gram match of the context's tail and propose what followed it.

    With ``branches > 1`` several matches with different continuations are merged into one tree (each
    shared prefix verified once). The defaults (8 tokens, one branch, a match of at least 2 tokens) were
    the fastest measured on the default model on a 2-core CPU: a 1-token match is too weak a signal to
    pay for a wider pass there, so without a 2-token match the step is plain decoding.
    """

    name = "pld"

    def __init__(self, num_tokens: int = 8, max_ngram: int = 3, min_ngram: int = 2, branches: int = 1) -> None:
        if num_tokens < 1 or not 1 <= min_ngram <= max_ngram or branches < 1:
            raise HastenError("pld needs num_tokens >= 1, 1 <= min_ngram <= max_ngram and branches >= 1")
        self.num_tokens = num_tokens
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.branches = branches

    def propose(self, context: list[int], max_depth: int) -> Proposal:
        depth = min(self.num_tokens, max_depth)
        if depth <= 0:
            return Proposal(TokenTree())
        return Proposal(TokenTree.from_paths(self.candidates(context, depth)))

    def candidates(self, context: list[int], depth: int) -> list[list[int]]:
        """Continuations after the most recent matches of the longest matching tail n-gram."""
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            tail = context[-n:]
            paths: list[list[int]] = []
            first = tail[0]
            # Scan right to left so the most recent occurrences come first.
            for start in range(len(context) - n - 1, -1, -1):
                if context[start] != first or context[start : start + n] != tail:
                    continue
                follow = context[start + n : start + n + depth]
                if follow and not any(p[: len(follow)] == follow for p in paths):
                    paths.append(follow)
                    if len(paths) == self.branches:
                        break
            if paths:
                return paths
        return []
