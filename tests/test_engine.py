"""The pass layout (root, verified tree and extra branch as one tree below the root) and the prefill's first token."""

from __future__ import annotations

from conftest import EOS, greedy_reference, random_prompts, tiny_model

from hasten.backends.transformers.target import TransformersModel
from hasten.engine import DecodeStats, Generation, pass_layout, run
from hasten.proposers.base import ExtraBranch, Proposal, Proposer
from hasten.sampling import SamplingParams
from hasten.tree import ROOT, TokenTree, ancestor_mask, depths_of

GREEDY = SamplingParams()


def test_chain_layout_is_plain_causal_order():
    layout = pass_layout(Proposal(TokenTree.chain([3, 4])), root=9)
    assert (layout.tokens, layout.parents, layout.logits_rows) == ([9, 3, 4], [-1, 0, 1], [0, 1, 2])


def test_tree_with_extra_branch_hand_worked():
    extra = ExtraBranch(TokenTree([20, 21], [ROOT, 0]), read_rows=[1])
    layout = pass_layout(Proposal(TokenTree.from_paths([[3], [4]]), extra), root=9)
    assert layout.tokens == [9, 3, 4, 20, 21]
    assert layout.parents == [-1, 0, 0, 0, 3]
    assert layout.logits_rows == [0, 1, 2, 4]
    assert depths_of(layout.parents) == [0, 1, 1, 1, 2]
    expected = [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 0, 0, 1, 0],
        [1, 0, 0, 1, 1],
    ]
    assert ancestor_mask(layout.parents).int().tolist() == expected


class CountingTarget:
    """A Target wrapper that records what the prefill ran and how many passes scored the tree."""

    def __init__(self, target) -> None:
        self.target, self.started, self.scores = target, [], 0

    def __getattr__(self, name):
        return getattr(self.target, name)

    def start(self, context):
        self.started.append(list(context))
        return self.target.start(context)

    def score(self, tokens, parents, logits_rows=None):
        self.scores += 1
        return self.target.score(tokens, parents, logits_rows)


def test_the_prefill_runs_the_whole_prompt_and_gives_the_first_token():
    model = tiny_model("llama", 2, init_std=0.6)
    backend = TransformersModel(model)
    for prompt in random_prompts(6, seed=4):
        reference = greedy_reference(model, prompt, 12)
        target = CountingTarget(backend.new_target())
        stats = DecodeStats()
        generation = Generation(target, Proposer(), prompt, 12, GREEDY, {EOS}, stats)
        first = generation.prefill()
        assert target.started == [prompt] and target.scores == 0
        assert first == reference[:1] and generation.context == prompt + first
        out = first + [token for chunk in run(generation) for token in chunk]
        assert out == reference
        assert target.scores == len(reference) - 1 == stats.target_passes - 1  # the prefill is a pass too
        assert stats.mean_accepted == 1.0


def test_one_new_token_needs_no_step_and_a_prompt_one_short_of_the_context_gets_one():
    backend = TransformersModel(tiny_model("llama", 2, init_std=0.6))
    prompt = random_prompts(1, seed=5)[0]
    target = CountingTarget(backend.new_target())
    generation = Generation(target, Proposer(), prompt, 1, GREEDY, {EOS})
    assert len(generation.prefill()) == 1 and generation.finished and target.scores == 0
    full = backend.new_target()
    room = full.max_context - 1  # the longest prompt the context takes
    generation = Generation(full, Proposer(), (prompt * room)[:room], 5, GREEDY, {EOS})
    assert len(generation.prefill()) == 1 and generation.finished  # its one token fills the context


def test_on_cuda_a_pass_is_timed_until_the_device_has_done_it(monkeypatch):
    """``score`` on CUDA only queues the pass; its time (the cost curve's online refinement, the statistics) must
    include waiting for it. No GPU here: the target names a CUDA device and ``torch.cuda.synchronize`` takes the
    30 ms the queued pass would."""
    import time

    import torch

    waits = []

    def synchronize(device=None):
        waits.append(device)
        time.sleep(0.03)

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)

    class OnCuda(CountingTarget):
        device = torch.device("cuda", 0)

    target = OnCuda(TransformersModel(tiny_model("llama", 2, init_std=0.6)).new_target())
    stats = DecodeStats()
    generation = Generation(target, Proposer(), random_prompts(1, seed=4)[0], 3, GREEDY, set(), stats)
    first = generation.prefill()
    out = first + [token for chunk in run(generation) for token in chunk]
    assert len(out) == 3 and len(stats.pass_ms) == 2 and set(waits) == {torch.device("cuda", 0)}
    assert stats.prefill_s >= 0.03 and min(stats.pass_ms) >= 30
