"""Classic speculative decoding with a draft model of the same vocabulary, drafting a tree each step.

The draft expands a tree one depth at a time: one draft pass scores the tree so far (tree attention over its own
cache) and reads the rows of the frontier, the nodes whose children come next. Greedy decoding keeps, at each
depth, the children with the highest path probability (the product of the draft's probabilities along the path,
as EAGLE-2 ranks them); the adaptive policy then prunes the tree to what pays. Sampling draws each frontier node's
children without replacement from the draft's processed distribution and hands their conditional rows to the
verifier (the sibling contract in ``TokenTree``); nothing sampled is ever pruned by what was drawn, so the
output keeps the target's distribution whatever the policy has learned (see ``DraftModelProposer.propose``).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from hasten.adaptive.chooser import AcceptanceModel, DraftPolicy, Feature, sibling_shares
from hasten.adaptive.costly import CostlySource
from hasten.backends.base import ModelBackend
from hasten.errors import HastenError
from hasten.proposers.base import Proposal, Proposer, StepOutcome
from hasten.sampling import SamplingParams
from hasten.tree import ROOT, TokenTree

ADAPTIVE_CHILDREN = 4  # candidates per frontier node (adaptive, greedy); the policy keeps those that pay
ADAPTIVE_FRONTIER = 8  # nodes kept (and expanded) per depth (adaptive, greedy)
SAMPLED_CHILDREN = 2  # children drawn per frontier node under sampling (adaptive)
SAMPLED_FRONTIER = 3  # frontier nodes expanded per depth under sampling (adaptive)


def check_same_vocabulary(target: ModelBackend, draft: ModelBackend, target_tok=None, draft_tok=None) -> None:
    """Refuse a draft whose vocabulary differs from the target's, before any work is done."""
    if target.vocab_size != draft.vocab_size:
        raise HastenError(
            f"draft vocabulary ({draft.vocab_size} tokens) differs from the target's ({target.vocab_size}); "
            "speculative decoding needs the same vocabulary"
        )
    if target_tok is not None and draft_tok is not None and target_tok.get_vocab() != draft_tok.get_vocab():
        raise HastenError("draft and target tokenizers map tokens to different ids; they must share a vocabulary")


TOP_CHILD_RATE = 0.6  # assumed acceptance of a level's likeliest child (the shipped draft's validation top-1)
CONFIDENCE_WEIGHT = 4.0  # pseudo-nodes behind the assumption that a draft token is accepted at its own probability


def confidence_bucket(prob: float) -> int:
    """The draft's probability of a token in tenths (0..9): the feature the policy learns acceptance on."""
    return min(int(prob * 10), 9)


def assume_calibrated(acceptance: AcceptanceModel, depth: int) -> None:
    """Start the draft's features as if its probabilities were calibrated: a token of probability bucket b is
    accepted at (b + 0.5) / 10 until verified nodes say otherwise. Without it, unseen siblings all start at one
    prior, share one acceptance, and a tree of fresh guesses never looks worth a pass."""
    for level, rank, bucket in itertools.product(range(1, depth + 1), range(3), range(10)):
        acceptance.assume(("draft", level, rank, bucket), (bucket + 0.5) / 10, CONFIDENCE_WEIGHT)
    for level in range(1, depth + 1):  # the likeliest child, before its confidence is known
        acceptance.assume(("draft", level, 0), TOP_CHILD_RATE, CONFIDENCE_WEIGHT)


@dataclass
class DraftTree:
    """One step's drafted tree: tokens, parents and (sampling) rows, each node's features and the draft's path
    probability of each node."""

    tree: TokenTree = field(default_factory=TokenTree)
    features: list[list[Feature]] = field(default_factory=list)
    path_probs: list[float] = field(default_factory=list)

    def paths(self) -> tuple[list[list[int]], list[list[Feature]]]:
        """Root-to-leaf token paths and one feature per token on each (what ``merge_paths`` takes)."""
        tree = self.tree
        has_child = {parent for parent in tree.parents}
        paths, features = [], []
        for leaf in (node for node in range(len(tree)) if node not in has_child):
            nodes = []
            node = leaf
            while node != ROOT:
                nodes.append(node)
                node = tree.parents[node]
            nodes.reverse()
            paths.append([tree.tokens[n] for n in nodes])
            features.append([self.features[n][0] for n in nodes])
        return paths, features


class DraftModelProposer(Proposer):
    """Draft a tree of at most ``num_tokens`` levels on the draft's own KV cache.

    Each frontier node gets up to ``children`` children and each depth keeps up to ``frontier`` nodes (1 and 1: a
    chain; the fixed sizes). With a ``policy`` the sizes are upper bounds: another depth is drafted only while the
    cost curve says it is expected to pay, and (greedy) the policy prunes the tree to the subtree that pays.
    The draft's cache holds the context but the root after each step, so only the accepted path stays in it.
    """

    name = "draft"

    def __init__(self, draft_model: ModelBackend, params: SamplingParams, num_tokens: int = 6,
                 generator: torch.Generator | None = None, policy: DraftPolicy | None = None,
                 children: int | None = None, frontier: int | None = None) -> None:
        if num_tokens < 1:
            raise ValueError("draft needs num_tokens >= 1")
        self.draft = draft_model.new_target()
        self.params = params
        self.num_tokens = num_tokens
        self.generator = generator or params.generator()
        self.policy = policy
        self.children, self.frontier = children, frontier  # None: by mode (a chain without a policy)
        # Running estimate (EMA) of one draft pass: it prices each further depth.
        self.draft_ms = 0.0
        # Whether the draft runs at all in a step: while its accepted tokens have paid its time (``propose``; a
        # proposer that composes this one, auto, gates it itself).
        self.gate = CostlySource("draft")
        self._offered: tuple[TokenTree, list[list[Feature]]] | None = None  # the tree and features verified
        self._assumed: AcceptanceModel | None = None  # the acceptance model its confidences were assumed in

    def start(self, context: list[int], hidden: torch.Tensor | None) -> None:
        self.draft.start(context[:-1])
        self.gate.restart()
        if self.policy is not None:  # what one draft pass costs, warm (the first pass of a process is slow)
            self.draft_ms = min(self._timed_root_pass(context[-1]) for _ in range(2))

    def _timed_root_pass(self, root: int) -> float:
        began = time.perf_counter()
        self.draft.score([root], [-1])
        self.draft.commit([])
        return (time.perf_counter() - began) * 1000

    def propose(self, context: list[int], max_depth: int) -> Proposal:
        """The drafted tree. Under sampling the policy only decides, before each depth is drawn, how deep to go
        and which already drawn nodes get children: a node, once drawn, is never pruned by its own token or a
        later one (pruning by what was sampled biased the output toward tokens the draft is sure of)."""
        self._offered = None
        greedy = self.params.greedy
        if max_depth <= 0 or not self.gate.should_run(self.policy):
            if self.policy is not None:
                self.policy.plain()
            return Proposal(TokenTree())
        with self.gate.timed():
            drafted = self.draft_tree(context, min(self.num_tokens, max_depth), greedy)
        tree, features = drafted.tree, drafted.features
        if self.policy is not None:
            if greedy:  # point masses: any pruning keeps the output exact
                tree, features = self.policy.choose(tree, features)
            else:
                self.policy.choices[len(tree)] += 1
            self._offered = (tree, features)
        return Proposal(tree)

    @torch.inference_mode()
    def draft_tree(self, context: list[int], depth: int, greedy: bool) -> DraftTree:
        """A tree of at most ``depth`` levels after ``context`` (which ends with the root), one draft pass a level.

        Greedy: the ``children`` most likely tokens of each frontier node, the ``frontier`` best by path probability
        kept. Sampling: ``children`` tokens of each of the ``frontier`` likeliest nodes, drawn without replacement,
        all kept, with their conditional rows.
        """
        out = DraftTree()
        if self.policy is not None and self.policy.acceptance is not self._assumed:
            assume_calibrated(self.policy.acceptance, self.num_tokens)
            self._assumed = self.policy.acceptance
        children, frontier_size = self.sizes(greedy)
        room = self.draft.max_context - len(context)  # a pass over the root and n nodes needs n free cells
        leaves = getattr(self.draft, "max_leaves", None)  # llama.cpp: one sequence id per leaf
        if leaves is not None and children * frontier_size > 1:
            room = min(room, leaves)
        depth = min(depth, room)
        if depth <= 0:  # nothing to draft, or the draft's own context is full: this step is plain decoding
            return out
        tokens, parents, rows = out.tree.tokens, out.tree.parents, []
        frontier: list[int] = [ROOT]
        accept: dict[int, float] = {ROOT: 1.0}  # the policy's estimate that the path to a node is accepted
        gained = spent = 0.0
        for level in range(1, depth + 1):
            # The first level runs whenever the draft runs (its gate weighs what drafting earned against its
            # time); a further level while its best guesses, priced by the confidences drawn so far, pay for it.
            width = 1 if greedy else len(frontier) * children  # greedy: the chooser prunes to what pays
            if self.policy is not None and level > 1 and \
                    not self._level_pays(level, frontier, accept, len(tokens), width, gained, spent):
                break
            began = time.perf_counter()
            logits = self._frontier_logits(context, frontier, tokens, parents)
            probs = self.params.probs(logits) if not greedy else torch.softmax(logits.float(), -1)
            picks = self._children(probs, greedy, min(children, room - len(tokens)))
            spent_now = (time.perf_counter() - began) * 1000
            spent += spent_now
            if tokens or len(context) - self.draft.cache_len == 1:  # not a pass catching up on the context
                self.draft_ms += (spent_now - self.draft_ms) * (0.2 if self.draft_ms else 1.0)
            if not picks:
                break
            new = self._add_level(out, frontier, picks, probs, rows, level, room - len(tokens),
                                  frontier_size if greedy else None)
            if self.policy is not None:
                gained += self._estimate_level(out.tree, new, out.features, accept)
            # the next frontier: the likeliest new nodes (ranked by path probability, which depends only on
            # nodes already drawn, so under sampling it chooses whose children come next, never who stays)
            frontier = sorted(new, key=lambda n: -out.path_probs[n])[:frontier_size]
            if len(tokens) >= room:
                break
        if rows:
            out.tree.draft_probs = torch.stack(rows)
        return out

    def _frontier_logits(self, context: list[int], frontier: list[int], tokens: list[int],
                         parents: list[int]) -> torch.Tensor:
        """The draft's logits (over the target's vocabulary) at each frontier node: one pass over the root and the
        tree so far (the first level also feeds what the draft's cache lacks of the context)."""
        if not tokens:  # the first level: the context the cache lacks, ending with the root
            feed = context[self.draft.cache_len :]
            logits = self.draft.score(feed, list(range(-1, len(feed) - 1)), [len(feed) - 1]).logits
            self.draft.commit(list(range(len(feed) - 1)))  # keep everything but the root
            return self.vocab_logits(logits)
        pass_tokens = [context[-1], *tokens]
        pass_parents = [-1, *(parent + 1 for parent in parents)]
        logits = self.draft.score(pass_tokens, pass_parents, [node + 1 for node in frontier]).logits
        self.draft.commit([])
        return self.vocab_logits(logits)

    def _children(self, probs: torch.Tensor, greedy: bool, count: int) -> list[tuple[int, list[int]]]:
        """For each frontier row, its children's tokens: the ``count`` most likely (greedy), or ``count`` drawn
        without replacement (Gumbel top-k: the perturbed order is a draw without replacement)."""
        if count <= 0:
            return []
        count = min(count, probs.shape[-1])
        if greedy:
            ids = probs.topk(count, -1).indices
            return [(row, ids[row].tolist()) for row in range(probs.shape[0])]
        noise = torch.rand(probs.shape, generator=self.generator, device=probs.device, dtype=torch.float32)
        keys = probs.log() - (-noise.clamp_min(1e-20).log()).log()
        values, ids = keys.topk(count, -1)
        return [(row, [int(t) for t, v in zip(ids[row].tolist(), values[row].tolist(), strict=True)
                       if v != float("-inf")]) for row in range(probs.shape[0])]

    def _add_level(self, out: DraftTree, frontier: list[int], picks: list[tuple[int, list[int]]],
                   probs: torch.Tensor, rows: list[torch.Tensor], level: int, limit: int, best: int | None
                   ) -> list[int]:
        """Add at most ``limit`` of a level's children, their indices: greedy (``best`` given), the ``best`` by
        path probability; sampling, every draw in the order drawn (cut by index only), with its row."""
        greedy = best is not None
        candidates = []
        for row, kids in picks:
            parent = frontier[row]
            base = 1.0 if parent == ROOT else out.path_probs[parent]
            chosen = probs[row, kids].tolist() if kids else []
            for rank, (token, prob) in enumerate(zip(kids, chosen, strict=True)):
                candidates.append((base * prob, parent, rank, token, prob, row))
        if greedy:
            candidates = sorted(candidates, key=lambda c: -c[0])[:best]
            candidates.sort(key=lambda c: (c[1], c[2]))  # siblings stay in rank order, parents first
        new: list[int] = []
        taken: dict[int, list[int]] = {}
        for path_prob, parent, rank, token, prob, row in candidates[:limit]:
            out.tree.tokens.append(token)
            out.tree.parents.append(parent)
            out.path_probs.append(path_prob)
            out.features.append([("draft", level, min(rank, 2), confidence_bucket(prob))])
            if not greedy:  # the row it was drawn from: p less its earlier siblings, renormalised
                row_probs = probs[row].clone()
                earlier = taken.setdefault(row, [])
                if earlier:
                    row_probs[earlier] = 0
                    row_probs /= row_probs.sum()
                rows.append(row_probs)
                earlier.append(token)
            new.append(len(out.tree.tokens) - 1)
        return new

    def _estimate_level(self, tree: TokenTree, new: list[int], features: list[list[Feature]],
                        accept: dict[int, float]) -> float:
        """Record the policy's path-acceptance estimate of each new node (siblings share one acceptance);
        the level's expected accepted tokens."""
        assert self.policy is not None
        factor = self.policy.calibration()
        fresh = set(new)
        conditional = [min(1.0, factor * self.policy.acceptance.estimate(features[n][0])) if n in fresh else 0.0
                       for n in range(len(tree))]
        shares = sibling_shares(tree, conditional)
        for n in new:
            parent = tree.parents[n]
            accept[n] = shares[n] * accept[parent]
        return sum(accept[n] for n in new)

    def _level_pays(self, level: int, frontier: list[int], accept: dict[int, float], nodes: int, width: int,
                    gained: float, spent: float) -> bool:
        """Whether drafting one more level is expected to pay: its best guesses (one per frontier node, at the
        depth's learned rate) against a target pass ``width`` tokens wider and one more draft pass."""
        assert self.policy is not None
        cost, others = self.policy.pass_cost, 1 + gained + self.policy.batch_gain
        best = ("draft", level, 0)  # the likeliest child's rate (the level's other ranks are rarely accepted)
        rate = min(1.0, self.policy.calibration() * self.policy.acceptance.estimate(best))
        chance = rate * min(1.0, sum(accept[node] for node in frontier))
        now = others / (cost(1 + nodes) + spent)
        after = (others + chance) / (cost(1 + nodes + width) + spent + self.draft_ms)
        return after > now

    def sizes(self, greedy: bool) -> tuple[int, int]:
        """Children per frontier node and frontier nodes per depth: as given, else a chain without a policy, else
        the mode's upper bounds (the policy drafts less where it does not pay)."""
        if self.policy is None:
            return self.children or 1, self.frontier or 1
        wide = (ADAPTIVE_CHILDREN, ADAPTIVE_FRONTIER) if greedy else (SAMPLED_CHILDREN, SAMPLED_FRONTIER)
        return self.children or wide[0], self.frontier or wide[1]

    def vocab_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The draft's logits (rows, draft vocabulary) over the target's vocabulary (a hook for drafts with a
        reduced output vocabulary)."""
        return logits

    def update(self, outcome: StepOutcome) -> None:
        if self.policy is not None and self._offered is not None:
            self.policy.learn(*self._offered, outcome)
        self.gate.credit(self.policy, len(outcome.accepted_nodes))
        self.rollback(outcome.accepted)

    def rollback(self, accepted: list[int]) -> None:
        """End the step whatever was accepted: the draft's cache never holds drafted tokens (each level is
        scored and dropped), so the accepted path is fed with the next step's first level."""
        self._offered = None
