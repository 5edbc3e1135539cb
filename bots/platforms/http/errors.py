"""The HTTP channel's errors: every one answers `{"error": {"code", "message"}}`, and
bodies over the limit are refused before they are read whole."""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine, MutableMapping
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from bots.core.ports import StoreUnavailable


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class BodyTooLarge(HTTPException):
    """Raised while a body is read (an HTTPException, so FastAPI's body parsing passes it on)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"The body is over {max_bytes:,} bytes.")


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def limited(retry_after: float, message: str) -> ApiError:
    wait = str(max(1, math.ceil(retry_after)))
    return ApiError(429, "rate_limited", message, {"Retry-After": wait})


class BodyLimit:
    """Refuse bodies over `max_bytes` (413), by Content-Length or as they arrive."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = error_response(413, "too_large", BodyTooLarge(self.max_bytes).detail)
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> MutableMapping[str, Any]:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counted, send)


async def api_error(_: Request, error: Exception) -> Response:
    assert isinstance(error, ApiError)
    return error_response(error.status, error.code, error.message, error.headers)


async def invalid(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    problems = error.errors()
    media_type = request.headers.get("content-type", "").partition(";")[0].strip()
    body_error = any(problem["loc"][:1] == ("body",) for problem in problems)
    if body_error and media_type != "application/json":
        return error_response(415, "unsupported_media_type", "Send JSON: application/json.")
    if any(problem["type"] == "json_invalid" for problem in problems):
        return error_response(400, "malformed_json", "The body is not valid JSON.")
    where = "; ".join(
        f"{'.'.join(str(part) for part in p['loc'])}: {p['msg']}" for p in problems[:5]
    )
    return error_response(422, "invalid_request", where)


def unreadable_json(cause: BaseException | None) -> str | None:
    """Why `json.loads` failed short of a JSONDecodeError (FastAPI's 400 has it as cause)."""
    if isinstance(cause, UnicodeDecodeError):
        return "The body is not valid JSON: it is not UTF-8."
    if isinstance(cause, RecursionError):
        return "The body is not valid JSON: it is nested too deeply."
    if isinstance(cause, ValueError):  # the only other: an integer over Python's digit limit
        return "The body is not valid JSON: a number is too long."
    return None


async def http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    if error.status_code == 400 and (message := unreadable_json(error.__cause__)):
        return error_response(400, "malformed_json", message)
    codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
    code = codes.get(error.status_code, "error")
    headers = dict(error.headers) if error.headers else {}
    if error.status_code == 405:  # name every method of the path, not one route's
        headers["Allow"] = ", ".join(allowed_methods(request))
    return error_response(error.status_code, code, str(error.detail), headers)


async def store_down(_: Request, __: Exception) -> Response:
    message = "Conversation memory is unreachable; try again shortly."
    return error_response(503, "unavailable", message, {"Retry-After": "5"})


def allowed_methods(request: Request) -> list[str]:
    path = request.url.path
    return sorted(
        {
            method
            for route in request.app.router.routes
            if isinstance(route, APIRoute) and route.path_regex.match(path)
            for method in route.methods
        }
    )


Handler = Callable[[Request, Any], Coroutine[Any, Any, Response]]
EXCEPTION_HANDLERS: dict[int | type[Exception], Handler] = {
    ApiError: api_error,
    RequestValidationError: invalid,
    HTTPException: http_error,
    StoreUnavailable: store_down,
}
"""Every error's answer, by the exception that raises it (`FastAPI(exception_handlers=...)`)."""
