"""The HTTP channel's web application: the integrations' API and the web chat widget.

Every conversation is scoped to the integration whose API key asks: the same id under
another integration is another conversation. Replies stream as Server-Sent Events and
run on when the connection drops; `GET …/replies/{id}` with `Last-Event-ID` reads on.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations,
# some of which are local to `create_app`, at run time.
import html
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Path, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from bots.core.models import Admission, Author, ConversationKey, Incoming, NoticeKind
from bots.core.ports import StoreUnavailable
from bots.core.service import ConversationService
from bots.platforms.http.keys import ApiKeys, Integration
from bots.platforms.http.replies import Reply, ReplyHub, done_data
from bots.settings import HttpSettings

log = logging.getLogger(__name__)

PLATFORM = "http"
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
KEEPALIVE_S = 15.0
WIDGET_FILES = resources.files("bots.platforms.http") / "widget"
LIMITED = (NoticeKind.RATE_LIMITED, NoticeKind.BUDGET_SPENT)


Quota = Callable[[str, int, float], Awaitable[Admission]]
"""Count a message against a named quota of so many per so many seconds
(`RedisLimiter.admit_quota`)."""


# ----------------------------------------------------------------------------- schemas


class UserIn(BaseModel):
    """The end user behind a message, as the integration knows them."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(min_length=1, max_length=128, description="Stable id; limits count per id.")
    name: str | None = Field(default=None, max_length=64)


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    text: str = Field(
        min_length=1, description="The user's message, or a command such as /help or /retry."
    )
    stream: bool = Field(
        default=True,
        description="true: the reply streams as Server-Sent Events; false: one JSON answer.",
    )
    user: UserIn | None = Field(
        default=None, description="Unset: the conversation is its own user for limits."
    )


class NoticeOut(BaseModel):
    kind: str = Field(description="e.g. rate_limited, queued, model_unavailable")
    text: str
    retry_after: float | None = Field(default=None, description="Seconds, for limits.")


class ReplyOut(BaseModel):
    reply_id: str
    text: str = Field(description="The model's reply; empty when only notices answered.")
    notices: list[NoticeOut]


class MessageOut(BaseModel):
    seq: int | None = Field(description="The turn's number in its conversation.")
    role: Literal["system", "user", "assistant"]
    content: str
    at: float = Field(description="Unix time the turn was recorded.")


class HistoryOut(BaseModel):
    conversation_id: str
    messages: list[MessageOut]


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok"]


SSE_EVENT = {
    "type": "object",
    "description": "One Server-Sent Event; `data` is a JSON object as the description says.",
    "required": ["event", "data"],
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "event": {"enum": ["reply", "delta", "notice", "done"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}
EVENT_STREAM = {"text/event-stream": {"schema": SSE_EVENT}}
SSE_DOC = (
    "Events, each with an `id:`: `reply` {reply_id}, then `delta` {text} as the reply "
    "grows, `notice` {kind, text, retry_after?} from Parley, and last `done` {reply_id, "
    "text, notices}. Comment lines keep an idle stream open."
)
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": text}
    for status, text in {
        400: "Malformed JSON.",
        401: "Missing, unknown or revoked API key.",
        413: "The body is larger than the server accepts.",
        415: "The body is not JSON.",
        422: "The request does not match the schema.",
        503: "Redis, which holds the conversations, is unreachable.",
    }.items()
}


def streamed(
    description: str, errors: dict[int | str, dict[str, Any]]
) -> dict[int | str, dict[str, Any]]:
    """The responses of an operation that answers with an event stream."""
    return {200: {"description": description, "content": EVENT_STREAM}, **errors, **ERRORS}


# ----------------------------------------------------------------------------- errors


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


# ----------------------------------------------------------------------------- the app


def create_app(
    service: ConversationService,
    keys: ApiKeys,
    hub: ReplyHub,
    settings: HttpSettings,
    quota: Quota | None = None,
) -> FastAPI:
    """Build the API and the widget's routes around one conversation service."""
    app = FastAPI(
        title="Parley HTTP channel",
        version="1",
        summary="Chat with Parley's model from your own product: replies stream as SSE.",
        docs_url=None,
        redoc_url=None,
    )
    bearer = HTTPBearer(auto_error=False, description="An integration's API key, pk_…")

    async def caller(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    ) -> Integration:
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None:
            message = "Send an API key: Authorization: Bearer pk_…"
            raise ApiError(401, "unauthorized", message, challenge)
        integration = await keys.find(credentials.credentials)
        if integration is None:
            raise ApiError(401, "unauthorized", "Unknown or revoked API key.", challenge)
        return integration

    Caller = Annotated[Integration, Depends(caller)]
    ConversationId = Annotated[
        str,
        Path(
            pattern=ID_PATTERN,
            description="Your id for the conversation (1-128 letters, digits, _ . : -); "
            "scoped to your integration.",
        ),
    ]

    def conversation(integration: Integration, conversation_id: str) -> ConversationKey:
        return ConversationKey(PLATFORM, integration.name, conversation_id)

    @app.post(
        "/v1/conversations/{conversation_id}/messages",
        summary="Send a message; stream the reply",
        response_model=ReplyOut,
        responses=streamed(
            "The reply: an event stream, or one JSON object (stream=false).",
            {429: {"model": ErrorOut, "description": "A rate limit; see Retry-After."}},
        ),
        description=SSE_DOC,
    )
    async def send_message(
        conversation_id: ConversationId, message: MessageIn, integration: Caller
    ) -> Response:
        if quota is not None:
            messages = integration.messages
            admission = await quota(
                f"key:{integration.key_id}",
                settings.key_messages if messages is None else messages,
                integration.window or settings.key_window,
            )
            if not admission.admitted:
                raise limited(admission.retry_after, "This API key's message quota is spent.")
        key = conversation(integration, conversation_id)
        user = message.user or UserIn(id=conversation_id)
        author = Author(f"{integration.name}:{user.id}", user.name or user.id)
        reply = hub.start(Incoming(key, message.text, author=author, is_admin=True))
        if message.stream:
            return event_stream(reply)
        async for _ in reply.follow(idle=KEEPALIVE_S):
            pass
        refusal = next((n for n in reply.notices if n.kind in LIMITED), None)
        if refusal is not None and not reply.text:
            raise limited(refusal.retry_after or 1.0, refusal.text)
        return JSONResponse(ReplyOut.model_validate(done_data(reply)).model_dump())

    @app.get(
        "/v1/conversations/{conversation_id}/replies/{reply_id}",
        summary="Read a reply's events again, from after Last-Event-ID",
        responses=streamed(
            "The reply's events (as the message's stream).",
            {404: {"model": ErrorOut, "description": "No such reply kept here; read history."}},
        ),
        response_class=Response,
        description="A reply is kept for HTTP_REPLY_KEEP_SECONDS after it ends, on the "
        "server that answered it. " + SSE_DOC,
    )
    async def read_reply(
        conversation_id: ConversationId,
        reply_id: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")],
        integration: Caller,
        last_event_id: Annotated[
            str | None, Header(description="The last event seen; the stream goes on after it.")
        ] = None,
    ) -> Response:
        reply = hub.find(reply_id, conversation(integration, conversation_id))
        if reply is None:
            raise ApiError(404, "not_found", "No such reply is kept; read the history instead.")
        seen = last_event_id or ""
        after = int(seen) if seen.isdigit() and len(seen) < 10 else -1  # else: from the start
        return event_stream(reply, after)

    @app.get(
        "/v1/conversations/{conversation_id}/messages",
        summary="Read the conversation's history",
        response_model=HistoryOut,
        responses=ERRORS,
    )
    async def history(conversation_id: ConversationId, integration: Caller) -> HistoryOut:
        turns = await service.history(conversation(integration, conversation_id))
        messages = [
            MessageOut(seq=t.seq, role=t.role.value, content=t.content, at=t.at) for t in turns
        ]
        return HistoryOut(conversation_id=conversation_id, messages=messages)

    @app.delete(
        "/v1/conversations/{conversation_id}",
        summary="Forget the conversation",
        status_code=204,
        response_class=Response,
        responses=ERRORS,
    )
    async def reset(conversation_id: ConversationId, integration: Caller) -> Response:
        await service.reset(conversation(integration, conversation_id))
        return Response(status_code=204)

    @app.get("/healthz", summary="The process is up", response_model=Health)
    async def healthz() -> Health:
        return Health(status="ok")

    add_widget_routes(app, settings)
    add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(settings.cors_origins),
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
        expose_headers=["Retry-After", "X-Reply-Id"],
        max_age=600,
    )
    return app


def event_stream(reply: Reply, after: int = -1) -> StreamingResponse:
    """Stream a reply's events after `after` as SSE, live until its `done`."""

    async def events() -> AsyncIterator[bytes]:
        async for index in reply.follow(after, idle=KEEPALIVE_S):
            if index is None:
                yield b": keep-alive\n\n"
                continue
            yield reply.events[index]

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Reply-Id": reply.id}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def add_error_handlers(app: FastAPI) -> None:
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

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        code = codes.get(error.status_code, "error")
        headers = dict(error.headers) if error.headers else {}
        if error.status_code == 405:  # name every method of the path, not one route's
            headers["Allow"] = ", ".join(allowed_methods(request))
        return error_response(error.status_code, code, str(error.detail), headers)

    async def store_down(_: Request, __: Exception) -> Response:
        message = "Conversation memory is unreachable; try again shortly."
        return error_response(503, "unavailable", message, {"Retry-After": "5"})

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(StoreUnavailable, store_down)


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


# ----------------------------------------------------------------------------- widget

PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'"
)


def add_widget_routes(app: FastAPI, settings: HttpSettings) -> None:
    """The embeddable chat: /widget.js and /widget.css for any site, /chat as a page."""
    page = (
        (WIDGET_FILES / "chat.html")
        .read_text()
        .replace("{{title}}", html.escape(settings.widget_title))
    )

    def static(name: str, media_type: str) -> Callable[[], Awaitable[Response]]:
        body = (WIDGET_FILES / name).read_bytes()

        async def serve() -> Response:
            headers = {"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"}
            return Response(body, media_type=media_type, headers=headers)

        return serve

    app.get("/widget.js", include_in_schema=False)(static("widget.js", "text/javascript"))
    app.get("/widget.css", include_in_schema=False)(static("widget.css", "text/css"))

    @app.get("/chat", include_in_schema=False)
    async def chat_page() -> Response:
        headers = {"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff"}
        return Response(page, media_type="text/html", headers=headers)

    @app.get("/", include_in_schema=False)
    async def home() -> Response:
        return RedirectResponse("/chat")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:  # browsers ask; "no icon" beats a 404 in their console
        return Response(status_code=204, headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/robots.txt", include_in_schema=False)
    async def robots() -> Response:
        return PlainTextResponse("User-agent: *\nDisallow: /\n")
