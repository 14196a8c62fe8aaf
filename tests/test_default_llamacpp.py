"""The real path: every method on the default model through llama.cpp equals llama.cpp's own plain decoding."""

from __future__ import annotations

import pytest

from hasten.api import generate, generate_batch

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    "Translate to French: The cat sat on the mat and looked at the bird.",
    "Write a Python function that reverses a string.",
]
METHODS = [("pld", {}), ("pld", {"adaptive": False}), ("lookahead", {}), ("lookahead", {"adaptive": False}),
           ("auto", {}), ("draft", {}), ("draft", {"adaptive": False}), ("redrafter", {}),
           ("redrafter", {"adaptive": False})]


@pytest.mark.slow
def test_every_method_equals_llamacpp_ar_on_the_default_model(default_model):
    assert default_model.backend.backend == "llamacpp"
    drafted = {}
    for prompt in PROMPTS:
        reference = generate(default_model, prompt, "ar", max_new_tokens=48).token_ids
        for method, options in METHODS:
            result = generate(default_model, prompt, method, max_new_tokens=48, **options)
            assert result.token_ids == reference, (prompt, method, options)
            if options.get("adaptive", True) is False:  # adaptive ones may rightly find nothing worth drafting
                drafted[method] = drafted.get(method, 0) + result.drafted_tokens
    assert all(count > 0 for count in drafted.values()), drafted


@pytest.mark.slow
def test_a_batch_on_the_default_model_equals_one_at_a_time(default_model):
    single = [generate(default_model, prompt, "auto", max_new_tokens=32).token_ids for prompt in PROMPTS]
    assert [r.token_ids for r in generate_batch(default_model, PROMPTS, "auto", max_new_tokens=32)] == single
