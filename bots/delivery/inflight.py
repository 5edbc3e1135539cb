"""Replies a platform bot is delivering, so that stopping lets them finish first.

On SIGTERM a bot stops taking messages, gives the replies in progress a bounded time to
end, and cancels the rest; each cancelled reply tells its user, and records nothing
(the service records an exchange only once its reply is whole).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

RESTART_NOTICE = "I'm restarting, so this reply stops here. Send your message again in a minute."
CLOSED_NOTICE = "I'm restarting and can't answer this now. Send your message again in a minute."


class InFlight:
    """The tasks delivering replies now; `closing` once a shutdown has begun."""

    def __init__(self) -> None:
        self._closing = asyncio.Event()
        self._tasks: dict[asyncio.Task[Any], int] = {}  # how deep each task is tracked
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    async def stopping(self) -> None:
        """Wait until a shutdown has begun."""
        await self._closing.wait()

    async def idle(self) -> None:
        """Wait until no reply is being delivered."""
        await self._idle.wait()

    def add(self, task: asyncio.Task[Any]) -> None:
        """Count a task as delivering a reply until it ends."""
        self._start(task)
        task.add_done_callback(self._end)

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count the current task as delivering a reply until the block ends (blocks nest)."""
        task = asyncio.current_task()
        assert task is not None
        self._start(task)
        try:
            yield
        finally:
            self._end(task)

    def _start(self, task: asyncio.Task[Any]) -> None:
        self._tasks[task] = self._tasks.get(task, 0) + 1
        self._idle.clear()

    def _end(self, task: asyncio.Task[Any]) -> None:
        depth = self._tasks.pop(task, 0) - 1
        if depth > 0:
            self._tasks[task] = depth
        elif not self._tasks:
            self._idle.set()

    async def deliver(
        self, reply: Awaitable[object], say: Callable[[str], Awaitable[object]]
    ) -> None:
        """Deliver a reply as one of these; if a shutdown cancels it, `say` the notice."""
        with self.track():
            try:
                await reply
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await say(RESTART_NOTICE)
                raise

    async def drain(self, grace: float) -> None:
        """Take no more; let replies in progress end within `grace` seconds, cancel the rest."""
        self._closing.set()
        if not self._tasks:
            return
        log.info("waiting up to %.0f s for %d replies", grace, len(self._tasks))
        _, late = await asyncio.wait(set(self._tasks), timeout=grace)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
