"""At the end of the context: every pass fits the cache slots left (it writes one per token, however shallow its
tree), the generation returns what it has with finish_reason "length", and every method's tokens equal ar's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from conftest import tiny_loaded, tiny_model, tiny_tokenizer
from test_redrafter import random_head
from tiny_gguf import write_tiny_gguf

import hasten
from hasten.adaptive.chooser import DraftPolicy
from hasten.adaptive.cost import CostModel
from hasten.backends.base import Scores, Target
from hasten.backends.transformers.target import TransformersModel
from hasten.engine import Generation, fit_to_room, scored_nodes
from hasten.errors import HastenError
from hasten.models import LoadedModel
from hasten.proposers.base import ExtraBranch, Proposal, Proposer, StepOutcome
from hasten.sampling import SamplingParams
from hasten.shaping import PreparedTree
from hasten.tree import TokenTree

CONTEXT = 256
# The review's prompt: period 50, so prompt lookup and lookahead's pool find long matches (wide trees) to the end.
LENGTHS = (240, 249, 253, 255)  # 255: the prefill's token fills the context


def periodic(length: int) -> list[int]:
    return [(7 * i) % 50 + 2 for i in range(length)]


def tiny_gguf_loaded(folder, seed: int) -> LoadedModel:
    from hasten.backends.llamacpp.model import LlamaCppModel

    path = write_tiny_gguf(folder / f"tiny-{seed}.gguf", seed=seed, vocab_size=64, context=CONTEXT, init_std=0.6)
    return LoadedModel(f"tiny-gguf-{seed}", LlamaCppModel(path, threads=1, n_ctx=CONTEXT), tiny_tokenizer(64), path)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[LoadedModel, dict[str, Any]]]:
    """Each backend's target and what its draft and ReDrafter methods need (a second tiny model, a random head)."""
    folder = tmp_path_factory.mktemp("gguf")
    transformers = tiny_loaded("llama", 0)
    gguf = tiny_gguf_loaded(folder, 4)
    return {"transformers": (transformers, {"draft": tiny_loaded("llama", 5, layers=1), "head": random_head()}),
            "llamacpp": (gguf, {"draft": tiny_gguf_loaded(folder, 9), "head": random_head(hidden=64)})}


def methods(extras: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    draft, head = extras["draft"], extras["head"]
    return {
        "pld": ("pld", {}),
        "pld-fixed-3-branches": ("pld", {"adaptive": False, "branches": 3}),
        "lookahead-fixed": ("lookahead", {"adaptive": False}),
        "lookahead-fixed-wide-window": ("lookahead", {"adaptive": False, "window": 4, "guesses": 4}),
        "lookahead": ("lookahead", {}),
        "draft": ("draft", {"draft": draft}),
        "draft-fixed": ("draft", {"draft": draft, "adaptive": False, "num_tokens": 8}),
        "redrafter": ("redrafter", {"head": head}),
        "redrafter-fixed": ("redrafter", {"head": head, "adaptive": False, "beam_width": 4}),
        "auto": ("auto", {}),
        "auto-draft-head": ("auto", {"draft": draft, "head": head}),
    }


@pytest.mark.parametrize("backend", ["transformers", "llamacpp"])
def test_every_method_ends_at_the_context_like_ar(models, backend):
    loaded, extras = models[backend]
    assert loaded.max_context == CONTEXT
    for length in LENGTHS:
        prompt = periodic(length)
        reference = hasten.generate(loaded, prompt, "ar", max_new_tokens=64)
        assert reference.finish_reason == "length" and len(reference.token_ids) == CONTEXT - length
        for name, (method, options) in methods(extras).items():
            result = hasten.generate(loaded, prompt, method, max_new_tokens=64, **options)
            assert (result.token_ids, result.finish_reason) == (reference.token_ids, "length"), (name, length)


def test_llamacpp_prefill_with_hidden_states_equals_the_plain_prefill(models):
    """A target that wants hidden states prefills in a plain target's batches: the same logits, bit for bit, past
    64 tokens (where a pass of the last token alone rounds differently on this F16 cache) and with the prompt
    filling the context (no cell left for a pass on the side); a hidden-state row, and the cache as plain's."""
    backend = models["llamacpp"][0].backend
    for length in (90, 200, 255, CONTEXT):
        prompt = periodic(length)
        plain, hidden = backend.new_target(), backend.new_target(want_hidden=True)
        want, got = plain.start(prompt), hidden.start(prompt)
        assert torch.equal(got.logits, want.logits), length
        assert got.hidden is not None and got.hidden.shape == (1, backend.hidden_size), length
        assert hidden.cache_problems() == [] and hidden.kv_cells() == plain.kv_cells(), length
        if length < CONTEXT:  # the cells hold the same bits: the next pass scores alike
            assert torch.equal(hidden.score([5], [-1]).logits, plain.score([5], [-1]).logits), length


@pytest.mark.parametrize("backend", ["transformers", "llamacpp"])
def test_sampled_methods_end_at_the_context(models, backend):
    loaded, extras = models[backend]
    prompt = periodic(246)
    for name, (method, options) in methods(extras).items():
        result = hasten.generate(loaded, prompt, method, max_new_tokens=64, temperature=1.0, seed=3, **options)
        assert result.finish_reason in ("length", "stop"), name
        assert len(result.token_ids) == CONTEXT - 246 or result.finish_reason == "stop", name


class Bushy(Proposer):
    """Every step: ``siblings`` guesses below the root, a chain under the first, and an extra branch of
    ``extra`` tokens; records the proposals it made and the outcomes it was told."""

    name = "bushy"

    def __init__(self, siblings: int = 6, chain: int = 4, extra: int = 8) -> None:
        self.siblings, self.chain, self.extra = siblings, chain, extra
        self.proposed: list[Proposal] = []
        self.outcomes: list[StepOutcome] = []

    def propose(self, context: list[int], max_depth: int) -> Proposal:
        if max_depth <= 0:
            proposal = Proposal(TokenTree())
        else:
            guess = periodic(len(context) + max_depth)[len(context) :]  # the prompt's pattern, continued
            tokens = [*guess[: min(self.chain, max_depth)], *(52 + i for i in range(self.siblings))]  # never right
            parents = [*range(-1, min(self.chain, max_depth) - 1), *([-1] * self.siblings)]
            window = TokenTree.chain([3] * self.extra)
            proposal = Proposal(TokenTree(tokens, parents), ExtraBranch(window, [self.extra - 1]))
        self.proposed.append(proposal)
        return proposal

    def update(self, outcome: StepOutcome) -> None:
        self.outcomes.append(outcome)


class Watched:
    """A target that records, before each pass, the slots it would write and the slots it has."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.passes: list[tuple[int, int]] = []  # (cache_len + width, max_context)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)

    def score(self, tokens: list[int], parents: list[int], logits_rows: Sequence[int] | None = None) -> Scores:
        self.passes.append((self.target.cache_len + len(tokens), self.target.max_context))
        return self.target.score(tokens, parents, logits_rows)


def _run(loaded: LoadedModel, proposer: Proposer, prompt: list[int]) -> tuple[list[int], Watched]:
    target = Watched(loaded.backend.new_target())
    generation = Generation(target, proposer, prompt, 64, SamplingParams(), loaded.eos_token_ids)
    generation.prefill()
    while not generation.finished:
        layout = generation.begin_step()
        generation.end_step(target.score(layout.tokens, layout.parents, layout.logits_rows), 1.0)
    return generation.context[len(prompt) :], target


@pytest.mark.parametrize("backend", ["transformers", "llamacpp"])
def test_a_bushy_pass_is_cut_to_the_slots_left(models, backend):
    loaded = models[backend][0]
    reached = 0
    for length in (236, 244, 250, 252):  # the first pass is cut already: 1 + 4 + 12 + 8 tokens > 256 - 235
        prompt = periodic(length)
        reference, _ = _run(loaded, Proposer(), prompt)
        bushy = Bushy(siblings=12)
        tokens, target = _run(loaded, bushy, prompt)
        assert tokens == reference
        assert all(end <= limit for end, limit in target.passes), target.passes
        if len(reference) == CONTEXT - length:  # not ended early: its last passes were cut to the very end
            reached += 1
            assert any(end == limit for end, limit in target.passes), "no pass reached the end of the context"
        for proposal, outcome in zip(bushy.proposed, bushy.outcomes, strict=True):
            assert all(node < len(proposal.tree) for node in outcome.accepted_nodes)
            assert outcome.pass_width <= CONTEXT
    assert reached >= 2


def test_fit_to_room_drops_the_extra_branch_first_then_the_last_nodes():
    tree = TokenTree([5, 6, 7, 8, 9], [-1, 0, -1, 2, 1])
    prepared = PreparedTree(tree, [None, 0, 1, 2, 3])  # a forced token first, then the proposer's nodes
    extra = ExtraBranch(TokenTree.chain([4, 4, 4]), [2])
    assert fit_to_room(prepared, extra, 8) == (prepared, extra)
    assert fit_to_room(prepared, extra, 7) == (prepared, None)
    assert fit_to_room(prepared, extra, 5) == (prepared, None)
    cut, dropped = fit_to_room(prepared, extra, 3)
    assert dropped is None
    assert (cut.tree.tokens, cut.tree.parents, cut.origin) == ([5, 6, 7], [-1, 0, -1], [None, 0, 1])


def test_scored_nodes_counts_the_proposers_nodes_before_the_first_cut_one():
    # the proposer's node 0 merged into the first of two forced tokens; its nodes 1 and 3 pruned by the grammar
    prepared = PreparedTree(TokenTree([5, 6, 7, 8], [-1, 0, 1, 1]), [0, None, 2, 4])
    assert [scored_nodes(prepared, held) for held in range(5)] == [0, 2, 2, 4, None]


class Learning(Bushy):
    """A bushy proposer whose policy learns each step's tree under features of its own for every node."""

    def __init__(self) -> None:
        super().__init__(siblings=12)
        self.policy = DraftPolicy(CostModel([1, 64], [10.0, 10.0]))

    def update(self, outcome: StepOutcome) -> None:
        super().update(outcome)
        step, tree = len(self.outcomes) - 1, self.proposed[-1].tree
        assert self.policy is not None
        self.policy.learn(tree, [[("bushy", step, node)] for node in range(len(tree))], outcome)

    def learned(self, step: int) -> set[int]:
        assert self.policy is not None
        return {f[2] for f in self.policy.acceptance.rates if len(f) == 3 and f[1] == step}


def test_nodes_cut_for_the_room_are_not_learned_as_rejected(models):
    """Near the end of the context the engine cuts the bushy tree (its 12 wrong guesses below the root last):
    the proposer is told how many of its nodes were scored, and its policy records those only."""
    loaded = models["transformers"][0]
    proposer = Learning()
    _run(loaded, proposer, periodic(236))
    cut_siblings = 0
    for step, (proposal, outcome) in enumerate(zip(proposer.proposed, proposer.outcomes, strict=True)):
        tree, scored = proposal.tree, outcome.scored_nodes
        if scored is None:
            assert outcome.pass_width >= 1 + len(tree)
            scored = len(tree)
        else:  # the extra branch dropped, the tree cut to its first nodes
            assert 0 <= scored < len(tree) and outcome.pass_width == 1 + scored
            cut_siblings += sum(parent == -1 for parent in tree.parents[scored:])
        on_path = {-1, *outcome.accepted_nodes}
        assert proposer.learned(step) == {node for node in range(scored) if tree.parents[node] in on_path}
    assert cut_siblings > 0  # guesses below the root, which would have counted as rejected


@pytest.mark.parametrize("backend", ["transformers", "transformers-padded", "llamacpp"])
def test_a_pass_wider_than_the_room_left_is_refused(models, backend):
    """Each backend refuses a pass wider than the cache cells or slots left (one per token, however shallow the
    tree) with one clear error, before it writes anything; a pass that fills the context exactly runs."""
    if backend == "llamacpp":
        model = models["llamacpp"][0].backend
    else:  # transformers with eager passes, and with passes padded to a width of 16 over a static span
        pass_width = 16 if backend == "transformers-padded" else None
        model = TransformersModel(tiny_model("llama", 0), pass_width=pass_width, static_span=pass_width is not None)
    assert model.max_context == CONTEXT
    target = model.new_target()
    target.start(periodic(250))
    with pytest.raises(HastenError, match="^a pass of 11 tokens after 250 cached ones would exceed the model's "
                                          "context of 256 tokens$"):
        target.score([5] + list(range(10, 20)), [-1] + [0] * 10)  # depth 1, width 11
    scores = target.score([5] + list(range(10, 15)), [-1] + [0] * 5)  # width 6: exactly the room left
    assert tuple(scores.logits.shape) == (6, 64)
    target.commit([0, 3])
    assert target.cache_len == 252
    if backend == "llamacpp":
        assert target.cache_problems() == []  # exactly the committed cells, in order
    else:
        assert target.cached_length() == 252
    with pytest.raises(HastenError, match="a pass of 5 tokens after 252"):
        target.score([1, 2, 3, 4, 5], [-1, 0, 1, 2, 3])
    assert tuple(target.score([1, 2, 3, 4], [-1, 0, 1, 2]).logits.shape) == (4, 64)
    if backend == "llamacpp":
        target.close()
