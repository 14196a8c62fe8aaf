"""The pass layout: root, verified tree and extra branch as one tree below the root."""

from __future__ import annotations

from hasten.backends.base import tree_depths
from hasten.backends.transformers_target import ancestor_mask
from hasten.engine import pass_layout
from hasten.proposers.base import ExtraBranch, Proposal
from hasten.tree import ROOT, TokenTree


def test_chain_layout_is_plain_causal_order():
    layout = pass_layout(Proposal(TokenTree.chain([3, 4])), root=9)
    assert (layout.tokens, layout.parents, layout.logits_rows) == ([9, 3, 4], [-1, 0, 1], [0, 1, 2])


def test_tree_with_extra_branch_hand_worked():
    extra = ExtraBranch(TokenTree([20, 21], [ROOT, 0]), read_rows=[1])
    layout = pass_layout(Proposal(TokenTree.from_paths([[3], [4]]), extra), root=9)
    assert layout.tokens == [9, 3, 4, 20, 21]
    assert layout.parents == [-1, 0, 0, 0, 3]
    assert layout.logits_rows == [0, 1, 2, 4]
    assert tree_depths(layout.parents) == [0, 1, 1, 1, 2]
    expected = [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 0, 0, 1, 0],
        [1, 0, 0, 1, 1],
    ]
    assert ancestor_mask(layout.parents).int().tolist() == expected
