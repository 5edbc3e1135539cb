"""Rate limits and token budgets on a real Redis, shared by several clients."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from bots.core.models import Author, ConversationKey, Incoming, NoticeKind
from bots.core.ports import StoreUnavailable
from bots.core.service import ConversationService
from bots.runtime import connect_redis
from bots.store.limits import RedisLimiter
from bots.store.redis import RedisContextStore
from tests.fakes import ScriptedModel, collect, notices

ROOM = ConversationKey("test", "room")


def limiter(client: Redis, prefix: str, **limits: float) -> RedisLimiter:
    options = {
        "user_messages": 5,
        "user_window": 60.0,
        "conversation_messages": 0,
        "conversation_window": 60.0,
        "daily_tokens": 0,
        **limits,
    }
    return RedisLimiter(client, prefix=prefix, **options)  # type: ignore[arg-type]


async def test_a_user_gets_exactly_the_limit_then_a_wait(
    redis_client: Redis, key_prefix: str
) -> None:
    limits = limiter(redis_client, key_prefix)
    results = [await limits.admit("test:1", ROOM) for _ in range(7)]
    assert [r.admitted for r in results] == [True] * 5 + [False] * 2
    assert results[-1].reason == "user" and 58 < results[-1].retry_after <= 60
    assert (await limits.admit("test:2", ROOM)).admitted, "other users are not affected"


async def test_the_window_slides(redis_client: Redis, key_prefix: str) -> None:
    limits = limiter(redis_client, key_prefix, user_messages=2, user_window=0.3)
    assert (await limits.admit("test:1", ROOM)).admitted
    assert (await limits.admit("test:1", ROOM)).admitted
    refused = await limits.admit("test:1", ROOM)
    assert not refused.admitted
    await asyncio.sleep(refused.retry_after + 0.02)
    assert (await limits.admit("test:1", ROOM)).admitted


async def test_two_replicas_hammering_one_user_admit_no_more_than_the_limit(
    redis_url: str, key_prefix: str
) -> None:
    clients = [connect_redis(redis_url) for _ in range(2)]
    try:
        replicas = [limiter(c, key_prefix, user_messages=25) for c in clients]
        tries = [replicas[i % 2].admit("test:1", ROOM) for i in range(400)]
        results = await asyncio.gather(*tries)
    finally:
        for client in clients:
            await client.aclose()
    assert sum(r.admitted for r in results) == 25


async def test_a_busy_conversation_refuses_and_gives_the_user_place_back(
    redis_client: Redis, key_prefix: str
) -> None:
    limits = limiter(redis_client, key_prefix, user_messages=3, conversation_messages=2)
    assert (await limits.admit("test:1", ROOM)).admitted
    assert (await limits.admit("test:2", ROOM)).admitted
    refused = await limits.admit("test:1", ROOM)
    assert not refused.admitted and refused.reason == "conversation"
    other = ConversationKey("test", "elsewhere")
    assert (await limits.admit("test:1", other)).admitted
    assert (await limits.admit("test:1", other)).admitted, "the refused message cost nothing"
    assert not (await limits.admit("test:1", other)).admitted


async def test_the_daily_budget_counts_tokens_and_stops_at_the_limit(
    redis_client: Redis, key_prefix: str
) -> None:
    limits = limiter(redis_client, key_prefix, user_messages=0, daily_tokens=1000)
    assert (await limits.admit("test:1", ROOM)).admitted
    await limits.charge("test:1", 600)
    await limits.charge("test:1", 450)
    usage = await limits.usage("test:1")
    assert (usage.used, usage.budget) == (1050, 1000) and 0 < usage.resets_in <= 86_400
    refused = await limits.admit("test:1", ROOM)
    assert not refused.admitted and refused.reason == "budget"
    assert 0 < refused.retry_after <= 86_400
    assert await redis_client.ttl(limits.tokens_key("test:1")) > 86_400


async def test_unreachable_redis_is_reported_as_such(key_prefix: str) -> None:
    from tests.conftest import free_port

    client = Redis.from_url(f"redis://127.0.0.1:{free_port()}", socket_connect_timeout=0.5)
    try:
        with pytest.raises(StoreUnavailable):
            await limiter(client, key_prefix).admit("test:1", ROOM)
    finally:
        await client.aclose()


async def test_two_service_replicas_share_the_limit_and_the_context(
    redis_url: str, key_prefix: str
) -> None:
    clients = [connect_redis(redis_url) for _ in range(2)]
    try:
        replicas = [
            ConversationService(
                RedisContextStore(client, prefix=key_prefix, max_turns=100, ttl_seconds=60),
                ScriptedModel(),
                limiter=limiter(client, key_prefix, user_messages=6),
            )
            for client in clients
        ]
        ada = Author("1", "Ada")
        rooms = [ConversationKey("test", f"room-{i}") for i in range(10)]
        answers = await asyncio.gather(
            *(
                collect(replicas[i % 2], Incoming(rooms[i], f"hello {i}", author=ada))
                for i in range(10)
            )
        )
        store = RedisContextStore(clients[0], prefix=key_prefix, max_turns=100, ttl_seconds=60)
        stored = [len(await store.load(room)) for room in rooms]
    finally:
        for client in clients:
            await client.aclose()
    limited = [notices(parts) == [NoticeKind.RATE_LIMITED] for parts in answers]
    assert limited.count(False) == 6 and limited.count(True) == 4
    assert [2 if not refused else 0 for refused in limited] == stored, "only answers are stored"
