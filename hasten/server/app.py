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
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from hasten.api import GenerationResult, Prompt, prompt_ids
from hasten.errors import HastenError
from hasten.methods import METHODS, build_proposer, options_for
from hasten.models import LoadedModel, has_chat_template
from hasten.sampling import SamplingParams
from hasten.server.errors import APIError, add_error_handlers, invalid_input, queue_full
from hasten.server.formats import KEEPALIVE, Reply, sse, statistics
from hasten.server.jobs import Closed, Delta, Failed, Finished, Job, Message, Started, choices
from hasten.server.limits import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, KEEPALIVE_S, MAX_BODY_BYTES, MAX_GENERATIONS
from hasten.server.logprobs import TokenTexts
from hasten.server.metrics import Metrics
from hasten.server.middleware import BodyLimit, RequestCounter
from hasten.server.schemas import ChatRequest, CompletionRequest, GenerationRequest
from hasten.server.worker import Worker

log = logging.getLogger("hasten.server")

POLL_S = 0.25  # how often a waiting request checks whether its client is still there


class Inbox:
    """Reads a job's messages; while waiting, notices a client that went away and cancels the job."""

    def __init__(self, job: Job, request: Request) -> None:
        self.job = job
        self.request = request
        self._getter: asyncio.Future[Message] | None = None

    async def next(self, watch: bool = True, timeout: float | None = None) -> Message | None:
        """The next message, or None after ``timeout`` seconds without one (the wait then resumes on the next
        call). With ``watch``, a client that went away cancels the job and raises ``ClientGone``."""
        if self._getter is None:
            self._getter = asyncio.ensure_future(self.job.out.get())
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            waits = [POLL_S] if watch else []
            if deadline is not None:
                waits.append(max(0.0, deadline - loop.time()))
            done, _ = await asyncio.wait({self._getter}, timeout=min(waits, default=None))
            if done:
                message, self._getter = self._getter.result(), None
                return message
            if deadline is not None and loop.time() >= deadline:
                return None
            if watch and await self.request.is_disconnected():
                self.close()
                raise ClientGone

    def close(self) -> None:
        self.job.cancel()
        if self._getter is not None:
            self._getter.cancel()
            self._getter = None


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def create_app(loaded: LoadedModel, default_method: str = "auto", draft: LoadedModel | None = None,
               max_queue: int = DEFAULT_MAX_QUEUE, *, default_max_tokens: int = 256, model_name: str | None = None,
               method_options: dict[str, Any] | None = None, max_generations: int = MAX_GENERATIONS,
               max_tokens_limit: int | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               keepalive_s: float = KEEPALIVE_S, max_batch: int = DEFAULT_MAX_BATCH) -> FastAPI:
    """An OpenAI-compatible app serving ``loaded`` (already loaded) through one generation thread.

    The worker batches continuously: up to ``max_batch`` generations (choices of the running requests) advance
    together, one shared target pass per step; new requests join at the next step while there is room.
    ``max_queue`` requests may wait for room; more are refused at once with 503 and ``Retry-After``. One request may ask
    for at most ``max_generations`` generations (prompts x n) of at most ``max_tokens_limit`` tokens each (default
    and ceiling: the context minus 1; a request without max_tokens gets ``default_max_tokens`` within it), in a
    body of at most ``max_body_bytes`` (413 beyond). A stream waiting in the queue gets an SSE comment every
    ``keepalive_s`` seconds. ``method_options`` is one pool for all methods, each taking its own (e.g.
    ``num_tokens``); ``draft`` is the draft model of ``method="draft"``. Every method's proposer is built once
    here: the default one must build (a bad configuration fails now), another that cannot is refused per request.
    """
    if default_method not in METHODS:
        raise HastenError(f"unknown method {default_method!r}; choose one of {', '.join(METHODS)}")
    context = loaded.max_context
    for name, value in (("the default max_tokens", default_max_tokens), ("max_generations", max_generations),
                        ("max_tokens_limit", max_tokens_limit), ("max_body_bytes", max_body_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise HastenError(f"{name} must be an integer >= 1, got {value!r}")
    if not keepalive_s > 0:
        raise HastenError(f"the keep-alive interval must be > 0 seconds, got {keepalive_s!r}")
    token_cap = min(max_tokens_limit or context, context - 1)
    if token_cap < 1:
        raise HastenError(f"this model's context ({context} tokens) leaves no room to generate")
    default_max_tokens = min(default_max_tokens, token_cap)
    metrics = Metrics()
    worker = Worker(loaded, metrics, max_queue, max_batch)
    metrics.queue_depth, metrics.running, metrics.batch_size = worker.depth, worker.running, worker.batch_size
    metrics.prompt_cache = loaded.prompt_cache_use
    served = model_name or loaded.name
    pool = {key: value for key, value in (method_options or {}).items() if value is not None}
    if draft is not None:
        pool["draft"] = draft
    unavailable = _probe_methods(loaded, default_method, pool)
    texts = TokenTexts(loaded.tokenizer)
    started_at = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        await asyncio.to_thread(worker.stop)

    app = FastAPI(title="hasten", lifespan=lifespan)
    app.state.worker, app.state.metrics = worker, metrics
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(RequestCounter, metrics=metrics)  # outermost: it counts the 413s too

    add_error_handlers(app)

    async def make_job(body: GenerationRequest, prompts: list[Prompt], chat: bool) -> Job:
        """Check everything a request asks for, tokenize and prepare its generations: a queued stream must not
        fail for its input."""
        if body.model is not None and body.model not in (served, loaded.name):
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {served!r}",
                           param="model", code="model_not_found")
        method = body.method or default_method
        if method not in METHODS:
            raise APIError(400, f"unknown method {method!r}; choose one of {', '.join(METHODS)}",
                           param="method", code="unknown_method")
        if method in unavailable:
            raise APIError(400, f"method {method!r} is not available on this server: {unavailable[method]}",
                           param="method")
        param = "messages" if chat else "prompt"
        if len(prompts) * body.n > max_generations:
            raise APIError(400, f"the request asks for {len(prompts)} prompt(s) x n={body.n} generations; this server "
                                f"allows at most {max_generations} per request", param="n" if body.n > 1 else param)
        sampling = body.sampling(default_max_tokens)
        if sampling["max_new_tokens"] > token_cap:
            field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
            raise APIError(400, f"{field} is {sampling['max_new_tokens']}; this server generates at most {token_cap} "
                                f"tokens per choice (the model's context is {context} tokens)", param=field)
        if chat and not has_chat_template(loaded.tokenizer):
            raise APIError(400, f"the model {served!r} has no chat template (a base model): send raw text to "
                                "/v1/completions", param="messages", code="no_chat_template")
        try:
            ids = await asyncio.to_thread(lambda: [prompt_ids(loaded, prompt, chat) for prompt in prompts])
        except HastenError as error:  # no chat template, an id outside the vocabulary, ...
            raise APIError(400, str(error), param=param) from None
        for tokens in ids:
            if len(tokens) >= context:
                raise APIError(400, f"the prompt has {len(tokens)} tokens; this model's context is {context} tokens",
                               param=param, code="context_length_exceeded")
        options = options_for(method, pool)
        try:
            requests = await asyncio.to_thread(choices, loaded, ids, body.n, method, body.seed, **sampling, **options)
        except HastenError as error:  # a logit_bias id outside the vocabulary, a bad grammar, ...
            raise invalid_input(error, body.model_fields_set) from None
        return Job(requests=requests, chat=chat, n=body.n, method=method)

    async def answer(request: Request, body: GenerationRequest, job: Job) -> Any:
        job.loop = asyncio.get_running_loop()
        try:
            worker.submit(job)
        except queue.Full:
            raise queue_full(max_queue) from None
        inbox = Inbox(job, request)
        reply = Reply(chat=job.chat, model=served, method=job.method, n=job.n,
                      texts=texts if body.logprob_options()[0] else None)
        if body.stream:  # headers at once; from here on the SSE body owns the job
            return StreamingResponse(stream_events(inbox, reply, body.include_usage()),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results: dict[int, GenerationResult] = {}
        try:
            message = await inbox.next()
            while not isinstance(message, Closed):
                if isinstance(message, Failed):
                    return message.error.response()
                if isinstance(message, Finished):
                    results[message.index] = message.result
                message = await inbox.next()
        except ClientGone:
            return JSONResponse({}, status_code=499)  # nobody reads it; /metrics counts it
        finally:
            inbox.close()  # a no-op when the job is over; cancels it if this handler was interrupted
        if len(results) != job.size:
            raise APIError(503, "the generation was interrupted", type="server_error")
        return reply.response(results)

    async def stream_events(inbox: Inbox, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
        """The SSE body; if the client disconnects, this generator is cancelled and the job with it."""
        results: dict[int, GenerationResult] = {}
        try:
            while True:
                message = await inbox.next(watch=False, timeout=keepalive_s)
                if message is None:  # still queued (or a long step): keep the connection alive
                    yield KEEPALIVE
                elif isinstance(message, Closed):
                    break
                elif isinstance(message, Started) and reply.chat:
                    for index in range(inbox.job.size):
                        yield sse(reply.chunk(index, role=True))
                elif isinstance(message, Delta):
                    yield sse(reply.chunk(message.index, message.text, logprobs=message.logprobs))
                elif isinstance(message, Finished):
                    results[message.index] = message.result
                    chunk = reply.chunk(message.index, finish_reason=message.result.finish_reason)
                    yield sse({**chunk, "hasten": statistics({message.index: message.result}, reply.method)})
                elif isinstance(message, Failed):
                    yield sse(message.error.body())
            if include_usage and results:
                yield sse(reply.usage_chunk(results))
            yield sse("[DONE]")
        finally:
            inbox.close()  # a no-op when the job is over; cancels it when the client went away

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        messages = [message.as_template_input() for message in body.messages]
        return await answer(request, body, await make_job(body, [messages], chat=True))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        prompt = body.prompt
        if isinstance(prompt, str) or all(isinstance(item, int) for item in prompt):
            prompts: list[Prompt] = [prompt]
        else:
            prompts = list(prompt)
        if any(isinstance(p, str) and not p.strip() for p in prompts):
            raise APIError(400, "the prompt is empty", param="prompt")
        return await answer(request, body, await make_job(body, prompts, chat=False))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list",
                "data": [{"id": served, "object": "model", "created": started_at, "owned_by": "hasten"}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": served, "default_method": default_method,
                "methods": [method for method in METHODS if method not in unavailable],
                "queue_depth": worker.depth(), "max_queue": max_queue, "running": worker.running(),
                "batch_size": worker.batch_size(), "max_batch": max_batch}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def _probe_methods(loaded: LoadedModel, default_method: str, pool: dict[str, Any]) -> dict[str, str]:
    """Build every method's proposer once with the server's options: the default must build (else HastenError);
    the others that cannot are returned with the reason, to be refused per request."""
    unavailable: dict[str, str] = {}
    for method in METHODS:
        try:
            build_proposer(method, loaded, SamplingParams(), None, **options_for(method, pool))
        except HastenError as error:
            if method == default_method:
                raise HastenError(f"method {method!r} cannot run on {loaded.name!r}: {error}") from error
            unavailable[method] = str(error)
        except Exception as error:  # a bug in a method nobody asked for must not stop the server
            if method == default_method:
                raise
            log.warning("method %r is unavailable: %s: %s", method, type(error).__name__, error)
            unavailable[method] = f"it failed to build ({type(error).__name__})"
    return unavailable
