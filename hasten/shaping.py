"""One sequence's logit shaping under speculation: penalties and a grammar, each tree node by its own path.

The verifier asks ``shape(row, path)`` for the rows it visits, where ``path`` is the drafted tokens between
the committed answer and that row, so every node sees exactly what plain decoding would have seen there.
Before the pass, ``prepare`` puts the tokens the grammar forces at the top of the tree (a near-certain draft
that needs no proposer) and prunes the drafted tokens the grammar rejects, which the target could never accept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hasten.grammar import GrammarState
from hasten.penalties import PenaltyState
from hasten.tree import ROOT, TokenTree


@dataclass
class PreparedTree:
    """The tree the target scores, and for each of its nodes the proposer's node it came from (None: forced)."""

    tree: TokenTree
    origin: list[int | None]

    @classmethod
    def as_proposed(cls, tree: TokenTree) -> PreparedTree:
        """The proposer's tree unchanged: every node its own."""
        return cls(tree, list(range(len(tree))))


class Shaper:
    """Penalties and a grammar for one sequence (either may be None). ``jump_forward`` off (``ar``: one token a
    pass, plain decoding) leaves the grammar's forced tokens to be chosen one pass each."""

    def __init__(self, penalties: PenaltyState | None = None, grammar: GrammarState | None = None,
                 jump_forward: bool = True) -> None:
        self.penalties, self.grammar, self.jump_forward = penalties, grammar, jump_forward

    def shape(self, logits: torch.Tensor, path: Sequence[int]) -> torch.Tensor:
        """One row of the target's logits as the sampler must see it ``path`` tokens past the answer."""
        row = logits.float()
        if self.penalties is not None:
            row = self.penalties.shape(row, path)
        if self.grammar is not None:
            row = row.masked_fill(~self.grammar.allowed(path, row.device), float("-inf"))
        return row

    def commit(self, tokens: Sequence[int]) -> None:
        """Tokens added to the answer."""
        if self.penalties is not None:
            self.penalties.commit(tokens)
        if self.grammar is not None:
            self.grammar.commit(tokens)

    def prepare(self, tree: TokenTree, room: int) -> PreparedTree:
        """The proposer's tree with the grammar's forced tokens first and the tokens it rejects pruned."""
        if self.grammar is None:
            return PreparedTree.as_proposed(tree)
        merged = _with_forced(tree, self.grammar.forced(room) if self.jump_forward else [])
        return self._pruned(merged)

    def _pruned(self, prepared: PreparedTree) -> PreparedTree:
        """Drop each node the grammar rejects after its parent's path, and all below it: a node is checked by its
        one token (its parent's path was checked when the parent was kept)."""
        assert self.grammar is not None
        tree = prepared.tree
        paths: dict[int, tuple[int, ...]] = {ROOT: ()}  # kept old node -> its path below the root
        kept: dict[int, int] = {ROOT: ROOT}  # old node -> new node
        tokens: list[int] = []
        parents: list[int] = []
        origin: list[int | None] = []
        rows: list[torch.Tensor] = []
        for node, (token, parent) in enumerate(zip(tree.tokens, tree.parents, strict=True)):
            above = paths.get(parent)
            if above is None or not self.grammar.accepts(above, token):
                continue
            paths[node] = (*above, token)
            kept[node] = len(tokens)
            tokens.append(token)
            parents.append(kept[parent])
            origin.append(prepared.origin[node])
            if tree.draft_probs is not None:  # drawn from p; kept only where allowed, so from p restricted there
                row = tree.draft_probs[node].float() * self.grammar.allowed(above, tree.draft_probs.device)
                rows.append(row / row.sum())
        probs = torch.stack(rows) if rows else None if tree.draft_probs is None else tree.draft_probs[:0]
        return PreparedTree(TokenTree(tokens, parents, probs), origin)


def _with_forced(tree: TokenTree, forced: list[int]) -> PreparedTree:
    """``forced`` as a chain below the root, tried first. A deterministic tree's nodes on that chain merge into
    it; a sampled tree's stay siblings (merging would change the order its siblings were drawn in)."""
    if not forced:
        return PreparedTree.as_proposed(tree)
    tokens, parents = list(forced), list(range(-1, len(forced) - 1))
    origin: list[int | None] = [None] * len(forced)
    depth_of = {ROOT: 0, **{node: node + 1 for node in range(len(forced))}}  # forced node -> depth below it
    placed: dict[int, int] = {ROOT: ROOT}
    for node, (token, parent) in enumerate(zip(tree.tokens, tree.parents, strict=True)):
        above = placed[parent]
        depth = depth_of.get(above)
        on_chain = tree.draft_probs is None and depth is not None and depth < len(forced) and forced[depth] == token
        if on_chain:
            assert depth is not None
        if on_chain:
            placed[node] = depth
            origin[depth] = node
            continue
        placed[node] = len(tokens)
        tokens.append(token)
        parents.append(above)
        origin.append(node)
    probs = None
    if tree.draft_probs is not None:
        point_masses = torch.zeros(len(forced), tree.draft_probs.shape[1], device=tree.draft_probs.device)
        point_masses[torch.arange(len(forced)), torch.tensor(forced)] = 1.0
        probs = torch.cat([point_masses, tree.draft_probs.float()])
    return PreparedTree(TokenTree(tokens, parents, probs), origin)
