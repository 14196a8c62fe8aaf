"""OpenAI-style error bodies (``{"error": {"message", "type", "param", "code"}}``) and the errors a request can get."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hasten.errors import HastenError
from hasten.server.limits import RETRY_AFTER_S
from hasten.server.unsupported import refusal

log = logging.getLogger("hasten.server")


class APIError(Exception):
    """An error answered to the client with an HTTP status and an OpenAI-style body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """The JSON response; a 503 (an overloaded or stopping server) says when to retry."""
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 503 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def queue_full(max_queue: int) -> APIError:
    return APIError(503, f"the server is busy: {max_queue} requests are already waiting; retry later",
                    type="server_error", code="queue_full")


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error")


def invalid_input(error: HastenError, fields: Iterable[str]) -> APIError:
    """A 400 for a request the API refused; ``param`` is the field its message names first (None if none)."""
    message = " ".join(str(error).split())
    found = [(match.start(), name) for name in fields
             if (match := re.search(rf"(?<!\w){re.escape(name)}(?!\w)", message))]
    return APIError(400, message, param=min(found)[1] if found else None)


def generation_error(error: Exception) -> APIError:
    """What the client is told when running its request raised ``error``: bad input (a ``HastenError``) is a 400;
    anything else is a bug, logged with its traceback and answered 500 (it must not kill the worker)."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, HastenError):
        return APIError(400, " ".join(str(error).split()))
    log.error("generation failed", exc_info=error)
    detail = (str(error).splitlines() or [""])[0]
    return APIError(500, f"internal error: {type(error).__name__}: {detail}", "server_error")


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """FastAPI's 422 details turned into one OpenAI-style 400 (unsupported fields first, all of them named)."""
    extra = [tuple(error["loc"][1:]) for error in errors if error.get("type") == "extra_forbidden"]
    if extra:
        message, param, code = refusal(extra)
        return APIError(400, message, param=param, code=code)
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON{f' ({detail})' if detail else ''}")
    loc = [str(part) for part in first.get("loc", ())][1:]  # drop the leading "body"
    if not loc and first.get("type") == "missing":
        return APIError(400, "the request body is empty; send a JSON object")
    if not loc:
        return APIError(400, f"the request body must be a JSON object: {first.get('msg', '')}")
    detail = str(first.get("msg", "")).removeprefix("Value error, ")
    return APIError(400, f"invalid value for '{'.'.join(loc)}': {detail}", param=loc[0])


def add_error_handlers(app: FastAPI) -> None:
    """Every error a route raises answered in the OpenAI shape: its own status for an ``APIError``, 400 for bad
    input (FastAPI's validation, a ``HastenError``), 404/405 for unknown routes, 500 (logged) for a bug."""

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
