"""The oracle bound of the model drafters: ``draft``'s greedy tree and ``auto``'s merged candidates, on tiny models."""

from __future__ import annotations

import functools

import pytest
from conftest import greedy_reference, random_prompts, tiny_loaded

from hasten.adaptive.cost import CostModel
from hasten.bench import BenchPrompt, run_bench
from hasten.bench.oracle import AutoSource, DraftSource, OracleRun, PldSource, replay, source_for
from hasten.methods import build_proposer
from hasten.models import LoadedModel
from hasten.proposers.draft_model import ADAPTIVE_CHILDREN, ADAPTIVE_FRONTIER
from hasten.sampling import SamplingParams

GREEDY = SamplingParams(0.0, 0, 1.0, 0)
COST = CostModel([1, 2, 4, 8], [10.0, 14.0, 22.0, 38.0])  # 10 ms for one token, 4 ms per extra token
DEPTH = 4


@functools.cache
def target() -> LoadedModel:
    return tiny_loaded(seed=0)


@functools.cache
def answers() -> list[tuple[list[int], list[int]]]:
    """(prompt, the target's greedy output) pairs, long enough for several steps."""
    pairs = [(p, greedy_reference(target().model, p, 24)) for p in random_prompts(4, seed=3)]
    assert sum(len(out) for _, out in pairs) >= 40
    return pairs


CHAIN, TREE = (1, 1), (ADAPTIVE_CHILDREN, ADAPTIVE_FRONTIER)  # (children, frontier): fixed sizes, adaptive bounds


def draft_source(draft: LoadedModel, num_tokens: int = DEPTH, adaptive: bool = True) -> DraftSource:
    source = source_for("draft", target(), GREEDY, {"draft": draft, "num_tokens": num_tokens, "adaptive": adaptive})
    assert isinstance(source, DraftSource) and source.proposer.policy is None  # the full depth
    assert (source.proposer.children, source.proposer.frontier) == (TREE if adaptive else CHAIN)  # the widest
    return source


def fresh_paths(draft: LoadedModel, context: list[int], depth: int, sizes: tuple[int, int] = TREE) -> list[list[int]]:
    """The paths of the draft's greedy tree after ``context`` at ``sizes``, from a cold cache."""
    proposer = build_proposer("draft", target(), GREEDY, None, draft=draft, adaptive=False, num_tokens=depth)
    proposer.children, proposer.frontier = sizes
    proposer.start(context, None)
    return proposer.draft_tree(context, depth, greedy=True).paths()[0]


class Checked:
    """A source whose every candidate list is checked against a cold draft, and its cache against the context."""

    def __init__(self, source: DraftSource | AutoSource, draft: LoadedModel, expected, bonus: bool = False) -> None:
        self.source, self.draft, self.expected, self.bonus, self.steps = source, draft, expected, bonus, 0

    def start(self, context: list[int]) -> None:
        self.source.start(context)

    def candidates(self, context: list[int], depth: int) -> list[list[int]]:
        found = self.source.candidates(context, depth)
        assert found == self.expected(context, depth)
        self.steps += 1
        return found

    def advance(self, context: list[int], new: list[int]) -> None:
        proposer = self.source.proposer if isinstance(self.source, DraftSource) else self.source.draft.proposer
        if self.bonus:  # the whole step, the target's token too: no path agrees with that one
            proposer.rollback(new)
        else:
            self.source.advance(context, new)
        assert proposer.draft.cache_len < len(context)  # a prefix of the context; the next tree feeds the rest


def perfect_ms(tokens: int, depth: int) -> float:
    """Every step emits ``depth + 1`` tokens while room allows (the last one what is left)."""
    return sum(COST(min(depth + 1, tokens - done)) for done in range(0, tokens, depth + 1))


@pytest.mark.parametrize("bonus", [False, True])
def test_a_self_draft_is_perfect_at_every_step(bonus):
    # The draft IS the target: its greedy chain (fixed sizes) is the answer, so every step drafts the full depth.
    # The first token comes from the prefill: the steps are over the rest.
    me = tiny_loaded(seed=0)
    for prompt, output in answers():
        source = Checked(draft_source(me, adaptive=False), me,
                         lambda context, depth: fresh_paths(me, context, min(depth, DEPTH), CHAIN), bonus)
        run = replay(prompt, output, source, COST)
        decoded = len(output) - 1
        assert run.tokens == decoded and run.steps == -(-decoded // (DEPTH + 1))
        assert run.oracle_ms == pytest.approx(perfect_ms(decoded, DEPTH))
        assert source.steps == run.steps - (decoded % (DEPTH + 1) == 1)  # no candidates for a last lone token


@pytest.mark.parametrize("bonus", [False, True])
def test_an_unrelated_draft_earns_less_and_its_cache_follows_the_answer(bonus):
    other = tiny_loaded(seed=1)
    perfect = unrelated = None
    for prompt, output in answers():
        source = Checked(draft_source(other), other,
                         lambda context, depth: fresh_paths(other, context, min(depth, DEPTH)), bonus)
        run = replay(prompt, output, source, COST)
        assert run.tokens == len(output) - 1 and run.mean_accepted >= 1.0
        unrelated = run if unrelated is None else unrelated + run
        mine = replay(prompt, output, draft_source(tiny_loaded(seed=0), adaptive=False), COST)
        perfect = mine if perfect is None else perfect + mine
    assert 1.0 <= unrelated.mean_accepted < perfect.mean_accepted
    assert unrelated.speedup < perfect.speedup


def test_auto_merges_lookup_pool_and_the_draft_tree():
    draft = tiny_loaded(seed=1)
    source = source_for("auto", target(), GREEDY, {"draft": draft})
    assert isinstance(source, AutoSource) and source.draft is not None and source.num_tokens == 8
    assert source.draft.proposer.policy is None
    repeating = [5, 6, 7, 8, 9, 5, 6, 7]
    source.start(repeating)
    pld = PldSource(8).candidates(repeating, 8)
    assert pld and source.candidates(repeating, 8) == [*pld, *fresh_paths(draft, repeating, 8)]
    # The pool stands in only where lookup finds nothing (filled from the context, it holds a key only where
    # lookup matches it too, so a hand-stocked n-gram shows the fall-back).
    fresh = [3, 4, 5, 9]
    source.start(fresh[:-1])
    source.pool.pool.add([9, 1, 2, 3, 4])
    assert PldSource(8).candidates(fresh, 8) == []
    assert source.candidates(fresh, 3) == [[1, 2, 3], *fresh_paths(draft, fresh, 3)]
    source.start(repeating)
    source.pool.pool.add([7, 1, 1, 1, 1])
    # lookup found something: no pool tails beside it
    assert source.candidates(repeating, 8) == [*pld, *fresh_paths(draft, repeating, 8)]
    # Without a draft (not the default model, none given): lookup and pool only.
    lookup_only = source_for("auto", target(), GREEDY, {})
    assert isinstance(lookup_only, AutoSource) and lookup_only.draft is None
    lookup_only.start(repeating)
    assert lookup_only.candidates(repeating, 3) == PldSource(8).candidates(repeating, 3)


def test_the_draft_offers_its_tree_and_a_self_draft_lifts_auto():
    source = draft_source(tiny_loaded(seed=1))
    context = [*answers()[0][0], answers()[0][1][0]]
    source.start(context)
    assert len(source.candidates(context, DEPTH)) > 1  # every path of the greedy tree, not only its best chain
    # With the target as its draft, auto's candidates hold the answer's continuations far more often than lookup's.
    runs = {}
    for name, options in (("self", {"draft": tiny_loaded(seed=0)}), ("lookup", {})):
        runs[name] = sum((replay(p, out, source_for("auto", target(), GREEDY, options), COST) for p, out in answers()),
                         OracleRun())
    assert runs["self"].mean_accepted > runs["lookup"].mean_accepted + 1.0
    assert runs["self"].speedup > runs["lookup"].speedup


def test_no_draft_no_source():
    assert source_for("draft", target(), GREEDY, {}) is None  # not the default model and no --draft-model
    assert source_for("redrafter", target(), GREEDY, {}) is None


PROMPTS = [
    BenchPrompt(1, "copy", ("w5 w6 w7 w8 w9 w5 w6 w7 w8 w9 w5 w6",)),
    BenchPrompt("two-turn", "chat", ("w10 w11 w12 w13 w10 w11", "w20 w21 w22")),
]


def test_the_bench_reports_the_draft_and_auto_oracles():
    # A self-draft: after each turn's first token (the prefill's), the oracle drafts its other 7 in one step (6
    # drafted + the target's one).
    res = run_bench(target(), PROMPTS, ["ar", "draft", "auto"], draft=tiny_loaded(seed=0), max_new_tokens=8,
                    warmup=0, progress=False)
    assert res["methods"]["ar"]["oracle"] is None
    turns = sum(len(p.turns) for p in PROMPTS)
    for method in ("draft", "auto"):
        entry = res["methods"][method]
        assert entry["errors"] == [] and entry["exact"] is True, method
        assert entry["oracle"] > 0 and all(part["oracle"] > 0 for part in entry["categories"].values()), method
        assert entry["oracle_mean_accepted"] == (entry["new_tokens"] - turns) / turns, method
