"""Chatwoot's agent-bot webhooks, read: who wrote what in which conversation, or its status.

The payloads are `Message#webhook_data` and `Conversation#webhook_data` with an `event`;
only the fields Parley uses are read, and anything else is left alone. A conversation's
display id (`conversation.id`) is the one the Application API's paths take.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, ValidationError

from bots.core.models import ConversationKey

PLATFORM = "chatwoot"


class _Read(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Ref(_Read):
    id: int


class _Sender(_Read):
    id: int | None = None
    name: str | None = None
    type: str | None = None  # "contact", "user" (an agent), "agent_bot"


class _LastMessage(_Read):
    account_id: int | None = None


class _Conversation(_Read):
    id: int
    inbox_id: int | None = None
    status: str = "pending"
    messages: list[_LastMessage] = []


class _Payload(_Read):
    event: str
    account: _Ref | None = None
    # message events
    id: int | None = None
    content: str | None = None
    message_type: str | int | None = None
    private: bool = False
    sender: _Sender | None = None
    inbox: _Ref | None = None
    conversation: _Conversation | None = None
    # conversation events: the payload is the conversation itself
    status: str | None = None
    inbox_id: int | None = None
    messages: list[_LastMessage] = []


class Kind(enum.Enum):
    CUSTOMER = "customer"  # the contact wrote: the bot may answer
    AGENT = "agent"  # a person of the team replied to the customer
    NOTE = "note"  # a private note among the team
    EDITED = "edited"  # the contact changed a message
    OPENED = "opened"  # the conversation went to people
    RESOLVED = "resolved"  # it is done


@dataclass(frozen=True, slots=True)
class Event:
    """One webhook, read: its kind, where, and for messages who wrote what."""

    kind: Kind
    account: int | None
    inbox: int | None
    conversation: int
    status: str  # the conversation's status as the webhook gives it
    message_id: int | None = None
    text: str = ""
    author: str | None = None  # the contact's or the agent's name
    author_id: int | None = None

    @property
    def key(self) -> ConversationKey:
        return conversation_key(self.account or 0, self.conversation)


def conversation_key(account: int, conversation: int) -> ConversationKey:
    """The Parley conversation of a Chatwoot conversation: account, then display id."""
    return ConversationKey(PLATFORM, str(account), str(conversation))


class Unreadable(ValueError):
    """The body is not a webhook Parley can read."""


def read_event(body: bytes) -> Event | None:
    """Read a webhook; None for one Parley has nothing to do with (the bot's own messages,
    activity lines, events it does not use)."""
    try:
        payload = _Payload.model_validate_json(body)
    except ValidationError as error:
        raise Unreadable(f"not a Chatwoot webhook: {error.error_count()} problems") from None
    if payload.event in ("conversation_opened", "conversation_resolved"):
        if payload.id is None:
            raise Unreadable("a conversation event without the conversation's id")
        status = Kind.OPENED if payload.event == "conversation_opened" else Kind.RESOLVED
        account = payload.account.id if payload.account else _account_of(payload.messages)
        return Event(status, account, payload.inbox_id, payload.id, payload.status or "")
    if payload.event not in ("message_created", "message_updated"):
        return None
    conversation = payload.conversation
    if conversation is None or payload.id is None:
        raise Unreadable("a message event without its conversation")
    kind = _kind_of(payload)
    if kind is None:
        return None
    sender = payload.sender or _Sender()
    account = payload.account.id if payload.account else _account_of(conversation.messages)
    return Event(
        kind,
        account,
        payload.inbox.id if payload.inbox else conversation.inbox_id,
        conversation.id,
        conversation.status,
        payload.id,
        payload.content or "",
        sender.name,
        sender.id,
    )


def _kind_of(payload: _Payload) -> Kind | None:
    sender = payload.sender.type if payload.sender else None
    incoming = payload.message_type in ("incoming", 0)
    outgoing = payload.message_type in ("outgoing", 1)
    if incoming and sender in (None, "contact"):
        return Kind.CUSTOMER if payload.event == "message_created" else Kind.EDITED
    if payload.event != "message_created" or sender != "user":
        return None  # the bot's own posts, templates, edits by agents
    if payload.private:
        return Kind.NOTE
    return Kind.AGENT if outgoing else None


def _account_of(messages: list[_LastMessage]) -> int | None:
    return next((m.account_id for m in reversed(messages) if m.account_id is not None), None)
