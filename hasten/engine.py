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
    wall_s: float = 0.0
    accepted_per_pass: list[int] = field(default_factory=list)

    @property
    def mean_accepted(self) -> float:
        return self.new_tokens / self.target_passes if self.target_passes else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0


def pass_layout(proposal: Proposal, root: int) -> tuple[list[int], list[int], torch.Tensor | None]:
    """Tokens, position offsets and bool mask of one target pass over [root, tree..., extra...]."""
    tree, extra = proposal.tree, proposal.extra
    tokens = [root, *tree.tokens]
    offsets = [0, *tree.depths()]
    if extra is None:
        return tokens, offsets, None if tree.is_chain else tree.ancestor_mask()
    t, m = len(tokens), len(extra.tokens)
    mask = torch.zeros(t + m, t + m, dtype=torch.bool)
    mask[:t, :t] = tree.ancestor_mask()
    mask[t:, 0] = extra.mask[:, 0]
    mask[t:, t:] = extra.mask[:, 1:]
    return tokens + extra.tokens, offsets + extra.offsets, mask


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
        proposal = proposer.propose(context, room)
        tree = proposal.tree
        tokens, offsets, mask = pass_layout(proposal, context[-1])
        scores = target.score(tokens, offsets, mask)
        verdict = verify(tree, scores.logits[: len(tree) + 1], params, generator)
        keep = [0, *(node + 1 for node in verdict.accepted)]
        target.commit(keep)
        accepted = [tree.tokens[node] for node in verdict.accepted]
        new = [*accepted, verdict.next_token]
        stats.target_passes += 1
        stats.drafted_tokens += len(tree)
        stats.accepted_drafts += len(accepted)
        stats.scored_tokens += len(tokens)
        stats.accepted_per_pass.append(len(new))
        hidden = scores.hidden[keep[-1] : keep[-1] + 1] if scores.hidden is not None else None
        extra_logits = scores.logits[len(tree) + 1 :] if proposal.extra is not None else None
        proposer.update(StepOutcome(accepted, verdict.next_token, hidden, extra_logits))
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
