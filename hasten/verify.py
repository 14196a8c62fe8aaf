"""The rejection sampler: decides which drafted tokens the target accepts.

One rule for every proposer. Given the target's logits at the root and at every tree node, walk down
from the root; at each node try its children in order:

* greedy: accept the child whose token is the target's argmax;
* sampling: accept child ``x`` with probability ``min(1, q(x) / p(x))``, where ``q`` is the target's
  processed distribution and ``p`` the distribution the child was drafted from (a point mass for a
  deterministic guess). On rejection ``q`` becomes ``norm(max(0, q - p))`` and the next sibling is tried
  (SpecInfer's multi-candidate rule); when every child is rejected, the next token is drawn from the
  residual ``q``. Every accepted path ends with one token chosen by the target itself, so a step always
  yields at least one token and the output distribution is exactly the target's, provided siblings keep
  the contract written in ``TokenTree`` (i.i.d. from ``p``, or without replacement with conditional rows).
  A drafted token with ``p(x) == 0`` in its own row is a proposer bug and raises ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from hasten.backends.base import Scores
from hasten.sampling import SamplingParams, sample, uniform
from hasten.tree import ROOT, TokenTree


class RowShaper(Protocol):
    """Reshapes one row of the target's logits given the drafted tokens on the path to it (``Shaper``)."""

    def shape(self, logits: torch.Tensor, path: Sequence[int]) -> torch.Tensor: ...


@dataclass
class Verdict:
    """Accepted node indices (root's child first) and the target's own next token."""

    accepted: list[int]
    next_token: int


def verify(
    tree: TokenTree,
    logits: Scores | torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    shaper: RowShaper | None = None,
) -> Verdict:
    """Accept a root-to-node path of ``tree``; ``logits`` has one row for the root then one per node (rows
    after those are not read), as a tensor or as the target's ``Scores``.

    Only the rows the walk visits are read: greedy takes each one's argmax (in place, where the backend reads
    rows on demand), sampling copies each visited row. With a ``shaper`` (penalties, grammar), each visited row
    is first reshaped by the tokens on its own path.
    """
    scores = logits if isinstance(logits, Scores) else Scores(logits)
    children = tree.children()
    if params.greedy and shaper is None:
        return _verify_greedy(tree, children, scores)
    rows = _ShapedRows(tree, scores, shaper)
    if params.greedy:
        return _verify_greedy_shaped(tree, children, rows)
    if generator is None:
        raise ValueError("sampling needs a generator")
    return _verify_sampling(tree, children, rows, params, generator)


class _ShapedRows:
    """The row of each tree node as the sampler sees it (reshaped by its path when there is a shaper)."""

    def __init__(self, tree: TokenTree, scores: Scores, shaper: RowShaper | None) -> None:
        self.tree, self.scores, self.shaper = tree, scores, shaper

    def __getitem__(self, node: int) -> torch.Tensor:
        row = self.scores.row(node + 1)
        if self.shaper is None:
            return row
        path: list[int] = []
        while node != ROOT:
            path.append(self.tree.tokens[node])
            node = self.tree.parents[node]
        return self.shaper.shape(row, path[::-1])


def _verify_greedy(tree: TokenTree, children: dict[int, list[int]], scores: Scores) -> Verdict:
    """The greedy walk: the argmax of each visited row (root first), never a row off the accepted path."""
    accepted: list[int] = []
    node = ROOT
    while True:
        wanted = scores.argmax(node + 1)
        match = next((c for c in children.get(node, ()) if tree.tokens[c] == wanted), None)
        if match is None:
            return Verdict(accepted, wanted)
        accepted.append(match)
        node = match


def _verify_greedy_shaped(tree: TokenTree, children: dict[int, list[int]], rows: _ShapedRows) -> Verdict:
    """The greedy walk one row at a time: each row is reshaped by its own path before its argmax."""
    accepted: list[int] = []
    node = ROOT
    while True:
        wanted = int(rows[node].argmax())
        match = next((c for c in children.get(node, ()) if tree.tokens[c] == wanted), None)
        if match is None:
            return Verdict(accepted, wanted)
        accepted.append(match)
        node = match


def _verify_sampling(
    tree: TokenTree,
    children: dict[int, list[int]],
    rows: _ShapedRows,
    params: SamplingParams,
    generator: torch.Generator,
) -> Verdict:
    accepted: list[int] = []
    node = ROOT
    while True:
        q = params.probs(rows[node])
        chosen = None
        for child in children.get(node, ()):
            token = tree.tokens[child]
            # A deterministic guess (no rows) was drafted from a point mass at its token.
            p = None if tree.draft_probs is None else tree.draft_probs[child].to(q.device, torch.float32)
            if _accepts(q, p, token, child, generator):
                chosen = child
                break
            q = _residual(q, token, p)
        if chosen is None:
            return Verdict(accepted, sample(q, generator))
        accepted.append(chosen)
        node = chosen


def _accepts(q: torch.Tensor, p: torch.Tensor | None, token: int, child: int, generator: torch.Generator) -> bool:
    """Draw the test ``u < q(x) / p(x)`` (``p`` None: a point mass at x); one device-to-host sync, which also
    brings back ``p(x)`` for the check that the proposer drew x from its row."""
    u = uniform(generator, q)
    if p is None:
        return bool(u < q[token])
    drafted, accepted = torch.stack([p[token], (u < q[token] / p[token]).float()]).tolist()
    if not drafted > 0:
        raise ValueError(f"node {child} (token {token}) has probability {drafted} in the row it was drafted "
                         "from; the proposer's draft_probs are wrong")
    return accepted > 0


def _residual(q: torch.Tensor, token: int, p: torch.Tensor | None) -> torch.Tensor:
    """``norm(max(0, q - p))``; for a point mass at ``token`` that is ``q`` without ``token``."""
    if p is None:
        rest = q.clone()
        rest[token] = 0
    else:
        rest = (q - p).clamp_min(0)
    total = rest.sum()
    # Rejection is impossible when q == p; guard against round-off leaving nothing to sample from (on the
    # device, without a sync: the division's value is discarded where the total is 0).
    return torch.where(total > 0, rest / total, q)
