"""Batched decoding: several sequences per step, ragged acceptance, joins and leaves, exact outputs."""

from __future__ import annotations

import random

import pytest
from conftest import EOS, random_prompts, tiny_loaded, tiny_tokenizer
from tiny_gguf import write_tiny_gguf

from hasten.api import generate, generate_batch
from hasten.batching import BatchDecoder
from hasten.engine import DecodeStats, Generation
from hasten.models import LoadedModel
from hasten.proposers.base import Proposer
from hasten.proposers.lookahead import LookaheadProposer
from hasten.proposers.prompt_lookup import PromptLookupProposer
from hasten.sampling import SamplingParams

GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def gguf_loaded(tmp_path_factory) -> LoadedModel:
    from hasten.backends.llamacpp.model import LlamaCppModel

    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=4, vocab_size=64, init_std=0.6)
    return LoadedModel("tiny-gguf", LlamaCppModel(path, threads=1), tiny_tokenizer(64), path)


def _models(gguf_loaded):
    return {"transformers": tiny_loaded("llama", 3, init_std=0.6), "llamacpp": gguf_loaded}


@pytest.mark.parametrize("backend", ["transformers", "llamacpp"])
@pytest.mark.parametrize("method", ["ar", "pld", "lookahead", "auto"])
def test_generate_batch_equals_one_at_a_time(gguf_loaded, backend, method):
    loaded = _models(gguf_loaded)[backend]
    prompts = [p + p for p in random_prompts(5, seed=11)]
    single = [generate(loaded, p, method, max_new_tokens=24).token_ids for p in prompts]
    batched = generate_batch(loaded, prompts, method, max_new_tokens=24)
    assert [r.token_ids for r in batched] == single
    assert all(r.method == method for r in batched)


def _fixed(kind: str) -> Proposer:
    return {"ar": Proposer, "pld": lambda: PromptLookupProposer(6, 3, 1, 3),
            "lookahead": lambda: LookaheadProposer(2, 3, 2)}[kind]()


@pytest.mark.parametrize("backend", ["transformers", "llamacpp"])
def test_mixed_methods_join_and_leave_with_ragged_acceptance(gguf_loaded, backend):
    loaded = _models(gguf_loaded)[backend]
    eos = loaded.eos_token_ids
    rng = random.Random(3)
    prompts = [p + p for p in random_prompts(8, seed=12)]
    kinds = [rng.choice(["ar", "pld", "lookahead"]) for _ in prompts]

    def fresh(i: int) -> Generation:
        return Generation(loaded.backend.new_target(), _fixed(kinds[i]), prompts[i], 30, GREEDY, eos, DecodeStats())

    alone = []
    for i in range(len(prompts)):
        generation = fresh(i)
        generation.prefill()
        while not generation.finished:
            layout = generation.begin_step()
            generation.end_step(generation.target.score(layout.tokens, layout.parents, layout.logits_rows), 1.0)
        alone.append(generation.context[len(prompts[i]):])

    batch = BatchDecoder(getattr(loaded.backend, "score_many", None))
    generations = [fresh(i) for i in range(len(prompts))]
    pending = list(range(len(prompts)))
    ragged = False
    dropped = generations[5]
    step = 0
    while pending or batch.active:
        if pending and step % 2 == 0:  # sequences arrive over time, joining a running batch
            batch.add(generations[pending.pop(0)])
        if dropped in batch.active and dropped.produced >= 3:  # one leaves mid-way (a cancelled request)
            batch.remove(dropped)
        accepted = [len(new) for _, new in batch.step()]
        ragged |= len(set(accepted)) > 1
        step += 1
    assert ragged  # in some step one sequence took more tokens than another
    for i, generation in enumerate(generations):
        out = generation.context[len(prompts[i]):]
        if generation is dropped:
            assert out == alone[i][: len(out)] and len(out) < len(alone[i])
        else:
            assert out == alone[i], (i, kinds[i])
            assert generation.finished and (len(out) == 30 or out[-1] in eos | {EOS})


def test_batch_policy_sees_the_batch_width():
    from hasten.adaptive.chooser import DraftPolicy
    from hasten.adaptive.cost import CostModel

    loaded = tiny_loaded("llama", 3, init_std=0.6)
    policies = []
    batch = BatchDecoder()
    for prompt in random_prompts(3, seed=1):
        policy = DraftPolicy(CostModel([1, 8], [10.0, 20.0]))
        policies.append(policy)
        batch.add(Generation(loaded.backend.new_target(), PromptLookupProposer(policy=policy), prompt * 2, 5,
                             GREEDY, loaded.eos_token_ids))
    batch.step()
    assert [p.batch_width for p in policies] == [2, 2, 2]
