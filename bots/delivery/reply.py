"""One reply path for chat platforms: a message in, a streamed, paced, ordered reply out.

A chat platform (Discord, Telegram, ...) supplies its `ChatStyle` (limits, how a notice
looks, how long its typing indicator lasts) and, per message, an `Incoming`, a sink and
a typing call. `ChatReplies` does the rest the same way for every platform: the
service's answer with notices marked up, "typing…" until the first text, streaming
within the platform's limits, replies in a chat in the order asked, 429s reported to
the service's Observer, and a notice when a shutdown cuts a reply short.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from bots.core.line import ArrivalLine
from bots.core.models import Incoming, Notice, ReplyPart
from bots.core.service import ConversationService
from bots.delivery.inflight import InFlight
from bots.delivery.stream import CallWindow, Limits, MessageSink, StreamingDelivery

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
    """

    platform: str
    limits: Limits
    notice: Callable[[str], str]
    typing_every: float


async def render(
    parts: AsyncIterator[ReplyPart], notice: Callable[[str], str]
) -> AsyncIterator[str]:
    """Mark notices up as the platform shows them, each on a line of its own; pass text on."""
    separator = ""
    async for part in parts:
        yield f"{separator}{notice(part.text)}\n" if isinstance(part, Notice) else part
        separator = "\n"


async def typing_until_first(
    parts: AsyncIterator[str], show_typing: ShowTyping, every: float
) -> AsyncIterator[str]:
    """Show "typing…", renewed every `every` seconds, until the first piece of text."""
    first = asyncio.ensure_future(anext(parts, None))
    try:
        while True:
            await show_typing()
            done, _ = await asyncio.wait({first}, timeout=every)
            if done:
                break
    finally:
        if not first.done():  # cancelled while waiting: the answer stops too
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
    head = first.result()
    if head is None:
        return
    yield head
    async for part in parts:
        yield part


class ChatReplies:
    """Answer a chat platform's messages through the service, as streamed replies."""

    def __init__(
        self,
        service: ConversationService,
        style: ChatStyle,
        *,
        show_reasoning: bool = False,
        in_flight: InFlight | None = None,
    ) -> None:
        self._service = service
        self._style = style
        self._show_reasoning = show_reasoning
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
        """Answer one message into `sink`, or nothing once a shutdown has begun.

        Args:
            incoming: the message, translated.
            sink: where the reply's messages are sent and edited.
            typing: shows the typing indicator once.
            say: posts one plain message: the restart notice when a shutdown cuts in.
            order: replies with the same value appear in the order asked (default: the
                conversation's channel).
            shared: call budgets every reply in the same chat spends from.
        """
        if self.in_flight.closing:  # stopping: the message stays unanswered, not half
            return
        # Both take their places in line now, before any await: arrival order.
        parts = render(self._service.respond(incoming), self._style.notice)
        delivery = StreamingDelivery(
            sink,
            self._style.limits,
            show_reasoning=self._show_reasoning,
            shared=shared,
            after=self._line.join(order if order is not None else incoming.key.channel_key),
            on_rate_limited=self._rate_limited,
        )
        deltas = typing_until_first(parts, typing, self._style.typing_every)
        await self.in_flight.deliver(delivery.run(deltas), say)

    async def text(self, incoming: Incoming) -> str:
        """The whole answer as one text, for platforms that post it at once."""
        parts = render(self._service.respond(incoming), self._style.notice)
        return "".join([part async for part in parts]).strip()

    def _rate_limited(self) -> None:
        self._service.observer.platform_limited(self._style.platform)
