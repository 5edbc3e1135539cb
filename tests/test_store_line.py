"""A conversation's line across replicas, on a real Redis: two stores stand for two
processes (each its own line, tickets and listener)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import pytest
from redis.asyncio import Redis

from bots.core.line import held
from bots.core.models import ConversationKey, Role, Turn
from bots.core.ports import LineLost
from bots.store.line import RedisPlace
from bots.store.redis import RedisContextStore, conversation_slot

KEY = ConversationKey("http", "acme", "c1")
OTHER = ConversationKey("http", "acme", "c2")

Replicas = Callable[..., RedisContextStore]


@pytest.fixture
async def replica(redis_client: Redis, key_prefix: str) -> AsyncIterator[Replicas]:
    """Make stores on one Redis, each with its line listening, as a process would."""
    async with AsyncExitStack() as stack:

        async def open_line(store: RedisContextStore) -> None:
            await stack.enter_async_context(store.line)

        made: list[asyncio.Task[None]] = []

        def make(lease_seconds: float = 10.0) -> RedisContextStore:
            store = RedisContextStore(
                redis_client,
                prefix=key_prefix,
                max_turns=50,
                ttl_seconds=600,
                lease_seconds=lease_seconds,
            )
            made.append(asyncio.create_task(open_line(store)))
            return store

        yield make
        await asyncio.gather(*made)


async def test_one_conversation_is_served_in_ticket_order_across_replicas(
    replica: Replicas,
) -> None:
    """Arrival is the ticket's number, whichever replica took it; within one replica it
    is also the order of the calls."""
    a, b = replica(), replica()
    served: list[tuple[int, str]] = []  # (ticket number, replica and call)
    inside = 0

    async def hold(call: str, place: RedisPlace) -> None:
        nonlocal inside
        await place.wait()
        inside += 1
        assert inside == 1, "two holders at once"
        served.append((int(str(place.ticket).split("/")[0]), call))
        await asyncio.sleep(0)  # let the others try to get in
        inside -= 1
        place.leave()

    calls = {
        f"{name}{n:02}": store.line.join(KEY)
        for n in range(10)
        for name, store in (("a", a), ("b", b))
    }
    await asyncio.wait_for(asyncio.gather(*(hold(c, p) for c, p in calls.items())), 30)
    numbers = [number for number, _ in served]
    assert numbers == sorted(numbers) and len(set(numbers)) == 20
    for name in "ab":
        mine = [call for _, call in served if call.startswith(name)]
        assert mine == sorted(mine)


async def test_other_conversations_do_not_wait(replica: Replicas) -> None:
    a, b = replica(), replica()
    first = a.line.join(KEY)
    await first.wait()
    second = b.line.join(OTHER)
    await asyncio.wait_for(second.wait(), 5)  # while KEY is held
    first.leave()
    second.leave()


async def test_a_holder_whose_lease_lapsed_cannot_write(replica: Replicas) -> None:
    stalled, alive = replica(lease_seconds=1.0), replica(lease_seconds=1.0)
    place = stalled.line.join(KEY)
    await place.wait()
    place._renewing.cancel()  # type: ignore[union-attr]  # as if its process froze
    await stalled.append(KEY, Turn(Role.USER, "before the stall"))
    async with held(alive.line, KEY):  # the lease runs out; the other replica takes over
        await alive.append(KEY, Turn(Role.USER, "taken over"))
        with pytest.raises(LineLost):
            await stalled.append(KEY, Turn(Role.ASSISTANT, "late answer"))
        with pytest.raises(LineLost):
            await stalled.clear(KEY)
    assert [t.content for t in await alive.load(KEY)] == ["before the stall", "taken over"]
    place.leave()


async def test_a_replica_that_died_holding_frees_the_line_within_the_lease(
    replica: Replicas,
) -> None:
    dead, alive = replica(lease_seconds=2.0), replica(lease_seconds=2.0)
    place = dead.line.join(KEY)
    await place.wait()
    place._renewing.cancel()  # type: ignore[union-attr]  # killed: nothing renews or leaves
    loop = asyncio.get_running_loop()
    died = loop.time()
    async with held(alive.line, KEY):
        waited = loop.time() - died
    assert waited < 2.0 + alive.line.renew_every + 0.5
    del place


async def test_a_stop_reaches_the_replica_serving_the_conversation(replica: Replicas) -> None:
    serving, other = replica(), replica()
    stopped: asyncio.Future[ConversationKey] = asyncio.get_running_loop().create_future()

    def heard(key: ConversationKey) -> None:
        if not stopped.done():
            stopped.set_result(key)

    serving.line.on_stop(heard)
    async with held(serving.line, KEY):
        for _ in range(50):  # the listener subscribes as the store opens: ask until heard
            other.line.stop(KEY)
            done, _ = await asyncio.wait({stopped}, timeout=0.1)
            if done:
                break
        assert stopped.result() == KEY


async def test_writes_go_on_when_redis_lost_the_line(
    replica: Replicas, redis_client: Redis
) -> None:
    store = replica()
    async with held(store.line, KEY):
        await redis_client.delete(*store.line.keys(conversation_slot(KEY)))  # line, counter
        await store.append(KEY, Turn(Role.USER, "after a restart without the data"))
    assert [t.content for t in await store.load(KEY)] == ["after a restart without the data"]
