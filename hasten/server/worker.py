"""Continuous batching on one generation thread fed by a bounded queue; results flow back to the event loop.

The thread drives a ``BatchDecoder``: every step, one shared target pass advances all active generations (the
choices of every running request). Queued requests join at the next step while the batch has room (``max_batch``
generations), finished ones leave, and a request whose client went away leaves at the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

from hasten.api import Request, TextOutput, start_generation
from hasten.batching import BatchDecoder
from hasten.engine import Generation
from hasten.errors import HastenError
from hasten.models import LoadedModel
from hasten.server.errors import generation_error, shutting_down
from hasten.server.jobs import Closed, Delta, Failed, Finished, Job, Message, Started
from hasten.server.limits import DEFAULT_MAX_BATCH
from hasten.server.metrics import Metrics

IDLE_POLL_S = 0.5  # an idle loop checks this often whether it was stopped

__all__ = ["DEFAULT_MAX_BATCH", "Worker"]


@dataclass
class Slot:
    """One choice of a job in the batch: its engine state and its text output."""

    job: Job
    index: int
    generation: Generation
    output: TextOutput
    first_token: bool = False


@dataclass
class Admitted:
    """A job taken from the queue: the choices still waiting for a slot and those in the batch."""

    job: Job
    waiting: deque[tuple[int, Request]]
    live: int = 0  # its slots in the batch

    @property
    def done(self) -> bool:
        return not self.waiting and not self.live


class Worker:
    """Runs every request on a single thread (the model is not thread-safe), up to ``max_batch`` choices at once."""

    def __init__(self, loaded: LoadedModel, metrics: Metrics, max_queue: int,
                 max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if max_queue < 1:
            raise HastenError(f"the queue must hold at least one request, got {max_queue}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise HastenError(f"the batch must hold at least one generation, got {max_batch!r}")
        self.loaded = loaded
        self.metrics = metrics
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.batch = BatchDecoder(getattr(loaded.backend, "score_many", None), isolate=True)
        self.slots: dict[int, Slot] = {}  # id(generation) -> slot
        self.admitted: list[Admitted] = []  # in arrival order
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._inline = False  # run() drives the loop on its caller's thread
        self._outbox: list[tuple[Job, Message]] = []  # a step's messages, handed over together
        self._stepping = False

    # -- lifecycle, and the request side (any thread)

    def start(self) -> None:
        """Run the loop on a thread of its own (unless ``run`` drives it already)."""
        with self._lock:
            if self._inline:
                return
            if self._thread is None or not self._thread.is_alive():
                self._stopping.clear()
                self._thread = threading.Thread(target=self._run, name="hasten-worker", daemon=True)
                self._thread.start()

    def hold(self) -> None:
        """Keep ``start`` from starting a thread: ``run`` will drive the loop."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise RuntimeError("the worker's thread is already running")
            self._inline = True

    def run(self) -> None:
        """Drive the loop on the calling thread until ``stop``.

        ``hasten serve`` calls this on the main thread: llama.cpp's OpenMP threads run a pass about 3x slower
        when it is started from another thread (measured: 31 ms against 11 ms for one token, default model).
        """
        self.hold()
        try:
            self._run()
        finally:
            self._drop_all()
            self._inline = False

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the running and queued jobs and end the thread."""
        self._stopping.set()
        for admitted in list(self.admitted):
            admitted.job.cancel()
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.post(Failed(shutting_down()))
                job.post(Closed())
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:  # a request slipped in while shutting down; the daemon thread dies with the process
            return
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue a job, or raise ``queue.Full`` at once when ``max_queue`` requests are already waiting."""
        self.start()
        job.submitted = time.perf_counter()
        self.queue.put_nowait(job)

    def depth(self) -> int:
        """Requests waiting: in the queue, or taken from it with no choice in the batch yet."""
        return self.queue.qsize() + sum(1 for a in list(self.admitted) if not a.live)

    def running(self) -> int:
        """Requests with at least one choice in the batch."""
        return sum(1 for a in list(self.admitted) if a.live)

    def batch_size(self) -> int:
        """Generations in the batch now."""
        return len(self.slots)

    # -- the loop and admission (the worker's thread from here on)

    def _run(self) -> None:
        while True:
            if not self._admit():
                return
            if not self.slots:
                continue
            self._step()

    def _admit(self) -> bool:
        """Fill free slots from the admitted jobs, then from the queue (waiting for one when idle); False to end."""
        while True:
            self._drop_cancelled()
            self._fill_slots()
            if len(self.slots) >= self.max_batch or any(a.waiting for a in self.admitted):
                return True
            idle = not self.slots and not self.admitted
            try:
                job = self.queue.get(block=idle, timeout=IDLE_POLL_S if idle else None)
            except queue.Empty:
                if not idle:
                    return True
                if self._stopping.is_set():
                    return False
                continue
            if job is None or self._stopping.is_set():
                self._drop_all()
                if job is not None:
                    self._send(job, Closed())
                return False
            self._take(job)

    def _fill_slots(self) -> None:
        """Give free slots to the admitted jobs' waiting choices, in arrival order; close the jobs that are done."""
        for admitted in list(self.admitted):
            while admitted.waiting and len(self.slots) < self.max_batch and not admitted.job.cancelled.is_set():
                self._join(admitted, *admitted.waiting.popleft())
            if admitted.done:
                self._close(admitted)

    def _take(self, job: Job) -> None:
        """Admit a job from the queue (its requests were checked before it was queued); a job whose client
        already left is closed at once."""
        if job.cancelled.is_set():
            self.metrics.count_cancelled()
            self._send(job, Closed())
            return
        self.admitted.append(Admitted(job, deque(enumerate(job.requests))))

    def _join(self, admitted: Admitted, index: int, request: Request) -> None:
        """Prefill one choice, send its first token at once and put it in the batch (a choice that token
        finishes ends at once)."""
        job = admitted.job
        try:
            generation = start_generation(self.loaded, request)
            output = TextOutput(self.loaded, request, generation)
            first = self.batch.add(generation)
        except Exception as error:
            self._abort(admitted, error)
            return
        slot = Slot(job, index, generation, output)
        self.slots[id(generation)] = slot
        admitted.live += 1
        self._deliver(slot, first, time.perf_counter())

    # -- a step and its delivery

    def _step(self) -> None:
        """One shared pass; each choice's final text goes to its own client. A choice whose step failed (its
        proposer, its pass or its verification) fails its own request; the others go on as if it were not there."""
        self.metrics.observe_step(len(self.slots), self.depth())
        try:
            out = self.batch.step()
        except Exception as error:  # the batch's own bookkeeping failed (not one choice's step): all fail
            for admitted in [a for a in self.admitted if a.live]:
                self._abort(admitted, error)
            return
        self._stepping = True
        try:
            for generation, error in self.batch.take_failed():
                slot = self.slots.get(id(generation))
                admitted = self._admitted(slot.job) if slot is not None else None
                if admitted is not None:
                    self._abort(admitted, error)
            self._deliver_step(out)
        finally:
            self._stepping = False
            self._flush()

    def _deliver_step(self, out: list[tuple[Generation, list[int]]]) -> None:
        now = time.perf_counter()
        for generation, chunk in out:
            slot = self.slots.get(id(generation))
            if slot is not None:
                self._deliver(slot, chunk, now)

    def _deliver(self, slot: Slot, chunk: list[int], now: float) -> None:
        """A choice's new tokens: their final text to its client; its end when it is over."""
        generation = slot.generation
        try:
            if not slot.first_token:
                slot.first_token = True
                self.metrics.observe_first_token(now - slot.job.submitted)
            event = slot.output.add(chunk)
            if slot.output.stopped:
                self.batch.remove(generation)
            elif event is not None and event.text:
                self._post(slot.job, Delta(slot.index, event.text, event.logprobs))
            if slot.output.stopped or generation.finished:
                self._finish(slot)
        except Exception as error:
            admitted = self._admitted(slot.job)
            if admitted is not None:
                self._abort(admitted, error)

    def _finish(self, slot: Slot) -> None:
        """A choice is over: its last text and its result, then its slot is free."""
        final = slot.output.close(slot.generation)
        self._release(slot)
        assert final.result is not None
        if final.text or final.logprobs:
            self._post(slot.job, Delta(slot.index, final.text, final.logprobs))
        self.metrics.count_generation(final.result)
        self._post(slot.job, Finished(slot.index, final.result))
        admitted = self._admitted(slot.job)
        if admitted is not None and admitted.done:
            self._close(admitted)

    # -- leaving the batch

    def _release(self, slot: Slot) -> None:
        """Take a choice out of the batch and give its cache back."""
        self.batch.remove(slot.generation)
        if self.slots.pop(id(slot.generation), None) is None:
            return
        admitted = self._admitted(slot.job)
        if admitted is not None:
            admitted.live -= 1
        close = getattr(slot.generation.target, "close", None)
        if callable(close):
            close()

    def _drop_cancelled(self) -> None:
        """Requests whose client went away leave now, freeing their slots."""
        for admitted in [a for a in self.admitted if a.job.cancelled.is_set()]:
            self._drop(admitted)
            self.metrics.count_cancelled()

    def _drop(self, admitted: Admitted) -> None:
        for slot in [s for s in self.slots.values() if s.job is admitted.job]:
            self._release(slot)
        admitted.waiting.clear()
        self._close(admitted)

    def _drop_all(self) -> None:
        for admitted in list(self.admitted):
            admitted.job.cancel()
            self._drop(admitted)

    def _abort(self, admitted: Admitted, error: Exception) -> None:
        """A request failed: its error goes to its client, its choices leave the batch."""
        for slot in [s for s in self.slots.values() if s.job is admitted.job]:
            self._release(slot)
        admitted.waiting.clear()
        self._fail_job(admitted.job, error)
        self._close(admitted)

    def _fail_job(self, job: Job, error: Exception) -> None:
        self._send(job, Failed(generation_error(error)))

    def _close(self, admitted: Admitted) -> None:
        if admitted in self.admitted:
            self.admitted.remove(admitted)
            self._send(admitted.job, Closed())

    def _admitted(self, job: Job) -> Admitted | None:
        return next((a for a in self.admitted if a.job is job), None)

    # -- messages back to the event loop

    def _post(self, job: Job, message: Message) -> None:
        """Send a piece of an answer (``Started`` first)."""
        if not job.started:
            job.started = True
            self._send(job, Started())
        self._send(job, message)

    def _send(self, job: Job, message: Message) -> None:
        """Send a message, in order; during a step ``_flush`` hands the step's messages over together."""
        self._outbox.append((job, message))
        if not self._stepping:
            self._flush()

    def _flush(self) -> None:
        """One event-loop wake-up per loop for all of a step's messages (each wake-up can stall a llama.cpp pass
        that runs meanwhile on the same cores)."""
        outbox, self._outbox = self._outbox, []
        by_loop: dict[int, tuple[asyncio.AbstractEventLoop, list[tuple[Job, Message]]]] = {}
        for job, message in outbox:
            if job.loop is None:
                job.post(message)
            else:
                by_loop.setdefault(id(job.loop), (job.loop, []))[1].append((job, message))
        for loop, messages in by_loop.values():
            try:
                loop.call_soon_threadsafe(_put_all, messages)
            except RuntimeError:  # the event loop is gone (server shutting down)
                for job, _ in messages:
                    job.cancelled.set()


def _put_all(messages: list[tuple[Job, Message]]) -> None:
    """On the event loop: each message into its own request's queue, in order."""
    for job, message in messages:
        job.out.put_nowait(message)
