"""The HTTP channel's wire types: request and response bodies, and the event stream's
description, from which the OpenAPI document is generated."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bots.core.models import HandoffReason

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
REPLY_ID_PATTERN = r"^[0-9a-f]{32}$"


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


class SourceOut(BaseModel):
    title: str = Field(description="The passage's title path, e.g. 'Guide > Install > Linux'.")
    link: str | None = Field(
        description="Where it is: a URL (with its anchor), or the document's path when the "
        "knowledge base was added without a base URL."
    )


class ReplyOut(BaseModel):
    reply_id: str
    text: str = Field(description="The model's reply; empty when only notices answered.")
    notices: list[NoticeOut]
    sources: list[SourceOut] = Field(
        default_factory=list,
        description="The documentation the reply was answered from (a knowledge base); "
        "empty for free answers.",
    )
    handed_off: bool = Field(
        default=False,
        description="true: people answer this conversation now, so the bot did not; the "
        "message is kept for them and their reply comes as an `agent` message in the history.",
    )
    recorded: bool = Field(
        default=False,
        description="true: this reply is in the conversation's history (the next message "
        "sees it). false: it was not stored: cut short (a reset, a shutdown), failed, a "
        "command's answer, or handed off; see `notices`.",
    )


class MessageOut(BaseModel):
    seq: int | None = Field(description="The turn's number in its conversation.")
    role: Literal["system", "user", "assistant", "agent", "note"] = Field(
        description="assistant: the bot; agent: a person's reply; note: a staff note, never "
        "shown to the user (listed only with notes=true)."
    )
    content: str
    at: float = Field(description="Unix time the turn was recorded.")
    name: str | None = Field(
        default=None, description="Who wrote it: the person (agent, note) or the group member."
    )


class HistoryOut(BaseModel):
    conversation_id: str
    messages: list[MessageOut]
    handed_off: bool = Field(
        default=False, description="People answer the conversation now (see …/handoff)."
    )


class AgentMessageIn(BaseModel):
    """A person's reply to the user, or a staff note, in a conversation."""

    model_config = ConfigDict(extra="forbid", strict=True)
    text: str = Field(
        min_length=1, description="What the person wrote (HTTP_MAX_BODY_BYTES bound it)."
    )
    name: str | None = Field(
        default=None, min_length=1, max_length=64, description="The person, as the user sees them."
    )
    note: bool = Field(
        default=False,
        description="true: a note among the staff, never shown to the user; it does not hand "
        "the conversation off. false: a reply, which hands it off first if it was not.",
    )


class HandoffOut(BaseModel):
    conversation_id: str
    handed_off: bool = Field(description="People answer the conversation; the bot stays quiet.")
    reason: HandoffReason | None = Field(
        description="Why it went to people: the user asked (/human or a phrase), the "
        "knowledge base had nothing, several messages failed in a row, or staff took it."
    )
    since: float | None = Field(description="Unix time it was handed off.")


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
    "text, notices, sources: [{title, link}], handed_off, recorded}. Comment lines keep an "
    "idle stream open. While people answer the conversation (`handed_off`) the bot says "
    "nothing: `done` comes with no text and `handed_off: true`. `recorded: false` says the "
    "reply is not in the history (cut short, failed, a command's answer). With stream=false, "
    "a reply that failed before any text is a 503 whose code is the notice's kind "
    "(model_unavailable, model_timed_out, store_unavailable...)."
)
Responses = dict[int | str, dict[str, Any]]
ERRORS: Responses = {
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


def streamed(description: str, errors: Responses) -> Responses:
    """The responses of an operation that answers with an event stream."""
    return {200: {"description": description, "content": EVENT_STREAM}, **ERRORS, **errors}


PEOPLE_ERRORS: Responses = {
    404: {"model": ErrorOut, "description": "No such conversation: the user has not written."},
    409: {"model": ErrorOut, "description": "The handoff is not in that state (see code)."},
    **ERRORS,
}
