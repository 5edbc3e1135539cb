"""The outbound webhook: signed deliveries of finished replies, retried, to a loopback receiver."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
from aiohttp import web

from bots.platforms.http.webhook import Webhook, signature, verify
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
    }


async def test_failed_deliveries_are_retried_with_the_same_id(receiver: Receiver) -> None:
    receiver.statuses = [503, 429, 500]
    async with Webhook(receiver.url, SECRET, attempts=5, first_backoff=0.01) as hook:
        assert await hook.deliver({"reply": "hello"})
    assert len(receiver.calls) == 4
    deliveries = {headers["Parley-Delivery"] for headers, _ in receiver.calls}
    assert len(deliveries) == 1
    assert [headers["Parley-Attempt"] for headers, _ in receiver.calls] == ["1", "2", "3", "4"]
    assert all(verify(SECRET, h["Parley-Signature"], body) for h, body in receiver.calls)


async def test_a_refusal_is_not_retried_and_attempts_are_bounded(receiver: Receiver) -> None:
    receiver.statuses = [400]
    async with Webhook(receiver.url, SECRET, attempts=3, first_backoff=0.01) as hook:
        assert not await hook.deliver({"reply": "x"})
        assert len(receiver.calls) == 1
        receiver.statuses = [503, 503, 503, 503]
        assert not await hook.deliver({"reply": "y"})
        assert len(receiver.calls) == 4


async def test_an_unreachable_receiver_is_retried_then_given_up() -> None:
    async with Webhook("http://127.0.0.1:9/hook", SECRET, attempts=3, first_backoff=0.01) as hook:
        started = time.monotonic()
        assert not await hook.deliver({"reply": "z"})
    assert time.monotonic() - started < 5


def test_signatures_bind_the_body_the_time_and_the_secret() -> None:
    body = b'{"reply": "hi"}'
    now = int(time.time())
    header = signature(SECRET, now, body)
    assert verify(SECRET, header, body)
    assert not verify(SECRET, header, body + b" ")
    assert not verify(b"another secret", header, body)
    assert not verify(SECRET, signature(SECRET, now - 3600, body), body), "too old"
    assert not verify(SECRET, "v1=deadbeef", body)
