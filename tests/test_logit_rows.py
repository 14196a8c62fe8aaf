"""Logits rows read on demand: the verifier reads only the rows its walk visits (an argmax each under greedy, one
row copied each under sampling), the engine releases a pass's rows without copying them, and llama.cpp's rows
held past the next pass (or past the target's close) are copied out first, while released ones refuse reads."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from conftest import EOS, greedy_reference, random_prompts, tiny_model
from tiny_gguf import write_tiny_gguf

from hasten.backends.base import Scores
from hasten.backends.llamacpp.model import LlamaCppModel
from hasten.backends.transformers.target import TransformersModel
from hasten.engine import Generation, run
from hasten.proposers.base import Proposal, Proposer
from hasten.sampling import SamplingParams
from hasten.tree import ROOT, TokenTree
from hasten.verify import verify

GREEDY = SamplingParams()


class SpyRows:
    """``LogitRows`` over a tensor that records every row read: argmaxes, and rows copied out."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self.argmaxed: list[int] = []
        self.copied: list[int] = []
        self.released = False

    def __len__(self) -> int:
        return self.logits.shape[0]

    def row(self, i: int) -> torch.Tensor:
        self.copied.append(i)
        return self.logits[i].clone()

    def argmax(self, i: int) -> int:
        self.argmaxed.append(i)
        return int(self.logits[i].argmax())

    def rows(self, index: Sequence[int]) -> torch.Tensor:
        self.copied += list(index)
        return self.logits[list(index)].clone()

    def release(self) -> None:
        self.released = True


def seven_node_tree() -> tuple[TokenTree, torch.Tensor]:
    """Root children 5 and 6; 5's children 7 and 8; 6's child 9; 7's child 10; 8's child 11. The target's argmax
    is 5 at the root, 8 below it, then 3 (no child): the walk visits rows 0, 1 and 4 of 8."""
    tree = TokenTree([5, 6, 7, 8, 9, 10, 11], [ROOT, ROOT, 0, 0, 1, 2, 3])
    logits = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    for row, best in [(0, 5), (1, 8), (4, 3)]:
        logits[row, best] = 10.0
    return tree, logits


def test_greedy_takes_one_argmax_per_visited_row_and_copies_none():
    tree, logits = seven_node_tree()
    spy = SpyRows(logits)
    verdict = verify(tree, Scores(spy), GREEDY)
    assert (verdict.accepted, verdict.next_token) == ([0, 3], 3)
    assert spy.argmaxed == [0, 1, 4] and spy.copied == []
    plain = verify(tree, logits, GREEDY)
    assert (plain.accepted, plain.next_token) == (verdict.accepted, verdict.next_token)


@pytest.mark.parametrize("seed", range(8))
def test_sampling_copies_each_visited_row_once_and_decides_as_on_the_full_tensor(seed):
    tree, logits = seven_node_tree()
    logits = logits / 4  # flatter rows: the walk stops at different depths across seeds
    params = SamplingParams(temperature=1.0, seed=seed)
    spy = SpyRows(logits)
    verdict = verify(tree, Scores(spy), params, params.generator())
    plain = verify(tree, logits, params, params.generator())
    assert (verdict.accepted, verdict.next_token) == (plain.accepted, plain.next_token)
    assert spy.copied == [0, *(node + 1 for node in verdict.accepted)] and spy.argmaxed == []


class WrongTree(Proposer):
    """Drafts a wide tree the target mostly rejects: seven nodes a step, whatever the context."""

    def propose(self, context: list[int], max_depth: int) -> Proposal:
        tree = TokenTree([5, 6, 7, 8, 9, 10, 11], [ROOT, ROOT, 0, 0, 1, 2, 3])
        return Proposal(tree) if max_depth >= 3 else Proposal(TokenTree())


class SpyTarget:
    """Hands a real target's logits over as ``SpyRows`` and keeps each pass's spy."""

    def __init__(self, target) -> None:
        self.target, self.spies = target, []

    def __getattr__(self, name):
        return getattr(self.target, name)

    def score(self, tokens, parents, logits_rows=None):
        scores = self.target.score(tokens, parents, logits_rows)
        self.spies.append(SpyRows(scores.logits))
        return Scores(self.spies[-1], scores.hidden)


def test_a_step_reads_only_its_accepted_path_and_releases_the_rest_unread():
    model = tiny_model("llama", 2, init_std=0.6)
    prompt = random_prompts(1, seed=4)[0]
    target = SpyTarget(TransformersModel(model).new_target())
    generation = Generation(target, WrongTree(), prompt, 12, GREEDY, {EOS})
    out = [token for chunk in run(generation, generation.prefill()) for token in chunk]
    assert out == greedy_reference(model, prompt, 12)
    wide = [spy for spy in target.spies if len(spy) == 8]
    assert wide, "no step scored the seven-node tree"
    for spy in target.spies:
        assert spy.copied == [] and spy.released
        assert len(spy.argmaxed) <= 4 and spy.argmaxed[0] == 0  # the root's row, then one row per accepted node


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> LlamaCppModel:
    path = write_tiny_gguf(tmp_path_factory.mktemp("rows") / "tiny.gguf", vocab_size=96)
    return LlamaCppModel(path, threads=1, n_batch=4)  # passes of more than 4 tokens run in several decodes


PROMPT = [1, 20, 31, 42, 53, 64, 75, 86, 17, 28]  # 10 tokens: three decodes of at most 4


def test_llamacpp_rows_held_past_the_next_pass_keep_their_values(tiny_llama):
    reference, holder = tiny_llama.new_target(), tiny_llama.new_target()
    for target in (reference, holder):
        target.start(PROMPT)
    expected = reference.score([5, 6, 7], [-1, 0, 1]).logits.clone()
    held = holder.score([5, 6, 7], [-1, 0, 1])
    assert held.argmax(2) == int(expected[2].argmax()) and torch.equal(held.row(1), expected[1])
    holder.commit([0])
    reference.commit([0])
    later = holder.score([6, 9], [-1, 0])  # llama.cpp overwrites its output buffer
    assert torch.equal(later.logits, reference.score([6, 9], [-1, 0]).logits)
    assert torch.equal(held.logits, expected)
    assert [held.argmax(i) for i in range(3)] == expected.argmax(-1).tolist()


def test_llamacpp_rows_outlive_their_target_and_refuse_reads_once_released(tiny_llama):
    reference, target = tiny_llama.new_target(), tiny_llama.new_target()
    reference.start(PROMPT)
    target.start(PROMPT)
    expected = reference.score([5, 6], [-1, 0]).logits.clone()
    held = target.score([5, 6], [-1, 0])
    target.close()  # its context goes back to the pool: the next target decodes in it
    other = tiny_llama.new_target()
    other.start(PROMPT[::-1])
    assert torch.equal(held.logits, expected)
    released = other.score([5, 6], [-1, 0])
    released.release()
    with pytest.raises(RuntimeError, match="released"):
        released.argmax(0)


def test_llamacpp_rows_over_several_decodes_and_out_of_order(tiny_llama):
    ascending, reordered = tiny_llama.new_target(), tiny_llama.new_target()
    first = ascending.start(PROMPT)
    assert len(first) == 1 and torch.equal(reordered.start(PROMPT).row(0), first.row(0))
    tokens, parents = [5, 6, 7, 8, 9, 10], [-1, 0, 0, 1, 2, 4]  # six tokens: two decodes
    rows = ascending.score(tokens, parents, [0, 3, 5]).logits
    picked = reordered.score(tokens, parents, [5, 0, 3, 5])
    assert len(picked) == 4
    assert torch.equal(picked.logits, rows[[2, 0, 1, 2]])
    assert picked.argmax(0) == int(rows[2].argmax())


class Layout:
    """A pass as ``score_many`` takes it."""

    def __init__(self, tokens: list[int], parents: list[int], logits_rows: list[int]) -> None:
        self.tokens, self.parents, self.logits_rows = tokens, parents, logits_rows


def test_llamacpp_rows_of_a_shared_decode_held_past_the_next_one_keep_their_values(tmp_path):
    model = LlamaCppModel(write_tiny_gguf(tmp_path / "shared.gguf", vocab_size=96), threads=1)
    contexts = [PROMPT, PROMPT[3:]]
    batched, alone = [model.new_target() for _ in contexts], [model.new_target() for _ in contexts]
    for target, reference, context in zip(batched, alone, contexts, strict=True):
        target.start(context)
        reference.start(context)
    passes = [([5, 6, 7], [-1, 0, 0], [2, 0]), ([8, 9], [-1, 0], [0, 1])]

    def layouts(step: int) -> list[tuple[object, Layout]]:
        return [(t, Layout(*[[x + step for x in p[0]], p[1], p[2]])) for t, p in zip(batched, passes, strict=True)]

    held = model.score_many(layouts(0))
    assert all(target.membership is not None for target in batched)  # scored in the shared context
    expected = [r.score(list(p[0]), p[1], p[2]).logits for r, p in zip(alone, passes, strict=True)]
    assert [scores.argmax(0) for scores in held] == [int(e[0].argmax()) for e in expected]
    for target, reference in zip(batched, alone, strict=True):
        target.commit([0])
        reference.commit([0])
    later = model.score_many(layouts(1))  # the shared context decodes again
    assert len(later) == 2 and all(torch.equal(h.logits, e) for h, e in zip(held, expected, strict=True))
