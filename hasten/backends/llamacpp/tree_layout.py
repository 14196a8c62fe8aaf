"""How a token tree is laid out for llama.cpp: one sequence id per leaf.

A token carries the id of every leaf below it, so each sequence is one root-to-leaf path, and a token attends
exactly to the cache and its own ancestors. A chain needs no ids beyond sequence 0. After a pass, the path that
is kept lies whole in one sequence (``kept_path_sequence``), from which it is committed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from hasten.tree import depths_of, is_chain


class PassPlan(NamedTuple):
    """A validated pass: which rows to output and, for a tree, where each token sits and which ids it carries."""

    rows: Sequence[int]  # the output rows asked for, in the order asked
    depths: list[int] | None  # each token's depth below the root; None for a chain
    sequences: list[list[int]] | None  # each token's sequence ids (``tree_sequences``); None for a chain
    n_sequences: int  # 1 for a chain
    depth: int  # the deepest token's depth


def tree_sequences(parents: Sequence[int]) -> tuple[list[list[int]], int]:
    """Sequence ids of a pass: leaf j (in index order) is sequence j, and a token carries the ids of every leaf
    below it, ascending. Returns (ids per token, number of sequences). A chain is one sequence, 0."""
    depths_of(parents)  # validates
    n = len(parents)
    has_child = [False] * n
    for parent in parents[1:]:
        has_child[parent] = True
    seqs: list[list[int]] = [[] for _ in range(n)]
    leaf = 0
    for i in range(n):
        if not has_child[i]:
            node = i
            while node != -1:
                seqs[node].append(leaf)
                node = parents[node]
            leaf += 1
    return seqs, leaf


def plan_pass(tokens: Sequence[int], parents: Sequence[int], logits_rows: Sequence[int] | None) -> PassPlan:
    """Validate a pass (tokens, one parent each, output rows in range) and lay it out."""
    n = len(tokens)
    if n == 0 or len(parents) != n:
        raise ValueError("a pass needs tokens and one parent per token")
    rows: Sequence[int] = range(n) if logits_rows is None else [int(row) for row in logits_rows]
    if rows and (min(rows) < 0 or max(rows) >= n):
        raise ValueError(f"logits_rows must lie in [0, {n})")
    if is_chain(parents):
        return PassPlan(rows, None, None, 1, n - 1)
    depths = depths_of(parents)
    sequences, n_sequences = tree_sequences(parents)
    return PassPlan(rows, depths, sequences, n_sequences, max(depths))


def kept_path_sequence(sequences: Sequence[Sequence[int]], keep: Sequence[int]) -> int:
    """The sequence that holds the whole kept path: that of the first leaf below its last node (0 if none)."""
    return sequences[keep[-1]][0] if keep else 0


def check_kept_path(parents: Sequence[int], keep: Sequence[int]) -> None:
    """Refuse a ``keep`` that is not a path down from the root of the pass with these ``parents``."""
    if keep and (keep[0] != 0 or max(keep) >= len(parents)
                 or any(parents[b] != a for a, b in zip(keep, keep[1:], strict=False))):
        raise ValueError(f"keep {list(keep)} is not a path down from the root of the last pass")


__all__ = ["PassPlan", "check_kept_path", "kept_path_sequence", "plan_pass", "tree_sequences"]
