"""What the HTTP channel's routes do: who is calling, their key's quota, starting a reply,
waiting for a whole one, reading a conversation, and the people answering it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Literal

from bots.core.handoff import Handoffs
from bots.core.models import (
    Admission,
    Author,
    ConversationKey,
    Handoff,
    HandoffReason,
    Incoming,
    Integration,
    NoticeKind,
    People,
    Role,
    Turn,
)
from bots.core.ports import ApiKeys
from bots.core.service import ConversationService
from bots.core.text import clean_name, sanitize
from bots.platforms.http.errors import ApiError, limited
from bots.platforms.http.protocol import (
    AgentMessageIn,
    HandoffOut,
    HistoryOut,
    MessageIn,
    MessageOut,
    ReplyOut,
    UserIn,
)
from bots.platforms.http.replies import FAILED, KeptReply, Reply, ReplyHub, done_data
from bots.settings import HttpSettings

PLATFORM = "http"
KEEPALIVE_S = 15.0
LIMITED = (NoticeKind.RATE_LIMITED, NoticeKind.BUDGET_SPENT)
CHALLENGE = {"WWW-Authenticate": "Bearer"}
NO_KEY = "Send an API key: Authorization: Bearer pk_…"
NO_CONVERSATION = "No such conversation: it starts with the user's first message."
BY_API = "api"  # who handed a conversation back through DELETE …/handoff

Quota = Callable[[str, int, float], Awaitable[Admission]]
"""Count a message against a named quota of so many per so many seconds
(`RedisLimiter.admit_quota`)."""


class HttpServing:
    """The channel's logic, one per app; each integration sees only its own conversations.

    Args:
        service: the conversation service that answers.
        keys: the integrations' API keys.
        hub: where replies run and are kept.
        settings: the HTTP_* settings (the keys' default quota).
        quota: counts a key's messages; None: keys have no quota.
    """

    def __init__(
        self,
        service: ConversationService,
        keys: ApiKeys,
        hub: ReplyHub,
        settings: HttpSettings,
        quota: Quota | None = None,
    ) -> None:
        self._service = service
        self._keys = keys
        self._hub = hub
        self._settings = settings
        self._quota = quota

    async def caller(self, key: str | None) -> Integration:
        """The integration whose API key this is; 401 for none, an unknown or a revoked one."""
        if key is None:
            raise ApiError(401, "unauthorized", NO_KEY, CHALLENGE)
        integration = await self._keys.find(key)
        if integration is None:
            raise ApiError(401, "unauthorized", "Unknown or revoked API key.", CHALLENGE)
        return integration

    async def start(
        self, integration: Integration, conversation_id: str, message: MessageIn
    ) -> Reply:
        """Count the message against its key's quota (429 when spent), then start the reply."""
        if self._quota is not None:
            messages = integration.messages
            admission = await self._quota(
                f"key:{integration.key_id}",
                self._settings.key_messages if messages is None else messages,
                integration.window or self._settings.key_window,
            )
            if not admission.admitted:
                raise limited(admission.retry_after, "This API key's message quota is spent.")
        user = message.user or UserIn(id=conversation_id)
        author = Author(f"{integration.name}:{user.id}", user.name or user.id)
        incoming = Incoming(
            conversation(integration, conversation_id),
            message.text,
            author=author,
            is_admin=True,
            knowledge=integration.knowledge,
        )
        return self._hub.start(incoming)

    async def answer(self, reply: Reply) -> ReplyOut:
        """Wait for the reply to end; a limit that refused it, with no text, is a 429."""
        async for _ in reply.follow(idle=KEEPALIVE_S):
            pass
        refusal = next((n for n in reply.notices if n.kind in LIMITED), None)
        if refusal is not None and not reply.text:
            raise limited(refusal.retry_after or 1.0, refusal.text)
        failure = next((n for n in reply.notices if n.kind in FAILED), None)
        if failure is not None and not reply.text:  # nothing to show: an error, not a 200
            raise ApiError(503, failure.kind.value, failure.text, {"Retry-After": "5"})
        return ReplyOut.model_validate(done_data(reply))

    async def reply(
        self, integration: Integration, conversation_id: str, reply_id: str
    ) -> Reply | KeptReply:
        """A reply kept in this conversation, by this replica or in Redis; 404 when there is
        none (or no longer)."""
        key = conversation(integration, conversation_id)
        reply = self._hub.find(reply_id, key) or await self._hub.kept(reply_id, key)
        if reply is None:
            raise ApiError(404, "not_found", "No such reply is kept; read the history instead.")
        return reply

    async def history(
        self,
        integration: Integration,
        conversation_id: str,
        *,
        after: int | None = None,
        notes: bool = False,
    ) -> HistoryOut:
        """The conversation's turns (after turn `after`); staff notes only with `notes`."""
        key = conversation(integration, conversation_id)
        turns = await self._service.history(key)
        messages = [
            message_out(t)
            for t in turns
            if (after is None or (t.seq or 0) > after) and (notes or t.people is not People.NOTE)
        ]
        handoffs = self._service.handoffs
        handed_off = handoffs is not None and await handoffs.current(key) is not None
        return HistoryOut(conversation_id=conversation_id, messages=messages, handed_off=handed_off)

    async def handoff(self, integration: Integration, conversation_id: str) -> HandoffOut:
        """Whether people answer the conversation; 404 when it has not started."""
        key = conversation(integration, conversation_id)
        handoff = await self._existing(key)
        return handoff_out(conversation_id, handoff)

    async def hand_off(self, integration: Integration, conversation_id: str) -> HandoffOut:
        """Hand the conversation to people (staff took it); 409 when it already was."""
        key = conversation(integration, conversation_id)
        taken = await self._existing(key) is None
        if not (taken and await self._people().hand_off(key, HandoffReason.STAFF)):
            raise ApiError(409, "already_handed_off", "People already answer this conversation.")
        return handoff_out(conversation_id, await self._people().current(key))

    async def hand_back(self, integration: Integration, conversation_id: str) -> None:
        """Give the conversation back to the bot; 409 when people were not answering it."""
        key = conversation(integration, conversation_id)
        handed = await self._existing(key) is not None
        if not (handed and await self._people().hand_back(key, BY_API)):
            raise ApiError(409, "not_handed_off", "The bot already answers this conversation.")

    async def from_people(
        self, integration: Integration, conversation_id: str, message: AgentMessageIn
    ) -> MessageOut:
        """Store a person's reply (handing the conversation off first) or a staff note."""
        key = conversation(integration, conversation_id)
        people = self._people()
        if await self._existing(key) is None and not message.note:
            await people.hand_off(key, HandoffReason.STAFF)  # False: someone else just did
        await self._service.from_people(key, message.text, name=message.name, note=message.note)
        kind = People.NOTE if message.note else People.REPLY
        stored = _stored(await self._service.history(key), kind, message.text, message.name)
        if stored is None:  # trimmed away at once, or the conversation was reset meanwhile
            raise ApiError(409, "not_stored", "The message was not kept; send it again.")
        return message_out(stored)

    def _people(self) -> Handoffs:
        handoffs = self._service.handoffs
        if handoffs is None or not handoffs.offered(PLATFORM):
            raise ApiError(409, "handoff_unavailable", "No people answer conversations here.")
        return handoffs

    async def _existing(self, key: ConversationKey) -> Handoff | None:
        """The conversation's handoff; 404 when the conversation has no turns and none."""
        handoff = await self._people().current(key)
        if handoff is None and not await self._service.history(key):
            raise ApiError(404, "not_found", NO_CONVERSATION)
        return handoff

    async def reset(self, integration: Integration, conversation_id: str) -> None:
        await self._service.reset(conversation(integration, conversation_id))


def conversation(integration: Integration, conversation_id: str) -> ConversationKey:
    """The integration's own conversation of this id."""
    return ConversationKey(PLATFORM, integration.name, conversation_id)


Shown = Literal["system", "user", "assistant", "agent", "note"]
ROLES: dict[Role, Shown] = {Role.SYSTEM: "system", Role.USER: "user", Role.ASSISTANT: "assistant"}
PEOPLES: dict[People | None, Shown] = {People.REPLY: "agent", People.NOTE: "note"}


def message_out(turn: Turn) -> MessageOut:
    """A stored turn on the wire: people's turns with their own role (agent, note)."""
    role = PEOPLES.get(turn.people) or ROLES[turn.role]
    return MessageOut(seq=turn.seq, role=role, content=turn.content, at=turn.at, name=turn.name)


def handoff_out(conversation_id: str, handoff: Handoff | None) -> HandoffOut:
    reason, since = (None, None) if handoff is None else (handoff.reason, handoff.since)
    return HandoffOut(
        conversation_id=conversation_id, handed_off=handoff is not None, reason=reason, since=since
    )


def _stored(turns: Sequence[Turn], kind: People, text: str, name: str | None) -> Turn | None:
    """The newest turn of people's `kind` with this text: the one just stored."""
    text, name = sanitize(text), clean_name(name or "") or None
    found = (t for t in reversed(turns) if t.people is kind and t.content == text)
    return next((t for t in found if t.name == name), None)


def resume_after(last_event_id: str | None) -> int:
    """The event a reader last saw, from its `Last-Event-ID`; -1 (from the start) if unreadable."""
    seen = last_event_id or ""
    return int(seen) if seen.isdigit() and len(seen) < 10 else -1


async def sse_bytes(reply: Reply | KeptReply, after: int = -1) -> AsyncIterator[bytes]:
    """A reply's SSE frames after `after`, live until its `done`, with keep-alive comments."""
    async for frame in reply.frames(after, idle=KEEPALIVE_S):
        yield b": keep-alive\n\n" if frame is None else frame
