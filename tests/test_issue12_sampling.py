"""Issue 12, items 3 and 4: temperatures below a floor are greedy; sampling uses a private generator."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy_reference, random_prompts, tiny_loaded
from fastapi.testclient import TestClient

from hasten.api import generate
from hasten.sampling import MIN_TEMPERATURE, SamplingParams
from hasten.server import create_app
from hasten.tree import TokenTree
from hasten.verify import verify

# Item 3: temperatures below the floor are greedy.


@pytest.mark.parametrize("temperature", [0.0, 5e-324, 1e-46, 1e-40, 1e-38, 1e-30, 1e-6, 9.99e-6])
def test_temperature_below_the_floor_is_greedy(temperature):
    params = SamplingParams(temperature=temperature, top_p=0.9)
    assert params.greedy
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(0)) * 5
    probs = params.probs(logits)
    assert not probs.isnan().any()
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 100).float())
    tree = TokenTree.chain([int(logits[0].argmax()), 7])
    verdict = verify(tree, logits, params)  # the greedy walk: no generator needed
    assert verdict.accepted == [0] and verdict.next_token == int(logits[1].argmax())


def test_temperature_at_the_floor_samples_without_nan():
    params = SamplingParams(temperature=MIN_TEMPERATURE, top_k=5, top_p=0.9)
    assert not params.greedy
    probs = params.probs(torch.randn(49152, generator=torch.Generator().manual_seed(1)) * 30)
    assert torch.isfinite(probs).all() and abs(float(probs.sum()) - 1) < 1e-5


def test_tiny_temperature_generates_the_greedy_answer():
    loaded = tiny_loaded("llama", 2)
    for prompt in random_prompts(2, seed=5):
        text = generate(loaded, prompt, "ar", max_new_tokens=10, temperature=1e-40).token_ids
        assert text == greedy_reference(loaded.model, prompt, 10)


def test_the_server_answers_a_tiny_temperature_greedily():
    """It used to answer 500 (NaN probabilities in multinomial)."""
    loaded = tiny_loaded("llama", 3)
    prompt = random_prompts(1, seed=7)[0]
    with TestClient(create_app(loaded, "pld")) as client:
        for temperature in (1e-40, 5e-324, 1e-6):
            body = {"prompt": prompt, "max_tokens": 6, "temperature": temperature}
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == generate(loaded, prompt, "ar", max_new_tokens=6).text


# Item 4: a private generator.


def test_generator_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(4)
    for params in (SamplingParams(1.0), SamplingParams(0.0), SamplingParams(0.7, seed=3)):
        torch.manual_seed(0)
        params.generator()
        assert torch.equal(torch.rand(4), expected), params


def test_unseeded_sampled_generation_leaves_the_global_rng_alone():
    loaded = tiny_loaded("llama", 2)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    generate(loaded, random_prompts(1, seed=6)[0], "pld", max_new_tokens=8, temperature=1.0)
    assert torch.equal(torch.get_rng_state(), state)


def test_generators_are_seeded_or_fresh():
    seeded = [SamplingParams(1.0, seed=11).generator() for _ in range(2)]
    assert torch.equal(torch.rand(5, generator=seeded[0]), torch.rand(5, generator=seeded[1]))
    fresh = [SamplingParams(1.0).generator() for _ in range(2)]
    assert not torch.equal(torch.rand(5, generator=fresh[0]), torch.rand(5, generator=fresh[1]))
