"""The chat platforms' reply path: typing while the model works, notices marked up and
worded when shown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from bots.core.models import Author, ConversationKey, Incoming, Notice, NoticeKind, ReplyPart
from bots.core.service import ConversationService
from bots.delivery.reply import ChatReplies, ChatStyle, render, typing_until_text
from bots.delivery.stream import Limits
from tests.fakes import MemoryLimiter, MemoryStore, ScriptedModel

QUEUED = Notice(NoticeKind.QUEUED, "You're in line.")


async def test_typing_goes_on_after_a_notice_until_the_model_s_text() -> None:
    shown: list[str] = []
    text_ready = asyncio.Event()

    async def typing() -> None:
        shown.append("typing")
        if shown.count("typing") >= 3:  # typing was renewed after the notice
            text_ready.set()

    async def answer() -> AsyncIterator[ReplyPart]:
        yield QUEUED
        await text_ready.wait()
        yield "Hello"
        yield " there"

    async for part in typing_until_text(answer(), typing, every=0.01):
        shown.append(part if isinstance(part, str) else "notice")
    assert shown[0] == "typing" and shown.index("notice") < shown.index("Hello")
    assert "typing" in shown[shown.index("notice") :], "typing resumed after the notice"
    assert shown[-2:] == ["Hello", " there"]
    assert "typing" not in shown[shown.index("Hello") :], "no typing once the text has begun"


async def test_notices_are_marked_up_on_a_line_of_their_own() -> None:
    async def answer() -> AsyncIterator[ReplyPart]:
        yield QUEUED
        yield "Hi"

    rendered = [part async for part in render(answer(), "<{}>".format)]
    assert "".join(rendered) == "<You're in line.>\nHi"


class HeldSink:
    """A chat that posts nothing until `release` is set (a slow or rate-limited send)."""

    def __init__(self, *, held: bool) -> None:
        self.release = asyncio.Event()
        if not held:
            self.release.set()
        self.shown: list[str] = []

    async def send(self, text: str) -> int:
        await self.release.wait()
        self.shown.append(text)
        return len(self.shown) - 1

    async def edit(self, message: int, text: str) -> None:
        self.shown[message] = text


async def test_a_wait_is_said_as_it_is_when_the_notice_is_shown() -> None:
    """The limit is checked at once, but the notice shows after the reply before it."""
    limiter = MemoryLimiter(limit=1)  # the second message waits 30 s
    service = ConversationService(MemoryStore(), ScriptedModel(), limiter=limiter)
    style = ChatStyle("test", Limits(100, 0.01, 50, 1.0), notice="{}".format, typing_every=1.0)
    replies = ChatReplies(service, style)
    first, second = HeldSink(held=True), HeldSink(held=False)
    key, ada = ConversationKey("test", "room"), Author("1", "Ada")

    async def quiet(text: str = "") -> None:
        pass

    answering = [
        asyncio.create_task(
            replies.answer(Incoming(key, text, author=ada), sink, typing=quiet, say=quiet)
        )
        for text, sink in (("one", first), ("two", second))
    ]
    await asyncio.sleep(1.3)  # the first reply cannot be posted for a while
    first.release.set()
    await asyncio.gather(*answering)
    assert first.shown == ["echo 1: one"]
    (notice,) = second.shown
    assert notice.startswith("You're sending messages faster") and "try again in 29 s" in notice
