"""The outbound webhook: signed deliveries of finished replies, retried, to a loopback receiver."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
from aiohttp import web
from redis.asyncio import Redis

from bots.platforms.http.webhook import Webhook, signature, verify
from bots.store.outbox import OutboxPolicy
from tests.http_channel import http_channel
from tests.loopback import serve
from tests.test_http_api import Answers

SECRET = b"whsec-test-0123456789"


@dataclass
class Receiver:
    """A helpdesk's endpoint: answers with `statuses` in turn (then 200), records each call."""

    statuses: list[int] = field(default_factory=list)
    calls: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append((dict(request.headers), await request.read()))
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.arrived.set()
        headers = {"Retry-After": "0"} if status == 429 else {}
        return web.Response(status=status, headers=headers)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/hook", found.handle)
    runner, port = await serve(app)
    found.url = f"http://127.0.0.1:{port}/hook"
    yield found
    await runner.cleanup()


async def test_a_finished_reply_is_pushed_signed(
    redis_url: str, key_prefix: str, receiver: Receiver
) -> None:
    async with http_channel(
        redis_url, key_prefix, Answers(), webhook_url=receiver.url, webhook_secret=SECRET.decode()
    ) as channel:
        key = await channel.key("helpdesk")
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as api:
            answer = await api.post(
                f"{channel.url}/v1/conversations/t-42/messages",
                json={"text": "where is my parcel", "stream": False},
            )
        await asyncio.wait_for(receiver.arrived.wait(), 10)
    [(headers, body)] = receiver.calls
    assert verify(SECRET, headers["Parley-Signature"], body)
    event = json.loads(body)
    assert event == {
        "type": "reply.finished",
        "integration": "helpdesk",
        "conversation_id": "t-42",
        "reply_id": answer.json()["reply_id"],
        "message": "where is my parcel",
        "reply": "You said: where is my parcel",
        "notices": [],
        "recorded": True,
    }


FAST = OutboxPolicy(first_backoff=0.01, max_backoff=0.05, claim_after=30.0)


@dataclass
class Counted:
    """The outbox's events, counted as the metrics would, and awaited by the tests."""

    seen: Counter[str] = field(default_factory=Counter)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, event: str) -> None:
        self.seen[event] += 1
        self.changed.set()

    async def reach(self, event: str, count: int) -> None:
        while self.seen[event] < count:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 10)


def hook(
    url: str, redis: Redis, prefix: str, counted: Counted, policy: OutboxPolicy = FAST
) -> Webhook:
    stream = f"{prefix}:outbox:{{http-webhook}}"
    return Webhook(url, SECRET, redis, stream=stream, consumer="one", policy=policy, count=counted)


async def test_failed_deliveries_are_retried_with_the_same_id(
    receiver: Receiver, redis_client: Redis, key_prefix: str
) -> None:
    receiver.statuses = [503, 429, 500]
    counted = Counted()
    async with hook(receiver.url, redis_client, key_prefix, counted) as webhook:
        await webhook.send("c1", {"reply": "hello"})
        await counted.reach("delivered", 1)
    assert len(receiver.calls) == 4
    deliveries = {headers["Parley-Delivery"] for headers, _ in receiver.calls}
    assert len(deliveries) == 1
    assert [headers["Parley-Attempt"] for headers, _ in receiver.calls] == ["1", "2", "3", "4"]
    assert all(verify(SECRET, h["Parley-Signature"], body) for h, body in receiver.calls)
    assert counted.seen["retried"] == 3


async def test_a_refusal_is_not_retried(
    receiver: Receiver, redis_client: Redis, key_prefix: str
) -> None:
    receiver.statuses = [400]
    counted = Counted()
    async with hook(receiver.url, redis_client, key_prefix, counted) as webhook:
        await webhook.send("c1", {"reply": "x"})
        await counted.reach("given_up", 1)
        await webhook.send("c1", {"reply": "y"})  # the next one of the conversation goes on
        await counted.reach("delivered", 1)
    assert [json.loads(body) for _, body in receiver.calls] == [{"reply": "x"}, {"reply": "y"}]


async def test_an_unreachable_receiver_is_retried_until_the_window_ends(
    redis_client: Redis, key_prefix: str
) -> None:
    counted = Counted()
    policy = dataclasses.replace(FAST, give_up_after=0.5)
    async with hook("http://127.0.0.1:9/hook", redis_client, key_prefix, counted, policy) as w:
        started = time.monotonic()
        await w.send("c1", {"reply": "z"})
        await counted.reach("given_up", 1)
    assert counted.seen["retried"] >= 2
    assert 0.5 <= time.monotonic() - started < 5


async def test_deliveries_pending_at_shutdown_go_out_after_the_restart(
    receiver: Receiver, redis_client: Redis, key_prefix: str
) -> None:
    receiver.statuses = [503] * 1000  # down until the test says
    counted = Counted()
    async with hook(receiver.url, redis_client, key_prefix, counted) as webhook:
        for n in range(6):
            await webhook.send(f"c{n % 2}", {"n": n})
        await counted.reach("retried", 6)
    receiver.statuses.clear()
    receiver.calls.clear()
    async with hook(receiver.url, redis_client, key_prefix, counted):
        await counted.reach("delivered", 6)
    delivered = [json.loads(body)["n"] for _, body in receiver.calls]
    assert sorted(delivered) == list(range(6))
    assert [n for n in delivered if n % 2 == 0] == [0, 2, 4], "one conversation in order"
    assert len({headers["Parley-Delivery"] for headers, _ in receiver.calls}) == 6


def test_signatures_bind_the_body_the_time_and_the_secret() -> None:
    body = b'{"reply": "hi"}'
    now = int(time.time())
    header = signature(SECRET, now, body)
    assert verify(SECRET, header, body)
    assert not verify(SECRET, header, body + b" ")
    assert not verify(b"another secret", header, body)
    assert not verify(SECRET, signature(SECRET, now - 3600, body), body), "too old"
    assert not verify(SECRET, "v1=deadbeef", body)
