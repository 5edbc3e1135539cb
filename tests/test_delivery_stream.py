"""Streaming delivery: pacing, coalescing, 429s, platform failures, continuation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from bots.delivery.split import split_message
from bots.delivery.stream import (
    EMPTY_REPLY,
    Limits,
    PlatformFailed,
    RateLimited,
    StreamingDelivery,
)

FAST = Limits(max_chars=100, edit_interval=0.2, burst=5, window=1.0)


@dataclass
class RecordingSink:
    """A chat that keeps every message's text, the time of each call, and can answer 429."""

    messages: list[str] = field(default_factory=list)
    calls: list[float] = field(default_factory=list)
    limit_edits: list[float] = field(default_factory=list)  # retry_after of the next edits

    async def send(self, text: str) -> int:
        self.calls.append(time.monotonic())
        self.messages.append(text)
        return len(self.messages) - 1

    async def edit(self, message: int, text: str) -> None:
        self.calls.append(time.monotonic())
        if self.limit_edits:
            raise RateLimited(self.limit_edits.pop(0))
        self.messages[message] = text


async def tokens(words: list[str], per_second: float) -> AsyncIterator[str]:
    for word in words:
        await asyncio.sleep(1 / per_second)
        yield word


WORDS = [f"w{i} " for i in range(60)]


async def test_deltas_are_coalesced_and_the_final_text_is_exact() -> None:
    sink = RecordingSink()
    report = await StreamingDelivery(sink, Limits(10_000, 0.25, 5, 1.0)).run(tokens(WORDS, 50))
    assert sink.messages == ["".join(WORDS)]
    assert report.calls <= 1 + 1.2 / 0.25 + 1, "about one update per interval, not per token"
    assert report.calls >= 3, "the reply grew while it streamed"


async def test_no_window_ever_holds_more_calls_than_the_burst() -> None:
    sink = RecordingSink()
    await StreamingDelivery(sink, FAST).run(tokens(WORDS * 3, 100))
    for start in sink.calls:
        assert sum(start <= t < start + FAST.window for t in sink.calls) <= FAST.burst


async def test_a_429_delays_the_next_update_and_the_final_text_still_arrives() -> None:
    sink = RecordingSink(limit_edits=[0.4, 0.4])
    report = await StreamingDelivery(sink, FAST).run(tokens(WORDS[:20], 50))
    assert report.rate_limited == 2
    assert sink.messages == ["".join(WORDS[:20])]
    limited_at = sink.calls[1]
    assert all(t >= limited_at + 0.4 - 0.01 for t in sink.calls[2:]), "retry_after honoured"


async def test_the_final_update_follows_the_last_token_at_once() -> None:
    sink = RecordingSink()
    delivery = StreamingDelivery(sink, Limits(10_000, 1.0, 5, 5.0))
    last_token_at = 0.0

    async def stream() -> AsyncIterator[str]:
        nonlocal last_token_at
        async for word in tokens(WORDS[:30], 50):
            yield word
            last_token_at = time.monotonic()

    report = await delivery.run(stream())
    assert report.finished_at - last_token_at < 0.1


async def test_a_long_reply_continues_in_new_messages() -> None:
    sink = RecordingSink()
    text = "Look:\n```py\n" + "".join(f"x = {i}\n" for i in range(40)) + "```\nDone."
    pieces = [text[i : i + 7] for i in range(0, len(text), 7)]

    async def stream() -> AsyncIterator[str]:
        for piece in pieces:
            yield piece

    report = await StreamingDelivery(sink, FAST).run(stream())
    assert sink.messages == [p.text for p in split_message(text, FAST.max_chars)]
    assert report.messages == len(sink.messages) > 2
    assert all(len(m) <= FAST.max_chars for m in sink.messages)


async def test_a_reply_with_nothing_to_show_says_so() -> None:
    async def stream() -> AsyncIterator[str]:  # a reasoning model that only thought
        for piece in list[str]():
            yield piece

    sink = RecordingSink()
    await StreamingDelivery(sink, FAST).run(stream())
    assert sink.messages == [EMPTY_REPLY]


@dataclass
class FailingSink(RecordingSink):
    """A chat whose next calls fail: `transient` with a 5xx-like error, or for good."""

    transient: int = 0
    broken: bool = False

    async def send(self, text: str) -> int:
        self._fail()
        return await super().send(text)

    async def edit(self, message: int, text: str) -> None:
        self._fail()
        await super().edit(message, text)

    def _fail(self) -> None:
        if self.broken:
            raise PermissionError("no right to post here")
        if self.transient:
            self.transient -= 1
            raise PlatformFailed("502 Bad Gateway")


async def test_platform_failures_are_retried_and_the_final_text_arrives() -> None:
    sink = FailingSink(transient=3)
    report = await StreamingDelivery(sink, FAST).run(tokens(WORDS[:20], 100))
    assert sink.messages == ["".join(WORDS[:20])]
    assert report.failed == 3


async def test_a_platform_that_refuses_for_good_still_lets_the_answer_end() -> None:
    """The model's answer is read to its end (so the service records it), then the error."""
    read: list[str] = []

    async def answer() -> AsyncIterator[str]:
        for word in WORDS[:10]:
            await asyncio.sleep(0.01)
            read.append(word)
            yield word

    with pytest.raises(PermissionError):
        await StreamingDelivery(FailingSink(broken=True), FAST).run(answer())
    assert read == WORDS[:10]
