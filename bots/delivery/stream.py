"""Stream reply text into platform messages: send, edit at a paced rate, continue past the limit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from bots.core.line import Place
from bots.delivery.split import split_message

Ref = TypeVar("Ref")

# The final text is retried, waiting out budgets and 429s, for this long at most.
FINAL_DEADLINE_S = 600.0
EMPTY_REPLY = "(The model gave no answer.)"
log = logging.getLogger(__name__)


class RateLimited(Exception):
    """The platform asked us to wait `retry_after` seconds before the next call."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"rate limited for {retry_after:.2f} s")
        self.retry_after = retry_after


class PlatformFailed(Exception):
    """The platform failed in a way that may pass: a 5xx, a timeout, a network error."""


WINDOW_MARGIN_S = 0.1
# Waits after a platform failure: doubling from the first, capped.
FIRST_RETRY_S = 0.5
MAX_RETRY_S = 30.0


class _OverBudget(Exception):
    """Our own budget for this reply is spent until `wait` seconds from now."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"over budget for {wait:.2f} s")
        self.wait = wait


class CallWindow:
    """At most `limit` calls in any `seconds`; intermediate updates keep `reserve` free.

    One per reply keeps a reply within an edit budget; one shared by every reply in a
    chat keeps the chat within the platform's per-chat limit.
    """

    def __init__(self, limit: int, seconds: float, *, reserve: int = 0) -> None:
        self.limit = limit
        self.seconds = seconds
        self.reserve = reserve
        self._calls: deque[float] = deque()

    def wait(self, now: float, *, final: bool) -> float:
        """Seconds until one more call fits (an intermediate one must leave the reserve)."""
        while self._calls and self._calls[0] <= now - self.seconds:
            self._calls.popleft()
        room = self.limit - (0 if final else self.reserve)
        if len(self._calls) < room:
            return 0.0
        return self._calls[len(self._calls) - room] + self.seconds - now

    def spend(self, now: float) -> None:
        self._calls.append(now)


class MessageSink(Protocol[Ref]):
    """Where one reply goes: a chat's send and edit operations."""

    async def send(self, text: str) -> Ref:
        """Post a new message and return a handle to edit it."""
        ...

    async def edit(self, message: Ref, text: str) -> None:
        """Replace a posted message's text."""
        ...


@dataclass(frozen=True, slots=True)
class Limits:
    """A platform's message limits.

    Args:
        max_chars: the most characters one message may hold.
        edit_interval: seconds between two intermediate updates of a streaming reply.
        burst: the most calls (sends and edits) one reply makes in any `window` seconds.
        window: the length of that window, in seconds.

    Intermediate updates are spaced `edit_interval` apart, which keeps a slot of the
    burst free, so the final text goes out as soon as the last token is in.
    """

    max_chars: int
    edit_interval: float
    burst: int
    window: float


@dataclass
class Report:
    """What one delivery did, for logs, metrics and benchmarks."""

    sends: int = 0
    edits: int = 0
    rate_limited: int = 0
    failed: int = 0  # platform failures retried
    messages: int = 0
    finished_at: float = 0.0

    @property
    def calls(self) -> int:
        return self.sends + self.edits


class StreamingDelivery(Generic[Ref]):
    """Show a streamed reply as it grows, within the platform's limits and edit rate.

    Deltas are coalesced: at most one update per `edit_interval`, always with the
    latest text. A 429 pushes the next update back by its `retry_after`. The final text
    is always delivered, whatever updates were skipped on the way. Past `max_chars`
    the reply continues in a new message, code blocks closed and reopened.
    """

    def __init__(
        self,
        sink: MessageSink[Ref],
        limits: Limits,
        *,
        shared: Sequence[CallWindow] = (),
        after: Place | None = None,
        on_rate_limited: Callable[[], None] | None = None,
    ) -> None:
        self._sink = sink
        self._on_rate_limited = on_rate_limited
        self._limits = limits
        self._text = ""
        self._quiet = False
        self._shown: list[tuple[Ref, str]] = []
        self._next_update = 0.0
        self._last_update = -float("inf")
        # The platform counts calls as they arrive, we as they leave: a little margin keeps
        # a call delayed in transit from landing inside the last one's window.
        burst = CallWindow(limits.burst, limits.window + WINDOW_MARGIN_S)
        self._windows = [burst, *shared]
        self._retry_wait = FIRST_RETRY_S
        self._after = after
        self.turn = asyncio.Event()  # set when this reply's turn to be shown has come
        self.report = Report()

    def stay_quiet(self) -> None:
        """Post nothing for an empty reply: the bot is quiet on purpose (people answer)."""
        self._quiet = True

    async def run(self, deltas: AsyncIterable[str]) -> Report:
        """Deliver the whole stream; return what was done."""
        changed = asyncio.Event()

        async def pump() -> None:
            async for delta in deltas:
                self._text += delta
                changed.set()

        pumping = asyncio.create_task(pump())
        try:
            if self._after is not None:  # replies in a chat appear in the order asked
                await self._after.wait()
            self.turn.set()
            while not pumping.done():
                waiter = asyncio.create_task(changed.wait())
                await asyncio.wait({pumping, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                delay = self._wait_before(final=False)
                if delay > 0:
                    await asyncio.wait({pumping}, timeout=delay)
                if pumping.done():
                    break
                changed.clear()
                await self._update(final=False)
            await pumping
            await self._finish()
        except Exception:
            # The platform refused for good: the answer is still read to its end, so the
            # service records the exchange; then the failure is reported.
            with contextlib.suppress(Exception):
                await pumping
            raise
        finally:
            pumping.cancel()
            if self._after is not None:
                self._after.leave()
        return self.report

    async def replace_with(self, text: str) -> bool:
        """Edit the message being streamed into `text` (a reply cut short says why there);
        False when nothing was posted yet."""
        if not self._shown:
            return False
        message, _ = self._shown[-1]
        await self._sink.edit(message, text)
        self._shown[-1] = (message, text)
        return True

    async def _finish(self) -> None:
        """Deliver the final text, however long the budgets and the platform make us wait."""
        give_up_at = time.monotonic() + FINAL_DEADLINE_S
        while True:
            delay = self._wait_before(final=True)
            if delay > 0:
                await asyncio.sleep(delay)
            if await self._update(final=True):
                break
            if time.monotonic() > give_up_at:
                log.error("final text not delivered after %.0f s", FINAL_DEADLINE_S)
                break
        self.report.finished_at = time.monotonic()
        self.report.messages = len(self._shown)

    def _spend_call(self, *, final: bool) -> None:
        """Count a call against every window, or refuse it until they all have room."""
        now = time.monotonic()
        wait = max(window.wait(now, final=final) for window in self._windows)
        if wait > 0:
            raise _OverBudget(wait)
        for window in self._windows:
            window.spend(now)

    def _wait_before(self, *, final: bool) -> float:
        """Seconds until the next update may go out: paced, or for the final one, in budget."""
        now = time.monotonic()
        wait = max(self._next_update - now, *(w.wait(now, final=final) for w in self._windows))
        if not final:
            wait = max(wait, self._last_update + self._limits.edit_interval - now)
        return wait

    async def _update(self, *, final: bool) -> bool:
        """Bring the posted messages up to the current text; False if rate limited."""
        visible = self._text
        if final and not visible.strip():
            if self._quiet:  # nothing to say, on purpose: nothing is posted
                return True
            visible = EMPTY_REPLY
        pieces = [p.text for p in split_message(visible, self._limits.max_chars)]
        try:
            for index, text in enumerate(t for t in pieces if t.strip()):
                if index < len(self._shown):
                    message, shown = self._shown[index]
                    if shown != text:
                        self._spend_call(final=final)
                        await self._sink.edit(message, text)
                        self.report.edits += 1
                        self._shown[index] = (message, text)
                else:
                    self._spend_call(final=final)
                    self._shown.append((await self._sink.send(text), text))
                    self.report.sends += 1
        except _OverBudget as over:
            self._next_update = time.monotonic() + over.wait
            return False
        except RateLimited as limited:
            self.report.rate_limited += 1
            if self._on_rate_limited is not None:  # e.g. the platform's 429 metric
                self._on_rate_limited()
            self._next_update = time.monotonic() + limited.retry_after
            return False
        except PlatformFailed as failed:
            log.warning("platform call failed (%s); retrying in %.1f s", failed, self._retry_wait)
            self.report.failed += 1
            self._next_update = time.monotonic() + self._retry_wait
            self._retry_wait = min(self._retry_wait * 2, MAX_RETRY_S)
            return False
        self._retry_wait = FIRST_RETRY_S
        self._last_update = time.monotonic()
        return True
