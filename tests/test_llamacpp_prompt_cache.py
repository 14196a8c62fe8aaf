"""The llama.cpp model's prompt cache: a prefill restores the longest stored prefix and runs the rest, bit-exactly."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_gguf import write_tiny_gguf

from hasten.api import generate
from hasten.backends.llamacpp_target import LlamaCppModel
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
