"""Token trees: prefix merging, depths, ancestor masks (hand-worked examples)."""

import pytest
import torch

from hasten.tree import ROOT, TokenTree


def test_from_paths_merges_shared_prefixes():
    tree = TokenTree.from_paths([[5, 6, 7], [5, 6, 8], [5, 9], [4]])
    assert tree.tokens == [5, 6, 7, 8, 9, 4]
    assert tree.parents == [ROOT, 0, 1, 1, 0, ROOT]
    assert tree.depths() == [1, 2, 3, 3, 2, 1]
    assert tree.children() == {ROOT: [0, 5], 0: [1, 4], 1: [2, 3]}
    assert tree.path_to(3) == [0, 1, 3]
    assert not tree.is_chain


def test_same_token_under_different_prefixes_is_not_merged():
    tree = TokenTree.from_paths([[1, 2], [3, 2]])
    assert tree.tokens == [1, 2, 3, 2]
    assert tree.parents == [ROOT, 0, ROOT, 2]


def test_ancestor_mask_hand_worked():
    tree = TokenTree.from_paths([[5, 6], [5, 7], [8]])
    # rows/cols: root, 5, 6, 7, 8
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 0, 1, 0],
            [1, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(tree.ancestor_mask(), expected)


def test_chain_and_validation():
    chain = TokenTree.chain([3, 4, 5])
    assert chain.is_chain and chain.parents == [ROOT, 0, 1]
    with pytest.raises(ValueError):
        TokenTree([1, 2], [ROOT, 1])
    with pytest.raises(ValueError):
        TokenTree([1], [ROOT, 0])
