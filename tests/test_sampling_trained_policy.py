"""Sampling stays the target's distribution whatever the adaptive policy has learned.

A policy that has learned that the draft's confident tokens are accepted (or the opposite) must change only what
is drafted: a sampled draft node, once drawn, is never pruned by its own token (that biased the output toward
tokens the draft is sure of: review 2026-12-07, finding 1). Chi-square tests with fixed seeds, on both backends.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_adaptive import FLAT, _decode, _exact_joint_on, frozen
from test_sampling_lossless import PROMPT, VOCAB, assert_same_distribution
from tiny_gguf import write_tiny_gguf

from hasten.adaptive.chooser import AcceptanceModel, DraftPolicy
from hasten.backends import TransformersModel
from hasten.engine import DecodeStats
from hasten.proposers.auto import AutoProposer
from hasten.proposers.draft_model import DraftModelProposer
from hasten.proposers.lookahead import LookaheadProposer
from hasten.proposers.prompt_lookup import PromptLookupProposer
from hasten.sampling import SamplingParams

PARAMS = SamplingParams(temperature=0.9, top_k=8)
DRAWS = 2500


def trained(confident_accepted: bool) -> AcceptanceModel:
    """An acceptance model that has learned that the draft's confident tokens (probability >= 0.5) and prompt
    lookup's first-ranked continuations are accepted and the others not, or (``False``) the opposite."""
    model = AcceptanceModel()
    for depth, rank, bucket in itertools.product(range(1, 5), range(3), range(10)):
        for _ in range(40):
            model.record(("draft", depth, rank, bucket), (bucket >= 5) == confident_accepted)
    for depth, ngram, rank, last in itertools.product(range(1, 5), range(1, 5), range(3), range(-1, 4)):
        for _ in range(10):
            model.record(("pld", depth, ngram, rank, last), (rank == 0) == confident_accepted)
    return model


def engine_on(backend: str, tmp_path):
    if backend == "transformers":
        return TransformersModel(tiny_model("llama", 21, vocab_size=VOCAB, init_std=0.1))
    from hasten.backends.llamacpp.model import LlamaCppModel

    return LlamaCppModel(write_tiny_gguf(tmp_path / "s.gguf", seed=21, vocab_size=VOCAB, init_std=0.1), threads=1)


def draft_engine_on(backend: str, tmp_path):
    """A weaker draft of the same vocabulary: some of its tokens are accepted, some not."""
    if backend == "transformers":
        return TransformersModel(tiny_model("llama", 22, vocab_size=VOCAB, layers=1, init_std=0.1))
    from hasten.backends.llamacpp.model import LlamaCppModel

    return LlamaCppModel(write_tiny_gguf(tmp_path / "d.gguf", seed=22, vocab_size=VOCAB, layers=1, init_std=0.1),
                         threads=1)


def sampled_joint(target, make, draws: int = DRAWS) -> tuple[np.ndarray, DecodeStats]:
    generator = torch.Generator().manual_seed(7)
    counts = np.zeros((VOCAB, VOCAB))
    stats = DecodeStats()
    for _ in range(draws):
        tokens = _decode(target, make(generator), PROMPT, 4, PARAMS, stats, generator, eos=())
        counts[tokens[0], tokens[1]] += 1
    return counts, stats


@pytest.mark.parametrize("confident_accepted", [True, False], ids=["confident-accepted", "confident-rejected"])
@pytest.mark.parametrize("backend", ["transformers", "llamacpp"])
def test_sampled_draft_trees_keep_the_distribution_under_a_trained_policy(backend, confident_accepted, tmp_path):
    engine, draft = engine_on(backend, tmp_path), draft_engine_on(backend, tmp_path)
    shared = trained(confident_accepted)  # shared across draws: it keeps learning, as in a server

    def make(generator):
        return DraftModelProposer(draft, PARAMS, 4, generator, policy=DraftPolicy(frozen(FLAT), shared))

    counts, stats = sampled_joint(engine.new_target(), make)
    assert_same_distribution(counts, _exact_joint_on(engine.new_target(), PARAMS))
    assert 0 < stats.accepted_drafts < stats.drafted_tokens
    assert stats.drafted_tokens > 2 * DRAWS  # trees: siblings below the root and a second level


@pytest.mark.parametrize("method", ["pld", "lookahead", "auto+draft"])
@pytest.mark.parametrize("confident_accepted", [True, False], ids=["confident-accepted", "confident-rejected"])
def test_every_adaptive_method_keeps_the_distribution_under_a_trained_policy(method, confident_accepted, tmp_path):
    engine, draft = engine_on("transformers", tmp_path), draft_engine_on("transformers", tmp_path)
    shared = trained(confident_accepted)

    def make(generator):
        policy = DraftPolicy(frozen(FLAT), shared)
        if method == "pld":
            return PromptLookupProposer(3, 3, 1, 2, policy=policy)
        if method == "lookahead":
            return LookaheadProposer(2, 3, 3, policy=policy)
        return AutoProposer(policy, num_tokens=3, draft=DraftModelProposer(draft, PARAMS, 3, generator, policy))

    counts, stats = sampled_joint(engine.new_target(), make)
    assert_same_distribution(counts, _exact_joint_on(engine.new_target(), PARAMS))
    assert 0 < stats.accepted_drafts < stats.drafted_tokens


def test_a_policy_never_prunes_a_sampled_node_by_its_token():
    """The unit form of the review's reproduction: draft p = (0.9, 0.1), target q = (0.5, 0.5), a policy that
    has learned that confident tokens are accepted; the first token must follow q."""
    from hasten.adaptive.cost import CostModel
    from hasten.backends.base import Scores
    from hasten.verify import verify

    draft_logits = torch.log(torch.tensor([0.9, 0.1, 1e-9, 1e-9]))
    target_logits = torch.log(torch.tensor([0.5, 0.5, 1e-9, 1e-9]))

    class Fixed:  # a draft whose every row is ``draft_logits``
        vocab_size, max_context, cache_len = 4, 1000, 0

        def new_target(self, want_hidden=False):
            return self

        def start(self, context):
            self.cache_len = len(context)
            return Scores(draft_logits[None])

        def score(self, tokens, parents, rows=None):
            return Scores(draft_logits.repeat(len(rows if rows is not None else tokens), 1))

        def commit(self, keep):
            self.cache_len += len(keep)

    params = SamplingParams(temperature=1.0, seed=0)
    generator = params.generator()
    acceptance = AcceptanceModel()
    for _ in range(200):
        for bucket in (8, 9):
            acceptance.record(("draft", 1, 0, bucket), True)
        for bucket in (0, 1):
            acceptance.record(("draft", 1, 0, bucket), False)
    policy = DraftPolicy(CostModel([1, 2, 4, 8], [10.0, 12.0, 16.0, 24.0]), acceptance)
    proposer = DraftModelProposer(Fixed(), params, num_tokens=1, generator=generator, policy=policy, children=1)
    proposer.start([1, 2, 3], None)
    draws, first_a = 20000, 0
    for _ in range(draws):
        tree = proposer.propose([1, 2, 3], 8).tree
        verdict = verify(tree, target_logits.repeat(len(tree) + 1, 1), params, generator)
        first = tree.tokens[verdict.accepted[0]] if verdict.accepted else verdict.next_token
        first_a += first == 0
        proposer.rollback([])
    assert abs(first_a / draws - 0.5) < 4 * (0.25 / draws) ** 0.5  # within 4 standard errors of q(a) = 0.5
