"""The FastAPI application: OpenAI routes, error shapes, request counting, streaming over SSE."""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hasten.api import GenerationResult, Prompt
from hasten.errors import HastenError
from hasten.methods import METHODS
from hasten.models import LoadedModel
from hasten.server.errors import APIError, queue_full
from hasten.server.formats import Reply, sse, statistics
from hasten.server.metrics import Metrics
from hasten.server.schemas import ChatRequest, CompletionRequest, GenerationRequest
from hasten.server.worker import Closed, Delta, Failed, Finished, Job, Message, Started, Worker

log = logging.getLogger("hasten.server")

POLL_S = 0.25  # how often a waiting request checks whether its client is still there
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


class RequestCounter:
    """ASGI middleware counting every HTTP request by endpoint and response status."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
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


class Inbox:
    """Reads a job's messages; while waiting, notices a client that went away and cancels the job."""

    def __init__(self, job: Job, request: Request) -> None:
        self.job = job
        self.request = request
        self._getter: asyncio.Future[Message] | None = None

    async def next(self, watch: bool = True) -> Message:
        if self._getter is None:
            self._getter = asyncio.ensure_future(self.job.out.get())
        while True:
            done, _ = await asyncio.wait({self._getter}, timeout=POLL_S if watch else None)
            if done:
                message, self._getter = self._getter.result(), None
                return message
            if await self.request.is_disconnected():
                self.close()
                raise ClientGone

    def close(self) -> None:
        self.job.cancel()
        if self._getter is not None:
            self._getter.cancel()
            self._getter = None


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """FastAPI's 422 details turned into one OpenAI-style 400."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON{f' ({detail})' if detail else ''}")
    loc = [str(part) for part in first.get("loc", ())][1:]  # drop the leading "body"
    if not loc and first.get("type") == "missing":
        return APIError(400, "the request body is empty; send a JSON object")
    if not loc:
        return APIError(400, f"the request body must be a JSON object: {first.get('msg', '')}")
    return APIError(400, f"invalid value for '{'.'.join(loc)}': {first.get('msg', '')}", param=loc[0])


def create_app(loaded: LoadedModel, default_method: str = "pld", draft: LoadedModel | None = None,
               max_queue: int = 8, *, default_max_tokens: int = 256, model_name: str | None = None,
               method_options: dict[str, Any] | None = None) -> FastAPI:
    """An OpenAI-compatible app serving ``loaded`` (already loaded) through one worker thread.

    ``max_queue`` requests may wait while one generates; more are refused with 503 at once.
    ``method_options`` go to every proposer (e.g. ``num_tokens``); ``draft`` enables ``method="draft"``.
    """
    if default_method not in METHODS:
        raise HastenError(f"unknown method {default_method!r}; choose one of {', '.join(METHODS)}")
    if default_method == "draft" and draft is None:
        raise HastenError("--method draft needs a draft model (--draft-model PATH)")
    if default_max_tokens < 1:
        raise HastenError(f"the default max_tokens must be >= 1, got {default_max_tokens}")
    metrics = Metrics()
    worker = Worker(loaded, metrics, max_queue)
    metrics.queue_depth, metrics.running = worker.depth, worker.running
    served = model_name or loaded.name
    options = {key: value for key, value in (method_options or {}).items() if value is not None}
    if draft is not None:
        options["draft"] = draft
    started_at = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        await asyncio.to_thread(worker.stop)

    app = FastAPI(title="hasten", lifespan=lifespan)
    app.state.worker, app.state.metrics = worker, metrics
    app.add_middleware(RequestCounter, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return validation_error(list(error.errors())).response()

    @app.exception_handler(HastenError)
    async def hasten_error(request: Request, error: HastenError) -> JSONResponse:
        return APIError(400, str(error)).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        message = f"{error.detail}: {request.method} {request.url.path}"
        return APIError(error.status_code, message, code=code).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(error).__name__}", type="server_error").response()

    def make_job(body: GenerationRequest, prompts: list[Prompt], chat: bool) -> Job:
        if body.model is not None and body.model not in (served, loaded.name):
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {served!r}",
                           param="model", code="model_not_found")
        method = body.method or default_method
        if method not in METHODS:
            raise APIError(400, f"unknown method {method!r}; choose one of {', '.join(METHODS)}",
                           param="method", code="unknown_method")
        if method == "draft" and draft is None:
            raise APIError(400, "method 'draft' needs the server started with --draft-model", param="method")
        return Job(prompts=prompts, chat=chat, n=body.n, method=method,
                   sampling=body.sampling(default_max_tokens), seed=body.seed, options=options)

    async def answer(request: Request, body: GenerationRequest, job: Job) -> Any:
        job.loop = asyncio.get_running_loop()
        try:
            worker.submit(job)
        except queue.Full:
            raise queue_full(max_queue) from None
        inbox = Inbox(job, request)
        reply = Reply(chat=job.chat, model=served, method=job.method, n=job.n)
        streaming = False
        try:
            first = await inbox.next()
            if isinstance(first, Failed):
                return first.error.response()
            if body.stream:
                streaming = True  # from here on the SSE body owns the job
                return StreamingResponse(stream_events(inbox, reply, first, body.include_usage()),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            results: dict[int, GenerationResult] = {}
            message = first
            while not isinstance(message, Closed):
                if isinstance(message, Failed):
                    return message.error.response()
                if isinstance(message, Finished):
                    results[message.index] = message.result
                message = await inbox.next()
        except ClientGone:
            return JSONResponse({}, status_code=499)  # nobody reads it; /metrics counts it
        finally:
            if not streaming:
                inbox.close()  # a no-op when the job is over; cancels it if this handler was interrupted
        if len(results) != len(job.prompts) * job.n:
            raise APIError(503, "the generation was interrupted", type="server_error")
        return reply.response(results)

    async def stream_events(inbox: Inbox, reply: Reply, first: Message, include_usage: bool) -> AsyncIterator[str]:
        """The SSE body; if the client disconnects, this generator is cancelled and the job with it."""
        results: dict[int, GenerationResult] = {}
        message = first
        try:
            while not isinstance(message, Closed):
                if isinstance(message, Started) and reply.chat:
                    for index in range(len(inbox.job.prompts) * inbox.job.n):
                        yield sse(reply.chunk(index, role=True))
                elif isinstance(message, Delta):
                    yield sse(reply.chunk(message.index, message.text))
                elif isinstance(message, Finished):
                    results[message.index] = message.result
                    chunk = reply.chunk(message.index, finish_reason=message.result.finish_reason)
                    yield sse({**chunk, "hasten": statistics({message.index: message.result}, reply.method)})
                elif isinstance(message, Failed):
                    yield sse(message.error.body())
                message = await inbox.next(watch=False)
            if include_usage and results:
                yield sse(reply.usage_chunk(results))
            yield sse("[DONE]")
        finally:
            inbox.close()  # a no-op when the job is over; cancels it when the client went away

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        messages = [message.as_template_input() for message in body.messages]
        return await answer(request, body, make_job(body, [messages], chat=True))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        prompt = body.prompt
        if isinstance(prompt, str) or all(isinstance(item, int) for item in prompt):
            prompts: list[Prompt] = [prompt]
        else:
            prompts = list(prompt)
        if any(isinstance(p, str) and not p.strip() for p in prompts):
            raise APIError(400, "the prompt is empty", param="prompt")
        return await answer(request, body, make_job(body, prompts, chat=False))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list",
                "data": [{"id": served, "object": "model", "created": started_at, "owned_by": "hasten"}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": served, "default_method": default_method, "methods": list(METHODS),
                "queue_depth": worker.depth(), "max_queue": max_queue, "running": worker.running()}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
