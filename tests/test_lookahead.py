"""Lookahead decoding: exact greedy output, exact sampling distribution, and the window's mask and offsets."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import (
    DEFAULT_MODEL_PROMPTS,
    EOS,
    default_reference,
    exact_sequence_probs,
    greedy_reference,
    random_prompts,
    tiny_loaded,
    tiny_model,
)

from hasten.api import generate
from hasten.backends.transformers.target import TransformersTarget
from hasten.engine import DecodeStats, decode, pass_layout
from hasten.errors import HastenError
from hasten.proposers.lookahead import LookaheadProposer, NgramPool, window_parents
from hasten.sampling import SamplingParams
from hasten.tree import ancestor_mask, depths_of

SIZES = [(4, 4, 3), (3, 2, 2), (5, 3, 5), (2, 6, 1)]  # (window, ngram, guesses)


@functools.cache
def _loaded(arch: str):
    return tiny_loaded(arch, seed=3)


@functools.cache
def _reference(arch: str, prompt: tuple[int, ...], max_new_tokens: int) -> list[int]:
    return greedy_reference(_loaded(arch).model, list(prompt), max_new_tokens)


def _run(loaded, prompt: list[int], max_new_tokens: int, window: int, ngram: int, guesses: int,
         params: SamplingParams | None = None, generator=None,
         stats: DecodeStats | None = None) -> tuple[list[int], LookaheadProposer]:
    proposer = LookaheadProposer(window, ngram, guesses, max_context=loaded.model.config.max_position_embeddings)
    target = TransformersTarget(loaded.model)
    out: list[int] = []
    params = params or SamplingParams()
    for chunk in decode(target, proposer, prompt, max_new_tokens, params, {EOS}, stats, generator):
        out.extend(chunk)
    return out, proposer


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "W{}N{}G{}".format(*s))
def test_greedy_matches_generate_and_guesses_are_accepted(arch, sizes):
    loaded = _loaded(arch)
    accepted = hits = 0
    for prompt in random_prompts(10, seed=11):
        stats = DecodeStats()
        out, proposer = _run(loaded, prompt, 32, *sizes, stats=stats)
        assert out == _reference(arch, tuple(prompt), 32), prompt
        accepted += proposer.accepted
        hits += proposer.hit_steps
        # A hit is a pass that emitted a guessed token besides its own; only a step that guessed can hit.
        passes = stats.accepted_per_pass
        assert proposer.hit_rate == sum(emitted > 1 for emitted in passes) / len(passes)
        assert proposer.hit_rate <= proposer.guess_rate
    assert hits > 0  # the tree path is exercised...
    assert accepted > hits or sizes[1] == 2  # ...and several guessed tokens are accepted at once (N > 2)


def test_api_method_and_options():
    loaded = _loaded("llama")
    prompt = random_prompts(1, seed=5)[0]
    result = generate(loaded, prompt, "lookahead", max_new_tokens=20, window=3, ngram=3, guesses=2, chat=False)
    assert result.token_ids == _reference("llama", tuple(prompt), 20)
    assert result.method == "lookahead"
    with pytest.raises(HastenError, match="ngram"):
        generate(loaded, prompt, "lookahead", ngram=1, chat=False)
    with pytest.raises(HastenError, match="window"):
        LookaheadProposer(window=0)


def test_window_mask_and_offsets_hand_worked():
    parents = [-1, *(p + 1 for p in window_parents(3, 2))]  # W=3, N=3: two levels of three columns
    offsets, mask = depths_of(parents)[1:], ancestor_mask(parents)
    assert offsets == [1, 2, 3, 2, 3, 4]
    #            root  a0 a1 a2 b0 b1 b2      (a = level 0, b = level 1)
    expected = [[1, 1, 0, 0, 0, 0, 0],  # a0 at 1: root a0
                [1, 1, 1, 0, 0, 0, 0],  # a1 at 2: root a0 a1
                [1, 1, 1, 1, 0, 0, 0],  # a2 at 3: root a0 a1 a2
                [1, 1, 0, 0, 1, 0, 0],  # b0 at 2: root a0 b0
                [1, 1, 1, 0, 0, 1, 0],  # b1 at 3: root a0 a1 b1
                [1, 1, 1, 1, 0, 0, 1]]  # b2 at 4: root a0 a1 a2 b2
    assert mask[1:].tolist() == [[bool(x) for x in row] for row in expected]


@pytest.mark.parametrize("sizes", [(3, 3, 2), (4, 4, 3), (3, 2, 2)])
def test_window_logits_equal_plain_runs_of_each_trajectory(sizes):
    """Each window row's logits must be what the model gives after the context plus that row's own chain."""
    window, ngram, guesses = sizes
    model = tiny_model("llama", seed=1)
    context = [5, 9, 12, 5, 9, 7, 30, 5, 9, 12, 40, 5]
    proposer = LookaheadProposer(window, ngram, guesses)
    proposer.start(context, None)
    proposal = proposer.propose(context, 8)
    assert len(proposal.tree) > 0  # the prompt's n-grams under the root are guessed
    layout = pass_layout(proposal, context[-1])
    target = TransformersTarget(model)
    target.start(context[:-1])
    logits = target.score(layout.tokens, layout.parents).logits[len(proposal.tree) + 1 :]
    columns = proposer.columns
    for level in range(ngram - 1):
        for col in range(window):
            chain = [context[-1], *(c[0] for c in columns[: col + 1]), *columns[col][1 : level + 1]]
            plain = model(torch.tensor([context[:-1] + chain])).logits[0, -1]
            torch.testing.assert_close(logits[level * window + col], plain, atol=1e-4, rtol=1e-4)


def test_pass_asks_logits_only_for_the_tree_and_the_window_top():
    proposer = LookaheadProposer(window=3, ngram=3, guesses=2)
    context = [5, 9, 12, 5, 9, 7, 5]
    proposer.start(context, None)
    proposal = proposer.propose(context, 8)
    layout = pass_layout(proposal, context[-1])
    t = len(proposal.tree) + 1
    assert len(layout.tokens) == t + 6
    assert layout.logits_rows == [*range(t), t + 3, t + 4, t + 5]
    assert layout.parents[t:] == [0, t, t + 1, t, t + 1, t + 2]  # the window hangs below the root, never the tree


def test_window_advance_pools_ngrams_and_slides_with_the_context():
    proposer = LookaheadProposer(window=3, ngram=3, guesses=4)
    proposer.start([2, 3, 4, 5, 6, 7], None)
    proposer.columns = [[10, 11], [20, 21], [30, 31]]
    logits = torch.zeros(3, 64)  # the engine hands back only the top level's rows
    for col, token in enumerate([12, 22, 32]):
        logits[col, token] = 1.0  # the top level predicts 12, 22, 32
    proposer._advance(logits, shift=0)
    assert proposer.columns == [[11, 12], [21, 22], [31, 32]]
    assert proposer.pool.lookup(20, 4) == [[21, 22]]
    # Two accepted tokens move the context three places: the first two columns fall off, fresh ones follow.
    logits = torch.zeros(3, 64)
    for col, token in enumerate([13, 23, 33]):
        logits[col, token] = 1.0
    proposer._advance(logits, shift=2)
    assert proposer.columns[0] == [32, 33]
    assert all(len(column) == 2 for column in proposer.columns)
    assert all(tok in range(2, 8) for column in proposer.columns[1:] for tok in column)  # seeded from the context


def test_pool_keeps_the_most_recent_per_key():
    pool = NgramPool(3, per_key=2)
    pool.add_sequence([1, 2, 3, 1, 4, 5, 1, 2, 3, 1, 6, 7])
    assert pool.lookup(1, 5) == [[6, 7], [2, 3]]  # (1, 4, 5) was evicted; (1, 2, 3) was refreshed
    assert pool.lookup(9, 5) == []


def test_sampling_is_lossless():
    """Distribution of the first four sampled tokens vs the model's exact one, chi-square over 3000 seeded draws
    (the first comes from the prefill; the pool drafts for the next three)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    params = SamplingParams(1.0)
    loaded = tiny_loaded("llama", seed=5, vocab_size=16, init_std=0.5)
    # Chosen (from 13 seeded candidates) so that the pool holds tails for the likely first tokens 7 and 9: about
    # one drafted token in two draws is accepted (7 has several tails, so the tree has siblings).
    prompt = [5, 7, 7, 5, 7, 6, 7, 9, 5, 9, 7, 6]
    exact = exact_sequence_probs(loaded.model, prompt, params.probs, 4, EOS)
    generator = torch.Generator().manual_seed(1234)
    draws = 3000
    counts: dict[tuple[int, ...], int] = {}
    accepted = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is several times faster on a busy machine
    try:
        for _ in range(draws):
            out, proposer = _run(loaded, prompt, 4, 3, 3, 3, params, generator)
            counts[tuple(out)] = counts.get(tuple(out), 0) + 1
            accepted += proposer.accepted
    finally:
        torch.set_num_threads(threads)
    assert accepted > draws // 5  # guesses were accepted often: the multi-candidate rule is what is tested
    assert set(counts) <= {key for key, p in exact.items() if p > 0}
    big = sorted(key for key, p in exact.items() if p * draws >= 5)
    observed = [counts.get(key, 0) for key in big]
    expected = [exact[key] * draws for key in big]
    if draws - sum(expected) > 1e-6:  # every rare outcome together, as one more cell
        observed.append(draws - sum(observed))
        expected.append(draws - sum(expected))
    assert len(observed) > 20
    assert scipy_stats.chisquare(observed, expected).pvalue > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("prompt", DEFAULT_MODEL_PROMPTS)
def test_default_model_matches_generate(default_model_hf, prompt):
    reference = default_reference(default_model_hf, prompt, 48)
    result = generate(default_model_hf, prompt, "lookahead", max_new_tokens=48)
    assert result.token_ids == reference
