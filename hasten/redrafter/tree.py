"""Dynamic tree attention: merge beams that share a prefix so that each distinct prefix is verified once.

Two beam tokens become one tree node only when the *whole* prefix up to them is equal (equal tokens after
different prefixes must stay apart, or causality breaks). Vectorised: for every beam position, find the first
beam with the same prefix; the position is a new node only if that first beam is its own.
"""

from __future__ import annotations

import torch

from hasten.tree import ROOT, TokenTree


def merge_beams(beams: torch.Tensor) -> TokenTree:
    """A ``TokenTree`` (nodes in beam-major order, so the best beam's path comes first) from beams (W, L)."""
    width, length = beams.shape
    if width == 0 or length == 0:
        return TokenTree()
    same = beams[:, None, :] == beams[None, :, :]  # (W, W, L): beams i and k agree at position j
    same_prefix = same.long().cumprod(dim=-1)  # ... and at every position before it
    owner = same_prefix.argmax(dim=1)  # (W, L): the first beam with beam i's prefix through j
    own = owner == torch.arange(width)[:, None]
    node_of_flat = own.flatten().long().cumsum(0) - 1  # node index of every owned (beam, position)
    node = node_of_flat[owner * length + torch.arange(length)]  # (W, L): node of every beam token
    parent = torch.cat([torch.full((width, 1), ROOT), node[:, :-1]], dim=1)
    return TokenTree(beams[own].tolist(), parent[own].tolist())

