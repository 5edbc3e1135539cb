"""Replies that outlive their HTTP connection: generated once, streamed to any reader.

A reply runs as a task of its own, detached from the request that asked for it. Its
events are kept in order, so a client whose connection dropped can reconnect and read
on from the last event it saw (`Last-Event-ID`), and the exchange is recorded whole
whether or not anyone is still listening. With a `RedisReplyLog` the events are also
written to Redis, so the reconnect may reach any replica, also after a restart of the one
that answered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from bots.core.commands import find_command, parse_command
from bots.core.models import (
    ConversationKey,
    Incoming,
    Notice,
    NoticeKind,
    Quiet,
    Source,
    Sources,
)
from bots.core.service import ConversationService
from bots.core.text import sanitize
from bots.delivery.inflight import InFlight
from bots.store.replies import RedisReplyLog

log = logging.getLogger(__name__)

SHUTDOWN_TEXT = "The server is restarting, so this reply was not finished; send it again."
FAILED_TEXT = "Something went wrong while answering; send your message again."
_ERROR_KIND = NoticeKind.REPLY_INTERRUPTED


def sse_frame(index: int, kind: str, data: dict[str, Any]) -> bytes:
    """One Server-Sent Event: its number, its kind ("reply", "delta", "notice" or "done")
    and its data as one line of JSON."""
    return f"id: {index}\nevent: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


@dataclass
class Reply:
    """One reply's events so far, as SSE frames; `done` once its last event is in.

    Frames are kept as bytes: written once, sent to every reader, and invisible to the
    garbage collector, whose pauses otherwise grow with the replies held open.
    """

    id: str
    key: ConversationKey
    message: str
    events: list[bytes] = field(default_factory=list)
    done: bool = False
    text: str = ""
    notices: list[Notice] = field(default_factory=list)
    sources: tuple[Source, ...] = ()
    handed_off: bool = False  # people answer the conversation now, not the bot
    recorded: bool = False  # the reply is in the conversation's history
    kept: Callable[[int, str, bytes], None] | None = None  # told of each event, to keep it
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, kind: str, data: dict[str, Any]) -> None:
        index = len(self.events)
        self.events.append(frame := sse_frame(index, kind, data))
        if self.kept is not None:
            self.kept(index, kind, frame)
        self._wake.set()
        self._wake = asyncio.Event()

    async def frames(self, after: int = -1, *, idle: float = 15.0) -> AsyncIterator[bytes | None]:
        """The SSE frames after event `after`, live until `done`; None after `idle` seconds
        without one (time for a keep-alive)."""
        async for index in self.follow(after, idle=idle):
            yield None if index is None else self.events[index]

    async def follow(self, after: int = -1, *, idle: float = 15.0) -> AsyncIterator[int | None]:
        """Yield the index of each event after `after` as it arrives; None after `idle`
        seconds without one (time for a keep-alive)."""
        index = after + 1
        while True:
            while index < len(self.events):
                yield index
                index += 1
            if self.done:
                return
            wake = self._wake
            try:
                await asyncio.wait_for(wake.wait(), idle)
            except TimeoutError:
                yield None


@dataclass(frozen=True)
class KeptReply:
    """A reply another replica (or this one before a restart) answered, read from Redis."""

    id: str
    log: RedisReplyLog

    def frames(self, after: int = -1, *, idle: float = 15.0) -> AsyncIterator[bytes | None]:
        return self.log.follow(self.id, after, idle=idle)


OnFinished = Callable[[Reply], Awaitable[None]]


def owner_of(key: ConversationKey) -> str:
    """A conversation, written down to check a kept reply against."""
    return json.dumps(dataclasses.astuple(key))


class ReplyHub:
    """Start replies as tasks, find them by id, and end them all on shutdown.

    Args:
        service: the conversation service that answers.
        keep_seconds: a finished reply stays readable this long.
        on_finished: called with each finished reply that has text (e.g. the webhook).
        log: where replies' events are kept for every replica; None: in this process only.
    """

    def __init__(
        self,
        service: ConversationService,
        *,
        keep_seconds: float = 120.0,
        on_finished: OnFinished | None = None,
        log: RedisReplyLog | None = None,
    ) -> None:
        self._service = service
        self._log = log
        self._keep_seconds = keep_seconds
        self._on_finished = on_finished
        self._replies: dict[str, Reply] = {}
        self._running = InFlight()

    def start(self, incoming: Incoming) -> Reply:
        """Begin answering; the reply's first event names it."""
        reply = Reply(uuid.uuid4().hex, incoming.key, incoming.text)
        if (kept := self._log) is not None:
            owner = owner_of(reply.key)

            def keep(index: int, kind: str, frame: bytes) -> None:
                kept.add(reply.id, index, kind, frame, owner if index == 0 else None)

            reply.kept = keep
        reply.add("reply", {"reply_id": reply.id})
        self._replies[reply.id] = reply
        self._running.add(asyncio.create_task(self._run(reply, incoming), name=f"reply-{reply.id}"))
        return reply

    def find(self, reply_id: str, key: ConversationKey) -> Reply | None:
        """The reply of this id in this conversation, while it is kept."""
        reply = self._replies.get(reply_id)
        return reply if reply is not None and reply.key == key else None

    async def kept(self, reply_id: str, key: ConversationKey) -> KeptReply | None:
        """The reply of this id in this conversation, as Redis keeps it for every replica."""
        if self._log is None or await self._log.owner(reply_id) != owner_of(key):
            return None
        return KeptReply(reply_id, self._log)

    async def _run(self, reply: Reply, incoming: Incoming) -> None:
        pieces: list[str] = []
        try:
            async with aclosing(self._service.respond(incoming)) as parts:
                async for part in parts:
                    if isinstance(part, Notice):
                        reply.notices.append(part)
                        reply.add("notice", notice_data(part))
                    elif isinstance(part, Sources):
                        reply.sources = part.items  # sent with `done`, under the whole text
                    elif isinstance(part, Quiet):
                        reply.handed_off = True  # people answer: no text, on purpose
                    else:
                        pieces.append(part)
                        reply.add("delta", {"text": part})
        except asyncio.CancelledError:
            self._finish(reply, pieces, extra=SHUTDOWN_TEXT)
            raise
        except Exception:
            log.exception("reply failed", extra={"conversation": str(reply.key)})
            self._finish(reply, pieces, extra=FAILED_TEXT)
            return
        if any(notice.kind is NoticeKind.HANDED_OFF for notice in reply.notices):
            reply.handed_off = True  # this message handed the conversation to people
        reply.recorded = bool(pieces) and not reply.handed_off and _stores(reply)
        self._finish(reply, pieces)
        if self._on_finished is not None and reply.text:
            await self._on_finished(reply)

    def _finish(self, reply: Reply, pieces: list[str], *, extra: str | None = None) -> None:
        if extra is not None:
            notice = Notice(_ERROR_KIND, extra)
            reply.notices.append(notice)
            reply.add("notice", notice_data(notice))
        reply.text = "".join(pieces)
        reply.done = True
        reply.add("done", done_data(reply))
        asyncio.get_running_loop().call_later(self._keep_seconds, self._replies.pop, reply.id, None)

    async def close(self, grace: float) -> None:
        """Let replies in progress finish for `grace` seconds, then end the rest."""
        await self._running.drain(grace)


FAILED = frozenset(
    {
        NoticeKind.MODEL_UNAVAILABLE,
        NoticeKind.MODEL_REJECTED,
        NoticeKind.MODEL_TIMED_OUT,
        NoticeKind.REPLY_INTERRUPTED,
        NoticeKind.STORE_UNAVAILABLE,
        NoticeKind.KNOWLEDGE_UNAVAILABLE,
    }
)
"""Notices that say the reply failed or was cut short."""
NOT_STORED = FAILED | {NoticeKind.RATE_LIMITED, NoticeKind.BUDGET_SPENT, NoticeKind.EMPTY_MESSAGE}
"""Notices that say the reply they come with was not stored as the conversation's."""


def _stores(reply: Reply) -> bool:
    """Whether the service stored this reply: a message's (or /retry's) answer that no
    notice says was cut or failed; other commands' answers are never stored."""
    command = parse_command(sanitize(reply.message))
    if command is not None and not ((spec := find_command(command.name)) and spec.asks_model):
        return False
    return not any(notice.kind in NOT_STORED for notice in reply.notices)


def notice_data(notice: Notice) -> dict[str, Any]:
    data: dict[str, Any] = {"kind": notice.kind.value, "text": notice.text}
    if notice.retry_after is not None:
        data["retry_after"] = round(notice.retry_after, 3)
    return data


def done_data(reply: Reply) -> dict[str, Any]:
    return {
        "reply_id": reply.id,
        "text": reply.text,
        "notices": [notice_data(notice) for notice in reply.notices],
        "sources": [{"title": s.title, "link": s.link} for s in reply.sources],
        "handed_off": reply.handed_off,
        "recorded": reply.recorded,
    }
