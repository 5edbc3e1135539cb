"""One reply path for chat platforms: a message in, a streamed, paced, ordered reply out.

A chat platform (Discord, Telegram, ...) supplies its `ChatStyle` (limits, how a notice
looks, how long its typing indicator lasts) and, per message, an `Incoming`, a sink and
a typing call. `ChatReplies` does the rest the same way for every platform: the
service's answer with notices marked up, "typing…" until the model's first text, streaming
within the platform's limits, replies in a chat in the order asked, 429s reported to
the service's Observer, and a notice when a shutdown cuts a reply short.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bots.core.knowledge import plain_sources
from bots.core.line import ArrivalLine
from bots.core.models import Incoming, Notice, Quiet, ReplyPart, Source, Sources
from bots.core.notices import shown_text
from bots.core.service import ConversationService
from bots.delivery.inflight import CLOSED_NOTICE, InFlight
from bots.delivery.stream import CallWindow, Limits, MessageSink, StreamingDelivery

ShowSources = Callable[[Sequence[Source]], str]
"""Mark up the sources under an answer as the platform shows them."""

ShowTyping = Callable[[], Awaitable[object]]
"""Show the platform's typing indicator once; it must not raise (typing is a courtesy)."""


@dataclass(frozen=True, slots=True)
class ChatStyle:
    """How a chat platform shows replies.

    Args:
        platform: the platform's name, as in conversation keys and metrics.
        limits: its message size and edit rate.
        notice: the markup of a notice's text (small print, italics...).
        typing_every: seconds between two typing calls: the indicator fades after a while.
        sources: the markup of an answer's sources (links where the platform has them).
    """

    platform: str
    limits: Limits
    notice: Callable[[str], str]
    typing_every: float
    sources: ShowSources = field(default_factory=lambda: plain_sources)


async def render(
    parts: AsyncIterator[ReplyPart],
    notice: Callable[[str], str],
    shown: asyncio.Event | None = None,
    sources: ShowSources = plain_sources,
    quiet: Callable[[], None] | None = None,
) -> AsyncIterator[str]:
    """Mark notices and sources up as the platform shows them, each on lines of their own;
    pass text on; tell `quiet` when the bot stays quiet on purpose (people answer).

    A notice that tells a wait is worded once `shown` is set (when the reply's turn to
    be shown has come), so the wait it says is the one left then.
    """
    separator = ""
    async for part in parts:
        if isinstance(part, Notice):
            if part.until is not None and shown is not None:
                await shown.wait()
            yield f"{separator}{notice(shown_text(part))}\n"
        elif isinstance(part, Sources):
            yield f"{separator}\n{sources(part.items)}\n"
        elif isinstance(part, Quiet):
            if quiet is not None:
                quiet()
            continue
        else:
            yield part
        separator = "\n"


async def typing_until_text(
    parts: AsyncIterator[ReplyPart], show_typing: ShowTyping, every: float
) -> AsyncIterator[ReplyPart]:
    """Show "typing…", renewed every `every` seconds, until the model's first text.

    Notices ("you're in line") pass at once, and typing goes on after them: the model
    is still at work, and posting a message clears a platform's indicator.
    """
    while True:
        head = await _typing_while(anext(parts, None), show_typing, every)
        if head is None:
            return
        yield head
        if not isinstance(head, Notice):
            break
    async for part in parts:
        yield part


async def _typing_while(
    next_part: Awaitable[ReplyPart | None], show_typing: ShowTyping, every: float
) -> ReplyPart | None:
    waiting = asyncio.ensure_future(next_part)
    try:
        while True:
            await show_typing()
            done, _ = await asyncio.wait({waiting}, timeout=every)
            if done:
                return waiting.result()
    finally:
        if not waiting.done():  # cancelled while waiting: the answer stops too
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting


class ChatReplies:
    """Answer a chat platform's messages through the service, as streamed replies."""

    def __init__(
        self,
        service: ConversationService,
        style: ChatStyle,
        *,
        in_flight: InFlight | None = None,
    ) -> None:
        self._service = service
        self._style = style
        self._line = ArrivalLine()
        self.in_flight = in_flight if in_flight is not None else InFlight()

    async def answer(
        self,
        incoming: Incoming,
        sink: MessageSink[Any],
        *,
        typing: ShowTyping,
        say: Callable[[str], Awaitable[object]],
        order: Hashable | None = None,
        shared: Sequence[CallWindow] = (),
    ) -> None:
        """Answer one message into `sink`; once a shutdown has begun, say to send it again.

        Args:
            incoming: the message, translated.
            sink: where the reply's messages are sent and edited.
            typing: shows the typing indicator once.
            say: posts one plain message: the restart notice when a shutdown cuts in
                before anything was posted (after, the posted text becomes the notice).
            order: replies with the same value appear in the order asked (default: the
                conversation's channel).
            shared: call budgets every reply in the same chat spends from.
        """
        if self.in_flight.closing:  # stopping: say so, rather than leave it unanswered
            with contextlib.suppress(Exception):  # the platform may be going away too
                await say(CLOSED_NOTICE)
            return
        # Both take their places in line now, before any await: arrival order.
        answer = self._service.respond(incoming)
        parts = typing_until_text(answer, typing, self._style.typing_every)
        delivery = StreamingDelivery(
            sink,
            self._style.limits,
            shared=shared,
            after=self._line.join(order if order is not None else incoming.key.channel_key),
            on_rate_limited=self._rate_limited,
        )
        deltas = render(
            parts, self._style.notice, delivery.turn, self._style.sources, delivery.stay_quiet
        )

        async def cut_short(text: str) -> None:  # the partial text becomes the notice
            if not await delivery.replace_with(text):
                await say(text)

        await self.in_flight.deliver(delivery.run(deltas), cut_short)

    async def text(self, incoming: Incoming) -> str:
        """The whole answer as one text, for platforms that post it at once."""
        parts = render(
            self._service.respond(incoming), self._style.notice, None, self._style.sources
        )
        return "".join([part async for part in parts]).strip()

    def _rate_limited(self) -> None:
        self._service.observer.platform_limited(self._style.platform)
