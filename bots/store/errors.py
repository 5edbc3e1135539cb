"""The one place Redis's errors become the core's `StoreUnavailable`; and the check that
a loop around Redis calls was cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from redis.exceptions import RedisError

from bots.core.ports import StoreUnavailable


@contextmanager
def store_errors() -> Iterator[None]:
    """Raise `StoreUnavailable` for a Redis error in the block, chained to it."""
    try:
        yield
    except RedisError as error:
        raise StoreUnavailable(str(error)) from error


def stop_if_cancelled() -> None:
    """Raise `CancelledError` if the running task was asked to stop.

    redis-py can swallow a cancellation that lands while a command waits on its timeout
    (redis/redis-py#2028, #2551): the task runs on as if it had never been cancelled, and
    a loop around Redis calls would never end. The request stays counted
    (`Task.cancelling`), so every such loop asks here on each turn.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
