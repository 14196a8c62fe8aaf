"""The rejection sampler: greedy walk, exact-distribution sampling and the sibling contract of sampled trees
(statistical, fixed seeds)."""

from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import TopKLogitsWarper, TopPLogitsWarper

from hasten.errors import HastenError
from hasten.sampling import SamplingParams, sample
from hasten.tree import TokenTree
from hasten.verify import verify

V = 6


def one_hot_logits(rows: list[int]) -> torch.Tensor:
    logits = torch.full((len(rows), V), -5.0)
    for i, token in enumerate(rows):
        logits[i, token] = 5.0
    return logits


def test_greedy_accepts_longest_matching_path_and_adds_the_target_token():
    tree = TokenTree.from_paths([[1, 2, 3], [1, 4], [5]])  # nodes: 1, 2, 3, 4, 5
    # argmax at root -> 1, at node "1" -> 4, at node "4" -> 0
    logits = one_hot_logits([1, 4, 0, 0, 0, 0])
    verdict = verify(tree, logits, SamplingParams())
    assert [tree.tokens[i] for i in verdict.accepted] == [1, 4]
    assert verdict.next_token == 0


def test_greedy_full_match_keeps_the_bonus_token():
    tree = TokenTree.chain([1, 2])
    verdict = verify(tree, one_hot_logits([1, 2, 3]), SamplingParams())
    assert [tree.tokens[i] for i in verdict.accepted] == [1, 2] and verdict.next_token == 3


def test_greedy_no_match_and_empty_tree():
    assert verify(TokenTree.chain([2]), one_hot_logits([1, 0]), SamplingParams()).accepted == []
    verdict = verify(TokenTree(), one_hot_logits([4]), SamplingParams())
    assert verdict.accepted == [] and verdict.next_token == 4


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"temperature": float("nan")}],
)
def test_invalid_sampling_parameters_are_refused(kwargs):
    with pytest.raises(HastenError):
        SamplingParams(**kwargs)


def test_processed_distribution_matches_transformers_warpers():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.8)
    warped = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(20)(None, logits / 0.7))
    torch.testing.assert_close(params.probs(logits), warped.softmax(-1))


def _check_distribution(samples: list[int], probs: torch.Tensor, alpha: float = 1e-3) -> None:
    counts = Counter(samples)
    expected = probs.double().cpu().numpy() * len(samples)
    observed = np.array([counts.get(i, 0) for i in range(len(expected))], dtype=float)
    assert observed[expected == 0].sum() == 0, "a token outside the target's support was emitted"
    keep = expected > 0
    result = chisquare(observed[keep], expected[keep] * observed[keep].sum() / expected[keep].sum())
    assert result.pvalue > alpha, (observed, expected)


def _emitted(tree: TokenTree, verdict) -> list[int]:
    return [tree.tokens[i] for i in verdict.accepted] + [verdict.next_token]


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_p=0.9)])
def test_point_mass_tree_sampling_is_exact(params, device):
    """Deterministic guesses (n-grams, beams): first and second emitted tokens follow the target exactly."""
    gen = torch.Generator(device).manual_seed(1)
    logits = torch.randn(V + 1, V, generator=gen, device=device)
    tree = TokenTree.from_paths([[0, 1], [0, 2], [3], [4, 5]])  # nodes: 0, 1, 2, 3, 4, 5
    firsts, seconds_after_0 = [], []
    for _ in range(6000):
        out = _emitted(tree, verify(tree, logits, params, gen))
        firsts.append(out[0])
        if out[0] == 0:
            seconds_after_0.append(out[1])
    _check_distribution(firsts, params.probs(logits[0]))
    _check_distribution(seconds_after_0, params.probs(logits[1]))  # node "0" is row 1


def test_sampled_chain_draft_is_exact(device):
    """A chain drafted by sampling from p: min(1, q/p) acceptance and residual resampling give q."""
    params = SamplingParams(temperature=1.0)
    gen = torch.Generator(device).manual_seed(2)
    logits = torch.randn(3, V, generator=gen, device=device)
    draft_probs = torch.softmax(torch.randn(2, V, generator=gen, device=device), -1)
    firsts, seconds = [], {}
    for _ in range(8000):
        drafted = [int(torch.multinomial(draft_probs[i], 1, generator=gen)) for i in range(2)]
        tree = TokenTree.chain(drafted, draft_probs)
        out = _emitted(tree, verify(tree, logits, params, gen))
        firsts.append(out[0])
        if out[0] == drafted[0] and len(out) > 1:
            seconds.setdefault(drafted[0], []).append(out[1])
    _check_distribution(firsts, params.probs(logits[0]))
    # Given the first token was the accepted draft, the second follows q at that node.
    token, follow = max(seconds.items(), key=lambda item: len(item[1]))
    _check_distribution(follow, params.probs(logits[1]))


# Sibling drafts: each node's row must be the distribution its token was drawn from (chi-square, fixed seeds).

Q = torch.tensor([0.1, 0.2, 0.3, 0.4])  # the target's distribution at the root
P = torch.tensor([0.5, 0.3, 0.15, 0.05])  # the draft's
DRAWS = 20000
PARAMS = SamplingParams(temperature=1.0)


def without(p: torch.Tensor, token: int) -> torch.Tensor:
    rest = p.clone()
    rest[token] = 0
    return rest / rest.sum()


def first_token_pvalue(draw_siblings, seed: int, device: str = "cpu") -> float:
    """Chi-square p-value of the first emitted token against Q, two sampled siblings below the root."""
    gen = torch.Generator(device).manual_seed(seed)
    logits = Q.to(device).log().expand(3, -1)  # every row is Q
    counts = np.zeros(len(Q))
    for _ in range(DRAWS):
        tokens, rows = draw_siblings(gen)
        tree = TokenTree(tokens, [-1, -1], torch.stack(rows))
        verdict = verify(tree, logits, PARAMS, gen)
        counts[tree.tokens[verdict.accepted[0]] if verdict.accepted else verdict.next_token] += 1
    return chisquare(counts, Q.double().numpy() / float(Q.double().sum()) * DRAWS).pvalue


def iid(gen):
    p = P.to(gen.device)
    return [sample(p, gen), sample(p, gen)], [p, p]


def without_replacement_conditional_rows(gen):
    p = P.to(gen.device)
    first = sample(p, gen)
    rest = without(p, first)
    return [first, sample(rest, gen)], [p, rest]


def without_replacement_plain_rows(gen):  # breaks the contract
    p = P.to(gen.device)
    first = sample(p, gen)
    return [first, sample(without(p, first), gen)], [p, p]


def test_iid_siblings_are_exact(device):
    assert first_token_pvalue(iid, 1, device) > 1e-3


def test_siblings_without_replacement_with_conditional_rows_are_exact(device):
    assert first_token_pvalue(without_replacement_conditional_rows, 2, device) > 1e-3


def test_siblings_without_replacement_with_plain_rows_are_detected_as_biased(device):
    assert first_token_pvalue(without_replacement_plain_rows, 3, device) < 1e-6


def test_a_token_with_zero_probability_in_its_row_is_refused():
    """It used to become a point mass silently, hiding the proposer's bug."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.stack([P, without(P, 2)])
    tree = TokenTree([1, 2], [-1, -1], rows)  # node 1 drew token 2 from a row where token 2 has no mass
    logits = torch.full((3, 4), -10.0)
    logits[:, 3] = 10.0  # the target never wants tokens 1 or 2, so both siblings get tried
    with pytest.raises(ValueError, match="node 1"):
        verify(tree, logits, PARAMS, gen)


def test_one_hot_rows_and_no_rows_are_the_same_point_mass_rule():
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(4))
    tree = TokenTree.from_paths([[2, 3], [4]])  # nodes 2, 3, 4
    one_hot = TokenTree(tree.tokens, tree.parents, torch.nn.functional.one_hot(torch.tensor(tree.tokens), 6).float())
    for seed in range(200):
        a = verify(tree, logits, PARAMS, torch.Generator().manual_seed(seed))
        b = verify(one_hot, logits, PARAMS, torch.Generator().manual_seed(seed))
        assert (a.accepted, a.next_token) == (b.accepted, b.next_token)
