"""The generation loop: propose a tree, score it in one target pass, verify, keep the accepted path."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from hasten.backends.base import Target
from hasten.errors import HastenError
from hasten.proposers.base import Proposal, Proposer, StepOutcome
from hasten.sampling import SamplingParams
from hasten.tree import ROOT
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


def decode(
    target: Target,
    proposer: Proposer,
    prompt_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams,
    eos_token_ids: set[int] | frozenset[int] = frozenset(),
    stats: DecodeStats | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[list[int]]:
    """Yield the new tokens of each step until ``max_new_tokens``, an end-of-sequence token or the context ends.

    The root, the last context token, is never in the cache before a pass: each pass scores it and the
    drafted tree, and the accepted path (root included) is what stays.
    """
    if not prompt_ids:
        raise HastenError("the prompt is empty")
    if max_new_tokens < 1:
        raise HastenError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if len(prompt_ids) >= target.max_context:
        raise HastenError(
            f"the prompt has {len(prompt_ids)} tokens; the model's context is {target.max_context} tokens"
        )
    stats = stats if stats is not None else DecodeStats()
    if generator is None and not params.greedy:
        generator = params.generator()
    began = time.perf_counter()
    prefill = target.start(prompt_ids[:-1])
    now = time.perf_counter()
    stats.prefill_s += now - began
    stats.wall_s += now - began
    began = now
    context = list(prompt_ids)
    proposer.start(context, prefill.hidden)
    produced = 0
    while produced < max_new_tokens and len(context) < target.max_context:
        room = min(max_new_tokens - produced, target.max_context - len(context)) - 1
        step_began = time.perf_counter()
        proposal = proposer.propose(context, room)
        stats.draft_s += time.perf_counter() - step_began
        tree = proposal.tree
        layout = pass_layout(proposal, context[-1])
        pass_began = time.perf_counter()
        scores = target.score(layout.tokens, layout.parents, layout.logits_rows)
        pass_ms = (time.perf_counter() - pass_began) * 1000
        verdict = verify(tree, scores.logits[: len(tree) + 1], params, generator)
        keep = [0, *(node + 1 for node in verdict.accepted)]
        target.commit(keep)
        accepted = [tree.tokens[node] for node in verdict.accepted]
        new = [*accepted, verdict.next_token]
        stats.target_passes += 1
        stats.drafted_tokens += len(tree)
        stats.accepted_drafts += len(accepted)
        stats.scored_tokens += len(layout.tokens)
        stats.accepted_per_pass.append(len(new))
        hidden = scores.hidden[keep[-1] : keep[-1] + 1] if scores.hidden is not None else None
        extra_logits = scores.logits[len(tree) + 1 :] if proposal.extra is not None else None
        update_began = time.perf_counter()
        proposer.update(StepOutcome(accepted, verdict.next_token, hidden, extra_logits, verdict.accepted,
                                    len(layout.tokens), pass_ms))
        stats.draft_s += time.perf_counter() - update_began
        stats.pass_widths.append(len(layout.tokens))
        stats.pass_ms.append(pass_ms)
        ended = next((i for i, tok in enumerate(new) if tok in eos_token_ids), None)
        if ended is not None:
            new = new[: ended + 1]
        new = new[: max_new_tokens - produced]
        context.extend(new)
        produced += len(new)
        stats.new_tokens += len(new)
        now = time.perf_counter()
        stats.wall_s += now - began
        began = now
        yield new
        if ended is not None:
            return
