"""The llama.cpp model's prompt cache: a prefill restores the longest stored prefix and runs the rest, bit-exactly."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_gguf import write_tiny_gguf

from hasten.api import generate
from hasten.backends.llamacpp.model import LlamaCppModel
from hasten.bench.prompts import read_prompts
from hasten.models import LoadedModel

SYSTEM = [(5 * i + 2) % 90 + 4 for i in range(40)]  # a shared opening, like a chat template's system turn


def wide_model(tmp_path, **options) -> LlamaCppModel:
    """A tiny model whose head size (32) takes the default Q8_0 cache."""
    path = tmp_path / "wide-heads.gguf"
    if not path.exists():
        write_tiny_gguf(path, hidden=128, heads=4, kv_heads=2, ffn=256, context=1024, vocab_size=96, init_std=0.5)
    return LlamaCppModel(path, threads=2, **options)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    """Prompts that share the opening, some sharing more (a repeat, an extension), of 1 to 150 tokens after it."""
    rng = random.Random(seed)
    out = [SYSTEM + [rng.randrange(4, 96) for _ in range(rng.randint(1, 150))] for _ in range(count)]
    out.append(list(out[0]))  # the same prompt again
    out.append(out[1] + [7, 8, 9])  # a prompt that extends an earlier one
    out.append(out[2][:45])  # one that is a prefix of an earlier one
    return out


def prefill_then_chain(model: LlamaCppModel, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefill's last logits, and those of a three-token chain scored on the prefilled cells."""
    target = model.new_target()
    last = target.start(prompt).logits[-1].clone()
    chain = target.score([11, 12, 13], [-1, 0, 1]).logits.clone()
    target.close()
    return last, chain


def test_prefills_that_reuse_stored_prompts_give_the_same_bits(tmp_path):
    cached, plain = wide_model(tmp_path), wide_model(tmp_path, prompt_cache_bytes=0)
    assert cached.prompt_cache is not None and plain.prompt_cache is None
    for prompt in prompts(6):
        got, want = prefill_then_chain(cached, prompt), prefill_then_chain(plain, prompt)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    cache = cached.prompt_cache
    assert cache.hits == 8  # every prompt after the first shares at least the opening
    # reused: the opening for the 5 new prompts, all but the last token of the repeat, the extended prompt,
    # and the prefix prompt (short of its last token)
    all_prompts = prompts(6)
    expected = 5 * len(SYSTEM) + (len(all_prompts[0]) - 1) + len(all_prompts[1]) + 44
    assert cache.reused_tokens == expected


def test_the_cache_stays_within_its_budget_and_forgets_on_request(tmp_path):
    model = wide_model(tmp_path)
    one_prompt = model.new_target()
    one_prompt.start(SYSTEM + [5] * 60)
    entry = model.prompt_cache.bytes
    one_prompt.close()
    small = wide_model(tmp_path, prompt_cache_bytes=int(2.5 * entry))
    for prompt in prompts(6, seed=1):
        target = small.new_target()
        target.start(prompt)
        target.close()
        assert small.prompt_cache.bytes <= small.prompt_cache.budget_bytes
    assert 1 <= len(small.prompt_cache) < 9
    small.forget_prompts()
    assert len(small.prompt_cache) == 0 and small.prompt_cache.bytes == 0


def test_there_is_no_prompt_cache_where_it_would_not_be_exact(tmp_path):
    assert wide_model(tmp_path, kv_type="f16").prompt_cache is None  # F16 passes of 64+ tokens round differently
    narrow = LlamaCppModel(write_tiny_gguf(tmp_path / "narrow.gguf", hidden=64, heads=4), threads=1)
    assert narrow.kv_type == "f16" and narrow.prompt_cache is None


@pytest.mark.slow
def test_default_model_outputs_are_the_same_with_and_without_the_prompt_cache(default_model: LoadedModel):
    backend = default_model.backend
    assert backend.prompt_cache is not None
    questions = [p.turns[0] for p in read_prompts()][::4]
    references = {}
    saved, backend.prompt_cache = backend.prompt_cache, None
    try:
        for question in questions:
            references[question] = generate(default_model, question, "ar", max_new_tokens=24).token_ids
    finally:
        backend.prompt_cache = saved
    backend.forget_prompts()
    hits = backend.prompt_cache.hits
    for method in ("ar", "pld", "auto"):
        for question in questions:
            assert generate(default_model, question, method, max_new_tokens=24).token_ids == references[question]
    assert backend.prompt_cache.hits - hits == 3 * len(questions) - 1  # all but the very first prefill


def test_the_server_reports_the_prompt_cache_use(tmp_path):
    from hasten.server.metrics import Metrics

    loaded = LoadedModel("tiny", wide_model(tmp_path), tokenizer=None)
    metrics = Metrics(prompt_cache=loaded.prompt_cache_use)
    for prompt in prompts(2)[:2]:
        target = loaded.backend.new_target()
        target.start(prompt)
        target.close()
    lines = metrics.render().splitlines()
    assert "hasten_prompt_cache_hits_total 1" in lines
    assert f"hasten_prompt_cache_tokens_total {len(SYSTEM)}" in lines


def converse(model: LlamaCppModel, prompts_: list[list[int]]) -> list[list[int]]:
    """Greedy answers (prompt lookup, 3 branches) to ``prompts_`` decoded together in one batch; the whole
    conversations (prompt, answer) come back."""
    from hasten.batching import BatchDecoder
    from hasten.engine import Generation
    from hasten.proposers.prompt_lookup import PromptLookupProposer
    from hasten.sampling import SamplingParams

    batch = BatchDecoder(model.score_many)
    generations = [Generation(model.new_target(), PromptLookupProposer(6, 3, 1, 3), prompt, 30, SamplingParams())
                   for prompt in prompts_]
    for generation in generations:
        batch.add(generation)
    while batch.active:
        batch.step()
    return [generation.context for generation in generations]


def test_a_finished_conversation_serves_its_next_turn_bit_exactly(tmp_path):
    cached, plain = wide_model(tmp_path), wide_model(tmp_path, prompt_cache_bytes=0)
    openings = [prompt + prompt[len(SYSTEM):] for prompt in prompts(3, seed=2)[:3]]  # repeats: lookup drafts
    conversations = converse(cached, openings)
    assert conversations == converse(plain, openings)  # and the answers are exact, batched with the cache
    cache = cached.prompt_cache
    for opening, conversation in zip(openings, conversations, strict=True):
        assert tuple(conversation[:-1]) in cache._entries  # the whole conversation, up to the last token
        assert tuple(opening) not in cache._entries  # the prompt alone: the conversation covers it
    hits, reused = cache.hits, cache.reused_tokens
    for conversation in conversations:
        follow_up = conversation + [21, 22, 23]
        got, want = prefill_then_chain(cached, follow_up), prefill_then_chain(plain, follow_up)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert cache.hits - hits == 3 and cache.reused_tokens - reused == sum(len(c) - 1 for c in conversations)


@pytest.mark.slow
def test_default_model_second_turns_reuse_the_first_and_stay_exact(default_model: LoadedModel):
    backend = default_model.backend
    question = read_prompts()[0].turns[0]

    def two_turns(method: str) -> tuple[list[int], list[int]]:
        messages = [{"role": "user", "content": question}]
        first = generate(default_model, messages, method, max_new_tokens=24)
        messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Say it shorter."}]
        return first.token_ids, generate(default_model, messages, method, max_new_tokens=24).token_ids

    saved, backend.prompt_cache = backend.prompt_cache, None
    try:
        reference = two_turns("ar")
    finally:
        backend.prompt_cache = saved
    for method in ("ar", "pld"):
        backend.forget_prompts()
        reused = backend.prompt_cache.reused_tokens
        assert two_turns(method) == reference
        # the second prefill restored the first turn's prompt and most of its answer (re-tokenised from text)
        assert backend.prompt_cache.reused_tokens - reused > 24 + len(reference[0]) // 2
