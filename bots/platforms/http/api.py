"""The integrations' API: each route reads its request and hands it to `HttpServing`.

Every conversation is scoped to the integration whose API key asks: the same id under
another integration is another conversation. Replies stream as Server-Sent Events and
run on when the connection drops; `GET …/replies/{id}` with `Last-Event-ID` reads on.
People take conversations over with `…/handoff` and answer with `…/agent-messages`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Security
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from bots.core.models import Integration
from bots.platforms.http.protocol import (
    ERRORS,
    ID_PATTERN,
    PEOPLE_ERRORS,
    REPLY_ID_PATTERN,
    SSE_DOC,
    AgentMessageIn,
    ErrorOut,
    HandoffOut,
    Health,
    HistoryOut,
    MessageIn,
    MessageOut,
    ReplyOut,
    streamed,
)
from bots.platforms.http.replies import KeptReply, Reply
from bots.platforms.http.serving import HttpServing, resume_after, sse_bytes

router = APIRouter()
bearer = HTTPBearer(auto_error=False, description="An integration's API key, pk_…")


def app_serving(request: Request) -> HttpServing:
    """The app's `HttpServing` (`create_app` puts it in the app's state)."""
    found: HttpServing = request.app.state.serving
    return found


Serving = Annotated[HttpServing, Depends(app_serving)]


async def caller(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    serving: Serving,
) -> Integration:
    return await serving.caller(None if credentials is None else credentials.credentials)


Caller = Annotated[Integration, Depends(caller)]
ConversationId = Annotated[
    str,
    Path(
        pattern=ID_PATTERN,
        description="Your id for the conversation (1-128 letters, digits, _ . : -); "
        "scoped to your integration.",
    ),
]


def event_stream(reply: Reply | KeptReply, after: int = -1) -> StreamingResponse:
    """Stream a reply's events after `after` as SSE, live until its `done`."""
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Reply-Id": reply.id}
    return StreamingResponse(
        sse_bytes(reply, after), media_type="text/event-stream", headers=headers
    )


@router.post(
    "/v1/conversations/{conversation_id}/messages",
    summary="Send a message; stream the reply",
    response_model=ReplyOut,
    responses=streamed(
        "The reply: an event stream, or one JSON object (stream=false).",
        {
            429: {"model": ErrorOut, "description": "A rate limit; see Retry-After."},
            503: {
                "model": ErrorOut,
                "description": "stream=false: the reply failed before any text (the model "
                "or Redis is unreachable; code: the notice's kind), or Redis is unreachable.",
            },
        },
    ),
    description=SSE_DOC,
)
async def send_message(
    conversation_id: ConversationId, message: MessageIn, integration: Caller, serving: Serving
) -> Response:
    reply = await serving.start(integration, conversation_id, message)
    if message.stream:
        return event_stream(reply)
    return JSONResponse((await serving.answer(reply)).model_dump())


@router.get(
    "/v1/conversations/{conversation_id}/replies/{reply_id}",
    summary="Read a reply's events again, from after Last-Event-ID",
    responses=streamed(
        "The reply's events (as the message's stream).",
        {404: {"model": ErrorOut, "description": "No such reply is kept; read the history."}},
    ),
    response_class=Response,
    description="A reply is kept for HTTP_REPLY_KEEP_SECONDS after its last event, in "
    "Redis: any replica serves it, also after a restart of the one that answered. " + SSE_DOC,
)
async def read_reply(
    conversation_id: ConversationId,
    reply_id: Annotated[str, Path(pattern=REPLY_ID_PATTERN)],
    integration: Caller,
    serving: Serving,
    last_event_id: Annotated[
        str | None, Header(description="The last event seen; the stream goes on after it.")
    ] = None,
) -> Response:
    reply = await serving.reply(integration, conversation_id, reply_id)
    return event_stream(reply, resume_after(last_event_id))


@router.get(
    "/v1/conversations/{conversation_id}/messages",
    summary="Read the conversation's history",
    response_model=HistoryOut,
    responses=ERRORS,
)
async def history(
    conversation_id: ConversationId,
    integration: Caller,
    serving: Serving,
    after: Annotated[
        int | None, Query(ge=0, description="Only turns numbered after this (`seq`).")
    ] = None,
    notes: Annotated[
        bool, Query(description="Include staff notes (role note); never for the user's eyes.")
    ] = False,
) -> HistoryOut:
    return await serving.history(integration, conversation_id, after=after, notes=notes)


@router.post(
    "/v1/conversations/{conversation_id}/agent-messages",
    summary="Answer the user as a person, or leave a staff note",
    status_code=201,
    response_model=MessageOut,
    responses=PEOPLE_ERRORS,
    description="A reply hands the conversation to people first if it was not (reason "
    "`staff`): the bot stays quiet until `DELETE …/handoff`. The user's side shows it as "
    "`role: agent` with its `name`; a note (`note: true`) is context for the bot and the "
    "staff, listed only with `GET …/messages?notes=true`.",
)
async def agent_message(
    conversation_id: ConversationId, message: AgentMessageIn, integration: Caller, serving: Serving
) -> MessageOut:
    return await serving.from_people(integration, conversation_id, message)


@router.get(
    "/v1/conversations/{conversation_id}/handoff",
    summary="Whether people answer the conversation",
    response_model=HandoffOut,
    responses=PEOPLE_ERRORS,
)
async def handoff(
    conversation_id: ConversationId, integration: Caller, serving: Serving
) -> HandoffOut:
    return await serving.handoff(integration, conversation_id)


@router.post(
    "/v1/conversations/{conversation_id}/handoff",
    summary="Hand the conversation to people",
    status_code=201,
    response_model=HandoffOut,
    responses=PEOPLE_ERRORS,
    description="The bot stops answering; the user's messages are kept (and sent to the "
    "webhook as `conversation.message`). 409 `already_handed_off` when it already was.",
)
async def hand_off(
    conversation_id: ConversationId, integration: Caller, serving: Serving
) -> HandoffOut:
    return await serving.hand_off(integration, conversation_id)


@router.delete(
    "/v1/conversations/{conversation_id}/handoff",
    summary="Hand the conversation back to the bot",
    status_code=204,
    response_class=Response,
    responses=PEOPLE_ERRORS,
    description="The bot answers the next message, with the people's replies in its "
    "context. 409 `not_handed_off` when people were not answering it.",
)
async def hand_back(
    conversation_id: ConversationId, integration: Caller, serving: Serving
) -> Response:
    await serving.hand_back(integration, conversation_id)
    return Response(status_code=204)


@router.delete(
    "/v1/conversations/{conversation_id}",
    summary="Forget the conversation",
    status_code=204,
    response_class=Response,
    responses=ERRORS,
)
async def reset(conversation_id: ConversationId, integration: Caller, serving: Serving) -> Response:
    await serving.reset(integration, conversation_id)
    return Response(status_code=204)


@router.get("/healthz", summary="The process is up", response_model=Health)
async def healthz() -> Health:
    return Health(status="ok")
