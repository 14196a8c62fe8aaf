"""ReDrafter's cheaper beam search drafts the same beams as the plain one.

The fast path (``ReDrafterHead.advance``: a table of the draft vocabulary's input projections, the hidden state's
share of the first residual block done once per search; beam search keeping parent pointers instead of copying
beams) only reorders floating-point sums, so scores agree to round-off and the beams themselves are identical.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_model
from test_redrafter import random_head

from hasten.proposers.redrafter import HeadDrafter
from hasten.redrafter.beam import Beams, beam_search
from hasten.redrafter.head import ReDrafterHead


class PlainDrafter(HeadDrafter):
    """The drafter as it was: ``step`` then ``logits`` over the concatenated hidden state, every step."""

    def advance(self, state: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.head.step(state, tokens)
        logits = self.head.logits(self.hidden.expand(state.shape[0], -1), state)
        return state, torch.log_softmax(logits.float(), dim=-1)


def plain_beam_search(drafter: HeadDrafter, root: int, width: int, length: int) -> Beams:
    """Beam search as it was: every step copies the surviving beams' tokens and per-token scores."""
    vocab = drafter.vocab
    tokens, steps, scores = torch.empty(1, 0, dtype=torch.long), torch.empty(1, 0), torch.zeros(1)
    state, last = drafter.start(1), torch.tensor([root])
    for _ in range(length):
        state, log_probs = drafter.advance(state, last)
        total = (scores[:, None] + log_probs.float()).flatten()
        best = total.topk(min(width, total.numel()))
        beam = best.indices // log_probs.shape[1]
        last = vocab[best.indices % log_probs.shape[1]]
        tokens = torch.cat([tokens[beam], last[:, None]], dim=1)
        steps = torch.cat([steps[beam], (best.values - scores[beam])[:, None]], dim=1)
        state, scores = state[beam], best.values
    return Beams(tokens, scores, steps)


def layered_head(layers: int) -> ReDrafterHead:
    """A random head with ``layers`` random residual blocks over 40 of the tiny model's 64 tokens."""
    base = random_head(draft_vocab=40, seed=layers + 10)
    head = ReDrafterHead(dataclasses.replace(base.config, num_layers=layers), base.draft_ids)
    for block in head.blocks:
        torch.nn.init.normal_(block.linear.weight, std=0.2)
        torch.nn.init.normal_(block.linear.bias, std=0.2)
    return head.attach(tiny_model("llama", seed=0)).eval()


@pytest.mark.parametrize("layers", [0, 1, 2])
@torch.inference_mode()
def test_advance_equals_step_then_logits(layers):
    head = layered_head(layers)
    outside = next(t for t in range(64) if t not in set(head.draft_ids.tolist()))
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        hidden = torch.randn(1, 32, generator=gen)
        fast, plain = HeadDrafter(head, hidden), PlainDrafter(head, hidden)
        state = torch.randn(3, head.config.state_size, generator=gen)
        for tokens in (torch.tensor([outside]), head.draft_ids[torch.randperm(40, generator=gen)[:3]]):
            rows = state[: len(tokens)]
            (fast_state, fast_lp), (plain_state, plain_lp) = fast.advance(rows, tokens), plain.advance(rows, tokens)
            assert torch.allclose(fast_state, plain_state, atol=1e-6)
            assert torch.allclose(fast_lp, plain_lp, atol=1e-5)


@pytest.mark.parametrize("layers", [0, 1, 2])
@torch.inference_mode()
def test_fast_beam_search_drafts_the_same_beams(layers):
    head = layered_head(layers)
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        hidden = torch.randn(1, 32, generator=gen) * 2
        root = int(torch.randint(0, 64, (1,), generator=gen))
        width, length = 1 + seed % 6, 1 + seed % 5
        want = plain_beam_search(PlainDrafter(head, hidden), root, width, length)
        for got in (beam_search(HeadDrafter(head, hidden), root, width, length),
                    beam_search(PlainDrafter(head, hidden), root, width, length)):
            assert torch.equal(got.tokens, want.tokens), (seed, width, length)
            assert torch.allclose(got.scores, want.scores, atol=1e-5)
            assert torch.allclose(got.token_log_probs, want.token_log_probs, atol=1e-5)
    # With the plain drafter the new search is bit-identical: it changed only the bookkeeping.
    got, want = (search(PlainDrafter(head, hidden), 3, 4, 4) for search in (beam_search, plain_beam_search))
    assert torch.equal(got.scores, want.scores) and torch.equal(got.token_log_probs, want.token_log_probs)


def test_tables_follow_training_and_reattaching():
    head = layered_head(1)
    hidden = torch.randn(1, 32)
    tokens = head.draft_ids[:2]
    with torch.inference_mode():
        before = HeadDrafter(head, hidden).advance(head.init_state(2), tokens)[1]
    with torch.no_grad():  # an optimizer step changes the weights in place
        head.rnn_w.weight.mul_(3.0)
        head.blocks[0].linear.weight.add_(0.5)
    with torch.inference_mode():
        fast = HeadDrafter(head, hidden).advance(head.init_state(2), tokens)[1]
        plain = PlainDrafter(head, hidden).advance(head.init_state(2), tokens)[1]
    assert not torch.allclose(fast, before, atol=1e-3) and torch.allclose(fast, plain, atol=1e-5)
    head.attach(tiny_model("llama", seed=1))  # another target's tables
    with torch.inference_mode():
        fast = HeadDrafter(head, hidden).advance(head.init_state(2), tokens)[1]
        plain = PlainDrafter(head, hidden).advance(head.init_state(2), tokens)[1]
    assert torch.allclose(fast, plain, atol=1e-5)


@pytest.mark.slow
@torch.inference_mode()
def test_shipped_head_drafts_the_same_beams(default_model):
    from hasten.models import encode_prompt
    from hasten.proposers.redrafter import load_head

    head = load_head("default", default_model.backend, None)
    target = default_model.backend.new_target(want_hidden=True)
    ids = encode_prompt(default_model.tokenizer, "Write a Python function that checks whether a number is prime.")
    hidden = target.start(ids[:-1]).hidden
    gen = torch.Generator().manual_seed(0)
    for i in range(30):
        h = hidden + 0.3 * i / 30 * torch.randn(hidden.shape, generator=gen)
        root = ids[-1] if i % 2 else int(head.draft_ids[i])
        for width in (2, 3):
            got = beam_search(HeadDrafter(head, h), root, width, 4)
            want = plain_beam_search(PlainDrafter(head, h), root, width, 4)
            assert torch.equal(got.tokens, want.tokens), (i, width)
            assert torch.allclose(got.scores, want.scores, atol=1e-4)
