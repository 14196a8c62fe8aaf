"""The server's ASGI middlewares: request counting by endpoint and status, and the request body's size limit."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from hasten.server.errors import APIError
from hasten.server.metrics import Metrics

Receive = Callable[[], Awaitable[dict]]
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


class HTTPMiddleware:
    """An ASGI middleware that sees HTTP requests (``handle``) and passes anything else (the lifespan) through."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: dict, receive: Any, send: Any) -> None:
        raise NotImplementedError


class RequestCounter(HTTPMiddleware):
    """Counts every HTTP request by endpoint and response status."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    async def handle(self, scope: dict, receive: Any, send: Any) -> None:
        status = 500

        async def capture(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            path = scope.get("path", "")
            self.metrics.count_request(path if path in ENDPOINTS else "other", status)


class BodyLimit(HTTPMiddleware):
    """Answers 413 to a request body over ``limit`` bytes, declared or streamed, before any work."""

    def __init__(self, app: Any, limit: int) -> None:
        super().__init__(app)
        self.limit = limit

    async def handle(self, scope: dict, receive: Any, send: Any) -> None:
        declared = dict(scope.get("headers", ())).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, replaying(b"".join(chunks), receive), send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        error = APIError(413, f"the request body is larger than {self.limit} bytes", code="request_too_large")
        await error.response()(scope, receive, send)


def replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands over ``body`` as the whole request once, then ``receive``'s messages (disconnects)."""
    replayed = False

    async def replay() -> dict:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
