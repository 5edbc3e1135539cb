"""A durable outbox: deliveries kept in a Redis stream until they went out or were given up.

`put` appends a delivery to the stream `{prefix}:outbox:{name}`; every process running the
outbox reads it through one consumer group, so each delivery is handed to one of them.
A delivery stays pending until it is acknowledged: a process that restarts reads its own
pending ones again, and those of a process that died are claimed by another after
`claim_after` seconds. Deliveries of one key (a conversation) go out one at a time, in
order; a failure is retried with capped exponential backoff until `give_up_after`, while
the other keys carry on. A delivery done is marked with its id before it is acknowledged,
so one claimed twice is not sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from bots.store.errors import stop_if_cancelled

log = logging.getLogger(__name__)

GROUP = "deliver"
READ_COUNT = 64
READ_BLOCK_MS = 1_000

# Mark delivery ARGV[1] done (for ARGV[2] seconds), then acknowledge and delete its entry
# ARGV[3] of the stream KEYS[1]: a claim racing with this sees it done, never half done.
DONE = """
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
redis.call('XACK', KEYS[1], ARGV[4], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One thing to send: its stable id, the key it is ordered by, and its body."""

    id: str
    key: str
    body: dict[str, Any]
    queued_at: float
    attempts: int = 0  # failed attempts so far (in this process)


class Retry(Exception):
    """The receiver is unavailable for now (down, 5xx, 429): send again later."""

    def __init__(self, reason: str, after: float | None = None) -> None:
        super().__init__(reason)
        self.after = after  # what the receiver asked for (Retry-After), if anything


class Reject(Exception):
    """The receiver refused the delivery for good (4xx): sending it again cannot help."""


Send = Callable[[Delivery], Awaitable[None]]
Count = Callable[[str], None]  # "queued", "delivered", "retried", "given_up", "duplicate"


@dataclass(frozen=True, slots=True)
class OutboxPolicy:
    """How hard the outbox tries.

    Args:
        first_backoff: seconds before the first retry; each next one waits twice as long.
        max_backoff: the longest wait between two attempts.
        give_up_after: a delivery still failing this long after it was queued is dropped.
        claim_after: another process's delivery pending this long is taken over (more
            than `max_backoff` plus a send's timeout, so a living process keeps its own).
        concurrency: deliveries sent at once by this process.
    """

    first_backoff: float = 1.0
    max_backoff: float = 60.0
    give_up_after: float = 24 * 3600.0
    claim_after: float = 180.0
    concurrency: int = 16


class Outbox:
    """Send deliveries put in a Redis stream, whichever process put them; `run` sends.

    Args:
        redis: the shared Redis.
        stream: the stream's key (one per kind of delivery).
        consumer: this process's name in the group: stable across its restarts (a host
            name), so that it reads back what it held when it stopped.
        send: delivers one; raises `Retry` or `Reject` (any other error counts as Retry).
        policy: backoff, give-up and take-over times.
        count: told of each event, for metrics.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        stream: str,
        consumer: str,
        send: Send,
        policy: OutboxPolicy = OutboxPolicy(),
        count: Count | None = None,
    ) -> None:
        self._redis = redis
        self._stream = stream
        self._consumer = consumer
        self._send = send
        self._policy = policy
        self._count: Count = count or (lambda _: None)
        self._done = redis.register_script(DONE)
        self._lanes: dict[str, asyncio.Queue[tuple[str, Delivery]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(policy.concurrency)
        self._held = asyncio.Semaphore(policy.concurrency * READ_COUNT)  # read, not yet done
        self._holding: set[str] = set()  # entry ids read and not done, in this process

    async def put(self, key: str, body: dict[str, Any], delivery_id: str | None = None) -> str:
        """Queue a delivery (raises RedisError when Redis is down); returns its id."""
        delivery_id = delivery_id or uuid.uuid4().hex
        record = {"id": delivery_id, "key": key, "body": body, "at": time.time()}
        await self._redis.xadd(self._stream, {"d": json.dumps(record, ensure_ascii=False)})
        self._count("queued")
        return delivery_id

    async def backlog(self) -> int:
        """Deliveries not done yet, in every process."""
        length: int = await self._redis.xlen(self._stream)
        return length

    async def run(self) -> None:
        """Send until cancelled: first what this consumer held, then new and claimed ones."""
        await self._create_group()
        try:
            start: str | None = "0"
            while start is not None:  # what this consumer held before a restart, by pages
                held = await self._read(start)
                await self._take(held)
                start = held[-1][0] if held else None
            claimed_at = 0.0
            while True:
                stop_if_cancelled()
                if time.monotonic() - claimed_at > self._policy.claim_after / 4:
                    claimed_at = time.monotonic()
                    await self._take(await self._claim())
                await self._take(await self._read(">"))
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _create_group(self) -> None:
        with contextlib.suppress(ResponseError):  # BUSYGROUP: another process made it
            await self._redis.xgroup_create(self._stream, GROUP, id="0", mkstream=True)

    async def _read(self, start: str) -> list[tuple[str, dict[bytes, bytes]]]:
        try:
            answer: Any = await self._redis.xreadgroup(
                GROUP,
                self._consumer,
                {self._stream: start},
                count=READ_COUNT,
                block=None if start == "0" else READ_BLOCK_MS,
            )
        except RedisError as error:
            log.warning("outbox %s: cannot read (%s); retrying", self._stream, error)
            await asyncio.sleep(self._policy.first_backoff)
            return []
        return [(_text(entry), fields) for _, entries in answer for entry, fields in entries]

    async def _claim(self) -> list[tuple[str, dict[bytes, bytes]]]:
        idle_ms = int(self._policy.claim_after * 1000)
        try:
            _, entries, *_ = await self._redis.xautoclaim(
                self._stream, GROUP, self._consumer, idle_ms, count=READ_COUNT
            )
        except RedisError as error:
            log.warning("outbox %s: cannot claim (%s)", self._stream, error)
            return []
        return [(_text(entry), fields) for entry, fields in entries if fields]

    async def _take(self, entries: list[tuple[str, dict[bytes, bytes]]]) -> None:
        for entry, fields in entries:
            if entry in self._holding:  # its lane has it already (a claim of our own)
                continue
            try:
                record = json.loads(fields[b"d"])
                delivery = Delivery(
                    record["id"], record["key"], record["body"], float(record["at"])
                )
            except (KeyError, ValueError, TypeError):
                log.error("outbox %s: dropping unreadable entry %s", self._stream, entry)
                await self._finish(entry, None)
                continue
            await self._held.acquire()
            self._holding.add(entry)
            lane = self._lanes.get(delivery.key)
            if lane is None:
                lane = self._lanes[delivery.key] = asyncio.Queue()
                task = asyncio.create_task(self._drain(delivery.key, lane))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            lane.put_nowait((entry, delivery))

    async def _drain(self, key: str, lane: asyncio.Queue[tuple[str, Delivery]]) -> None:
        """Send one key's deliveries in order; the lane ends when it is empty."""
        while not lane.empty():
            entry, delivery = lane.get_nowait()
            try:
                await self._deliver(entry, delivery)
            finally:
                self._holding.discard(entry)
                self._held.release()
        del self._lanes[key]

    async def _deliver(self, entry: str, delivery: Delivery) -> None:
        policy = self._policy
        while True:
            stop_if_cancelled()
            try:
                if await self._redis.exists(self._done_key(delivery.id)):
                    await self._finish(entry, delivery)  # sent by a process that lost it
                    self._count("duplicate")
                    return
            except RedisError as error:  # whether it went out cannot be told yet
                log.warning("outbox %s: cannot check (%s); retrying", self._stream, error)
                await asyncio.sleep(policy.first_backoff)
                continue
            try:
                async with self._slots:
                    await self._send(delivery)
            except Reject as error:
                log.error("outbox %s: delivery %s refused: %s", self._stream, delivery.id, error)
                await self._finish(entry, delivery, sent=False)
                self._count("given_up")
                return
            except Exception as error:  # Retry, or anything a send can throw
                after = error.after if isinstance(error, Retry) else None
                delivery = replace(delivery, attempts=delivery.attempts + 1)
                if time.time() - delivery.queued_at > policy.give_up_after:
                    log.error("outbox %s: giving up on %s: %s", self._stream, delivery.id, error)
                    await self._finish(entry, delivery, sent=False)
                    self._count("given_up")
                    return
                self._count("retried")
                await asyncio.sleep(self._backoff(delivery.attempts, after))
                await self._keep(entry)
                continue
            await self._finish(entry, delivery)
            self._count("delivered")
            return

    def _backoff(self, attempts: int, asked: float | None) -> float:
        policy = self._policy
        wait: float = min(policy.first_backoff * 2.0 ** (attempts - 1), policy.max_backoff)
        wait *= random.uniform(0.5, 1.0)  # replicas retrying together spread out
        return min(max(wait, asked or 0.0), policy.max_backoff)

    async def _keep(self, entry: str) -> None:
        """Reset the entry's idle time, so that no other process takes it over."""
        with contextlib.suppress(RedisError):
            await self._redis.xclaim(self._stream, GROUP, self._consumer, 0, [entry], justid=True)

    async def _finish(self, entry: str, delivery: Delivery | None, *, sent: bool = True) -> None:
        """Acknowledge an entry done (marking a sent delivery's id); retried while Redis is
        down, since an entry left pending would be sent again."""
        while True:
            try:
                if delivery is not None and sent:
                    keys = [self._stream, self._done_key(delivery.id)]
                    ttl = int(self._policy.give_up_after) + 3600
                    await self._done(keys=keys, args=[delivery.id, ttl, entry, GROUP])
                else:
                    await self._redis.xack(self._stream, GROUP, entry)
                    await self._redis.xdel(self._stream, entry)
                return
            except RedisError as error:
                log.warning("outbox %s: cannot acknowledge (%s); retrying", self._stream, error)
                stop_if_cancelled()
                await asyncio.sleep(self._policy.first_backoff)

    def _done_key(self, delivery_id: str) -> str:
        return f"{self._stream}:done:{delivery_id}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
