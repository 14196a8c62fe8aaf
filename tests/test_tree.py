"""Token trees: prefix merging, depths, ancestor masks and sub-trees (hand-worked examples)."""

import pytest
import torch

from hasten.tree import ROOT, TokenTree, ancestor_mask, depths_of, is_chain, merge_paths, subtree


def test_from_paths_merges_shared_prefixes():
    tree = TokenTree.from_paths([[5, 6, 7], [5, 6, 8], [5, 9], [4]])
    assert tree.tokens == [5, 6, 7, 8, 9, 4]
    assert tree.parents == [ROOT, 0, 1, 1, 0, ROOT]
    assert tree.depths() == [1, 2, 3, 3, 2, 1]
    assert tree.children() == {ROOT: [0, 5], 0: [1, 4], 1: [2, 3]}
    assert not tree.is_chain and not is_chain(tree.parents)


def test_same_token_under_different_prefixes_is_not_merged():
    tree = TokenTree.from_paths([[1, 2], [3, 2]])
    assert tree.tokens == [1, 2, 3, 2]
    assert tree.parents == [ROOT, 0, ROOT, 2]


def test_merged_nodes_keep_the_distinct_features_of_every_path_through_them():
    tree, features = merge_paths([[1, 2], [1, 3], [1, 2, 4]], [["a", "b"], ["c", "d"], ["a", "e", "f"]])
    assert (tree.tokens, tree.parents) == ([1, 2, 3, 4], [ROOT, 0, 0, 1])
    assert features == [["a", "c"], ["b", "e"], ["d"], ["f"]]
    assert merge_paths([[1, 2], [1, 3]])[1] == [[], [], []]  # no features: empty lists


def test_pass_depths_and_ancestor_mask_hand_worked():
    tree = TokenTree.from_paths([[5, 6], [5, 7], [8]])
    parents = [-1, *(p + 1 for p in tree.parents)]  # a pass: the root first, then the nodes
    assert depths_of(parents) == [0, 1, 2, 2, 1]
    assert depths_of(parents)[1:] == tree.depths()  # a node is as deep in its pass as in its tree
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
    assert torch.equal(ancestor_mask(parents), expected)
    for bad in ([0], [-1, -1], [-1, 1], [-1, 0, 3]):  # a root that is not token 0, a second root, a forward parent
        with pytest.raises(ValueError):
            depths_of(bad)


def test_subtree_renumbers_the_kept_nodes():
    tree = TokenTree([5, 6, 7, 8, 9], [ROOT, 0, ROOT, 2, 1], torch.eye(5))
    kept, old = subtree(tree, [4, 2, 0, 1])
    assert old == [0, 1, 2, 4]
    assert (kept.tokens, kept.parents) == ([5, 6, 7, 9], [ROOT, 0, ROOT, 1])
    assert torch.equal(kept.draft_probs, torch.eye(5)[[0, 1, 2, 4]])


def test_chain_and_validation():
    chain = TokenTree.chain([3, 4, 5])
    assert chain.is_chain and chain.parents == [ROOT, 0, 1]
    with pytest.raises(ValueError):
        TokenTree([1, 2], [ROOT, 1])
    with pytest.raises(ValueError):
        TokenTree([1], [ROOT, 0])
