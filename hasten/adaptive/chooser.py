"""Choosing what to draft: acceptance estimates learned online, and the tree that maximizes tokens per second.

A proposer offers a generous candidate tree; each node carries a *feature* (what the proposer knew when it
guessed it: its source, match length, depth, a probability bucket). ``AcceptanceModel`` estimates, per feature,
the probability that the node is accepted given that its parent was, from every node verified so far. The
chooser keeps the nodes with the highest path probability (a path's probability only falls with depth, so the
kept nodes always form a tree below the root) and as many of them as maximize

    E[tokens emitted] / cost(width)  =  (1 + sum of kept path probabilities) / cost(1 + kept [+ extra])

When nothing pays, it keeps nothing and the step is plain decoding. It changes only what is drafted: the
verifier decides what is accepted, so output stays exactly the target's.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from hasten.adaptive.cost import CostModel
from hasten.tree import ROOT, TokenTree, subtree

Feature = Hashable


class VerifiedStep(Protocol):
    """What a policy learns from one verified step (``hasten.proposers.base.StepOutcome`` is one)."""

    @property
    def accepted_nodes(self) -> list[int]: ...  # tree indices of the accepted tokens

    @property
    def pass_width(self) -> int: ...  # tokens the target pass scored

    @property
    def pass_ms(self) -> float: ...  # its wall time

    @property
    def scored_nodes(self) -> int | None: ...  # the tree's nodes the pass could score, in index order (None: all)


EXPLORE = 0.5  # width of the optimism bonus, in standard errors
CALIBRATION_PRIOR = 6.0  # pseudo-nodes a generation's calibration starts with, accepted at the model's rate
CALIBRATION_MEMORY = 0.99  # per verified step: older evidence of this generation fades (half-life ~69 steps)


@dataclass
class Rate:
    """Acceptance counts of one feature."""

    accepted: float = 0.0
    offered: float = 0.0


RETRY_EVERY = 32  # steps a source that does not pay sits out between trials, at least
RETRY_SHARE = 0.005  # and at most this share of the time goes into retrying it (at 2% lookahead's window
# retries alone cost chat and math prompts 2-3% on the 2-core EPYC, where the window never paid)
TRIALS = 24  # steps an optional source is tried (while it still could pay) before its measured gain decides
TRIAL_TOKENS = 2.0  # during the trials, it is credited this many tokens in advance (its gain may come later)
LOCAL_PRIOR = 4.0  # runs' worth of the shared record a generation's own runs are weighed against: a source that
# pays on code can be useless on a translation (the draft, trained without one, earned 0.03 tokens a run there)


@dataclass
class SourceGain:
    """What an optional, costly source earned: accepted tokens only it proposed, per step it ran, and its cost.

    ``cost_ms`` is its own time per step (a beam search) or the extra pass time it caused (a window).
    """

    tokens: float = 0.0
    steps: int = 0
    cost_ms: float = 0.0
    skipped: int = 0

    def record(self, tokens: int, cost_ms: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self.cost_ms += (cost_ms - self.cost_ms) / min(self.steps, 20)

    def pays(self, token_ms: float, cost_ms: float | None = None, ceiling: float | None = None,
             local: tuple[float, int] | None = None) -> bool:
        """Whether running it is worth its cost, a token being worth ``token_ms`` (a plain step's time).

        ``ceiling``, the most tokens one run could ever earn, rules it out with no trials nor retries where even
        that would not pay. ``local``, if given, is (tokens, runs) of the current generation alone: once the trials are
        over, its rate is weighed against the shared one (``LOCAL_PRIOR`` runs' worth), so what a source earns on
        this text decides within a few runs; and each generation runs it once, on its first chance, wherever
        ``TRIAL_TOKENS`` tokens would pay for a run (a source shut by other texts is tried on this one).
        """
        spent = self.cost_ms if cost_ms is None else cost_ms
        if ceiling is not None and ceiling * token_ms <= spent:
            return False
        if local is not None and local[1] == 0 and self.steps and TRIAL_TOKENS * token_ms > spent:
            return True
        if self.steps < TRIALS:  # too little evidence yet: keep trying it while it still could pay
            if (self.tokens + TRIAL_TOKENS) / max(self.steps, 1) * token_ms > spent:
                return True
        else:
            tokens, runs = local or (0.0, 0)
            rate = (tokens + LOCAL_PRIOR * self.tokens / self.steps) / (runs + LOCAL_PRIOR)
            if rate * token_ms > spent:
                return True
        self.skipped += 1  # now and then it runs anyway: what it earns may have changed
        every = max(RETRY_EVERY, math.ceil(spent / (RETRY_SHARE * token_ms)))
        return self.skipped % every == 0


def coarser(feature: Feature) -> Feature | None:
    """A tuple feature without its last field, down to (source, depth); None below that."""
    return feature[:-1] if isinstance(feature, tuple) and len(feature) > 2 else None


@dataclass
class AcceptanceModel:
    """P(node accepted | parent accepted) per feature, learned from every verified node.

    Each feature's rate is shrunk toward its coarser feature's (``coarser``), ``prior_weight`` pseudo-counts
    of it: a rarely seen feature borrows strength from what is known about its source and depth, and below
    that from ``prior_mean``. Estimates are optimistic by ``EXPLORE`` standard errors of the feature's own
    evidence, so an unseen feature is tried, and one that looked bad early is tried again now and then.
    (Replayed along greedy outputs of the default model, shrinking toward the coarser rate's current value
    drafted 7-10% faster than rates whose prior was fixed when the feature was first seen.)
    """

    prior_mean: float = 0.5
    prior_weight: float = 4.0
    rates: dict[Feature, Rate] = field(default_factory=dict)

    def mean(self, feature: Feature | None) -> float:
        """The shrunk acceptance rate of ``feature`` (the prior for None)."""
        if feature is None:
            return self.prior_mean
        parent = self.mean(coarser(feature))
        rate = self.rates.get(feature)
        if rate is None:
            return parent
        return (rate.accepted + self.prior_weight * parent) / (rate.offered + self.prior_weight)

    def estimate(self, feature: Feature) -> float:
        """The optimistic rate the chooser uses: the mean plus the exploration bonus."""
        value = self.mean(feature)
        rate = self.rates.get(feature)
        seen = rate.offered if rate is not None else 0.0
        return min(1.0, value + EXPLORE * (value * (1 - value) / (seen + self.prior_weight)) ** 0.5)

    def assume(self, feature: Feature, rate: float, weight: float) -> None:
        """Start an unseen ``feature`` at ``rate`` worth ``weight`` nodes (a source's own calibrated confidence,
        such as the draft's probability of its token), its coarser features untouched; real evidence outweighs it
        as it comes."""
        self.rates.setdefault(feature, Rate(rate * weight, weight))

    def record(self, feature: Feature, accepted: bool) -> None:
        """One verified node with this feature (and so with each coarser one)."""
        while feature is not None:
            rate = self.rates.setdefault(feature, Rate())
            rate.accepted += accepted
            rate.offered += 1
            feature = coarser(feature)

    def learn(self, tree: TokenTree, features: Sequence[Sequence[Feature]], accepted_nodes: Sequence[int],
              scored: int | None = None) -> None:
        """Record every node whose parent was accepted (the root counts), of the first ``scored`` (None: all):
        accepted or not, under each of its features (a node several sources proposed has one per source)."""
        for node, accepted in verified_nodes(tree, accepted_nodes, scored):
            for feature in features[node]:
                self.record(feature, accepted)


def verified_nodes(tree: TokenTree, accepted_nodes: Sequence[int],
                   scored: int | None = None) -> list[tuple[int, bool]]:
    """The nodes a step verified, those whose parent was accepted (the root counts), and whether each was.

    Only the first ``scored`` nodes (None: all) count: the engine cut the others from the pass for the room left
    in the context, and a node never scored was not rejected. Nodes before them that a grammar pruned from the
    pass do count: they were offered and the target could never accept them, so they are rejected where their
    parent was accepted.
    """
    on_path, taken = {ROOT, *accepted_nodes}, set(accepted_nodes)
    end = len(tree) if scored is None else min(scored, len(tree))
    return [(node, node in taken) for node, parent in enumerate(tree.parents[:end]) if parent in on_path]


def sibling_shares(tree: TokenTree, conditional: Sequence[float]) -> list[float]:
    """Each node's conditional acceptance, scaled so that siblings' add up to at most 1.

    Siblings exclude each other (the target takes one token after their parent), so where their estimates add
    up to more than 1 (unseen features all start at the prior) they are scaled to sum to 1.
    """
    siblings: dict[int, float] = {}
    for node, parent in enumerate(tree.parents):
        siblings[parent] = siblings.get(parent, 0.0) + conditional[node]
    return [conditional[node] / max(1.0, siblings[parent]) for node, parent in enumerate(tree.parents)]


def path_probabilities(tree: TokenTree, conditional: Sequence[float]) -> list[float]:
    """P(the path to each node is accepted), from each node's conditional acceptance (``sibling_shares``)."""
    probs: list[float] = []
    for share, parent in zip(sibling_shares(tree, conditional), tree.parents, strict=True):
        probs.append(share * (1.0 if parent == ROOT else probs[parent]))
    return probs


def best_size(path_probs: Sequence[float], cost: Callable[[int], float], extra: int = 0,
              extra_gain: float = 0.0) -> tuple[list[int], float]:
    """The nodes to keep (by falling path probability) and the expected tokens per millisecond that gives.

    ``extra`` tokens ride along in the same pass (lookahead's window) and are worth ``extra_gain`` tokens.
    """
    order = sorted(range(len(path_probs)), key=lambda i: (-path_probs[i], i))
    best_m, best_rate, gained = 0, (1.0 + extra_gain) / cost(1 + extra), 0.0
    for m, node in enumerate(order, start=1):
        gained += path_probs[node]
        rate = (1.0 + gained + extra_gain) / cost(1 + m + extra)
        if rate > best_rate:
            best_m, best_rate = m, rate
    return sorted(order[:best_m]), best_rate


@dataclass
class DraftPolicy:
    """What an adaptive proposer asks: the target's cost curve and an acceptance model of its own."""

    cost: CostModel
    acceptance: AcceptanceModel = field(default_factory=AcceptanceModel)
    gains: dict[str, SourceGain] = field(default_factory=dict)  # optional sources (a window, a head), by name
    choices: Counter = field(default_factory=Counter)  # drafted width -> steps, for the statistics
    batch_width: int = 0  # tokens other sequences put into the same pass (a batch)
    batch_gain: float = 0.0  # tokens those sequences are expected to emit from it
    realized: float = 0.0  # this generation's verified nodes that were accepted (fading)
    predicted: float = 0.0  # how many of them the acceptance model expected (fading)
    context: int | None = None  # tokens in this sequence's cache at this step (None: the curve's default)

    def at_context(self, context: int) -> None:
        """This step's pass runs after ``context`` cached tokens: price it (and learn from it) there.

        The curve is shared by every sequence on the model; each sequence tells it its own cache length before
        it drafts (a pass after 1,500 tokens costs 1.7x one after 50 on the default model with llama.cpp)."""
        self.context = context
        self.cost.at_context(context)

    def calibration(self) -> float:
        """This generation's accepted nodes over what the shared acceptance model predicted for them.

        The model pools every generation, so it cannot know that this prompt's text does not repeat (a
        retrieval answer that paraphrases, arithmetic): there its rates are too high and every draft is a loss.
        Estimates are multiplied by this ratio, shrunk toward 1 by ``CALIBRATION_PRIOR`` pseudo-nodes.
        """
        return (self.realized + CALIBRATION_PRIOR) / (self.predicted + CALIBRATION_PRIOR)

    def choose(self, tree: TokenTree, features: Sequence[Sequence[Feature]], extra: int = 0,
               extra_gain: float = 0.0) -> tuple[TokenTree, list[list[Feature]]]:
        """Prune ``tree`` to the nodes that maximize expected tokens per millisecond; their features."""
        factor = self.calibration()
        conditional = [min(1.0, factor * max(self.acceptance.estimate(f) for f in node)) for node in features]
        keep, _ = best_size(path_probabilities(tree, conditional), self.cost, extra + self.batch_width,
                            extra_gain + self.batch_gain)
        pruned, kept = subtree(tree, keep)
        self.choices[len(kept)] += 1
        return pruned, [list(features[i]) for i in kept]

    def plain(self) -> None:
        """Count a step that drafted nothing before any tree was chosen (a closed gate), for the statistics."""
        self.choices[0] += 1

    def gain(self, name: str) -> SourceGain:
        """The shared record of the optional source ``name``."""
        return self.gains.setdefault(name, SourceGain())

    def pass_cost(self, width: int) -> float:
        """Predicted ms of a pass where this sequence scores ``width`` tokens (a batch's others included)."""
        return self.cost(width + self.batch_width)

    def learn(self, tree: TokenTree, features: Sequence[Sequence[Feature]], outcome: VerifiedStep) -> None:
        """Learn from one verified step: acceptance of what was sent, this generation's calibration, and the
        pass's real cost."""
        self.realized *= CALIBRATION_MEMORY
        self.predicted *= CALIBRATION_MEMORY
        # predicted as ``choose`` predicts: siblings' shares sum to at most 1
        shares = sibling_shares(tree, [max(self.acceptance.mean(f) for f in node) for node in features])
        for node, accepted in verified_nodes(tree, outcome.accepted_nodes, outcome.scored_nodes):
            self.predicted += shares[node]
            self.realized += accepted
        self.acceptance.learn(tree, features, outcome.accepted_nodes, outcome.scored_nodes)
        if outcome.pass_ms > 0:
            self.cost.observe(outcome.pass_width, outcome.pass_ms, self.context)

    def stats(self) -> dict[str, float]:
        steps = sum(self.choices.values())
        if not steps:
            return {}
        return {"mean_drafted": sum(w * n for w, n in self.choices.items()) / steps,
                "plain_steps": self.choices[0] / steps}
