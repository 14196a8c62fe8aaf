"""Issue 12, item 12: top-k/top-p without sorting the vocabulary and inverse-CDF sampling, with the same law."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import TopKLogitsWarper, TopPLogitsWarper

from hasten.sampling import SamplingParams, sample
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


def test_sampling_never_calls_multinomial(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.multinomial was called")

    monkeypatch.setattr(torch, "multinomial", refuse)
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(0.9, top_p=0.95)
    logits = torch.randn(3, 64, generator=gen)
    sample(params.probs(logits[0]), gen)
    verify(TokenTree.chain([1, 2]), logits, params, gen)


def test_sample_follows_the_distribution_and_never_draws_a_zero():
    gen = torch.Generator().manual_seed(3)
    probs = torch.tensor([0.0, 0.05, 0.0, 0.25, 0.3, 0.0, 0.4, 0.0])
    counts = Counter(sample(probs, gen) for _ in range(20000))
    observed = np.array([counts.get(i, 0) for i in range(len(probs))], dtype=float)
    assert observed[probs.numpy() == 0].sum() == 0
    keep = probs.numpy() > 0
    assert chisquare(observed[keep], probs.numpy()[keep] * 20000).pvalue > 1e-3
    assert sample(torch.tensor([0.0, 0.0, 1.0]), gen) == 2
    with pytest.raises(ValueError, match="total mass"):
        sample(torch.zeros(4), gen)
