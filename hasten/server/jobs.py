"""A request as the worker runs it (``Job``) and the messages it sends back to the request's coroutine."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from hasten.api import GenerationResult
from hasten.server.errors import APIError

__all__ = ["Closed", "Delta", "Failed", "Finished", "Job", "Message", "Started"]


@dataclass
class Started:
    """The request's first piece is ready: it is valid and under way."""


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
    submitted: float = field(default_factory=time.perf_counter)

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

    @property
    def size(self) -> int:
        return len(self.prompts) * self.n
