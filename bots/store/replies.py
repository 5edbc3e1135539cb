"""Reply events in Redis: a stream per reply, so any replica serves a resume.

The replica answering writes each event's frame to the stream `{prefix}:reply:{id}`
behind the reply (one pipeline per turn of the event loop, for every reply at once), with
the entry id `0-<n + 1>` for event n, so a reader asks for exactly the events after the
last one it saw. The stream is capped, and expires `keep_seconds` after its last event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bots.store.errors import stop_if_cancelled, store_errors

log = logging.getLogger(__name__)

MAX_EVENTS = 20_000  # a reply of a few thousand tokens, with room
READ_COUNT = 512
DONE = b"done"


class RedisReplyLog:
    """Write replies' events behind them; read them back from any process.

    Args:
        client: the shared Redis.
        prefix: namespace of the streams.
        keep_seconds: a reply's events stay readable this long after its last one.
    """

    def __init__(self, client: Redis, *, prefix: str, keep_seconds: float) -> None:
        self._client = client
        self._prefix = prefix
        self._keep_ms = max(1, round(keep_seconds * 1000))
        self._pending: list[tuple[str, int, str, bytes, str | None]] = []
        self._wake = asyncio.Event()
        self._writing: asyncio.Task[None] | None = None

    def stream(self, reply_id: str) -> str:
        return f"{self._prefix}:reply:{reply_id}"

    async def __aenter__(self) -> RedisReplyLog:
        self._writing = asyncio.create_task(self._write(), name="reply-log")
        return self

    async def __aexit__(self, *_: object) -> None:
        """Write what is pending (the last events of replies that just ended), then stop."""
        if self._writing is not None:
            self._writing.cancel()
            await asyncio.gather(self._writing, return_exceptions=True)
        with contextlib.suppress(RedisError):
            await self._flush()

    def add(self, reply_id: str, index: int, kind: str, frame: bytes, owner: str | None) -> None:
        """Queue event `index` of a reply for writing; the first names its `owner`."""
        self._pending.append((self.stream(reply_id), index, kind, frame, owner))
        self._wake.set()

    async def owner(self, reply_id: str) -> str | None:
        """Whose reply this is (the conversation it answers), or None if none is kept."""
        with store_errors():
            first: Any = await self._client.xrange(self.stream(reply_id), count=1)
        owner = first[0][1].get(b"o") if first else None
        return owner.decode() if isinstance(owner, bytes) else None

    async def follow(
        self, reply_id: str, after: int = -1, *, idle: float = 15.0
    ) -> AsyncIterator[bytes | None]:
        """The reply's frames after event `after`, live until its `done`; None after `idle`
        seconds without one. Ends early if the reply's events expire (its replica died)."""
        stream, last = self.stream(reply_id), f"0-{after + 1}"
        while True:
            stop_if_cancelled()
            with store_errors():
                found: Any = await self._client.xread(
                    {stream: last}, count=READ_COUNT, block=round(idle * 1000)
                )
            if not found:
                with store_errors():
                    if not await self._client.exists(stream):
                        return
                yield None
                continue
            for entry, fields in found[0][1]:
                last = entry
                yield fields[b"f"]
                if fields.get(b"k") == DONE:
                    return

    async def _write(self) -> None:
        while True:
            stop_if_cancelled()
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._flush()
            except RedisError as error:  # the reply goes on; only a resume elsewhere misses it
                log.warning("reply events not kept: %s", error)
                await asyncio.sleep(0.5)

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        pipe = self._client.pipeline(transaction=False)
        for stream, index, kind, frame, owner in batch:
            fields: dict[Any, Any] = {"k": kind, "f": frame}
            if owner is not None:
                fields["o"] = owner
            pipe.xadd(stream, fields, id=f"0-{index + 1}", maxlen=MAX_EVENTS, approximate=True)
        for stream in {entry[0] for entry in batch}:
            pipe.pexpire(stream, self._keep_ms)
        await pipe.execute(raise_on_error=False)  # an event written before is not an error
