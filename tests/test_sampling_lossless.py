"""Losslessness under sampling, end to end: the first tokens' joint distribution equals the target's."""

import numpy as np
import pytest
import torch
from conftest import tiny_model
from scipy.stats import chisquare

from hasten.backends import TransformersModel, TransformersTarget
from hasten.engine import DecodeStats, decode
from hasten.proposers.base import Proposer
from hasten.proposers.draft_model import DraftModelProposer
from hasten.proposers.prompt_lookup import PromptLookupProposer
from hasten.sampling import SamplingParams

VOCAB = 12
PROMPT = [3, 4, 5, 6, 7, 3, 4, 5, 6, 7, 3, 4]  # the tail "3 4" recurs, so prompt lookup drafts from step one
DRAWS = 3000


@torch.inference_mode()
def exact_joint(model, params: SamplingParams) -> np.ndarray:
    """P(first two generated tokens) computed directly from the model's processed distributions."""
    first = params.probs(model(torch.tensor([PROMPT])).logits[0, -1])
    batch = torch.tensor([PROMPT + [x] for x in range(VOCAB)])
    second = params.probs(model(batch).logits[:, -1])
    return (first[:, None] * second).double().numpy()


def sampled_joint(model, make_proposer, params: SamplingParams, seed: int) -> tuple[np.ndarray, DecodeStats]:
    generator = torch.Generator().manual_seed(seed)
    counts = np.zeros((VOCAB, VOCAB))
    stats = DecodeStats()
    target = TransformersTarget(model)
    for _ in range(DRAWS):
        chunks = decode(target, make_proposer(generator), PROMPT, 3, params, (), stats, generator)
        tokens = [t for chunk in chunks for t in chunk]
        counts[tokens[0], tokens[1]] += 1
    return counts, stats


def assert_same_distribution(counts: np.ndarray, probs: np.ndarray) -> None:
    observed, expected = counts.ravel(), probs.ravel() / probs.sum() * counts.sum()
    assert observed[expected == 0].sum() == 0
    big = expected >= 5  # pool the rare cells so the chi-square approximation holds
    if expected[~big].sum() > 0:
        observed = np.append(observed[big], observed[~big].sum())
        expected = np.append(expected[big], expected[~big].sum())
    else:
        observed, expected = observed[big], expected[big]
    result = chisquare(observed, expected)
    assert result.pvalue > 1e-3, result


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=8,
                                                                                    top_p=0.9)])
@pytest.mark.parametrize("method", ["ar", "pld", "draft"])
def test_first_tokens_follow_the_target_distribution(method, params):
    model = tiny_model("llama", 21, vocab_size=VOCAB, init_std=0.1)
    draft = tiny_model("llama", 22, vocab_size=VOCAB, layers=1, init_std=0.1)
    makers = {
        "ar": lambda gen: Proposer(),
        "pld": lambda gen: PromptLookupProposer(num_tokens=3, branches=2),
        "draft": lambda gen: DraftModelProposer(TransformersModel(draft), params, num_tokens=3, generator=gen),
    }
    counts, stats = sampled_joint(model, makers[method], params, seed=123)
    assert_same_distribution(counts, exact_joint(model, params))
    if method != "ar":  # the drafts must really have been verified, some accepted and some rejected
        assert 0 < stats.accepted_drafts < stats.drafted_tokens
