"""The one place Redis's errors become the core's `StoreUnavailable`."""

from __future__ import annotations

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
