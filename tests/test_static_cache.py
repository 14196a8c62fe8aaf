"""The transformers backend's static KV cache, padded pass widths and CUDA graphs.

On the CPU: every row of a pass against a fresh full forward over its path (chains, trees, non-prefix commits,
truncation, many steps), padded passes against unpadded ones, and a row's bits at a fixed width whatever the
other rows hold. Tests marked ``cuda`` run only where torch sees a GPU.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from conftest import EOS, random_prompts, tiny_model

from hasten.backends import TransformersModel
from hasten.backends.transformers.pass_inputs import PassInputs
from hasten.backends.transformers.static_kv import TreeMask, padded_ancestor_mask
from hasten.engine import DecodeStats, Generation
from hasten.proposers.base import Proposer
from hasten.proposers.lookahead import LookaheadProposer
from hasten.proposers.prompt_lookup import PromptLookupProposer
from hasten.sampling import SamplingParams

GREEDY = SamplingParams()
cuda = pytest.mark.cuda


def _path(parents: list[int], node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def _random_tree(rng: random.Random, size: int, vocab: int) -> tuple[list[int], list[int]]:
    parents = [-1] + [rng.randrange(i) for i in range(1, size)]
    return [rng.randrange(2, vocab) for _ in range(size)], parents


@torch.inference_mode()
def _full_logits(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.parametrize("options", [{}, {"pass_width": 8, "static_span": True}], ids=["plain", "padded-static"])
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_every_row_equals_a_full_forward_over_its_path(arch, options):
    """Trees of random shapes, committed along random paths (prefixes or not), with truncations between."""
    model = tiny_model(arch, 2)
    target = TransformersModel(model, **options).new_target()
    rng = random.Random(5)
    context = [rng.randrange(2, 64) for _ in range(7)]
    target.start(context[:-1])
    for step in range(14):
        tokens, parents = _random_tree(rng, rng.randrange(1, 7), 64)
        tokens[0] = context[-1]
        rows = sorted(rng.sample(range(len(tokens)), rng.randrange(1, len(tokens) + 1)))
        scores = target.score(tokens, parents, rows)
        for got, row in zip(scores.logits, rows, strict=True):
            path = [tokens[i] for i in _path(parents, row)]
            torch.testing.assert_close(got, _full_logits(model, context[:-1] + path), atol=2e-4, rtol=1e-4)
        keep = _path(parents, rng.randrange(len(tokens)))
        target.commit(keep)
        context = context[:-1] + [tokens[i] for i in keep] + [rng.randrange(2, 64)]
        if step % 5 == 4:  # roll back two tokens, as a draft model does
            target.truncate(target.cache_len - 2)
            context = context[: target.cache_len] + [rng.randrange(2, 64)]
        assert target.cache_len == target.cached_length() == len(context) - 1


def _generate(backend: TransformersModel, proposer: Proposer, prompt: list[int], new: int = 40) -> list[int]:
    generation = Generation(backend.new_target(), proposer, prompt, new, GREEDY, {EOS}, DecodeStats())
    generation.prefill()
    while not generation.finished:
        layout = generation.begin_step()
        target = generation.target
        generation.end_step(target.score(layout.tokens, layout.parents, layout.logits_rows), 1.0)
    return generation.context[len(prompt):]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_padded_passes_give_the_greedy_output_of_unpadded_ones(arch):
    model = tiny_model(arch, 3, init_std=0.6)
    plain, padded = TransformersModel(model), TransformersModel(model, pass_width=16, static_span=True)
    assert plain.pass_width is None and padded.pass_width == 16
    for prompt in random_prompts(4, seed=11):
        for make in (Proposer, lambda: PromptLookupProposer(6, 3, 1, 3), lambda: LookaheadProposer(2, 4, 2)):
            assert _generate(padded, make(), prompt) == _generate(plain, make(), prompt)


def test_a_rows_logits_do_not_depend_on_the_other_rows_at_a_fixed_width():
    """At one padded width, the root's and a shared child's logits are the same bits whatever their siblings."""
    backend = TransformersModel(tiny_model("llama", 4), pass_width=8, static_span=True)
    prompt = random_prompts(1, seed=2)[0]
    outputs = []
    for siblings in ([], [9], [9, 10, 11], [30, 31, 32, 33, 34, 35]):
        target = backend.new_target()
        target.start(prompt[:-1])
        tokens = [prompt[-1], 5] + siblings
        scores = target.score(tokens, [-1, 0] + [0] * len(siblings), [0, 1])
        outputs.append(scores.logits)
        target.commit([0])
    for other in outputs[1:]:
        assert torch.equal(other, outputs[0])


def test_the_cache_is_allocated_once_and_reused_by_the_next_target():
    backend = TransformersModel(tiny_model("llama", 0))
    first = backend.new_target()
    first.start([3, 4, 5])
    storage = first.cache.kv.data_ptr()
    first.score([6, 7, 8], [-1, 0, 0])
    first.commit([0, 2])  # not a prefix: only row 2 moves
    assert first.cache.kv.data_ptr() == storage and first.cache_len == 5
    del first
    second = backend.new_target()
    second.start([9, 10])
    assert second.cache.kv.data_ptr() == storage


def test_ancestor_mask_pads_rows_that_see_only_themselves():
    mask = padded_ancestor_mask([-1, 0, 0, 1], width=6)
    assert mask.tolist()[3] == [True, True, False, True, False, False]
    assert mask[4].nonzero().flatten().tolist() == [4] and mask[5].nonzero().flatten().tolist() == [5]


def test_tree_positions_do_not_outlive_their_pass_in_the_slot_positions():
    """``slot_positions`` (what sliding-window layers compare) hold a pass's tree positions only while its block
    is open: they return to each slot's own position when a wider pass regrows the rows, and on a reset."""
    mask = TreeMask(16, torch.float32, torch.device("cpu"), rows=1)
    parents = [-1, 0, 0, 2]  # positions 4, 5, 5, 6 from cache length 4
    mask.update(4, padded_ancestor_mask(parents, 4), torch.tensor([4, 5, 5, 6]))
    # commit the path 0, 2, 3 (not a prefix): slots 4, 5, 6 now hold positions 4, 5, 6; a wider pass follows
    mask.update(7, padded_ancestor_mask([-1, 0, 1, 2, 3], 5), torch.tensor([7, 8, 9, 10, 11]))
    assert mask.slot_positions[:7].tolist() == list(range(7))
    mask.reset()  # the next sequence's prefill reads the positions before any pass writes them
    assert torch.equal(mask.slot_positions, torch.arange(16))


def test_staging_waits_for_the_copies_on_its_own_devices_stream(monkeypatch):
    """The event that guards the pinned host buffers is recorded on the stream of the buffers' device, where the
    non-blocking copies queue, not on the current device's (another GPU with ``--device cuda:1``). No GPU here:
    the event and the streams are stand-ins, the buffers stay on the host."""
    recorded = []

    class Event:
        def record(self, stream=None):
            recorded.append(stream)

        def synchronize(self):
            pass

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", device))
    inputs = PassInputs(torch.device("cpu"), rows=4)
    inputs.device, inputs._copied = torch.device("cuda", 1), Event()
    inputs.stage([1, 2], [5, 6], [5, 6], torch.ones(2, 2, dtype=torch.bool), [1])
    inputs.stage_moves([6], [5])
    assert recorded == [("stream of", torch.device("cuda", 1))] * 2


def test_graphs_are_refused_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from hasten.errors import HastenError

    with pytest.raises(HastenError, match="CUDA"):
        TransformersModel(tiny_model("llama", 0), graphs=True)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_equals_eager_on_cuda(dtype):
    model = tiny_model("llama", 3, init_std=0.6).to("cuda", dtype)
    graphed = TransformersModel(model, pass_width=16, graphs=True)
    eager = TransformersModel(model, pass_width=16, graphs=False)
    assert graphed.graphs and not eager.graphs and eager.static_span
    rng = random.Random(1)
    targets = [graphed.new_target(), eager.new_target()]
    for target in targets:
        target.start([5, 6, 7, 8])
    for _ in range(12):
        tokens, parents = _random_tree(rng, rng.randrange(1, 12), 64)
        keep = _path(parents, rng.randrange(len(tokens)))
        results = [target.score(tokens, parents).logits for target in targets]
        assert torch.equal(results[0], results[1])
        for target in targets:
            target.commit(keep)


@cuda
@needs_cuda
@pytest.mark.slow
@pytest.mark.parametrize("method", ["pld", "lookahead", "auto", "draft", "redrafter"])
def test_greedy_methods_equal_ar_in_bf16_on_cuda(method):
    """The default model dequantized to bf16 on CUDA: every greedy method's tokens equal ar's."""
    import hasten
    from hasten.bench import read_prompts

    loaded = hasten.load_model(os.environ.get("HASTEN_CUDA_MODEL", "default"), device="cuda")
    assert loaded.dtype == torch.bfloat16 and loaded.backend.pass_width is not None
    for prompt in read_prompts(None)[:7]:
        text = prompt.turns[0]
        reference = hasten.generate(loaded, text, "ar", max_new_tokens=64).token_ids
        got = hasten.generate(loaded, text, method, max_new_tokens=64).token_ids
        assert got == reference, (method, text[:40])


@cuda
@needs_cuda
def test_graphs_without_a_static_span_are_refused_on_cuda():
    from hasten.errors import HastenError

    with pytest.raises(HastenError, match="static_span"):
        TransformersModel(tiny_model("llama", 0).to("cuda"), graphs=True, static_span=False)
