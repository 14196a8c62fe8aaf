"""Sampling and verification on the target's device: a device-local generator, no CPU tensor mixed with device
ones, and on the CPU the very same draws as a plain ``torch.Generator`` seeded alike."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_loaded

from hasten.api import generate
from hasten.sampling import SamplingParams, sample, uniform
from hasten.tree import TokenTree
from hasten.verify import verify

SETTINGS = [SamplingParams(1.0, seed=1), SamplingParams(0.7, top_k=5, seed=1), SamplingParams(0.9, top_p=0.8, seed=1),
            SamplingParams(0.8, top_k=20, top_p=0.9, seed=1)]


def test_a_seeded_generator_lives_on_its_device_and_draws_what_torch_seeded_alike_draws(device):
    gen = SamplingParams(1.0, seed=7).generator(device)
    assert gen.device.type == device
    reference = torch.Generator(device).manual_seed(7)
    assert torch.equal(torch.rand(16, generator=gen, device=device),
                       torch.rand(16, generator=reference, device=device))


def test_the_default_generator_is_the_cpu_one():
    assert SamplingParams(1.0, seed=3).generator().device == torch.device("cpu")


def test_uniform_draws_on_the_generators_device_and_lands_beside_the_tensor(device):
    gen = torch.Generator(device).manual_seed(0)
    like = torch.zeros(3, device=device)
    u = uniform(gen, like, (4,), torch.float64)
    assert u.device == like.device and u.dtype == torch.float64 and bool(((u >= 0) & (u < 1)).all())
    assert torch.equal(u, torch.rand(4, generator=torch.Generator(device).manual_seed(0), dtype=torch.float64,
                                     device=device))


@pytest.mark.parametrize("params", SETTINGS)
def test_processed_probabilities_stay_on_the_device_and_equal_the_cpus(params, device):
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(5)) * 3
    on_device = params.probs(logits.to(device))
    assert on_device.device.type == device
    reference = params.probs(logits)
    assert torch.equal(on_device.cpu() > 0, reference > 0), "the kept tokens differ"
    torch.testing.assert_close(on_device.cpu(), reference, atol=1e-6, rtol=1e-5)


def test_sample_returns_the_token_the_inverse_cdf_picks(device):
    """The one uniform, scaled by the total mass, lands in the token whose cumulative mass first exceeds it."""
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3], device=device)
    for seed in range(50):
        u = float(torch.rand(1, generator=torch.Generator(device).manual_seed(seed), dtype=torch.float64,
                             device=device))
        expected = 0 if u < 0.1 else 2 if u < 0.7 else 3
        if abs(u - 0.1) > 1e-6 and abs(u - 0.7) > 1e-6:  # away from float32 round-off of the edges
            assert sample(probs, torch.Generator(device).manual_seed(seed)) == expected


@pytest.mark.parametrize("params", SETTINGS)
def test_verify_on_the_device_returns_plain_ints(params, device):
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(2)).to(device)
    drafted = torch.softmax(torch.randn(2, 40, generator=torch.Generator().manual_seed(3)), -1).to(device)
    trees = [TokenTree.from_paths([[1, 2], [3]]), TokenTree.chain([int(drafted[0].argmax()),
                                                                   int(drafted[1].argmax())], drafted)]
    for tree in trees:
        gen = params.generator(device)
        for _ in range(20):
            verdict = verify(tree, logits[: len(tree) + 1], params, gen)
            assert all(type(i) is int for i in verdict.accepted) and type(verdict.next_token) is int
            assert 0 <= verdict.next_token < 40


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cpu_generator_still_samples_cuda_probabilities():
    """A caller that kept a CPU generator gets the same tokens as on the CPU (the uniform is copied over)."""
    probs = torch.tensor([0.2, 0.5, 0.3])
    on_cpu = [sample(probs, g) for g in [torch.Generator().manual_seed(4)] for _ in range(50)]
    on_cuda = [sample(probs.cuda(), g) for g in [torch.Generator().manual_seed(4)] for _ in range(50)]
    assert on_cpu == on_cuda


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["ar", "pld", "lookahead"])
def test_a_sampled_generation_runs_on_cuda_and_repeats_with_its_seed(method):
    loaded = tiny_loaded("llama", 3)
    loaded.backend.model.to("cuda")
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    runs = [generate(loaded, prompt, method, max_new_tokens=24, temperature=0.9, top_p=0.95, seed=11, chat=False)
            for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids and len(runs[0].token_ids) > 0
