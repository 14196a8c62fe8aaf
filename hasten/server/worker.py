"""One generation thread fed by a bounded queue; results flow back to the event loop as messages."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from hasten.api import GenerationResult, stream
from hasten.errors import HastenError
from hasten.models import LoadedModel
from hasten.server.errors import APIError
from hasten.server.metrics import Metrics

log = logging.getLogger("hasten.server")


@dataclass
class Started:
    """The first generation produced its first piece: the request is valid and under way."""


@dataclass
class Delta:
    index: int
    text: str


@dataclass
class Finished:
    index: int
    result: GenerationResult


@dataclass
class Failed:
    error: APIError


@dataclass
class Closed:
    """The job is over (finished, failed or cancelled); no message follows."""


Message = Started | Delta | Finished | Failed | Closed


@dataclass
class Job:
    """One request: ``n`` generations for each prompt (token ids, checked), choice ``i * n + j`` with seed ``seed + j``.

    ``options`` are the method's own.
    """

    prompts: list[list[int]]
    chat: bool
    n: int
    method: str
    sampling: dict[str, Any]
    seed: int | None
    options: dict[str, Any] = field(default_factory=dict)
    loop: asyncio.AbstractEventLoop | None = None
    out: asyncio.Queue[Message] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: bool = False

    def post(self, message: Message) -> None:
        """Hand a message to the request's coroutine (called from the worker thread)."""
        if self.loop is None:
            self.out.put_nowait(message)
            return
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, message)
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


class Worker:
    """Runs jobs one at a time on a single thread (the model is not thread-safe)."""

    def __init__(self, loaded: LoadedModel, metrics: Metrics, max_queue: int) -> None:
        if max_queue < 1:
            raise HastenError(f"the queue must hold at least one request, got {max_queue}")
        self.loaded = loaded
        self.metrics = metrics
        self.max_queue = max_queue
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.current: Job | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="hasten-worker", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the running and queued jobs and end the thread."""
        if self.current is not None:
            self.current.cancel()
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.post(Failed(APIError(503, "the server is shutting down", type="server_error")))
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
        self.queue.put_nowait(job)

    def depth(self) -> int:
        return self.queue.qsize()

    def running(self) -> int:
        return int(self.current is not None)

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            self.current = job
            try:
                if job.cancelled.is_set():
                    self.metrics.count_cancelled()
                else:
                    self._execute(job)
            except APIError as error:
                job.post(Failed(error))
            except HastenError as error:
                job.post(Failed(APIError(400, str(error))))
            except Exception as error:  # a bug must not kill the worker; the client gets a 500
                log.exception("generation failed")
                job.post(Failed(APIError(500, f"internal error: {type(error).__name__}: {error}", "server_error")))
            finally:
                self.current = None
                job.post(Closed())

    def _execute(self, job: Job) -> None:
        for p, tokens in enumerate(job.prompts):
            for j in range(job.n):
                if not self._generate(job, p * job.n + j, tokens, self._seed(job.seed, j)):
                    self.metrics.count_cancelled()
                    return

    def _generate(self, job: Job, index: int, tokens: list[int], seed: int | None) -> bool:
        """One choice, streamed to the job; False if the client went away first."""
        events = stream(self.loaded, tokens, job.method, seed=seed, **job.sampling, **job.options)
        try:
            for event in events:
                if job.cancelled.is_set():
                    return False
                if not job.started:
                    job.started = True
                    job.post(Started())
                if event.text:
                    job.post(Delta(index, event.text))
                if event.result is not None:
                    self.metrics.count_generation(event.result)
                    job.post(Finished(index, event.result))
        finally:
            events.close()  # frees the per-request cache at once
        return True

    @staticmethod
    def _seed(seed: int | None, j: int) -> int | None:
        return None if seed is None else (seed + j) % 2**63

