"""Many sequences at once: every step, one target pass scores the trees of all active generations.

Each generation keeps its own proposer, cache bookkeeping, statistics and sampling state (ragged acceptance:
one may accept five tokens while its neighbour accepts none); generations join and leave between steps. A
backend that can score several sequences in one forward (``score_many``) does so; otherwise their passes run
one after another inside the step, which keeps the outputs and the bookkeeping the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from hasten.adaptive.chooser import DraftPolicy
from hasten.backends.base import Scores, Target
from hasten.engine import Generation, PassLayout

ScoreMany = Callable[[Sequence[tuple[Target, PassLayout]]], list[Scores]]


def score_one_by_one(passes: Sequence[tuple[Target, PassLayout]]) -> list[Scores]:
    """The fallback: each sequence's pass on its own target."""
    return [target.score(layout.tokens, layout.parents, layout.logits_rows) for target, layout in passes]


class BatchDecoder:
    """Steps a changing set of generations together; ``score_many`` scores all their passes in one go."""

    def __init__(self, score_many: ScoreMany | None = None) -> None:
        self.score_many = score_many or score_one_by_one
        self.active: list[Generation] = []
        self._widths: dict[Generation, int] = {}  # tokens each sequence scored in the last step

    def add(self, generation: Generation) -> list[int]:
        """Prefill now and join at the next step; the prefill's new token (a generation it finishes stays out)."""
        first = generation.prefill()
        if not generation.finished:
            self.active.append(generation)
        return first

    def remove(self, generation: Generation) -> None:
        """Leave now (a cancelled request); its cache goes with it."""
        if generation in self.active:
            self.active.remove(generation)

    def step(self) -> list[tuple[Generation, list[int]]]:
        """One shared pass: every active generation's new tokens; finished ones leave the batch."""
        if not self.active:
            return []
        # A wide batch leaves less room for drafts: each sequence is told what the others scored last step.
        total = sum(self._widths.get(g, 1) for g in self.active)
        for generation in self.active:
            policy = getattr(generation.proposer, "policy", None)
            if isinstance(policy, DraftPolicy):
                policy.batch_width = total - self._widths.get(generation, 1)
                policy.batch_gain = len(self.active) - 1
        began = time.perf_counter()
        layouts = [generation.begin_step() for generation in self.active]
        self._widths = {g: len(layout.tokens) for g, layout in zip(self.active, layouts, strict=True)}
        clock = self.active[0].clock  # the device's (every sequence of a batch is on one model)
        pass_began = clock()
        scores = self.score_many([(g.target, layout) for g, layout in zip(self.active, layouts, strict=True)])
        pass_ms = (clock() - pass_began) * 1000
        width = sum(len(layout.tokens) for layout in layouts)
        out = [(g, g.end_step(s, pass_ms, width)) for g, s in zip(self.active, scores, strict=True)]
        elapsed = time.perf_counter() - began
        for generation, _ in out:
            generation.stats.wall_s += elapsed
        self.active = [g for g in self.active if not g.finished]
        return out
