"""An optional drafting source that must earn its cost: gate it, time it, credit it.

A beam search, a draft model's chain or lookahead's window costs time every step it runs; the tokens only it
finds must be worth that time. ``CostlySource`` is one such source inside one proposer: it asks the policy's
shared record (``SourceGain``) whether to run this step, measures what the run cost, and credits the record
with the accepted tokens the source earned. Without a policy it always runs and records nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from hasten.adaptive.chooser import DraftPolicy


class CostlySource:
    """One optional source in one generation, ``name`` being its record's key in the policy
    (``DraftPolicy.gain``, shared by generations); it also keeps what it earned in this generation alone."""

    def __init__(self, name: str, judged_locally: bool = True) -> None:
        self.name = name
        self.cost_ms: float | None = None  # what running it cost this step; None while it has not run
        self.earned = (0.0, 0)  # accepted tokens credited and runs begun in this generation
        # whether this generation's own runs weigh in (``SourceGain.pays``): not where a run's tokens come many
        # steps later (lookahead's window fills the pool its guesses are drawn from), so a generation's first runs
        # cannot judge it
        self.judged_locally = judged_locally

    def restart(self) -> None:
        """A new generation: what it earns here is counted from nothing (the shared record stays)."""
        self.cost_ms, self.earned = None, (0.0, 0)

    def should_run(self, policy: DraftPolicy | None, cost_ms: float | None = None,
                   ceiling: float | None = None) -> bool:
        """Whether to run it this step: always without a policy, else while its tokens have paid its cost.

        ``cost_ms`` is its cost when that is known in advance (a window's extra pass width); a source that is
        timed instead (``timed``) passes none, and its recorded mean cost is weighed. ``ceiling`` is the most
        tokens one run could ever earn (``SourceGain.pays``).
        """
        self.cost_ms = None
        local = self.earned if self.judged_locally else None
        if policy is not None and not policy.gain(self.name).pays(policy.cost(1), cost_ms, ceiling, local):
            return False
        self.cost_ms = cost_ms
        if policy is not None:  # a run counts from its start: one never credited earned nothing
            self.earned = (self.earned[0], self.earned[1] + 1)
        return True

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Measure one run: its wall time becomes this step's cost."""
        began = time.perf_counter()
        yield
        self.cost_ms = (time.perf_counter() - began) * 1000

    def credit(self, policy: DraftPolicy | None, tokens: int) -> None:
        """Record what this step's run earned (accepted tokens owed to it); nothing if it did not run."""
        if policy is not None and self.cost_ms is not None:
            policy.gain(self.name).record(tokens, self.cost_ms)
            self.earned = (self.earned[0] + tokens, self.earned[1])
        self.cost_ms = None
