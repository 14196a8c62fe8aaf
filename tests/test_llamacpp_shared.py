"""llama.cpp ``score_many``: several targets in one llama_decode, bit-identical to scoring each alone.

Each test drives batched targets and, beside each, a reference target that gets the same passes and commits
alone in a context of its own; logits (and hidden states) must be equal bit for bit, and after every commit the
batched targets' caches must be exactly their committed positions (``cache_problems``).
"""

from __future__ import annotations

import functools
import gc
import random
import weakref
from types import SimpleNamespace
from typing import cast

import pytest
import torch
from test_llamacpp_backend import VOCAB, chain, random_path, random_tree, tokens
from tiny_gguf import write_tiny_gguf

from hasten.backends.llamacpp.model import LlamaCppModel
from hasten.backends.llamacpp.shared_context import SharedCache
from hasten.backends.llamacpp.shared_exactness import MAX_TOKENS
from hasten.backends.llamacpp.target import LlamaCppTarget
from hasten.errors import HastenError


@functools.cache
def model(weights: str = "q8_0", **kwargs) -> LlamaCppModel:
    import tempfile

    path = write_tiny_gguf(f"{tempfile.mkdtemp(prefix='hasten-shared-')}/tiny.gguf", weights=weights,
                           vocab_size=VOCAB)
    return LlamaCppModel(path, threads=kwargs.pop("threads", 1), **kwargs)


def shared_of(target: LlamaCppTarget) -> SharedCache | None:
    """The shared context ``target``'s cache lives in (None: its own context)."""
    return None if target.membership is None else cast(SharedCache, target.membership.cache)


def layout(toks: list[int], parents: list[int], rows: list[int] | None = None) -> SimpleNamespace:
    return SimpleNamespace(tokens=toks, parents=parents, logits_rows=list(range(len(toks))) if rows is None else rows)


class Pair:
    """A target that is scored in batches and its reference, scored alone."""

    def __init__(self, m: LlamaCppModel, rng: random.Random, want_hidden: bool = False) -> None:
        self.target, self.reference = m.new_target(want_hidden), m.new_target(want_hidden)
        context = tokens(rng, rng.randrange(2, 30))
        self.target.start(context)
        self.reference.start(context)

    def commit(self, keep: list[int]) -> None:
        self.target.commit(keep)
        self.reference.commit(keep)
        assert self.target.cache_len == self.reference.cache_len == self.target.real_cache_len()
        assert self.target.cache_problems() == []


def step(m: LlamaCppModel, pairs: list[Pair], passes: list[SimpleNamespace]) -> list:
    """One batched pass; asserts every target's scores equal its reference's."""
    got = m.score_many([(pair.target, p) for pair, p in zip(pairs, passes, strict=True)])
    for pair, p, scores in zip(pairs, passes, got, strict=True):
        want = pair.reference.score(p.tokens, p.parents, p.logits_rows)
        assert torch.equal(scores.logits, want.logits)
        assert (scores.hidden is None) == (want.hidden is None)
        if want.hidden is not None:
            assert torch.equal(scores.hidden, want.hidden)
    return got


def random_pass(rng: random.Random, pair: Pair, size: int = 12) -> SimpleNamespace:
    parents = random_tree(rng, rng.randrange(1, size)) if rng.random() < 0.7 else chain(rng.randrange(1, 7))
    rows = sorted(rng.sample(range(len(parents)), rng.randrange(0, len(parents) + 1)))
    if rng.random() < 0.2:  # out of order, repeated
        rows = rows[::-1] + rows[:1]
    return layout(tokens(rng, len(parents)), parents, rows)


@pytest.mark.parametrize("weights", ["q8_0", "q4_0"])
def test_chains_and_trees_batched_are_bit_identical_to_alone(weights):
    m = model(weights)
    rng = random.Random(5)
    pairs = [Pair(m, rng, want_hidden=(i == 2)) for i in range(4)]
    for _ in range(25):
        passes = [random_pass(rng, pair) for pair in pairs]
        step(m, pairs, passes)
        for pair, p in zip(pairs, passes, strict=True):
            pair.commit(random_path(rng, p.parents))
    assert all(shared_of(pair.target) is not None for pair in pairs)  # they really were scored together
    assert all(shared_of(pair.reference) is None for pair in pairs)


def test_ragged_acceptance_keeps_each_cache_exact():
    m = model()
    rng = random.Random(6)
    long, short = Pair(m, rng), Pair(m, rng)
    starts = long.target.cache_len, short.target.cache_len
    for _ in range(4):
        passes = [layout(tokens(rng, 8), chain(8)), layout(tokens(rng, 6), [-1, 0, 1, 0, 3, 3])]
        step(m, [long, short], passes)
        before = short.target.cache_len
        long.commit(list(range(6)))  # the root and five accepted guesses
        short.commit([0])  # the root only: no guess accepted
        assert short.target.cache_len == before + 1
    assert (long.target.cache_len, short.target.cache_len) == (starts[0] + 24, starts[1] + 4)
    assert shared_of(long.target) is shared_of(short.target) is not None


def test_targets_join_and_leave_between_steps_and_closing_frees_ids_and_cells():
    m = model("q4_0")
    rng = random.Random(7)
    pairs = [Pair(m, rng) for _ in range(2)]
    cache = None
    for round_ in range(12):
        if round_ in (3, 6):  # a newcomer joins a running batch
            pairs.append(Pair(m, rng))
        if round_ in (5, 9):  # one leaves (its target closed)
            gone = pairs.pop(0)
            ids = list(gone.target.membership.ids)
            gone.target.close()
            assert cache is not None and all(s in cache.free_ids for s in ids)
        passes = [random_pass(rng, pair) for pair in pairs]
        step(m, pairs, passes)
        for pair, p in zip(pairs, passes, strict=True):
            pair.commit(random_path(rng, p.parents))
            if rng.random() < 0.2 and pair.target.cache_len > 2:
                cut = rng.randrange(1, pair.target.cache_len)
                pair.target.truncate(cut)
                pair.reference.truncate(cut)
                assert pair.target.cache_problems() == []
        cache = shared_of(pairs[0].target)
        assert isinstance(cache, SharedCache)
        assert set(cache.members.values()) == {pair.target for pair in pairs}
    for pair in pairs:
        pair.target.close()
    assert not cache.members and cache.end == cache.garbage == 0  # nothing live: the cache starts over
    assert sorted(cache.free_ids) == list(range(1, cache.n_seq))


def test_compaction_drops_garbage_and_stays_exact():
    m = model("q8_0", shared_cells=512, n_ctx=256)
    rng = random.Random(8)
    pairs = [Pair(m, rng) for _ in range(3)]
    compacted, garbage = False, 0
    for _ in range(30):
        passes = [layout(tokens(rng, 10), random_tree(rng, 10)) for _ in pairs]
        step(m, pairs, passes)  # compacts first when the garbage outweighs the live cells
        cache = shared_of(pairs[0].target)
        compacted |= cache.garbage < garbage
        for pair in pairs:
            pair.commit([0])  # 9 cells of garbage each, per step
        garbage = cache.garbage
        if pairs[0].target.cache_len > 200:
            break
    assert compacted


def test_big_and_lone_passes_run_alone_exactly():
    m = model()
    rng = random.Random(9)
    a, b = Pair(m, rng), Pair(m, rng)
    step(m, [a, b], [layout(tokens(rng, 3), chain(3)), layout(tokens(rng, 3), chain(3))])
    a.commit([0, 1])
    b.commit([0])
    assert shared_of(a.target) is not None
    # 70 tokens: over what one shared decode may hold (flash attention tiles 64+), so its own context scores it
    big = layout(tokens(rng, MAX_TOKENS + 7), random_tree(rng, MAX_TOKENS + 7))
    step(m, [a, b], [big, layout(tokens(rng, 2), chain(2))])
    assert shared_of(a.target) is None and shared_of(b.target) is not None
    a.commit(random_path(rng, big.parents))
    b.commit([0, 1])
    # a target already in the shared context, scored on its own (Target.score)
    p = layout(tokens(rng, 4), [-1, 0, 0, 1])
    assert torch.equal(b.target.score(p.tokens, p.parents).logits, b.reference.score(p.tokens, p.parents).logits)
    b.commit([0, 2])
    # prefill runs in a context of its own
    context = tokens(rng, 40)
    b.target.start(context)
    b.reference.start(context)
    assert shared_of(b.target) is None and b.target.cache_problems() == []


def test_one_token_passes_with_threads_follow_plain_decoding_past_256_cells():
    """With two threads, ggml splits a lone token's cells across threads once n_kv reaches 512: such passes
    run in the target's own context, so ar over a long context still equals plain decoding bit for bit."""
    m = model("q8_0", threads=2)
    rng = random.Random(10)
    pairs = [Pair(m, rng) for _ in range(2)]
    for pair in pairs:  # fill past 256 cells
        toks = tokens(rng, 250)
        for t in (pair.target, pair.reference):
            t.score(toks, chain(250), [])
            t.commit(list(range(250)))
    for _ in range(12):
        step(m, pairs, [layout(tokens(rng, 1), [-1]) for _ in pairs])
        for pair in pairs:
            pair.commit([0])
        step(m, pairs, [layout(tokens(rng, 3), [-1, 0, 0]) for _ in pairs])  # trees are shared again
        assert all(shared_of(pair.target) is not None for pair in pairs)
        for pair in pairs:
            pair.commit([0, 2])


def test_sequence_id_exhaustion_falls_back_and_too_wide_a_tree_is_a_clear_error():
    m = model("q8_0", shared_seq_max=8, n_seq_max=8)
    rng = random.Random(11)
    pairs = [Pair(m, rng) for _ in range(3)]
    fan = [-1, 0, 0, 0, 0]  # 4 leaves: 4 ids each, 7 ids to lend in all
    for _ in range(4):
        step(m, pairs, [layout(tokens(rng, 5), fan) for _ in pairs])
        for pair in pairs:
            pair.commit([0, rng.randrange(1, 5)])
    with pytest.raises(HastenError, match="n_seq_max"):
        m.score_many([(pairs[0].target, layout(tokens(rng, 9), [-1] + [0] * 8))])


def test_score_many_refuses_misuse():
    m, other = model(), model("q4_0")
    a, b = m.new_target(), other.new_target()
    a.start([4, 5])
    b.start([4, 5])
    p = layout([6, 7], chain(2))
    with pytest.raises(ValueError, match="this model"):
        m.score_many([(a, p), (b, p)])
    with pytest.raises(ValueError, match="at most once"):
        m.score_many([(a, p), (a, p)])
    assert isinstance(a, LlamaCppTarget) and a.cache_problems() == []


def test_a_dropped_model_is_freed_at_once_its_shared_context_before_the_model(tmp_path, monkeypatch):
    # No reference cycle between a model and its shared context: after a batch scored there, dropping the model
    # and its targets frees it by reference counting alone (the cyclic collector is off), and the shared context
    # is freed before the llama model it was made on.
    m = LlamaCppModel(write_tiny_gguf(tmp_path / "tiny.gguf", vocab_size=VOCAB), threads=1, prompt_cache_bytes=0)
    rng = random.Random(3)
    targets = [m.new_target() for _ in range(2)]
    for target in targets:
        target.start(tokens(rng, 6))
    m.score_many([(target, layout([5, 6], [-1, 0])) for target in targets])
    for target in targets:
        target.commit([0, 1])
    shared = m.shared_cache_if_made
    assert shared is not None and all(shared_of(target) is shared for target in targets)
    lib, shared_ctx = m.lib, shared.ctx
    freed: list[object] = []
    real_free, real_model_free = lib.llama_free, lib.llama_model_free
    monkeypatch.setattr(lib, "llama_free", lambda ctx: (freed.append(ctx), real_free(ctx))[1])
    monkeypatch.setattr(lib, "llama_model_free", lambda model: (freed.append("model"), real_model_free(model))[1])
    alive = weakref.ref(m)
    del shared
    gc.disable()
    try:
        del target, targets, m
        assert alive() is None
    finally:
        gc.enable()
    assert freed[-1] == "model" and freed.count("model") == 1
    assert shared_ctx in freed[:-1]
