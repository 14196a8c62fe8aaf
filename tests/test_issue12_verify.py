"""Issue 12, item 5: the sibling contract of sampled trees, checked by chi-square (fixed seeds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from hasten.sampling import SamplingParams, sample
from hasten.tree import TokenTree
from hasten.verify import verify

Q = torch.tensor([0.1, 0.2, 0.3, 0.4])  # the target's distribution at the root
P = torch.tensor([0.5, 0.3, 0.15, 0.05])  # the draft's
DRAWS = 20000
PARAMS = SamplingParams(temperature=1.0)


def without(p: torch.Tensor, token: int) -> torch.Tensor:
    rest = p.clone()
    rest[token] = 0
    return rest / rest.sum()


def first_token_pvalue(draw_siblings, seed: int) -> float:
    """Chi-square p-value of the first emitted token against Q, two sampled siblings below the root."""
    gen = torch.Generator().manual_seed(seed)
    logits = Q.log().expand(3, -1)  # every row is Q
    counts = np.zeros(len(Q))
    for _ in range(DRAWS):
        tokens, rows = draw_siblings(gen)
        tree = TokenTree(tokens, [-1, -1], torch.stack(rows))
        verdict = verify(tree, logits, PARAMS, gen)
        counts[tree.tokens[verdict.accepted[0]] if verdict.accepted else verdict.next_token] += 1
    return chisquare(counts, Q.double().numpy() / float(Q.double().sum()) * DRAWS).pvalue


def iid(gen):
    return [sample(P, gen), sample(P, gen)], [P, P]


def without_replacement_conditional_rows(gen):
    first = sample(P, gen)
    rest = without(P, first)
    return [first, sample(rest, gen)], [P, rest]


def without_replacement_plain_rows(gen):  # breaks the contract
    first = sample(P, gen)
    return [first, sample(without(P, first), gen)], [P, P]


def test_iid_siblings_are_exact():
    assert first_token_pvalue(iid, seed=1) > 1e-3


def test_siblings_without_replacement_with_conditional_rows_are_exact():
    assert first_token_pvalue(without_replacement_conditional_rows, seed=2) > 1e-3


def test_siblings_without_replacement_with_plain_rows_are_detected_as_biased():
    assert first_token_pvalue(without_replacement_plain_rows, seed=3) < 1e-6


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
