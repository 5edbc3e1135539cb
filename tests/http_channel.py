"""Run the HTTP channel in the test's event loop, on a loopback port, over a real Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import httpx

from bots.core.handoff import HandoffPolicy, Handoffs
from bots.core.ports import ChatModel
from bots.core.service import ChatPolicy, ConversationService
from bots.platforms.http import run_http
from bots.runtime import connect_redis
from bots.settings import HttpSettings
from bots.store.keys import RedisApiKeys
from bots.store.limits import RedisLimiter
from bots.store.redis import RedisContextStore
from tests.conftest import free_port


@dataclass
class Channel:
    url: str
    keys: RedisApiKeys
    service: ConversationService
    task: asyncio.Task[None]

    async def key(self, integration: str = "acme", **quota: Any) -> str:
        key, _ = await self.keys.create(integration, **quota)
        return key


@asynccontextmanager
async def http_channel(
    redis_url: str,
    prefix: str,
    model: ChatModel,
    *,
    user_messages: int = 1000,
    conversation_messages: int = 0,
    policy: ChatPolicy | None = None,
    handoff: HandoffPolicy | None = None,
    **settings: Any,
) -> AsyncIterator[Channel]:
    """Serve `python -m bots http`'s app with this model; stop it (as SIGTERM would) after.

    With a `handoff` policy, conversations can go to people, as `python -m bots http` does.
    """
    stack = AsyncExitStack()
    redis = connect_redis(redis_url)
    store = RedisContextStore(redis, prefix=prefix, max_turns=200, ttl_seconds=3600)
    limiter = RedisLimiter(
        redis,
        prefix=prefix,
        user_messages=user_messages,
        user_window=60,
        conversation_messages=conversation_messages,
        conversation_window=60,
        daily_tokens=0,
    )
    handoffs = None if handoff is None else Handoffs(store, store, handoff)
    service = ConversationService(
        store,
        model,
        limiter=limiter,
        policy=policy or ChatPolicy(),
        handoffs=handoffs,
        line=await stack.enter_async_context(store.line),
    )
    keys = RedisApiKeys(redis, prefix=prefix)
    http = HttpSettings(**{"port": free_port(), **settings})
    task = asyncio.create_task(
        run_http(service, http, keys, limiter.admit_quota, redis=redis, prefix=prefix)
    )
    url = f"http://127.0.0.1:{http.port}"
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(200):
                assert not task.done(), task
                with suppress(httpx.TransportError):
                    if (await client.get(f"{url}/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
        yield Channel(url, keys, service, task)
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        await stack.aclose()
        await redis.aclose()


@dataclass(frozen=True)
class SseEvent:
    id: int
    kind: str
    data: dict[str, Any]


async def events(response: httpx.Response) -> AsyncIterator[SseEvent]:
    """Parse a text/event-stream response into events as they arrive."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line.startswith(":"):
            continue
        if line:
            name, _, value = line.partition(": ")
            fields[name] = value
        elif fields:
            yield SseEvent(int(fields["id"]), fields["event"], json.loads(fields["data"]))
            fields = {}


async def read_events(response: httpx.Response) -> list[SseEvent]:
    """Read a reply's events up to its `done` (or the end of the stream)."""
    found = []
    async for event in events(response):
        found.append(event)
        if event.kind == "done":
            break
    return found


def reply_text(events: list[SseEvent]) -> str:
    return "".join(event.data["text"] for event in events if event.kind == "delta")
