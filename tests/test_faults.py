"""Outages of the model server and of Redis, through the real client, store and service."""

from __future__ import annotations

import time
from contextlib import aclosing
from pathlib import Path

from openai import AsyncOpenAI
from redis.asyncio import Redis

from bots.core.models import ConversationKey, Incoming, Notice, NoticeKind, ReplyPart, Role
from bots.core.service import ConversationService
from bots.llm.openai import OpenAIChatModel, timeouts
from bots.store.embedded import EmbeddedRedis
from bots.store.redis import RedisContextStore
from tests.conftest import free_port
from tests.fake_openai import FakeOpenAI, Reply

KEY = ConversationKey("console", "faults")


def model_at(port: int) -> OpenAIChatModel:
    client = AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1",
        api_key="k",
        max_retries=0,
        timeout=timeouts(connect=1.0, read=5.0),
    )
    return OpenAIChatModel(client, model="parley", reply_tokens=32, retry_deadline=2.0)


async def ask(service: ConversationService, text: str) -> list[ReplyPart]:
    async with aclosing(service.respond(Incoming(KEY, text))) as parts:
        return [part async for part in parts]


async def test_inference_down_then_back(store: RedisContextStore) -> None:
    port = free_port()
    service = ConversationService(store, model_at(port))
    started = time.monotonic()
    parts = await ask(service, "anyone home?")
    assert time.monotonic() - started < 5.0
    assert [p.kind for p in parts if isinstance(p, Notice)] == [NoticeKind.MODEL_UNAVAILABLE]
    assert [t.role for t in await store.load(KEY)] == [Role.USER], "user turn kept, no reply"

    async with FakeOpenAI([Reply("back again")], port=port) as server:
        parts = await ask(service, "now?")
    assert "".join(p for p in parts if isinstance(p, str)) == "back again"
    sent = server.completions()[0].body["messages"]
    assert [m["content"] for m in sent] == ["anyone home?\n\nnow?"], (
        "the kept turn is context, read with the new one so that roles alternate"
    )


async def test_redis_down_then_back(tmp_path: Path) -> None:
    port = free_port()
    redis_server = EmbeddedRedis(tmp_path, port=port)
    url = await redis_server.start()
    client = Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    store = RedisContextStore(client, prefix="faults", max_turns=50, ttl_seconds=600)
    async with FakeOpenAI([Reply("fine")]) as server:
        service = ConversationService(store, model_at(server.port))
        assert "fine" in (await ask(service, "first"))
        await redis_server.stop()
        parts = await ask(service, "during the outage")
        assert [p.kind for p in parts if isinstance(p, Notice)] == [NoticeKind.STORE_UNAVAILABLE]
        assert len(server.completions()) == 1, "no model call without context"
        await redis_server.start()
        parts = await ask(service, "after")
        assert "".join(p for p in parts if isinstance(p, str)) == "fine"
    history = [t.content for t in await store.load(KEY)]
    assert history == ["first", "fine", "after", "fine"], "persisted across the restart"
    await client.aclose()
    await redis_server.stop()
