"""Adaptive drafting: acceptance learning, the chooser, and exactness of adaptive methods (the cost curve:
test_cost.py)."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from conftest import EOS, greedy_reference, random_prompts, tiny_loaded, tiny_model, tiny_tokenizer
from test_sampling_lossless import PROMPT, VOCAB, assert_same_distribution
from tiny_gguf import write_tiny_gguf

from hasten.adaptive.chooser import (
    TRIALS,
    AcceptanceModel,
    DraftPolicy,
    best_size,
    path_probabilities,
    sibling_shares,
    verified_nodes,
)
from hasten.adaptive.cost import CostModel
from hasten.api import generate
from hasten.backends import TransformersModel
from hasten.engine import DecodeStats, decode
from hasten.models import LoadedModel
from hasten.proposers.auto import AutoProposer
from hasten.proposers.base import Proposer, StepOutcome
from hasten.proposers.draft_model import DraftModelProposer
from hasten.proposers.lookahead import LookaheadProposer
from hasten.proposers.prompt_lookup import PromptLookupProposer
from hasten.sampling import SamplingParams
from hasten.tree import ROOT, TokenTree, merge_paths

GREEDY = SamplingParams()
FLAT = CostModel([1, 64], [10.0, 10.0])  # a GPU-like curve: width is free
LINEAR = CostModel([1, 64], [10.0, 640.0])  # fully compute-bound: n tokens cost n passes
CPU = CostModel([1, 2, 4], [10.0, 14.0, 24.0])


def frozen(curve: CostModel) -> CostModel:
    """A copy of ``curve`` that ignores the real passes (tests must not depend on how fast this machine is)."""
    copy = CostModel(curve.widths, curve.millis)
    copy.observe = lambda width, millis, context=None: None
    return copy


# --- the chooser ----------------------------------------------------------------------------------------------

def test_best_chain_length_hand_worked():
    # A chain accepted with 0.9 at every depth on a Q4_1-like curve: rates 1, 1.9/1.65, 2.71/2.2, 3.439/3.1.
    curve = CostModel([1, 2, 3, 4], [1.0, 1.65, 2.2, 3.1])
    probs = path_probabilities(TokenTree.chain([5, 6, 7]), [0.9, 0.9, 0.9])
    assert probs == pytest.approx([0.9, 0.81, 0.729])
    keep, rate = best_size(probs, curve)
    assert keep == [0, 1] and rate == pytest.approx(2.71 / 2.2)
    assert best_size(probs, FLAT)[0] == [0, 1, 2]  # width is free: draft everything that may be accepted
    assert best_size(probs, LINEAR)[0] == []  # nothing pays when n tokens cost n passes


def test_chooser_matches_brute_force_on_random_trees():
    rng = np.random.default_rng(0)
    curve = CostModel([1, 2, 4, 8, 16], [13.6, 22.4, 42.0, 64.7, 120.8])
    for _ in range(200):
        n = int(rng.integers(1, 9))
        parents = [ROOT] + [int(rng.integers(-1, i)) for i in range(1, n)]
        tree = TokenTree(list(range(n)), parents)
        conditional = rng.uniform(0, 1, n).tolist()
        probs = path_probabilities(tree, conditional)
        keep, rate = best_size(probs, curve)
        assert all(tree.parents[i] == ROOT or tree.parents[i] in keep for i in keep)  # a tree below the root
        best = max((1 + sum(probs[i] for i in range(n) if mask >> i & 1)) / curve(1 + bin(mask).count("1"))
                   for mask in range(2 ** n)
                   if all(not mask >> i & 1 or parents[i] == ROOT or mask >> parents[i] & 1 for i in range(n)))
        assert rate == pytest.approx(best)


def test_acceptance_model_learns_and_backs_off_to_coarser_features():
    model = AcceptanceModel(prior_mean=0.5, prior_weight=2.0)
    fresh = model.estimate(("pld", 1, 3))
    for _ in range(200):
        model.record(("pld", 1, 3), True)
    assert model.estimate(("pld", 1, 3)) > 0.98 > fresh
    assert model.estimate(("pld", 1, 2)) > 0.9  # unseen: borrows ("pld", 1)
    assert model.estimate(("pool", 1, 0)) == fresh  # another source: the prior
    for _ in range(400):
        model.record(("pld", 2, 3), False)
    assert model.estimate(("pld", 2, 3)) < 0.05


def test_acceptance_shrinks_toward_the_current_coarser_rate():
    model = AcceptanceModel(prior_mean=0.5, prior_weight=4.0)
    model.record(("pld", 1, 2), True)  # seen once, early
    assert model.mean(("pld", 1, 2)) == pytest.approx((1 + 4 * 0.6) / 5)  # ("pld", 1) is (1 + 4 * 0.5) / 5
    for _ in range(96):  # later, (pld, 1) is learned to be rarely accepted through other features
        model.record(("pld", 1, 3), False)
    parent = model.mean(("pld", 1))
    assert parent == pytest.approx((1 + 4 * 0.5) / (97 + 4))
    assert model.mean(("pld", 1, 2)) == pytest.approx((1 + 4 * parent) / 5)  # it follows its parent now
    unseen, seen = model.estimate(("pld", 1, 4)), model.estimate(("pld", 1, 3))
    assert unseen > model.mean(("pld", 1, 4)) == pytest.approx(parent)  # unseen: the parent plus the full bonus
    assert seen < unseen  # much evidence: little bonus


def test_learning_counts_only_nodes_whose_parent_was_accepted():
    tree, features = merge_paths([[1, 2, 3], [1, 4]], [[("a", 1), ("a", 2), ("a", 3)], [("b", 1), ("b", 2)]])
    assert tree.tokens == [1, 2, 3, 4] and tree.parents == [ROOT, 0, 1, 0]
    assert features == [[("a", 1), ("b", 1)], [("a", 2)], [("a", 3)], [("b", 2)]]
    model = AcceptanceModel()
    model.learn(tree, features, accepted_nodes=[0])  # 1 accepted, then 2 and 4 rejected; 3 was never reached
    assert model.rates[("a", 1)].accepted == 1 and model.rates[("b", 2)].offered == 1
    assert ("a", 3) not in model.rates


def test_learning_leaves_out_the_nodes_the_pass_did_not_score():
    """Nodes from ``scored_nodes`` on were cut from the pass (the context's end): neither accepted nor rejected."""
    tree = TokenTree([1, 2, 3, 4, 5], [ROOT, 0, ROOT, 0, ROOT])
    features = [[("a", node)] for node in range(5)]
    assert verified_nodes(tree, [0], 3) == [(0, True), (1, False), (2, False)]
    assert verified_nodes(tree, [0]) == [(0, True), (1, False), (2, False), (3, False), (4, False)]
    policy = DraftPolicy(frozen(CPU))
    policy.learn(tree, features, StepOutcome([1], 2, None, None, [0], 4, 12.0, scored_nodes=3))
    assert set(policy.acceptance.rates) == {("a", 0), ("a", 1), ("a", 2)}
    assert policy.realized == 1 and policy.predicted == pytest.approx(sum(sibling_shares(
        tree, [policy.acceptance.prior_mean] * 5)[:3]))


def test_policy_learns_to_stop_drafting_what_is_never_accepted():
    policy = DraftPolicy(CostModel([1, 2, 8], [10.0, 13.0, 20.0]))
    tree = TokenTree.chain([7, 8, 9])
    features = [[("pld", 1)], [("pld", 2)], [("pld", 3)]]
    assert len(policy.choose(tree, features)[0]) == 3  # optimistic at first
    for _ in range(100):
        policy.acceptance.learn(tree, features, [])
    assert len(policy.choose(tree, features)[0]) == 0


def test_siblings_share_one_acceptance():
    """The target takes one token after a node: siblings' estimates that add up to more than 1 are scaled down."""
    tree = TokenTree([5, 6, 7, 8], [ROOT, ROOT, ROOT, 0])
    probs = path_probabilities(tree, [0.6, 0.6, 0.6, 0.5])
    assert probs == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1 / 6])
    assert path_probabilities(tree, [0.5, 0.3, 0.1, 0.5]) == pytest.approx([0.5, 0.3, 0.1, 0.25])  # under 1: as is
    curve = CostModel([1, 2, 4], [10.0, 17.0, 26.0])  # three fresh guesses at 0.62 each seemed to earn 1.9 tokens
    assert best_size(path_probabilities(TokenTree([5, 6, 7], [ROOT] * 3), [0.62] * 3), curve)[0] == []


def test_a_generation_whose_drafts_fail_stops_drafting_and_the_next_starts_afresh():
    """The shared model says the chain pays; this generation's rejections calibrate it down for this generation."""
    model = AcceptanceModel()
    tree, features = TokenTree.chain([7, 8]), [[("pld", 1)], [("pld", 2)]]
    for _ in range(50):
        model.learn(tree, features, [0, 1])  # other generations: always accepted
    curve = CostModel([1, 2, 4], [10.0, 14.0, 20.0])
    policy = DraftPolicy(frozen(curve), model)
    assert len(policy.choose(tree, features)[0]) == 2
    steps = 0
    while len(policy.choose(tree, features)[0]) and steps < 20:
        policy.learn(tree, features, StepOutcome([], 1, None, None, [], 3, 14.0))
        steps += 1
    assert 0 < steps <= 10 and policy.calibration() < 0.5  # stopped after a few rejected steps
    assert model.mean(("pld", 1)) > 0.8  # while the shared model still rates the chain highly
    assert len(DraftPolicy(frozen(curve), model).choose(tree, features)[0]) == 2  # a new generation drafts
    for _ in range(150):  # plain steps let this generation's evidence fade: it tries again
        policy.learn(TokenTree(), [], StepOutcome([], 1, None, None, [], 1, 10.0))
    assert len(policy.choose(tree, features)[0]) > 0


# --- exactness: adaptivity changes what is drafted, never what is accepted -------------------------------------

def _decode(target, proposer, prompt, max_new_tokens, params=GREEDY, stats=None, generator=None, eos=(EOS,)):
    chunks = decode(target, proposer, prompt, max_new_tokens, params, frozenset(eos), stats, generator)
    return [t for chunk in chunks for t in chunk]


def _auto_with_draft(curve: CostModel, draft) -> AutoProposer:
    policy = DraftPolicy(frozen(curve))
    return AutoProposer(policy, draft=DraftModelProposer(draft, GREEDY, 8, policy=policy))


def _proposers(curve: CostModel, drafts: dict = {}) -> dict[str, callable]:  # noqa: B006 (read only)
    return {
        "pld": lambda: PromptLookupProposer(8, 4, 1, 3, policy=DraftPolicy(frozen(curve))),
        "lookahead": lambda: LookaheadProposer(2, 4, 3, policy=DraftPolicy(frozen(curve))),
        "auto": lambda: AutoProposer(DraftPolicy(frozen(curve))),
        **{f"auto+{name}": functools.partial(_auto_with_draft, curve, draft) for name, draft in drafts.items()},
    }


@pytest.mark.parametrize("curve", [FLAT, CPU], ids=["flat", "cpu"])
def test_adaptive_methods_match_greedy_generate_on_transformers(curve):
    model = tiny_model("llama", 3, init_std=0.6)
    drafts = {"self-draft": TransformersModel(model), "other-draft": TransformersModel(tiny_model("llama", 8))}
    for name, make in _proposers(curve, drafts).items():
        stats = DecodeStats()
        for prompt in random_prompts(6, seed=5):
            prompt = prompt + prompt
            assert _decode(TransformersModel(model).new_target(), make(), prompt, 40, stats=stats) == \
                greedy_reference(model, prompt, 40), name
        assert stats.drafted_tokens > 0, name


def test_api_methods_are_adaptive_by_default_and_exact():
    loaded = tiny_loaded("llama", 3, init_std=0.6)
    prompt = random_prompts(1, seed=5)[0] * 2
    reference = greedy_reference(loaded.model, prompt, 30)
    for method in ("auto", "pld", "lookahead"):
        result = generate(loaded, prompt, method, max_new_tokens=30)
        assert result.token_ids == reference, method
        assert "mean_drafted" in result.method_stats and "plain_steps" in result.method_stats


@pytest.fixture(scope="module")
def tiny_gguf_loaded(tmp_path_factory) -> LoadedModel:
    from hasten.backends.llamacpp.model import LlamaCppModel

    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=4, vocab_size=64, init_std=0.6)
    return LoadedModel("tiny-gguf", LlamaCppModel(path, threads=1), tiny_tokenizer(64), path)


@pytest.mark.parametrize("curve", [FLAT, CPU], ids=["flat", "cpu"])
def test_adaptive_methods_match_ar_on_llamacpp(tiny_gguf_loaded, curve, tmp_path):
    from hasten.backends.llamacpp.model import LlamaCppModel

    backend = tiny_gguf_loaded.backend
    other = LlamaCppModel(write_tiny_gguf(tmp_path / "other.gguf", seed=9, vocab_size=64, init_std=0.6), threads=1)
    eos = tuple(backend.eos_token_ids)
    for name, make in _proposers(curve, {"self-draft": backend, "other-draft": other}).items():
        stats = DecodeStats()
        for prompt in random_prompts(6, seed=5):
            prompt = prompt + prompt
            reference = _decode(backend.new_target(), Proposer(), prompt, 40, eos=eos)
            assert _decode(backend.new_target(), make(), prompt, 40, stats=stats, eos=eos) == reference, name
        assert stats.drafted_tokens > 0, name


def test_auto_drafts_with_the_draft_model_and_keeps_its_cache_in_step():
    model = tiny_model("llama", 3, init_std=0.6)
    policy = DraftPolicy(frozen(FLAT))
    draft = DraftModelProposer(TransformersModel(model), GREEDY, 8, policy=policy)
    auto = AutoProposer(policy, draft=draft)
    prompt = random_prompts(1, seed=11, repeat=False)[0]
    out = _decode(TransformersModel(model).new_target(), auto, prompt, 30)
    assert out == greedy_reference(model, prompt, 30)
    assert auto.stats()["nodes_from_draft"] > 1  # the draft (the target itself) found most tokens
    assert draft.draft.cache_len <= len(prompt) + len(out)  # never ahead of the committed tokens


def test_auto_prefills_its_draft_only_when_the_draft_first_runs():
    """A draft whose gate stays closed costs nothing, not even its prefill; one that opens mid-answer catches up
    on the whole context then, and the output stays exact."""
    model = tiny_model("llama", 3, init_std=0.6)
    prompt = random_prompts(1, seed=11, repeat=False)[0]
    reference = greedy_reference(model, prompt, 30)
    closed, opens_late = DraftPolicy(frozen(FLAT)), DraftPolicy(frozen(FLAT))
    gate = closed.gain("draft")
    gate.steps, gate.tokens, gate.cost_ms = TRIALS, 0.0, 1e6  # measured: earns nothing, costs much
    gate.skipped = 1  # and not due for a retry within this answer
    idle = DraftModelProposer(TransformersModel(model), GREEDY, 8, policy=closed)
    assert _decode(TransformersModel(model).new_target(), AutoProposer(closed, draft=idle), prompt, 30) == reference
    assert idle.draft.cache_len == 0  # never prefilled

    late = DraftModelProposer(TransformersModel(model), GREEDY, 8, policy=opens_late)
    auto = AutoProposer(opens_late, draft=late)
    runs = iter([False] * 5 + [True] * 100)
    auto.draft_source.should_run = lambda policy, cost_ms=None: next(runs)
    out = _decode(TransformersModel(model).new_target(), auto, prompt, 30)
    assert out == reference
    assert 0 < late.draft.cache_len <= len(prompt) + len(out) and auto.stats()["nodes_from_draft"] > 0


def _auto_with_draft_sampling(engine, params: SamplingParams, policy: DraftPolicy) -> AutoProposer:
    return AutoProposer(policy, num_tokens=3, draft=DraftModelProposer(engine, params, 3, policy=policy))


# --- sampling: the same distribution ---------------------------------------------------------------------------

def _exact_joint_on(target, params: SamplingParams) -> np.ndarray:
    """P(first two tokens) from a backend's own target: the root scored, then each first token under it."""
    target.start(PROMPT[:-1])
    first = params.probs(target.score([PROMPT[-1]], [-1]).logits[0])
    target.commit([])
    second = []
    for x in range(VOCAB):
        second.append(params.probs(target.score([PROMPT[-1], x], [-1, 0], [1]).logits[0]))
        target.commit([])
    return (first[:, None] * torch.stack(second)).double().numpy()


def _sampled_joint(target, make, params: SamplingParams, draws: int = 2500) -> tuple[np.ndarray, DecodeStats]:
    generator = torch.Generator().manual_seed(99)
    counts = np.zeros((VOCAB, VOCAB))
    stats = DecodeStats()
    for _ in range(draws):
        tokens = _decode(target, make(), PROMPT, 3, params, stats, generator, eos=())
        counts[tokens[0], tokens[1]] += 1
    return counts, stats


@pytest.mark.parametrize("method", ["pld", "auto", "auto+draft"])
@pytest.mark.parametrize("backend", ["transformers", "llamacpp"])
def test_adaptive_sampling_follows_the_target_distribution(method, backend, tmp_path):
    params = SamplingParams(temperature=0.9, top_k=8)
    if backend == "transformers":
        engine = TransformersModel(tiny_model("llama", 21, vocab_size=VOCAB, init_std=0.1))
    else:
        from hasten.backends.llamacpp.model import LlamaCppModel

        engine = LlamaCppModel(write_tiny_gguf(tmp_path / "s.gguf", seed=21, vocab_size=VOCAB, init_std=0.1),
                               threads=1)
    shared = AcceptanceModel()  # shared across draws: it keeps learning, as in a server
    flat = frozen(FLAT)
    make = {"pld": lambda: PromptLookupProposer(3, 3, 1, 2, policy=DraftPolicy(flat, shared)),
            "auto": lambda: AutoProposer(DraftPolicy(flat, shared), num_tokens=3),
            "auto+draft": lambda: _auto_with_draft_sampling(engine, params, DraftPolicy(flat, shared))}[method]
    target = engine.new_target()
    counts, stats = _sampled_joint(target, make, params)
    assert_same_distribution(counts, _exact_joint_on(engine.new_target(), params))
    assert 0 < stats.accepted_drafts < stats.drafted_tokens


def test_a_generation_s_own_runs_gate_a_costly_source_that_pays_elsewhere():
    from hasten.adaptive.chooser import TRIALS, DraftPolicy, SourceGain
    from hasten.adaptive.costly import CostlySource

    shared = SourceGain(tokens=2.0 * TRIALS, steps=TRIALS, cost_ms=4.0)  # 2 tokens a run elsewhere (code, math)
    assert shared.pays(token_ms=10.0)
    assert shared.pays(token_ms=10.0, local=(0.0, 4))  # a few empty runs here: the shared record still wins
    assert not shared.pays(token_ms=10.0, local=(0.0, 40))  # this text's 40 empty runs decide
    assert shared.pays(token_ms=10.0, local=(20.0, 40))  # and half a token a run pays for 4 ms here too
    shut = SourceGain(tokens=0.0, steps=TRIALS, cost_ms=4.0, skipped=1)  # it never paid on other texts
    assert not shut.pays(token_ms=10.0) and shut.pays(token_ms=10.0, local=(0.0, 0))  # each text tries it once
    assert not shut.pays(token_ms=10.0, local=(0.0, 1)) and shut.pays(token_ms=10.0, local=(3.0, 1))

    policy = DraftPolicy(CostModel([1, 2, 4], [10.0, 11.0, 12.0]))
    policy.gains["draft"] = shared
    source = CostlySource("draft")
    runs = 0
    for _ in range(60):  # a generation where it finds nothing: it stops within a few dozen runs
        if source.should_run(policy, cost_ms=4.0):
            runs += 1
            source.credit(policy, 0)
    assert 8 <= runs < 24 and source.earned == (0.0, runs)
    source.restart()
    assert source.should_run(policy, cost_ms=4.0)  # the next generation starts from the shared record alone

    model = tiny_model("llama", 3, init_std=0.6)  # a gate closed by the shared record counts plain steps
    closed = DraftPolicy(frozen(FLAT))
    closed.gains["draft"] = SourceGain(steps=TRIALS, cost_ms=1e6, skipped=1)
    draft = DraftModelProposer(TransformersModel(model), GREEDY, 8, policy=closed)
    prompt = random_prompts(1, seed=11, repeat=False)[0]
    assert _decode(TransformersModel(model).new_target(), draft, prompt, 10) == greedy_reference(model, prompt, 10)
    assert closed.stats() == {"mean_drafted": 0.0, "plain_steps": 1.0}


def test_a_costly_source_that_does_not_pay_sits_out_and_is_retried():
    from hasten.adaptive.chooser import RETRY_EVERY, RETRY_SHARE, TRIALS, SourceGain

    gain = SourceGain()
    for _ in range(TRIALS):
        assert gain.pays(token_ms=10.0)  # too little evidence: always tried
        gain.record(0, cost_ms=0.2)  # it found nothing and cost 0.2 ms a step
    runs = [gain.pays(token_ms=10.0) for _ in range(3 * RETRY_EVERY)]
    assert sum(runs) == 3 and runs[RETRY_EVERY - 1]  # sits out, but is retried every RETRY_EVERY steps
    for _ in range(200):
        gain.record(1, cost_ms=0.2)  # now each run finds a token worth 10 ms
    assert gain.pays(token_ms=10.0)

    costly = SourceGain(steps=TRIALS, cost_ms=30.0)  # a wide window: 3 passes' worth, never earning a token
    runs = [costly.pays(token_ms=10.0) for _ in range(6000)]
    assert sum(runs) * 30.0 <= RETRY_SHARE * 6000 * 10.0  # its retries take at most RETRY_SHARE of the time

    fresh = SourceGain()  # no trials where even TRIAL_TOKENS tokens a step could not pay for a run
    assert not fresh.pays(token_ms=10.0, cost_ms=30.0)
    fresh = SourceGain()  # and the trials end early once what it earned plus TRIAL_TOKENS would not pay
    assert fresh.pays(token_ms=10.0, cost_ms=15.0)
    fresh.record(0, cost_ms=15.0)
    assert fresh.pays(token_ms=10.0, cost_ms=15.0)
    fresh.record(0, cost_ms=15.0)
    assert not fresh.pays(token_ms=10.0, cost_ms=15.0)


def _windows_sent(curve: CostModel, ngram: int, guesses: int, steps: int) -> int:
    """Steps, of ``steps`` that accept nothing, in which a W=2 lookahead sends its window on ``curve``."""
    proposer = LookaheadProposer(2, ngram, guesses, policy=DraftPolicy(frozen(curve)))
    context = [5, 6, 7, 8, 9]
    proposer.start(context, None)
    sent = 0
    for _ in range(steps):
        sent += proposer.propose(context, 8).extra is not None
        proposer.update(StepOutcome([], 3, None, torch.zeros(2, 50), [], 1, 0.0))
    return sent


def test_lookaheads_window_stops_its_trials_where_its_width_cannot_pay():
    """Where 8 window tokens cost 3.4 passes no trial runs them (even 2 tokens a step would not pay); free, it runs."""
    epyc = CostModel([1, 2, 4, 8, 12], [6.98, 11.98, 17.89, 30.18, 42.74])  # the 2-core EPYC, llama.cpp
    assert _windows_sent(epyc, 5, 4, 10) == 0
    assert _windows_sent(FLAT, 5, 4, 10) == 10


def test_lookaheads_window_never_runs_where_one_guess_cannot_pay_for_it():
    """N = 2: a guess earns at most 1 token, and 2 window tokens cost 1.2 passes: no trials, no retries, ever
    (the trials alone would have run it: 2 tokens credited in advance outweigh 1.2 passes)."""
    assert _windows_sent(CostModel([1, 2, 4], [10.0, 16.0, 28.0]), 2, 2, 100) == 0


def test_redrafter_skips_its_beam_search_while_it_does_not_pay():
    from hasten.proposers import redrafter as module
    from tests.test_redrafter import random_head

    model = tiny_model("llama", 3, init_std=0.6)
    backend = TransformersModel(model)
    head = random_head().attach(backend)
    policy = DraftPolicy(frozen(FLAT))
    proposer = module.ReDrafterProposer(head, 2, 4, policy)
    proposer.start([5, 6, 7], torch.zeros(1, 32))
    assert len(proposer.propose([5, 6, 7], 8).tree) > 0  # tried at first
    gain = policy.gain("head")
    gain.steps, gain.tokens, gain.cost_ms = 1000, 0.0, 5.0  # long evidence: it never earns a token
    searched = []
    real = module.beam_search
    module.beam_search = lambda *args: searched.append(1) or real(*args)
    try:
        trees = [len(proposer.propose([5, 6, 7], 8).tree) for _ in range(10)]
    finally:
        module.beam_search = real
    assert trees == [0] * 10 and not searched  # plain steps, and no beam search was run


def test_auto_takes_the_shipped_draft_only_where_its_chain_can_pay_at_some_depth():
    from hasten.draft.model import CONFIG, SHIPPED_DRAFT, bench_like_agreement, validation_agreement
    from hasten.methods import _draft_can_pay

    config = json.loads((SHIPPED_DRAFT / CONFIG).read_text())
    validation = validation_agreement()  # the shipped draft's, on its own validation split
    assert validation == config["history"][-1]["val_top1"] and 0.3 < validation < 0.7
    held_out = bench_like_agreement()  # on held-out prompts like the bench's: what auto's gate reads
    assert held_out == config["held_out_top1"] and 0.2 < held_out < validation
    agreement = 0.6  # a draft as good as the one shipped on 2026-12-05 was on its validation split
    epyc = DraftPolicy(frozen(CostModel([1, 2, 4], [8.9, 15.4, 24.3])))  # measured: a second token costs 0.73
    xeon = DraftPolicy(frozen(CostModel([1, 2, 4], [12.0, 14.9, 21.9])))  # measured: 0.24
    assert not _draft_can_pay(epyc, agreement) and _draft_can_pay(xeon, agreement)
    assert _draft_can_pay(DraftPolicy(frozen(FLAT)), 0.1) and not _draft_can_pay(DraftPolicy(frozen(CPU)), 0.3)
    # transformers fp32 on the 2-core EPYC blocks rows by four: a second token costs 0.72 of a pass, five tokens
    # 1.49x one. A 0.6 draft loses at depth 1 and pays at depth 4 (2.18 tokens for 1.49); a 0.3 one pays nowhere.
    blocked = DraftPolicy(frozen(CostModel([1, 2, 3, 4, 5], [70.0, 120.6, 148.6, 111.9, 104.6])))
    assert _draft_can_pay(blocked, 0.6) and not _draft_can_pay(blocked, 0.6, depth=1)
    assert not _draft_can_pay(blocked, 0.3)
