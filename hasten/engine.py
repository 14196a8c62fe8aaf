"""The generation loop: propose a tree, score it in one target pass, verify, keep the accepted path."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import takewhile

import torch

from hasten.adaptive.cost import clock_for
from hasten.backends.base import Scores, Target
from hasten.errors import HastenError
from hasten.logprobs import TokenLogprob, token_logprobs
from hasten.proposers.base import ExtraBranch, Proposal, Proposer, StepOutcome
from hasten.sampling import SamplingParams
from hasten.shaping import PreparedTree, Shaper
from hasten.tree import ROOT, TokenTree, subtree
from hasten.verify import verify


@dataclass
class DecodeStats:
    """Counters of one or more generations (they add up). ``mean_accepted`` is vLLM's: tokens per target pass."""

    target_passes: int = 0
    new_tokens: int = 0
    drafted_tokens: int = 0
    accepted_drafts: int = 0
    scored_tokens: int = 0
    prefill_s: float = 0.0
    draft_s: float = 0.0  # time in the proposer (propose and update), the draft model's passes included
    wall_s: float = 0.0
    accepted_per_pass: list[int] = field(default_factory=list)
    pass_widths: list[int] = field(default_factory=list)  # tokens scored by each pass
    pass_ms: list[float] = field(default_factory=list)  # wall time of each pass

    @property
    def mean_accepted(self) -> float:
        return self.new_tokens / self.target_passes if self.target_passes else 0.0

    @property
    def draft_ms_per_step(self) -> float:
        return 1000 * self.draft_s / self.target_passes if self.target_passes else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class PassLayout:
    """One target pass over [root, tree..., extra...]: tokens, their parents, and the rows that need logits."""

    tokens: list[int]
    parents: list[int]
    logits_rows: list[int]


def pass_layout(proposal: Proposal, root: int) -> PassLayout:
    """Lay out the root, the verified tree and the extra branch as one tree below the root.

    Every row of the verified tree gets logits (the verifier may visit any of them); of the extra branch,
    only its ``read_rows``.
    """
    tree, extra = proposal.tree, proposal.extra
    tokens = [root, *tree.tokens]
    parents = [-1, *(parent + 1 for parent in tree.parents)]
    rows = list(range(len(tokens)))
    if extra is not None:
        base = len(tokens)
        tokens += extra.tree.tokens
        parents += [0 if parent == ROOT else parent + base for parent in extra.tree.parents]
        rows += [base + row for row in extra.read_rows]
    return PassLayout(tokens, parents, rows)


def fit_to_room(prepared: PreparedTree, extra: ExtraBranch | None,
                free: int) -> tuple[PreparedTree, ExtraBranch | None]:
    """The tree and extra branch cut to ``free`` tokens, as many as the cache has slots after the root's.

    A pass writes one slot per token, however shallow its tree, so its width is what must fit. The extra
    branch goes first; then the tree keeps its first ``free`` nodes (index order is topological, so they are
    closed under parents, and a prefix of each node's siblings keeps a sampled tree's rows honest). Only the
    last passes of a context are cut; the proposer hears of its kept nodes only (``origin``) and is told how
    many of its nodes the pass scored (``scored_nodes``), so a policy learns nothing of the cut ones.
    """
    if len(prepared.tree) + (len(extra.tree) if extra is not None else 0) <= free:
        return prepared, extra
    if len(prepared.tree) <= free:
        return prepared, None
    tree, _ = subtree(prepared.tree, range(max(free, 0)))
    return PreparedTree(tree, prepared.origin[: len(tree)]), None


def scored_nodes(prepared: PreparedTree, held: int) -> int | None:
    """How many of the proposer's nodes, in index order, a pass holding the first ``held`` nodes of ``prepared``
    scores (None: all): those before the first one it cut.

    The shaper keeps the proposer's order (the nodes it merges into forced tokens come before the rest and are
    a chain, parents first), so the cut nodes are those from there on; the count stops at the lowest cut one, so
    a scored node may be left out of what a policy learns, never a cut one counted as rejected. Nodes from there
    on that the grammar pruned are left out with them.
    """
    cut = [node for node in prepared.origin[held:] if node is not None]
    return min(cut) if cut else None


class Generation:
    """One sequence being decoded: its context, target cache, proposer, statistics and sampling state.

    ``prefill`` runs the whole prompt, as plain decoding does, and takes the first new token from its last
    row. A step then has two halves around the target pass, so that several generations can share one pass:
    ``begin_step`` asks the proposer for a tree and lays the pass out; ``end_step`` verifies the pass's scores,
    keeps the accepted path in the cache, tells the proposer, and returns the new tokens. The root, the last
    context token, is never in the cache before a pass: each pass scores it and the drafted tree, and the
    accepted path (root included) is what stays.

    A ``shaper`` (penalties, a grammar) reshapes each verified row by its own path and prepares the tree;
    ``logprobs`` (the number of alternatives, 0 included) records each new token's ``TokenLogprob``.
    """

    def __init__(self, target: Target, proposer: Proposer, prompt_ids: list[int], max_new_tokens: int,
                 params: SamplingParams, eos_token_ids: set[int] | frozenset[int] = frozenset(),
                 stats: DecodeStats | None = None, generator: torch.Generator | None = None,
                 shaper: Shaper | None = None, logprobs: int | None = None) -> None:
        if not prompt_ids:
            raise HastenError("the prompt is empty")
        if max_new_tokens < 1:
            raise HastenError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if len(prompt_ids) >= target.max_context:
            raise HastenError(
                f"the prompt has {len(prompt_ids)} tokens; the model's context is {target.max_context} tokens"
            )
        self.target, self.proposer, self.params = target, proposer, params
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = eos_token_ids
        self.stats = stats if stats is not None else DecodeStats()
        self.generator = generator if generator is not None or params.greedy else \
            params.generator(getattr(target, "device", "cpu"))
        self.clock = clock_for(getattr(target, "device", "cpu"))  # on CUDA a pass is timed until it is done
        self.context = list(prompt_ids)
        self.produced = 0
        self.finished = False
        self.shaper = shaper
        self.want_logprobs = logprobs
        self.logprobs: list[TokenLogprob] = []
        self._proposal: Proposal | None = None
        self._prepared: PreparedTree | None = None
        self._scored: int | None = None  # the proposer's nodes the pass scores (``scored_nodes``)
        self._layout: PassLayout | None = None

    def prefill(self) -> list[int]:
        """Run the prompt into the cache, choose the first new token from its last row (the verifier's rule
        with nothing drafted) and start the proposer; the new token (as a step's list)."""
        began = self.clock()
        scores = self.target.start(self.context)
        elapsed = self.clock() - began
        self.stats.prefill_s += elapsed
        self.stats.wall_s += elapsed
        self.stats.target_passes += 1
        last = scores if len(scores) == 1 else Scores(scores.logits[-1:])  # a target gives its last row alone
        first = verify(TokenTree(), last, self.params, self.generator, self.shaper).next_token
        hidden = scores.hidden[-1:] if scores.hidden is not None else None
        self.proposer.start([*self.context, first], hidden)
        new = self._append([first], last, [0])
        scores.release()
        return new

    def begin_step(self) -> PassLayout:
        """The proposer's tree for this step, cut to the room left in the context and laid out as one pass."""
        free = self.target.max_context - len(self.context)  # cache slots after the root's: one per drafted token
        room = min(self.max_new_tokens - self.produced, free) - 1
        if self.proposer.policy is not None:  # an adaptive proposer prices this pass at this cache length
            self.proposer.policy.at_context(len(self.context) - 1)
        began = time.perf_counter()
        proposal = self.proposer.propose(self.context, room)
        self.stats.draft_s += time.perf_counter() - began
        prepared = self._prepare(proposal.tree, room)
        self._prepared, extra = fit_to_room(prepared, proposal.extra, free)
        self._scored = scored_nodes(prepared, len(self._prepared.tree))
        self._proposal = Proposal(proposal.tree, extra)
        self._layout = pass_layout(Proposal(self._prepared.tree, extra), self.context[-1])
        return self._layout

    def _prepare(self, tree: TokenTree, room: int) -> PreparedTree:
        """The tree the target scores: the proposer's, or the shaper's version of it (forced tokens, pruning)."""
        return PreparedTree.as_proposed(tree) if self.shaper is None else self.shaper.prepare(tree, room)

    def end_step(self, scores: Scores, pass_ms: float, pass_width: int | None = None) -> list[int]:
        """Verify the pass, keep the accepted path, update the proposer; the step's new tokens.

        ``pass_width`` is the width of the whole pass when other sequences shared it (default: this one's).
        """
        assert self._proposal is not None and self._prepared is not None and self._layout is not None, \
            "begin_step() first"
        proposal, layout, stats = self._proposal, self._layout, self.stats
        tree, origin = self._prepared.tree, self._prepared.origin
        verdict = verify(tree, scores, self.params, self.generator, self.shaper)  # reads only the rows it visits
        keep = [0, *(node + 1 for node in verdict.accepted)]
        self.target.commit(keep)
        accepted = [tree.tokens[node] for node in verdict.accepted]
        new = [*accepted, verdict.next_token]
        stats.target_passes += 1
        stats.drafted_tokens += len(tree)
        stats.accepted_drafts += len(accepted)
        stats.scored_tokens += len(layout.tokens)
        stats.accepted_per_pass.append(len(new))
        stats.pass_widths.append(len(layout.tokens))
        stats.pass_ms.append(pass_ms)
        hidden = scores.hidden[keep[-1] : keep[-1] + 1] if scores.hidden is not None else None
        extra_logits = scores.rows(range(len(tree) + 1, len(scores))) if proposal.extra is not None else None
        began = time.perf_counter()
        # The proposer hears of its own nodes only (forced tokens it did not draft are accepted tokens all the same).
        own_nodes = list(takewhile(lambda node: node is not None, (origin[node] for node in verdict.accepted)))
        self.proposer.update(StepOutcome(accepted, verdict.next_token, hidden, extra_logits, own_nodes,
                                         pass_width or len(layout.tokens), pass_ms, self._scored))
        stats.draft_s += time.perf_counter() - began
        self._proposal = self._prepared = self._layout = None
        new = self._append(new, scores, keep)
        scores.release()  # nothing else reads this pass's rows: llama.cpp's buffer is not copied
        return new

    def _append(self, new: list[int], scores: Scores, rows: list[int]) -> list[int]:
        """Add a pass's new tokens to the context, cut at an end of sequence and at ``max_new_tokens``;
        ``scores``' rows ``rows`` are the target's logits that produced each of them (read for logprobs only)."""
        ended = next((i for i, tok in enumerate(new) if tok in self.eos_token_ids), None)
        if ended is not None:
            new = new[: ended + 1]
        new = new[: self.max_new_tokens - self.produced]
        if self.want_logprobs is not None:
            self.logprobs += token_logprobs(scores.rows(rows[: len(new)]), new, self.want_logprobs)
        if self.shaper is not None:
            self.shaper.commit(new)
        self.context.extend(new)
        if self.target.cache_len > len(self.context) - 1:  # tokens after an end or the length cut: not kept
            self.target.truncate(len(self.context) - 1)
        self.produced += len(new)
        self.stats.new_tokens += len(new)
        self.finished = (ended is not None or self.produced >= self.max_new_tokens
                         or len(self.context) >= self.target.max_context)
        remember = getattr(self.target, "remember", None) if self.finished else None
        if remember is not None:  # a backend with a prompt cache keeps the conversation for its next turn
            remember(self.context[: self.target.cache_len])
        return new


def decode(
    target: Target,
    proposer: Proposer,
    prompt_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams,
    eos_token_ids: set[int] | frozenset[int] = frozenset(),
    stats: DecodeStats | None = None,
    generator: torch.Generator | None = None,
    shaper: Shaper | None = None,
) -> Iterator[list[int]]:
    """Yield the new tokens of each step until ``max_new_tokens``, an end-of-sequence token or the context ends."""
    generation = Generation(target, proposer, prompt_ids, max_new_tokens, params, eos_token_ids, stats, generator,
                            shaper)
    first = generation.prefill()
    return run(generation, first)


def run(generation: Generation, first: list[int] | None = None) -> Iterator[list[int]]:
    """Step a prefilled generation alone, one target pass per step, yielding each step's new tokens (first
    ``first``, the prefill's token, when given)."""
    if first:
        yield first
    target = generation.target
    began = time.perf_counter()
    while not generation.finished:
        layout = generation.begin_step()
        pass_began = generation.clock()
        scores = target.score(layout.tokens, layout.parents, layout.logits_rows)
        new = generation.end_step(scores, (generation.clock() - pass_began) * 1000)
        generation.stats.wall_s += time.perf_counter() - began
        yield new
        began = time.perf_counter()  # the consumer's time between steps is not the generation's
