"""Arrival order: each key's holders are served one at a time, in the order they came.

`ArrivalLine` is the line of one process; `bots.store.line.RedisLine` is the same line
across processes. And the way out of a line held too long: a `Stoppable` answer can be
ended by a later arrival (/reset) at once, even while it waits on a model that does not
answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Hashable
from contextlib import aclosing, asynccontextmanager
from typing import TypeVar

from bots.core.models import ConversationKey
from bots.core.ports import Line

T = TypeVar("T")


class Place:
    """A place in one conversation's line: its turn comes when everyone before has left.

    Leaving is idempotent, and happens when the holder is garbage collected too, so a
    reply stream that was created but never consumed cannot block the conversation.
    """

    def __init__(self, before: asyncio.Future[None] | None, done: asyncio.Future[None]) -> None:
        self._before = before
        self.done = done

    async def wait(self) -> None:
        if self._before is not None:
            await asyncio.shield(self._before)

    def leave(self) -> None:
        if self.done.done():
            return
        if self._before is None or self._before.done():
            self.done.set_result(None)
        else:  # left before its turn: the next in line still waits for the one before
            self._before.add_done_callback(lambda _: self.leave())

    def __del__(self) -> None:
        if not self.done.get_loop().is_closed():
            self.leave()


class ArrivalLine:
    """Serve each key's holders strictly in the order they arrived; keys run concurrently.

    The `Line` of a single process: a stop asked of it is answered here.
    """

    def __init__(self) -> None:
        self._last: dict[Hashable, asyncio.Future[None]] = {}
        self._stop: Callable[[ConversationKey], None] = lambda _: None

    def stop(self, key: ConversationKey) -> None:
        self._stop(key)

    def on_stop(self, stop: Callable[[ConversationKey], None]) -> None:
        self._stop = stop

    def __len__(self) -> int:
        return len(self._last)

    def join(self, key: Hashable) -> Place:
        """Take a place now, synchronously: call order is arrival order."""
        done = asyncio.get_running_loop().create_future()
        place = Place(self._last.get(key), done)
        self._last[key] = done
        done.add_done_callback(lambda _: self._forget(key, done))
        return place

    def _forget(self, key: Hashable, done: asyncio.Future[None]) -> None:
        if self._last.get(key) is done:
            del self._last[key]


@asynccontextmanager
async def held(line: Line, key: ConversationKey) -> AsyncIterator[None]:
    """Hold `key`'s line for the block: wait for the turn, leave on the way out."""
    place = line.join(key)
    try:
        await place.wait()
        yield
    finally:
        place.leave()


class Stoppable:
    """An answer under way that another task may stop: at once while it awaits, else before
    its next step. Once it `finish`es (it is storing what it said) it runs to its end."""

    def __init__(self) -> None:
        self.stopped = False
        self._final = False
        self._stepping: asyncio.Task[object] | None = None  # the task running a step now

    def stop(self) -> None:
        """End the answer, unless it is already finishing."""
        if self._final or self.stopped:
            return
        self.stopped = True
        if self._stepping is not None:
            self._stepping.cancel()

    def finish(self) -> None:
        """From here on the answer runs to its end."""
        self._final = True

    async def run(self, parts: AsyncGenerator[T, None]) -> AsyncIterator[T]:
        """Pass `parts` on until they end or `stop()` ends them (then `stopped` is true)."""
        async with aclosing(parts):
            while not self.stopped:
                self._stepping = task = asyncio.current_task()
                try:
                    part = await anext(parts)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    # Ours, unless the task was cancelled besides (a shutdown): then re-raise.
                    if not self.stopped or task is None or task.uncancel() > 0:
                        raise
                    return
                finally:
                    self._stepping = None
                yield part
