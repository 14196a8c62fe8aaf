"""``auto``: every available drafter offers candidates each step; one tree keeps those that pay.

Sources: prompt lookup (continuations of the context's tail matches), an n-gram pool keyed by the last token
(lookahead's pool, filled from the context; asked only where lookup finds nothing, since its candidates
repeat lookup's and, offered beside them, cost more than they earn in replays), and, where available, a
draft model's greedy tree and a ReDrafter head's beams (each run only while the tokens only it finds are
worth its time). Their
candidates are merged into one tree whose nodes keep a feature per source that proposed them; the draft
policy estimates each node's acceptance from what was learned about those features and keeps the subtree
with the most expected tokens per millisecond of the target's pass (often nothing: then the step is plain
decoding). Which sources the kept nodes came from is reported in the statistics.
"""

from __future__ import annotations

from collections import Counter

import torch

from hasten.adaptive.chooser import DraftPolicy, Feature
from hasten.adaptive.costly import CostlySource
from hasten.proposers.base import Proposal, Proposer, StepOutcome, accepted_if_drafted, last_accepted_capped
from hasten.proposers.draft_model import DraftModelProposer
from hasten.proposers.lookahead import NgramPool
from hasten.proposers.prompt_lookup import PromptLookupProposer, lookup_features
from hasten.proposers.redrafter import ReDrafterProposer
from hasten.redrafter.head import ReDrafterHead
from hasten.tree import TokenTree, merge_paths

POOL_NGRAM = 5
POOL_GUESSES = 3
HEAD_BEAMS = 3
HEAD_LENGTH = 4  # tokens per beam after the root


class AutoProposer(Proposer):
    """Prompt lookup + n-gram pool (+ draft tree, + ReDrafter beams), merged and pruned by a cost-aware policy.

    ``draft`` is a draft proposer built on the same policy; it drafts greedily here (its most likely tree gives
    more deterministic candidates, verified like the others, under sampling too). A ``head`` drafts through a
    ``ReDrafterProposer`` on the same policy (``HEAD_BEAMS`` beams of ``HEAD_LENGTH`` tokens).
    """

    name = "auto"

    def __init__(self, policy: DraftPolicy, head: ReDrafterHead | None = None, num_tokens: int = 8,
                 draft: DraftModelProposer | None = None) -> None:
        self.policy = policy
        self.draft = draft
        self.redrafter = None if head is None else ReDrafterProposer(head, HEAD_BEAMS, HEAD_LENGTH + 1, policy)
        self.needs_hidden = head is not None
        self.num_tokens = num_tokens
        self.lookup = PromptLookupProposer(num_tokens=num_tokens, max_ngram=4, min_ngram=1, branches=3)
        self.pool = NgramPool(POOL_NGRAM, POOL_GUESSES)
        self.sources: Counter = Counter()
        self._offered: tuple[TokenTree, list[list[Feature]]] | None = None  # the tree and features verified
        self._last_accepted: int | None = None  # the last step's accepted count (None: it drafted nothing)
        self._tail: list[int] = []
        self.draft_source = CostlySource("draft")  # the draft's tree runs while the tokens only it finds pay
        self._draft_started = False  # the draft prefills the context only when its tree first runs
        self._reference: list[int] = []  # the expected answer (``expect``): n-grams for the pool

    def expect(self, tokens: list[int]) -> None:
        self.lookup.expect(tokens)
        self._reference = list(tokens)

    def start(self, context: list[int], hidden: torch.Tensor | None) -> None:
        self.pool = NgramPool(POOL_NGRAM, POOL_GUESSES)
        self.pool.add_sequence(self._reference)
        self.pool.add_sequence(context)
        self._tail = context[-(POOL_NGRAM - 1) :]
        if self.redrafter is not None:
            self.redrafter.start(context, hidden)
        self._offered, self._last_accepted = None, None
        self.sources = Counter()
        self._draft_started = False
        self.draft_source.restart()

    @torch.inference_mode()
    def propose(self, context: list[int], max_depth: int) -> Proposal:
        self._offered = None
        depth = min(self.num_tokens, max_depth)
        if depth <= 0:
            return Proposal(TokenTree())
        last = last_accepted_capped(self._last_accepted)
        paths: list[list[int]] = []
        features: list[list[Feature]] = []
        match = self.lookup.lookup(context, depth)
        paths += match.paths
        features += lookup_features(match, last)
        if not match.paths:  # the pool's n-grams come from the same context: only a fall-back when lookup finds nothing
            for rank, tail in enumerate(self.pool.lookup(context[-1], POOL_GUESSES)):
                paths.append(tail[:depth])
                features.append([("pool", d, rank, last) for d in range(1, len(paths[-1]) + 1)])
        if self.draft is not None and self.draft_source.should_run(self.policy):
            if not self._draft_started:  # its prefill, once, outside the time its tree is charged
                self.draft.start(context, None)
                self._draft_started = True
            with self.draft_source.timed():
                drafted = self.draft.draft_tree(context, depth, greedy=True)
            draft_paths, draft_features = drafted.paths()
            paths += draft_paths
            features += draft_features
        if self.redrafter is not None:  # its beam search runs while the tokens only it finds pay
            beams, beam_features = self.redrafter.draft_beams(context, depth)
            paths += beams
            features += beam_features
        tree, node_features = merge_paths(paths, features)
        tree, node_features = self.policy.choose(tree, node_features)
        for node in node_features:
            self.sources.update({feature[0] for feature in node})
        self._offered = (tree, node_features)
        return Proposal(tree)

    def update(self, outcome: StepOutcome) -> None:
        if self._offered is not None:
            tree, features = self._offered
            self.policy.learn(tree, features, outcome)
            for source in self._costly():  # credit each with the accepted tokens only it proposed
                alone = sum(all(f[0] == source.name for f in features[node]) for node in outcome.accepted_nodes)
                source.credit(self.policy, alone)
            self._last_accepted = accepted_if_drafted(tree, outcome)
        new = [*outcome.accepted, outcome.next_token]
        self.pool.add_sequence(self._tail + new)
        self._tail = (self._tail + new)[-(POOL_NGRAM - 1) :]
        if self.redrafter is not None:
            self.redrafter.update(outcome)  # its new hidden state (it learns nothing: it offered no tree itself)

    def _costly(self) -> list[CostlySource]:
        return [self.draft_source] + ([self.redrafter.search] if self.redrafter is not None else [])

    def stats(self) -> dict[str, float]:
        steps = sum(self.policy.choices.values()) or 1
        drafted = {f"nodes_from_{source}": count / steps for source, count in sorted(self.sources.items())}
        return self.policy.stats() | drafted

