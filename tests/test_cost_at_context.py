"""The cost curve prices each step's pass at the sequence's own cache length (a longer cache costs more)."""

from __future__ import annotations

import pytest
from conftest import EOS, tiny_model

from hasten.adaptive.chooser import DraftPolicy
from hasten.adaptive.cost import CostModel
from hasten.backends import TransformersModel
from hasten.backends.base import Target
from hasten.bench.oracle import PldSource, replay
from hasten.engine import decode
from hasten.proposers.base import Proposal
from hasten.proposers.prompt_lookup import PromptLookupProposer
from hasten.sampling import SamplingParams

SHORT = 24  # up to this many cached tokens width is free; past it a pass over n tokens costs n passes or more


def short_then_dear() -> CostModel:
    """Width free after at most ``SHORT`` cached tokens, dear one token later (and, extended, dearer still)."""
    curve = CostModel([1, 64], [[10.0, 10.0], [10.0, 640.0]], contexts=[SHORT, SHORT + 1])
    curve.observe = lambda width, millis, context=None: None  # priced by the grid alone, not by this machine
    return curve


class Recording(PromptLookupProposer):
    """Prompt lookup that notes, at each step, the cache length, the policy's context, its candidates and its tree."""

    def __init__(self, target: Target, policy: DraftPolicy) -> None:
        super().__init__(8, 3, 1, 1, policy=policy)
        self.target, self.steps = target, []

    def propose(self, context: list[int], max_depth: int) -> Proposal:
        proposal = super().propose(context, max_depth)
        _, paths = self.matches(context, min(self.num_tokens, max_depth))
        self.steps.append((self.target.cache_len, self.policy.context, bool(paths), len(proposal.tree)))
        return proposal


def test_each_step_is_priced_at_its_own_cache_length():
    model = tiny_model("llama", 3, init_std=0.6)
    target = TransformersModel(model).new_target()
    proposer = Recording(target, DraftPolicy(short_then_dear()))
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    for _ in decode(target, proposer, prompt, 40, SamplingParams(), frozenset({EOS})):
        pass
    steps = proposer.steps
    assert [context for _, context, _, _ in steps] == [cache for cache, _, _, _ in steps]
    with_candidates = [(cache, drafted) for cache, _, found, drafted in steps if found]
    assert any(cache <= SHORT for cache, _ in with_candidates) and any(cache > SHORT for cache, _ in with_candidates)
    assert all((drafted > 0) == (cache <= SHORT) for cache, drafted in with_candidates), with_candidates


def test_the_oracle_prices_each_pass_at_its_cache_length():
    """A pass after n cached tokens costs 10 + n ms: ar's passes and the oracle's are each priced where they run."""
    curve = CostModel([1, 8], [[10.0, 10.0], [110.0, 110.0]], contexts=[0, 100])
    prompt, output = [1, 2, 3, 4, 9, 1], [2, 3, 4, 5, 6]
    run = replay(prompt, output, PldSource(), curve)
    # ar: one pass per token after the prefill's, after 6, 7, 8 and 9 cached tokens
    assert run.ar_ms == pytest.approx(sum(10.0 + n for n in (6, 7, 8, 9)))
    # the oracle: context [1 2 3 4 9 1 2] matches "1 2" -> "3 4 9": 3 and 4 accepted, 5 the target's own, one pass
    # after 6 cached; the last token, 6, a plain pass after 9 cached
    assert run.steps == 2 and run.oracle_ms == pytest.approx(16.0 + 19.0)
