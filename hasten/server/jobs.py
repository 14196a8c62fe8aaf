"""A request as the worker runs it (``Job``) and the messages it sends back to the request's coroutine."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from hasten.api import GenerationResult, Request, TokenLogprob, make_request
from hasten.models import LoadedModel
from hasten.server.errors import APIError

__all__ = ["Closed", "Delta", "Failed", "Finished", "Job", "Message", "Started", "choices"]


@dataclass
class Started:
    """The request's first piece is ready: it is valid and under way."""


@dataclass
class Delta:
    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens behind the text, when asked for


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
    """One request: ``n`` generations for each prompt; ``requests[i * n + j]`` (checked, tokenized) is choice
    ``j`` of prompt ``i``."""

    requests: list[Request]
    chat: bool
    n: int
    method: str
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
        return len(self.requests)


def choices(loaded: LoadedModel, prompts: list[list[int]], n: int, method: str, seed: int | None,
            **kwargs: Any) -> list[Request]:
    """Every generation of a request, choice ``j`` of prompt ``i`` at ``i * n + j`` with seed ``seed + j``; each
    prompt is checked (and its constraint compiled) once, so a bad request fails here, before it is queued."""
    requests = []
    for tokens in prompts:
        first = make_request(loaded, tokens, method, seed=seed, **kwargs)
        requests.append(first)
        for j in range(1, n):
            params = replace(first.params, seed=None if seed is None else (seed + j) % 2**63)
            requests.append(replace(first, params=params))
    return requests
