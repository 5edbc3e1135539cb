"""What the HTTP channel's routes do: who is calling, their key's quota, starting a reply,
waiting for a whole one, and reading a conversation."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from bots.core.models import Admission, Author, ConversationKey, Incoming, Integration, NoticeKind
from bots.core.ports import ApiKeys
from bots.core.service import ConversationService
from bots.platforms.http.errors import ApiError, limited
from bots.platforms.http.protocol import HistoryOut, MessageIn, MessageOut, ReplyOut, UserIn
from bots.platforms.http.replies import Reply, ReplyHub, done_data
from bots.settings import HttpSettings

PLATFORM = "http"
KEEPALIVE_S = 15.0
LIMITED = (NoticeKind.RATE_LIMITED, NoticeKind.BUDGET_SPENT)
CHALLENGE = {"WWW-Authenticate": "Bearer"}
NO_KEY = "Send an API key: Authorization: Bearer pk_…"

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
        return ReplyOut.model_validate(done_data(reply))

    def reply(self, integration: Integration, conversation_id: str, reply_id: str) -> Reply:
        """A reply kept in this conversation; 404 when there is none (or no longer)."""
        reply = self._hub.find(reply_id, conversation(integration, conversation_id))
        if reply is None:
            raise ApiError(404, "not_found", "No such reply is kept; read the history instead.")
        return reply

    async def history(self, integration: Integration, conversation_id: str) -> HistoryOut:
        turns = await self._service.history(conversation(integration, conversation_id))
        messages = [
            MessageOut(seq=t.seq, role=t.role.value, content=t.content, at=t.at) for t in turns
        ]
        return HistoryOut(conversation_id=conversation_id, messages=messages)

    async def reset(self, integration: Integration, conversation_id: str) -> None:
        await self._service.reset(conversation(integration, conversation_id))


def conversation(integration: Integration, conversation_id: str) -> ConversationKey:
    """The integration's own conversation of this id."""
    return ConversationKey(PLATFORM, integration.name, conversation_id)


def resume_after(last_event_id: str | None) -> int:
    """The event a reader last saw, from its `Last-Event-ID`; -1 (from the start) if unreadable."""
    seen = last_event_id or ""
    return int(seen) if seen.isdigit() and len(seen) < 10 else -1


async def sse_bytes(reply: Reply, after: int = -1) -> AsyncIterator[bytes]:
    """A reply's SSE frames after `after`, live until its `done`, with keep-alive comments."""
    async for index in reply.follow(after, idle=KEEPALIVE_S):
        if index is None:
            yield b": keep-alive\n\n"
            continue
        yield reply.events[index]
