"""Token trees: what every proposer hands to the verifier.

A tree hangs below the *root*, the last token of the context that is not yet in the target's KV cache.
Node ``i`` holds ``tokens[i]`` and its parent ``parents[i]`` (``-1`` for the root). Parents always come
before their children, so index order is a topological order.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

ROOT = -1


@dataclass
class TokenTree:
    """Drafted tokens as a tree below the root.

    ``draft_probs`` (one row of vocabulary probabilities per node) says which distribution each node was
    *sampled* from; ``None`` means every node is a deterministic guess (a point mass), as for n-gram,
    lookahead and beam-search drafts. The verifier is lossless only if the rows are honest:

    * a node's row is the distribution its token was actually drawn from, so ``row[token] > 0`` (a zero
      raises ``ValueError`` in ``verify``); a deterministic node in a sampled tree gets a one-hot row;
    * siblings (children of one node, tried in index order) are either drawn **i.i.d.** from one ``p``, every
      row being that ``p`` (SpecInfer), or drawn **without replacement**, each row being that sibling's
      conditional distribution: ``p`` with the earlier siblings' tokens zeroed and renormalised (recursive
      rejection sampling). Sampling without replacement but passing plain ``p`` rows biases the output.
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError("tokens and parents differ in length")
        for i, parent in enumerate(self.parents):
            if not ROOT <= parent < i:
                raise ValueError(f"node {i} has parent {parent}; parents must precede their children")
        if self.draft_probs is not None and self.draft_probs.shape[0] != len(self.tokens):
            raise ValueError("draft_probs needs one row per node")

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def chain(cls, tokens: list[int], draft_probs: torch.Tensor | None = None) -> TokenTree:
        """A single path: each token the child of the one before."""
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), draft_probs)

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]]) -> TokenTree:
        """Merge candidate continuations into one tree in which each distinct prefix appears once."""
        return merge_paths(paths)[0]

    @property
    def is_chain(self) -> bool:
        return is_chain(self.parents)

    def depths(self) -> list[int]:
        """Depth of every node, the root's children being at depth 1: as deep as in its pass (``depths_of``)."""
        return depths_of([-1] + [parent + 1 for parent in self.parents])[1:]

    def children(self) -> dict[int, list[int]]:
        """Children of every node (key ``ROOT`` for the root), in index order."""
        kids: dict[int, list[int]] = {ROOT: []}
        for i, parent in enumerate(self.parents):
            kids.setdefault(parent, []).append(i)
        return kids


def merge_paths(paths: Sequence[Sequence[int]], features: Sequence[Sequence[Hashable]] | None = None
                ) -> tuple[TokenTree, list[list[Hashable]]]:
    """Candidate continuations merged into one tree in which each distinct prefix is one node (in the order
    the paths first reach it); with ``features`` (one per token of each path), each node keeps the distinct
    features of every path through it, in that order."""
    tree = TokenTree()
    node_features: list[list[Hashable]] = []
    index: dict[tuple[int, ...], int] = {}
    for p, path in enumerate(paths):
        parent = ROOT
        for depth, token in enumerate(path):
            prefix = tuple(path[: depth + 1])
            node = index.get(prefix)
            if node is None:
                node = index[prefix] = len(tree.tokens)
                tree.tokens.append(token)
                tree.parents.append(parent)
                node_features.append([])
            if features is not None and features[p][depth] not in node_features[node]:
                node_features[node].append(features[p][depth])
            parent = node
    return tree, node_features


def subtree(tree: TokenTree, keep: Sequence[int]) -> tuple[TokenTree, list[int]]:
    """The tree of ``keep`` (node indices closed under parents, in index order) and the kept old indices."""
    keep = sorted(keep)
    new_index = {old: new for new, old in enumerate(keep)}
    parents = [ROOT if tree.parents[old] == ROOT else new_index[tree.parents[old]] for old in keep]
    probs = None if tree.draft_probs is None else tree.draft_probs[keep]
    return TokenTree([tree.tokens[old] for old in keep], parents, probs), keep


# Helpers over a parents list. A tree's own ``parents`` hang below the root (``ROOT``); a *pass* (what a target
# scores) puts the root first as token 0, its parent -1, and every other token's parent among those before it.

def is_chain(parents: Sequence[int]) -> bool:
    """True when every token's parent is the token before it (plain causal order)."""
    return all(parent == i - 1 for i, parent in enumerate(parents))


def depths_of(parents: Sequence[int]) -> list[int]:
    """Depth of every token of a pass (the root, token 0, at 0), refusing any other layout (a ``TokenTree``'s own
    nodes: ``TokenTree.depths``)."""
    out: list[int] = []
    for i, parent in enumerate(parents):
        if not -1 <= parent < i or (parent == -1) != (i == 0):
            raise ValueError(f"token {i} has parent {parent}: token 0 is the root and parents precede children")
        out.append(0 if parent == -1 else out[parent] + 1)
    return out


def ancestor_mask(parents: Sequence[int]) -> torch.Tensor:
    """Bool (n, n) over a pass: token i may attend to token j when j is i or one of its ancestors."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            mask[i] = mask[parent]
        mask[i, i] = True
    return mask
