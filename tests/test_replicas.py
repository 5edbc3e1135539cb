"""Two real `python -m bots http` processes on one Redis, as an integrator runs them behind
a load balancer: one conversation's line, resets, resumes, kills, revocations and
webhooks hold across them."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from bots.core.models import ConversationKey
from bots.store.redis import RedisContextStore
from tests.conftest import free_port, start_bots
from tests.fake_openai import FakeOpenAI, Hang, Recorded, Reply
from tests.fake_telegram import TOKEN, FakeTelegram, person, private_chat
from tests.http_channel import events, read_events, reply_text
from tests.loopback import serve

STORY = "A reply long enough to be cut short by a reset on the other replica. " * 4
SECRET = "whsec-replicas-0123456789"


@dataclass
class Replica:
    """One `python -m bots http` process (or `telegram`, whose webhook is on `port`); its
    stderr is drained (and kept) as it runs."""

    env: dict[str, str]
    port: int
    command: str = "http"
    process: asyncio.subprocess.Process | None = None
    log: list[str] = field(default_factory=list)
    _draining: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        ports = {"HTTP_PORT": str(self.port), "TELEGRAM_WEBHOOK_PORT": str(self.port)}
        self.process = process = await start_bots(self.command, env={**self.env, **ports})
        assert process.stderr is not None
        while self.command == "http" and b"HTTP channel on http://127.0.0.1:" not in (
            line := await asyncio.wait_for(process.stderr.readline(), 60)
        ):
            self.log.append(line.decode(errors="replace"))
            assert line, "".join(self.log)
        self._draining = asyncio.create_task(self._drain(process.stderr))

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.log.append(line.decode(errors="replace"))

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(sig)
        code = await asyncio.wait_for(self.process.wait(), 60)
        if self._draining is not None:
            await self._draining
        return code

    async def restart(self) -> None:
        assert await self.stop() == 0, "".join(self.log[-20:])
        await self.start()


async def bots(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await start_bots(*args, env=env)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@dataclass
class Pair:
    """Two replicas on one Redis and one model, and an API key they both know."""

    one: Replica
    two: Replica
    key: str
    env: dict[str, str]

    def client(self, replica: Replica) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=replica.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=60
        )


@asynccontextmanager
async def replicas(
    redis_url: str, prefix: str, model: FakeOpenAI, tmp_path: Path, **settings: str
) -> AsyncIterator[Pair]:
    env = {
        **os.environ,
        "LLM_BASE_URL": model.base_url,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": prefix,
        "DATA_DIR": str(tmp_path),
        "LIMITS_USER_MESSAGES": "0",
        "LIMITS_CONVERSATION_MESSAGES": "0",
        "HTTP_KEY_MESSAGES": "0",
        "OPS_PORT": "0",
        **settings,
    }
    code, key, err = await bots(env, "keys", "create", "acme")
    assert code == 0, err
    one = Replica({**env, "HTTP_CONSUMER": "one"}, free_port())
    two = Replica({**env, "HTTP_CONSUMER": "two"}, free_port())
    await asyncio.gather(one.start(), two.start())
    try:
        yield Pair(one, two, key.strip(), env)
    finally:
        for replica in (one, two):
            if replica.process is not None and replica.process.returncode is None:
                replica.process.kill()
                await replica.process.wait()


def last_user_text(request: Recorded) -> str:
    return str(
        next(m["content"] for m in reversed(request.body["messages"]) if m["role"] == "user")
    )


async def test_simultaneous_messages_to_one_conversation_take_turns_across_replicas(
    redis_url: str, key_prefix: str, store: RedisContextStore, tmp_path: Path
) -> None:
    """100 pairs, each pair's two messages sent at once, one to each replica: the second
    answer's prompt always holds the first exchange, stored in the order answered."""
    async with (
        FakeOpenAI([Reply("Noted that.", chunk_chars=3, delay=0.005)]) as model,
        replicas(redis_url, key_prefix, model, tmp_path) as pair,
        pair.client(pair.one) as one,
        pair.client(pair.two) as two,
    ):

        async def send(api: httpx.AsyncClient, conversation: str, text: str) -> None:
            answer = await api.post(
                f"/v1/conversations/{conversation}/messages", json={"text": text, "stream": False}
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["text"] == "Noted that."

        async def pair_of(n: int) -> None:
            await asyncio.gather(
                send(one, f"p{n}", f"first-{n}"), send(two, f"p{n}", f"second-{n}")
            )

        for batch in range(0, 100, 25):
            await asyncio.gather(*(pair_of(n) for n in range(batch, batch + 25)))

    keys = [ConversationKey("http", "acme", f"p{n}") for n in range(100)]
    await took_turns(store, model, keys)


async def took_turns(
    store: RedisContextStore, model: FakeOpenAI, keys: list[ConversationKey]
) -> None:
    """Each conversation holds its pair's two exchanges whole, in the order the model was
    asked, and the second prompt holds the first exchange."""
    asked = {last_user_text(request): request for request in model.completions()}
    order = [last_user_text(request) for request in model.completions()]
    for n, key in enumerate(keys):
        turns = await store.load(key)
        assert [t.role.value for t in turns] == ["user", "assistant", "user", "assistant"]
        earlier, later = turns[0].content, turns[2].content
        assert {earlier, later} == {f"first-{n}", f"second-{n}"}
        assert order.index(earlier) < order.index(later), "stored in the order answered"
        prompt = [m["content"] for m in asked[later].body["messages"]]
        assert earlier in prompt and "Noted that." in prompt, f"pair {n}: {prompt}"


async def test_simultaneous_messages_in_one_chat_take_turns_across_telegram_replicas(
    redis_url: str, key_prefix: str, store: RedisContextStore, tmp_path: Path
) -> None:
    """Two `python -m bots telegram` processes in webhook mode, as behind a load balancer:
    100 users each send two messages at once, one reaching each replica."""
    async with (
        FakeTelegram() as telegram,
        FakeOpenAI([Reply("Noted that.", chunk_chars=3, delay=0.005)]) as model,
    ):
        env = {
            **os.environ,
            "LLM_BASE_URL": model.base_url,
            "REDIS_URL": redis_url,
            "REDIS_KEY_PREFIX": key_prefix,
            "DATA_DIR": str(tmp_path),
            "OPS_PORT": "0",
            "LIMITS_USER_MESSAGES": "0",
            "LIMITS_CONVERSATION_MESSAGES": "0",
            "TELEGRAM_TOKEN": TOKEN,
            "TELEGRAM_BASE_URL": telegram.base_url,
            "TELEGRAM_WEBHOOK_URL": "https://bots.example.com/telegram",
            "TELEGRAM_WEBHOOK_LISTEN": "127.0.0.1",
        }
        pair = [Replica(env, free_port(), "telegram") for _ in range(2)]
        await asyncio.gather(*(replica.start() for replica in pair))
        try:
            await telegram.wait_for(lambda: len(telegram.calls_to("setWebhook")) >= 2, 60)
            users = [person(10_000 + n, f"user{n}") for n in range(100)]
            updates = itertools.count(1)
            async with httpx.AsyncClient() as client:

                async def say(user: dict[str, Any], text: str, replica: Replica) -> None:
                    fields = {"chat": private_chat(user), "from": user, "text": text}
                    update = {"update_id": next(updates), "message": await telegram.push(fields)}
                    for _ in range(200):  # the webhook listens just after setWebhook
                        with contextlib.suppress(httpx.ConnectError):
                            answer = await client.post(f"{replica.url}/telegram", json=update)
                            assert answer.status_code == 200
                            return
                        await asyncio.sleep(0.05)
                    raise AssertionError(f"replica on {replica.port} never listened")

                async def pair_of(n: int) -> None:
                    user = users[n]
                    await asyncio.gather(
                        say(user, f"first-{n}", pair[0]), say(user, f"second-{n}", pair[1])
                    )

                for batch in range(0, 100, 25):
                    await asyncio.gather(*(pair_of(n) for n in range(batch, batch + 25)))
            await telegram.wait_for(
                lambda: all(len(telegram.sent[user["id"]]) >= 2 for user in users), 60
            )
        finally:
            for replica in pair:
                assert await replica.stop() == 0, "".join(replica.log[-20:])
    keys = [ConversationKey("telegram", str(user["id"])) for user in users]
    await took_turns(store, model, keys)


async def test_a_reset_on_one_replica_ends_the_reply_on_the_other(
    redis_url: str, key_prefix: str, store: RedisContextStore, tmp_path: Path
) -> None:
    async with (
        FakeOpenAI([Reply(STORY, chunk_chars=4, delay=0.05)]) as model,
        replicas(redis_url, key_prefix, model, tmp_path) as pair,
        pair.client(pair.one) as one,
        pair.client(pair.two) as two,
    ):
        async with one.stream(
            "POST", "/v1/conversations/c1/messages", json={"text": "tell me everything"}
        ) as response:
            stream = events(response)
            seen = [await anext(stream), await anext(stream)]
            assert seen[1].kind == "delta"
            assert (await two.delete("/v1/conversations/c1")).status_code == 204
            assert (await two.get("/v1/conversations/c1/messages")).json()["messages"] == []
            rest = [event async for event in stream]
        assert rest[-1].kind == "done"
        assert "reply_interrupted" in [n["kind"] for n in rest[-1].data["notices"]]
        assert len(reply_text(seen + rest)) < len(STORY)
        for api in (one, two):
            assert (await api.get("/v1/conversations/c1/messages")).json()["messages"] == []
    assert await store.load(ConversationKey("http", "acme", "c1")) == []


async def test_any_replica_resumes_a_reply_also_after_a_restart(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    async with (
        FakeOpenAI([Reply(STORY, chunk_chars=8, delay=0.02)]) as model,
        replicas(redis_url, key_prefix, model, tmp_path) as pair,
    ):
        async with (
            pair.client(pair.one) as one,
            one.stream(
                "POST", "/v1/conversations/c1/messages", json={"text": "a story"}
            ) as response,
        ):
            stream = events(response)
            head = [await anext(stream) for _ in range(4)]  # then the connection drops
        reply_id = head[0].data["reply_id"]
        path = f"/v1/conversations/c1/replies/{reply_id}"
        async with pair.client(pair.two) as two:
            async with two.stream("GET", path, headers={"Last-Event-ID": "3"}) as response:
                assert response.status_code == 200
                rest = await read_events(response)
            assert [e.id for e in rest] == list(range(4, 4 + len(rest)))
            assert rest[-1].kind == "done" and reply_text(head + rest) == STORY
            other = await two.get("/v1/conversations/c2/replies/" + reply_id)
            assert other.status_code == 404, "another conversation's reply"
        await pair.one.restart()
        async with (
            pair.client(pair.one) as one,
            one.stream("GET", path, headers={"Last-Event-ID": "10"}) as response,
        ):
            again = await read_events(response)
        assert [(e.id, e.kind, e.data) for e in again] == [
            (e.id, e.kind, e.data) for e in rest if e.id > 10
        ]


async def test_a_replica_killed_mid_reply_frees_the_conversation_within_the_lease(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    lease = 2.0
    async with (
        FakeOpenAI([Hang(), Reply("I am here.")]) as model,
        replicas(
            redis_url, key_prefix, model, tmp_path, REDIS_LINE_LEASE_SECONDS=str(lease)
        ) as pair,
        pair.client(pair.one) as one,
        pair.client(pair.two) as two,
    ):
        hanging = asyncio.create_task(
            one.post("/v1/conversations/c1/messages", json={"text": "hello?", "stream": False})
        )
        await asyncio.wait_for(model.asked(), 30)  # replica one holds it; the model hangs
        loop = asyncio.get_running_loop()
        await pair.one.stop(signal.SIGKILL)
        killed = loop.time()
        answer = await two.post(
            "/v1/conversations/c1/messages", json={"text": "anyone?", "stream": False}
        )
        waited = loop.time() - killed
        with pytest.raises(httpx.TransportError):
            await hanging
    assert answer.status_code == 200 and answer.json()["text"] == "I am here."
    assert waited < lease + 1.0, f"waited {waited:.1f} s for a lease of {lease} s"


async def test_a_revoked_key_is_refused_by_every_replica_at_once(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    async with (
        FakeOpenAI() as model,
        replicas(redis_url, key_prefix, model, tmp_path) as pair,
        pair.client(pair.one) as one,
        pair.client(pair.two) as two,
    ):
        for api in (one, two):
            assert (await api.get("/v1/conversations/c1/handoff")).status_code in (404, 409)
        code, _, err = await bots(pair.env, "keys", "revoke", "acme")
        assert code == 0 and "refused from now on by every replica" in err
        loop = asyncio.get_running_loop()
        revoked = loop.time()
        for api in (one, two):
            assert (await api.get("/v1/conversations/c1/messages")).status_code == 401
        assert loop.time() - revoked < 1.0


@dataclass
class Receiver:
    """A helpdesk's webhook endpoint: 503 while `down`; records what it took, by id."""

    down: bool = True
    taken: Counter[str] = field(default_factory=Counter)
    bodies: dict[str, dict[str, object]] = field(default_factory=dict)
    refused: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.down:
            self.refused += 1
            return web.Response(status=503)
        delivery = request.headers["Parley-Delivery"]
        self.taken[delivery] += 1
        self.bodies[delivery] = json.loads(body)
        self.arrived.set()
        return web.Response(status=204)


async def test_webhook_deliveries_survive_an_outage_and_two_restarts(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner, port = await serve(app)
    settings = {
        "HTTP_WEBHOOK_URL": f"http://127.0.0.1:{port}/hook",
        "HTTP_WEBHOOK_SECRET": SECRET,
        "HTTP_WEBHOOK_RETRY_MAX_SECONDS": "1",
    }
    async with AsyncExitStack() as stack:
        stack.push_async_callback(runner.cleanup)
        model = await stack.enter_async_context(FakeOpenAI([Reply("Logged.")]))
        pair = await stack.enter_async_context(
            replicas(redis_url, key_prefix, model, tmp_path, **settings)
        )

        async def send(n: int) -> None:
            async with pair.client(pair.one if n % 2 else pair.two) as api:
                answer = await api.post(
                    f"/v1/conversations/t{n}/messages",
                    json={"text": f"ticket {n}", "stream": False},
                )
                assert answer.status_code == 200

        await asyncio.gather(*(send(n) for n in range(50)))
        await pair.one.restart()
        await asyncio.gather(*(send(n) for n in range(50, 100)))
        await pair.one.restart()
        await pair.two.restart()
        assert receiver.refused >= 100 and not receiver.taken
        receiver.down = False
        while len(receiver.taken) < 100:
            receiver.arrived.clear()
            await asyncio.wait_for(receiver.arrived.wait(), 60)
    assert sorted(int(str(b["conversation_id"])[1:]) for b in receiver.bodies.values()) == list(
        range(100)
    )
    assert max(receiver.taken.values()) == 1, "a delivery taken twice"
