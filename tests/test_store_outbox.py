"""The durable outbox on a real Redis: once each, in order per key, through failures,
restarts and a process that dies with deliveries in hand."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from redis.asyncio import Redis

from bots.store.outbox import GROUP, READ_COUNT, Delivery, Outbox, OutboxPolicy, Reject, Retry

FAST = OutboxPolicy(first_backoff=0.01, max_backoff=0.05, claim_after=30.0)


@dataclass
class Receiver:
    """Takes deliveries; fails while `down`, or the first `failures` times of a key."""

    down: bool = False
    failures: dict[str, int] = field(default_factory=dict)
    refuse: set[str] = field(default_factory=set)
    hold: asyncio.Event | None = None  # when set, every send waits for it
    got: list[Delivery] = field(default_factory=list)
    attempts: Counter[str] = field(default_factory=Counter)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def send(self, delivery: Delivery) -> None:
        async with self.changed:
            self.attempts[delivery.id] += 1
            self.changed.notify_all()
        if self.hold is not None:
            await self.hold.wait()
        if delivery.key in self.refuse:
            raise Reject("404 gone")
        if self.down:
            raise Retry("503", after=None)
        if self.failures.get(delivery.key, 0) > 0:
            self.failures[delivery.key] -= 1
            raise ConnectionError("reset by peer")
        async with self.changed:
            self.got.append(delivery)
            self.changed.notify_all()

    async def until(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        async def wait() -> None:
            async with self.changed:
                await self.changed.wait_for(predicate)

        await asyncio.wait_for(wait(), within)


@contextlib.asynccontextmanager
async def running(outbox: Outbox) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(outbox.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
def stream(key_prefix: str) -> str:
    return f"{key_prefix}:outbox:{{test}}"


@dataclass
class Tally:
    """The outbox's counts, awaitable."""

    counts: Counter[str] = field(default_factory=Counter)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, event: str) -> None:
        self.counts[event] += 1
        self.changed.set()

    def __getitem__(self, event: str) -> int:
        return self.counts[event]

    async def until(self, event: str, count: int, within: float = 10.0) -> None:
        async def wait() -> None:
            while self.counts[event] < count:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), within)


def outbox(
    redis: Redis, stream: str, receiver: Receiver, consumer: str = "a", **policy: float
) -> tuple[Outbox, Tally]:
    counts = Tally()
    chosen = dataclasses.replace(FAST, **policy)  # type: ignore[arg-type]
    box = Outbox(
        redis,
        stream=stream,
        consumer=consumer,
        send=receiver.send,
        policy=chosen,
        count=counts,
    )
    return box, counts


async def test_every_delivery_goes_once_in_order_per_key_through_failures(
    redis_client: Redis, stream: str
) -> None:
    receiver = Receiver(failures={"c1": 3, "c2": 1})
    box, counts = outbox(redis_client, stream, receiver)
    sent = [await box.put(f"c{n % 3}", {"n": n}) for n in range(30)]
    async with running(box):
        await counts.until("delivered", 30)
    assert sorted(d.id for d in receiver.got) == sorted(sent)
    by_key: dict[str, list[int]] = defaultdict(list)
    for delivery in receiver.got:
        by_key[delivery.key].append(delivery.body["n"])
    assert all(numbers == sorted(numbers) for numbers in by_key.values())
    assert counts["delivered"] == 30 and counts["retried"] == 4
    assert await box.backlog() == 0


async def test_a_failing_key_does_not_hold_up_the_others(redis_client: Redis, stream: str) -> None:
    receiver = Receiver(failures={"slow": 10**6})
    box, _ = outbox(redis_client, stream, receiver)
    await box.put("slow", {"n": 0})
    for n in range(5):
        await box.put("fast", {"n": n})
    async with running(box):
        await receiver.until(lambda: len(receiver.got) == 5)
    assert {d.key for d in receiver.got} == {"fast"}


async def test_a_restart_sends_what_was_queued_and_what_was_in_hand(
    redis_client: Redis, stream: str
) -> None:
    receiver = Receiver(hold=asyncio.Event())
    first, _ = outbox(redis_client, stream, receiver)
    ids = [await first.put("c", {"n": n}) for n in range(3)]
    async with running(first):  # stops while the first send hangs
        await receiver.until(lambda: receiver.attempts[ids[0]] == 1)
    receiver.hold = None
    ids.append(await first.put("c", {"n": 3}))  # queued while no process runs
    again, _ = outbox(redis_client, stream, receiver)  # the same consumer, restarted
    async with running(again):
        await receiver.until(lambda: len(receiver.got) == 4)
    assert [d.id for d in receiver.got] == ids


async def test_a_restart_takes_up_more_held_deliveries_than_one_read_returns(
    redis_client: Redis, stream: str
) -> None:
    receiver = Receiver()
    first, _ = outbox(redis_client, stream, receiver)
    held = READ_COUNT * 2 + 5
    ids = [await first.put(f"c{n}", {"n": n}) for n in range(held)]
    # As if consumer "a" read them all and stopped before sending one: all pending on it.
    await redis_client.xgroup_create(stream, GROUP, id="0")
    await redis_client.xreadgroup(GROUP, "a", {stream: ">"}, count=held)
    again, _ = outbox(redis_client, stream, receiver)  # the same consumer, restarted
    async with running(again):
        await receiver.until(lambda: len(receiver.got) == held)
    assert sorted(d.id for d in receiver.got) == sorted(ids)


async def test_another_process_takes_over_from_one_that_died(
    redis_client: Redis, stream: str
) -> None:
    receiver = Receiver(hold=asyncio.Event())
    dead, _ = outbox(redis_client, stream, receiver, consumer="dead")
    taken = await dead.put("c", {"n": 0})
    async with running(dead):
        await receiver.until(lambda: receiver.attempts[taken] == 1)
    receiver.hold = None
    alive, _ = outbox(redis_client, stream, receiver, consumer="alive", claim_after=0.2)
    async with running(alive):
        await receiver.until(lambda: len(receiver.got) == 1)
    assert receiver.got[0].id == taken


async def test_a_delivery_sent_before_its_process_died_is_not_sent_again(
    redis_client: Redis, stream: str
) -> None:
    receiver = Receiver()
    box, _ = outbox(redis_client, stream, receiver, consumer="first")
    delivery_id = await box.put("c", {"n": 0})
    # As if "first" sent it and died before acknowledging: the mark is there, the entry too.
    await redis_client.set(f"{stream}:done:{delivery_id}", "1")
    other, counts = outbox(redis_client, stream, receiver, consumer="other")
    async with running(other):
        await counts.until("duplicate", 1)
    assert receiver.attempts[delivery_id] == 0 and counts["delivered"] == 0
    assert await other.backlog() == 0


async def test_refused_and_expired_deliveries_are_given_up(
    redis_client: Redis, stream: str
) -> None:
    receiver = Receiver(refuse={"gone"})
    box, counts = outbox(redis_client, stream, receiver, give_up_after=0.0)
    refused = await box.put("gone", {"n": 0})
    receiver.down = True
    await box.put("late", {"n": 1})
    async with running(box):
        await counts.until("given_up", 2)
    assert receiver.attempts[refused] == 1 and receiver.got == []
    assert await box.backlog() == 0
