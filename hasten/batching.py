"""Many sequences at once: every step, one target pass scores the trees of all active generations.

Each generation keeps its own proposer, cache bookkeeping, statistics and sampling state (ragged acceptance:
one may accept five tokens while its neighbour accepts none); generations join and leave between steps. A
backend that can score several sequences in one forward (``score_many``) does so; otherwise their passes run
one after another inside the step, which keeps the outputs and the bookkeeping the same.

Each generation's step has its own error boundary: one whose proposer, pass or verification raises leaves the
batch with its own error, and the others' step goes on as if it had never been there. When the shared pass
raises, each sequence's pass is run again alone, so that the error lands on the sequence that caused it.
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


def score_alone(target: Target, layout: PassLayout) -> Scores | Exception:
    """One sequence's pass after a shared pass failed: whatever that pass left pending is dropped first (an
    empty kept path; a target with nothing pending may refuse it), then the pass runs again on its own."""
    try:
        target.commit([])
    except RuntimeError:
        pass
    try:
        return target.score(layout.tokens, layout.parents, layout.logits_rows)
    except Exception as error:  # this sequence's own failure
        return error


class BatchDecoder:
    """Steps a changing set of generations together; ``score_many`` scores all their passes in one go.

    A generation whose step fails leaves the batch; with ``isolate`` its error waits in ``failed`` (for the
    caller to take) and the step returns the others' tokens, without it the step raises that error.
    """

    def __init__(self, score_many: ScoreMany | None = None, isolate: bool = False) -> None:
        self.score_many = score_many or score_one_by_one
        self.isolate = isolate
        self.active: list[Generation] = []
        self.failed: list[tuple[Generation, Exception]] = []  # generations whose step raised, and their errors
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

    def take_failed(self) -> list[tuple[Generation, Exception]]:
        """The generations that failed since the last call, each with its own error."""
        failed, self.failed = self.failed, []
        return failed

    def step(self) -> list[tuple[Generation, list[int]]]:
        """One shared pass: every active generation's new tokens; finished and failed ones leave the batch."""
        if not self.active:
            return []
        # A wide batch leaves less room for drafts: each sequence is told what the others scored last step.
        total = sum(self._widths.get(g, 1) for g in self.active)
        for generation in self.active:
            policy = getattr(generation.proposer, "policy", None)
            if isinstance(policy, DraftPolicy):
                policy.batch_width = total - self._widths.get(generation, 1)
                policy.batch_gain = len(self.active) - 1
        failed: list[tuple[Generation, Exception]] = []
        began = time.perf_counter()
        laid: list[tuple[Generation, PassLayout]] = []
        for generation in self.active:
            try:
                laid.append((generation, generation.begin_step()))
            except Exception as error:
                failed.append((generation, error))
        self._widths = {g: len(layout.tokens) for g, layout in laid}
        clock = self.active[0].clock  # the device's (every sequence of a batch is on one model)
        pass_began = clock()
        scores = self._score(laid)
        pass_ms = (clock() - pass_began) * 1000
        width = sum(len(layout.tokens) for _, layout in laid)
        out: list[tuple[Generation, list[int]]] = []
        for (generation, _), scored in zip(laid, scores, strict=True):
            if isinstance(scored, Exception):
                failed.append((generation, scored))
                continue
            try:
                out.append((generation, generation.end_step(scored, pass_ms, width)))
            except Exception as error:
                failed.append((generation, error))
        elapsed = time.perf_counter() - began
        for generation, _ in out:
            generation.stats.wall_s += elapsed
        gone = {id(g) for g, _ in failed}
        self.active = [g for g in self.active if not g.finished and id(g) not in gone]
        if failed and not self.isolate:
            raise failed[0][1]
        self.failed += failed
        return out

    def _score(self, laid: Sequence[tuple[Generation, PassLayout]]) -> list[Scores | Exception]:
        """Every laid-out pass scored together; when that raises, each alone (its own scores or its own error)."""
        if not laid:
            return []
        passes = [(g.target, layout) for g, layout in laid]
        try:
            return list(self.score_many(passes))
        except Exception:  # whose pass failed? each runs again alone, and only the culprit's fails again
            return [score_alone(target, layout) for target, layout in passes]
