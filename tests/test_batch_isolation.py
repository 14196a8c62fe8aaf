"""Per-request error boundaries: in a batch, a request whose proposer, pass or verification fails fails alone,
with its own error, and the others finish exactly as they would have alone (in ``BatchDecoder`` and the server)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from conftest import random_prompts, tiny_loaded

import hasten
from hasten.backends.base import Scores, Target
from hasten.batching import BatchDecoder, score_one_by_one
from hasten.engine import DecodeStats, Generation, PassLayout
from hasten.models import LoadedModel
from hasten.proposers.base import Proposal, Proposer, StepOutcome
from hasten.proposers.prompt_lookup import PromptLookupProposer
from hasten.sampling import SamplingParams
from hasten.server import worker as worker_module
from hasten.server.jobs import Closed, Failed, Finished, Job, Message, choices
from hasten.server.metrics import Metrics
from hasten.server.worker import Worker

GREEDY = SamplingParams()


class ProposerBug(Exception):
    """The synthetic failure of a proposer."""


class FailingProposer(PromptLookupProposer):
    """Prompt lookup that raises in ``propose`` (or ``update``) at its ``at``-th step."""

    def __init__(self, at: int, where: str = "propose") -> None:
        super().__init__(num_tokens=4)
        self.at, self.where, self.steps = at, where, 0

    def propose(self, context: list[int], max_depth: int) -> Proposal:
        self.steps += 1
        if self.where == "propose" and self.steps == self.at:
            raise ProposerBug(f"propose failed at step {self.steps}")
        return super().propose(context, max_depth)

    def update(self, outcome: StepOutcome) -> None:
        if self.where == "update" and self.steps == self.at:
            raise ProposerBug(f"update failed at step {self.steps}")
        super().update(outcome)


class PassBug(Exception):
    """The synthetic failure of one sequence's pass."""


class FailingTarget:
    """A target whose passes raise from the ``at``-th on, before they touch the cache (as a guard does)."""

    def __init__(self, target: Target, at: int) -> None:
        self.target, self.at, self.passes = target, at, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)

    def score(self, tokens: list[int], parents: list[int], logits_rows: Sequence[int] | None = None) -> Scores:
        self.passes += 1
        if self.passes >= self.at:
            raise PassBug(f"pass {self.passes} failed (from pass {self.at} on)")
        return self.target.score(tokens, parents, logits_rows)


def shared_all_or_nothing(passes: Sequence[tuple[Target, PassLayout]]) -> list[Scores]:
    """A shared pass that fails as a whole when any sequence's pass would (each checked before any is run)."""
    for target, _ in passes:
        if isinstance(target, FailingTarget) and target.passes + 1 >= target.at:
            raise PassBug("the shared pass failed")
    return score_one_by_one(passes)


def _alone(loaded: LoadedModel, proposer: Proposer, prompt: list[int], max_new: int) -> list[int]:
    generation = Generation(loaded.backend.new_target(), proposer, prompt, max_new, GREEDY, loaded.eos_token_ids)
    generation.prefill()
    while not generation.finished:
        layout = generation.begin_step()
        generation.end_step(generation.target.score(layout.tokens, layout.parents, layout.logits_rows), 1.0)
    return generation.context[len(prompt) :]


Culprit = Callable[[LoadedModel, list[int]], Generation]


def _culprits() -> dict[str, tuple[Culprit, type[Exception]]]:
    def generation(loaded: LoadedModel, prompt: list[int], proposer: Proposer, at: int = 0) -> Generation:
        target = loaded.backend.new_target()
        return Generation(FailingTarget(target, at) if at else target, proposer, prompt, 40, GREEDY,
                          loaded.eos_token_ids, DecodeStats())

    return {
        "propose": (lambda loaded, prompt: generation(loaded, prompt, FailingProposer(3)), ProposerBug),
        "update": (lambda loaded, prompt: generation(loaded, prompt, FailingProposer(3, "update")), ProposerBug),
        "pass": (lambda loaded, prompt: generation(loaded, prompt, PromptLookupProposer(4), at=3), PassBug),
    }


@pytest.mark.parametrize("shared", [None, shared_all_or_nothing], ids=["one-by-one", "all-or-nothing"])
@pytest.mark.parametrize("where", ["propose", "update", "pass"])
def test_a_failing_generation_leaves_the_batch_alone(shared, where):
    loaded = tiny_loaded("llama", 3, init_std=0.6)
    prompts = [p + p for p in random_prompts(3, seed=21)]
    alone = [_alone(loaded, PromptLookupProposer(4), p, 40) for p in prompts]
    make, error_type = _culprits()[where]
    batch = BatchDecoder(shared, isolate=True)
    innocent = [Generation(loaded.backend.new_target(), PromptLookupProposer(4), p, 40, GREEDY, loaded.eos_token_ids)
                for p in prompts]
    culprit = make(loaded, prompts[1])
    for generation in (innocent[0], culprit, innocent[1], innocent[2]):
        batch.add(generation)
    failed: list[tuple[Generation, Exception]] = []
    while batch.active:
        out = batch.step()
        failed += batch.take_failed()
        if failed:  # it left at once, with no tokens from the step that failed
            assert culprit not in batch.active and all(g is not culprit for g, _ in out)
    assert [(g, type(e)) for g, e in failed] == [(culprit, error_type)]
    assert "3" in str(failed[0][1])  # its own error, from its third step
    assert culprit.produced >= 3  # the prefill's token and at least one from each of its two good steps
    assert [g.context[len(p) :] for g, p in zip(innocent, prompts, strict=True)] == alone


def test_without_isolation_the_step_raises_the_culprits_own_error():
    loaded = tiny_loaded("llama", 3, init_std=0.6)
    prompts = [p + p for p in random_prompts(2, seed=22)]
    batch = BatchDecoder(shared_all_or_nothing)
    target = FailingTarget(loaded.backend.new_target(), 2)
    batch.add(Generation(loaded.backend.new_target(), Proposer(), prompts[0], 20, GREEDY))
    batch.add(Generation(target, Proposer(), prompts[1], 20, GREEDY))
    batch.step()
    with pytest.raises(PassBug, match="from pass 2 on"):  # its own pass's error, not the shared pass's
        batch.step()


# -- the server: the review's two requests in one batch, and one that fails beside an innocent one

def _messages(job: Job, timeout: float = 60.0) -> list[Message]:
    """Every message of a finished job (waiting until it is closed)."""
    messages: list[Message] = []
    deadline = time.monotonic() + timeout
    while not any(isinstance(m, Closed) for m in messages):
        assert time.monotonic() < deadline, "the job did not close"
        while not job.out.empty():
            messages.append(job.out.get_nowait())
        time.sleep(0.01)
    return messages


def _serve_together(loaded: LoadedModel, jobs: list[Job]) -> list[list[Message]]:
    """Run the jobs in one worker, queued before its loop starts so that they share the batch."""
    worker = Worker(loaded, Metrics(), max_queue=4, max_batch=4)
    for job in jobs:
        worker.queue.put_nowait(job)
    worker.start()
    try:
        return [_messages(job) for job in jobs]
    finally:
        worker.stop()


def _tokens(messages: list[Message]) -> list[int]:
    assert not any(isinstance(m, Failed) for m in messages), messages
    (finished,) = [m for m in messages if isinstance(m, Finished)]
    return finished.result.token_ids


def test_the_reviews_two_requests_finish_each_as_it_would_alone():
    loaded = tiny_loaded("llama", 0)
    long_prompt, short_prompt = [(7 * i) % 50 + 2 for i in range(240)], [3, 4, 5, 6]
    solo_short = hasten.generate(loaded, short_prompt, "ar", max_new_tokens=64).token_ids
    solo_long = hasten.generate(loaded, long_prompt, "ar", max_new_tokens=64)
    jobs = [Job(choices(loaded, [short_prompt], 1, "ar", None, max_new_tokens=64), False, 1, "ar"),
            Job(choices(loaded, [long_prompt], 1, "lookahead", None, max_new_tokens=64), False, 1, "lookahead")]
    short, long = _serve_together(loaded, jobs)
    assert _tokens(short) == solo_short and len(solo_short) == 64
    assert _tokens(long) == solo_long.token_ids and len(solo_long.token_ids) == 16
    assert [m.result.finish_reason for m in long if isinstance(m, Finished)] == ["length"]


def test_a_failing_request_fails_alone_in_the_server(monkeypatch):
    loaded = tiny_loaded("llama", 0)
    innocent_prompt, culprit_prompt = [3, 4, 5, 6], [7, 8, 9, 10, 7, 8, 9]
    solo = hasten.generate(loaded, innocent_prompt, "pld", max_new_tokens=48, adaptive=False).token_ids
    real_start = worker_module.start_generation

    def start_generation(loaded: LoadedModel, request: Any) -> Generation:
        generation = real_start(loaded, request)
        if request.ids == culprit_prompt:
            generation.proposer = FailingProposer(4)
        return generation

    monkeypatch.setattr(worker_module, "start_generation", start_generation)
    jobs = [Job(choices(loaded, [prompt], 1, "pld", None, max_new_tokens=48, adaptive=False), False, 1, "pld")
            for prompt in (innocent_prompt, culprit_prompt)]
    innocent, culprit = _serve_together(loaded, jobs)
    assert _tokens(innocent) == solo
    errors = [m.error for m in culprit if isinstance(m, Failed)]
    assert len(errors) == 1 and "propose failed at step 4" in str(errors[0].body())
    assert not any(isinstance(m, Finished) for m in culprit)
