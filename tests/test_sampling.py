"""Sampling: the processed distribution (temperature, top-k, top-p) equals transformers' without sorting the
vocabulary, draws follow it by inverse CDF, temperatures below a floor are greedy, and the generator is private."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import greedy_reference, random_prompts, tiny_loaded
from fastapi.testclient import TestClient
from scipy.stats import chisquare
from transformers import TopKLogitsWarper, TopPLogitsWarper

from hasten import sampling
from hasten.api import generate
from hasten.sampling import MIN_TEMPERATURE, SamplingParams, sample
from hasten.server import create_app
from hasten.tree import TokenTree
from hasten.verify import verify


def old_probs(params: SamplingParams, logits: torch.Tensor) -> torch.Tensor:
    """``SamplingParams.probs`` as it was at 84bf9c1 (full sort for top-p): the reference for the new one."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits.softmax(-1)


def warped(params: SamplingParams, logits: torch.Tensor) -> torch.Tensor:
    """transformers' own processing: temperature, TopKLogitsWarper, TopPLogitsWarper, softmax."""
    scores = logits.float() / params.temperature
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    return scores.softmax(-1)


def assert_same(new: torch.Tensor, reference: torch.Tensor) -> None:
    assert torch.equal(new > 0, reference > 0), "the kept tokens differ"
    torch.testing.assert_close(new, reference, atol=1e-7, rtol=1e-5)


SETTINGS = list(itertools.product((0.3, 1.0, 2.5), (0, 1, 5, 40, 2000), (0.05, 0.5, 0.9, 0.99, 0.999999, 1.0)))


@pytest.mark.parametrize("vocab", [7, 50, 1000])
def test_probs_equal_the_old_implementation_and_transformers(vocab):
    gen = torch.Generator().manual_seed(vocab)
    for (temperature, top_k, top_p), scale in itertools.product(SETTINGS, (1.0, 4.0)):
        params = SamplingParams(temperature, top_k, top_p)
        logits = torch.randn(3, vocab, generator=gen) * scale
        assert_same(params.probs(logits), warped(params, logits))
        if top_p != 0.999999:  # beyond float32 resolution: the old cumsum from the top dropped tokens it should keep
            assert_same(params.probs(logits), old_probs(params, logits))


def test_probs_equal_transformers_warpers_on_a_full_vocabulary():
    """On 49152 tokens the old float32 cumsum from the top missed a token now and then; transformers does not."""
    gen = torch.Generator().manual_seed(0)
    for (temperature, top_k, top_p), scale in itertools.product(SETTINGS, (1.0, 4.0)):
        params = SamplingParams(temperature, top_k, top_p)
        logits = torch.randn(2, 49152, generator=gen) * scale
        assert_same(params.probs(logits), warped(params, logits))


@pytest.mark.parametrize("vocab", [10, 300, 1000])
def test_ties_are_kept_as_transformers_keeps_them(vocab):
    """Integer logits: many ties at the k-th value (all kept) and inside the nucleus (only their number matters)."""
    gen = torch.Generator().manual_seed(vocab)
    for temperature, top_k, top_p in itertools.product((0.5, 1.0, 1.7), (0, 1, 3, 40), (0.13, 0.37, 0.71, 1.0)):
        params = SamplingParams(temperature, top_k, top_p)
        logits = torch.randint(-4, 4, (3, vocab), generator=gen).float()
        new, reference = params.probs(logits), warped(params, logits)
        if top_p == 1.0:
            assert_same(new, reference)
        else:  # which of the tied tokens at the nucleus' edge stay is the sort's choice, in both
            torch.testing.assert_close(new.sort(-1).values, reference.sort(-1).values, atol=1e-7, rtol=1e-5)


def test_top_p_does_not_sort_the_vocabulary(monkeypatch):
    sizes: list[int] = []
    tensor_sort, torch_sort = torch.Tensor.sort, torch.sort

    def recording(function):
        def sort(tensor, *args, **kwargs):
            sizes.append(tensor.shape[-1])
            return function(tensor, *args, **kwargs)
        return sort

    monkeypatch.setattr(torch.Tensor, "sort", recording(tensor_sort))
    monkeypatch.setattr(torch, "sort", recording(torch_sort))
    logits = torch.randn(49152, generator=torch.Generator().manual_seed(2)) * 3
    for top_k, top_p in ((0, 0.9), (0, 0.99), (50, 0.9)):
        SamplingParams(0.8, top_k, top_p).probs(logits)
    assert sizes and max(sizes) < 49152 // 8, sizes


def bincount_nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``sampling._nucleus`` as it was at 525553e, bin masses from ``torch.bincount`` with weights (not
    deterministic on CUDA): the reference the deterministic one must match bit for bit on the CPU."""
    probs = logits.double().softmax(-1)
    bins = ((logits.max() - logits) / sampling._BIN).clamp_(max=sampling._BINS - 1).long()
    mass = torch.bincount(bins, weights=probs, minlength=sampling._BINS).cumsum(0)
    edge = min(int(torch.searchsorted(mass, top_p)), sampling._BINS - 1)
    above = float(mass[edge - 1]) if edge else 0.0
    band = (bins == edge).nonzero().squeeze(-1)
    values, order = probs[band].sort(descending=True)
    keep = sampling._before(values.cumsum(0), above) < top_p
    return torch.cat([(bins < edge).nonzero().squeeze(-1), band[order[keep]]])


def test_top_p_gives_the_bits_bincount_gave_on_the_cpu(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randn(49152, generator=gen) * scale for scale in (0.5, 1.0, 3.0, 8.0, 30.0) for _ in range(4)]
    rows += [torch.randint(-6, 6, (5000,), generator=gen).float() for _ in range(4)]  # ties inside every bin
    settings = [SamplingParams(temperature, 0, top_p) for temperature in (0.3, 1.0, 2.5)
                for top_p in (0.05, 0.5, 0.9, 0.99, 0.999999)]
    new = [params.probs(row) for params in settings for row in rows]
    monkeypatch.setattr(sampling, "_nucleus", bincount_nucleus)
    old = [params.probs(row) for params in settings for row in rows]
    assert all(torch.equal(a, b) for a, b in zip(new, old, strict=True))
    assert sum(int((row > 0).sum()) for row in new) > 10 * len(new)  # wide nuclei, not a few tokens each


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_top_p_is_deterministic_on_cuda():
    logits = torch.randn(4, 49152, generator=torch.Generator().manual_seed(6)).cuda() * 3
    params = SamplingParams(0.8, 0, 0.9)
    torch.use_deterministic_algorithms(True)  # bincount with weights would raise here: it adds atomically
    try:
        first = params.probs(logits)
        assert all(torch.equal(params.probs(logits), first) for _ in range(5))
    finally:
        torch.use_deterministic_algorithms(False)
    assert_same(first.cpu(), warped(params, logits.cpu()))


def test_sampling_never_calls_multinomial(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.multinomial was called")

    monkeypatch.setattr(torch, "multinomial", refuse)
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(0.9, top_p=0.95)
    logits = torch.randn(3, 64, generator=gen)
    sample(params.probs(logits[0]), gen)
    verify(TokenTree.chain([1, 2]), logits, params, gen)


def test_sample_follows_the_distribution_and_never_draws_a_zero(device):
    gen = torch.Generator(device).manual_seed(3)
    expected = np.array([0.0, 0.05, 0.0, 0.25, 0.3, 0.0, 0.4, 0.0])
    probs = torch.tensor(expected, dtype=torch.float32, device=device)
    counts = Counter(sample(probs, gen) for _ in range(20000))
    observed = np.array([counts.get(i, 0) for i in range(len(probs))], dtype=float)
    assert observed[expected == 0].sum() == 0
    keep = expected > 0
    assert chisquare(observed[keep], expected[keep] * 20000).pvalue > 1e-3
    assert sample(torch.tensor([0.0, 0.0, 1.0], device=device), gen) == 2
    with pytest.raises(ValueError, match="total mass"):
        sample(torch.zeros(4, device=device), gen)


# Temperatures below the floor are greedy.


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


# Sampling draws from a private generator.


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
