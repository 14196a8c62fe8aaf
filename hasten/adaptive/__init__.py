"""Speculation that pays: the target's cost curve, acceptance learned online, and the chooser of draft sizes.

One ``AdaptiveState`` lives beside each loaded model for the process's lifetime (a server's included): its
cost curve and its acceptance models, one per drafting source and decoding mode, keep learning across
generations. Each generation's proposer gets a fresh ``DraftPolicy`` over them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from hasten.adaptive.chooser import AcceptanceModel, DraftPolicy, SourceGain
from hasten.adaptive.cost import CostModel, cost_model_for
from hasten.backends.base import ModelBackend


class NamedModel(Protocol):
    """What adaptive drafting needs of a loaded model (``hasten.models.LoadedModel`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def backend(self) -> ModelBackend: ...

    @property
    def path(self) -> Path | None: ...


@dataclass
class AdaptiveState:
    """What adaptive drafting has learned about one model (``name`` says which, for the cost cache)."""

    name: str
    cost: CostModel | None = None
    acceptance: dict[tuple[str, bool], AcceptanceModel] = field(default_factory=dict)
    gains: dict[tuple[str, bool], dict[str, SourceGain]] = field(default_factory=dict)


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adaptive_state(loaded: NamedModel) -> AdaptiveState:
    """The adaptive state of ``loaded``'s model; its cost curve is calibrated, or read from disk, on first use."""
    state = _STATES.get(loaded.backend)
    if state is None:
        state = _STATES[loaded.backend] = AdaptiveState(str(loaded.path or loaded.name))
    if state.cost is None:
        threads = getattr(loaded.backend, "threads", None) or torch.get_num_threads()
        state.cost = cost_model_for(loaded.backend, state.name, threads)
    return state


def draft_policy(loaded: NamedModel, source: str, greedy: bool) -> DraftPolicy:
    """A fresh policy for one generation over the model's cost curve and the source's acceptance model."""
    state = adaptive_state(loaded)
    assert state.cost is not None
    key = (source, greedy)
    return DraftPolicy(state.cost, state.acceptance.setdefault(key, AcceptanceModel()),
                       state.gains.setdefault(key, {}))


__all__ = ["AcceptanceModel", "AdaptiveState", "CostModel", "DraftPolicy", "adaptive_state", "draft_policy"]
