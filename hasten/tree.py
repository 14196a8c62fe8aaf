"""Token trees: what every proposer hands to the verifier.

A tree hangs below the *root*, the last token of the context that is not yet in the target's KV cache.
Node ``i`` holds ``tokens[i]`` and its parent ``parents[i]`` (``-1`` for the root). Parents always come
before their children, so index order is a topological order.
"""

from __future__ import annotations

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
    def from_paths(cls, paths: list[list[int]]) -> TokenTree:
        """Merge candidate continuations into one tree in which each distinct prefix appears once."""
        tree = cls()
        index: dict[tuple[int, ...], int] = {}
        for path in paths:
            parent = ROOT
            for depth in range(len(path)):
                prefix = tuple(path[: depth + 1])
                node = index.get(prefix)
                if node is None:
                    node = len(tree.tokens)
                    index[prefix] = node
                    tree.tokens.append(path[depth])
                    tree.parents.append(parent)
                parent = node
        return tree

    @property
    def is_chain(self) -> bool:
        return all(parent == i - 1 for i, parent in enumerate(self.parents))

    def depths(self) -> list[int]:
        """Depth of every node, the root's children being at depth 1."""
        depths: list[int] = []
        for parent in self.parents:
            depths.append(1 if parent == ROOT else depths[parent] + 1)
        return depths

    def children(self) -> dict[int, list[int]]:
        """Children of every node (key ``ROOT`` for the root), in index order."""
        kids: dict[int, list[int]] = {ROOT: []}
        for i, parent in enumerate(self.parents):
            kids.setdefault(parent, []).append(i)
        return kids

    def ancestor_mask(self) -> torch.Tensor:
        """Bool (n+1, n+1) over [root, nodes...]: row i may attend to column j (j is i or an ancestor)."""
        n = len(self.tokens) + 1
        mask = torch.zeros(n, n, dtype=torch.bool)
        mask[:, 0] = True
        for i, parent in enumerate(self.parents, start=1):
            if parent != ROOT:
                mask[i] = mask[parent + 1]
            mask[i, i] = True
        mask[0, 0] = True
        return mask

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root's child down to ``node`` inclusive."""
        path = []
        while node != ROOT:
            path.append(node)
            node = self.parents[node]
        return path[::-1]
