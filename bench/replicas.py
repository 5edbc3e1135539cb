"""Several replicas on one Redis: what the conversation's line costs, what two replicas
carry against one, and the webhook outbox's throughput and drain.

1. The line's cost: MESSAGES messages, one at a time, over 50 conversations, through the
   conversation service with a stub model that answers at once, on an embedded Redis:
   with the line of one process (no Redis), with the Redis line and one replica, and with
   two replicas taking turns on the same conversations. Timed: `respond` from the call
   to the end of the reply (the exchange stored), p50/p99; the line's cost is the
   difference.
2. Throughput: `python -m bots http` processes (one, then two) with a fake model process
   answering at once; CLIENTS clients send messages (JSON mode) to their own
   conversations for SECONDS seconds, round-robin over the replicas. Messages/s.
3. The outbox: DELIVERIES webhook deliveries queued at once to a receiver that takes them
   at once (deliveries/s from the first put to the last arrival); then the issue's case:
   the receiver down OUTAGE seconds while 100 conversations talk through two replicas,
   replica one restarted at a third of it and both at two thirds; counted: deliveries
   lost, duplicates by delivery id, and the drain time after the receiver is back.

    python -m bench.replicas [--messages 2000] [--seconds 20] [--outage 600]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
from aiohttp import web
from redis.asyncio import Redis

from bench.common import PacedModel, machine, percentile, stub_model_server
from bots.core.line import ArrivalLine
from bots.core.models import ConversationKey, Incoming
from bots.core.service import ConversationService
from bots.platforms.http.webhook import Webhook
from bots.runtime import connect_redis, context_store
from bots.settings import RedisSettings
from bots.store.embedded import EmbeddedRedis
from tests.conftest import free_port
from tests.loopback import serve
from tests.test_replicas import Replica, bots

CONVERSATIONS = 50
TALKERS = 100
SECRET = "whsec-bench-0123456789"


@asynccontextmanager
async def embedded_redis() -> AsyncIterator[tuple[Redis, str]]:
    """Redis 8 as Parley embeds it, on a loopback port the bot processes reach too."""
    with tempfile.TemporaryDirectory() as folder:
        async with EmbeddedRedis(Path(folder), port=free_port()) as url:
            redis = connect_redis(url)
            try:
                yield redis, url
            finally:
                await redis.aclose()


def show(samples: list[float]) -> str:
    ms = [s * 1000 for s in samples]
    return f"p50 {percentile(ms, 0.5):.2f} ms, p99 {percentile(ms, 0.99):.2f} ms"


async def timed_messages(services: list[ConversationService], messages: int) -> list[float]:
    """Send `messages` one at a time, taking turns over the services (the replicas)."""
    samples = []
    for n in range(messages):
        service = services[n % len(services)]
        key = ConversationKey("bench", "line", f"c{n % CONVERSATIONS}")
        started = time.perf_counter()
        async for _ in service.respond(Incoming(key, f"message {n}")):
            pass
        samples.append(time.perf_counter() - started)
    return samples


async def line_cost(redis: Redis, messages: int) -> None:
    async with AsyncExitStack() as stack:

        async def service(prefix: str, *, shared: bool) -> ConversationService:
            kept = context_store(redis, RedisSettings(key_prefix=prefix))
            model = PacedModel(tokens_per_second=1e9)
            line = await stack.enter_async_context(kept.line) if shared else ArrivalLine()
            return ConversationService(kept, model, line=line)

        local = [await service("local", shared=False)]
        one = [await service("one", shared=True)]
        two = [await service("two", shared=True), await service("two", shared=True)]
        for services in (local, one, two):  # warm up: scripts loaded, connections open
            await timed_messages(services, 100)
        runs = {}
        for name, services in (("local", local), ("one", one), ("two", two)):
            runs[name] = await timed_messages(services, messages)
    base = percentile(runs["local"], 0.5)
    print(f"1. the line, {messages} messages one at a time over {CONVERSATIONS} conversations:")
    print(f"   one process's line (no Redis):  {show(runs['local'])}")
    for name, label in (("one", "Redis line, 1 replica: "), ("two", "Redis line, 2 replicas:")):
        cost = (percentile(runs[name], 0.5) - base) * 1000
        print(f"   {label}        {show(runs[name])}  (line's cost at p50: {cost:+.2f} ms)")


async def throughput(redis_url: str, seconds: float, clients: int) -> None:
    print(f"2. messages/s, {clients} clients for {seconds:.0f} s, a model answering at once:")
    rates = {}
    async with stub_model_server("Noted.") as model_url:
        for count in (1, 2):
            rates[count] = await carried(redis_url, model_url, count, seconds, clients)
            print(f"   {count} replica{'s' if count > 1 else ''}: {rates[count]:.0f} messages/s")
    print(f"   two against one: {rates[2] / rates[1]:.2f}x")


async def carried(
    redis_url: str, model_url: str, count: int, seconds: float, clients: int
) -> float:
    prefix = f"bench-throughput-{count}-{os.getpid()}"
    async with replicas(redis_url, model_url, prefix, count) as (urls, key):
        done = 0
        deadline = time.monotonic() + seconds

        async def client(n: int) -> None:
            nonlocal done
            headers = {"Authorization": f"Bearer {key}"}
            async with httpx.AsyncClient(base_url=urls[n % count], headers=headers) as api:
                while time.monotonic() < deadline:
                    answer = await api.post(
                        f"/v1/conversations/c{n}/messages", json={"text": "hi", "stream": False}
                    )
                    assert answer.status_code == 200, answer.text
                    done += 1

        started = time.monotonic()
        await asyncio.gather(*(client(n) for n in range(clients)))
        return done / (time.monotonic() - started)


@asynccontextmanager
async def replicas(
    redis_url: str, model_url: str, prefix: str, count: int, **settings: str
) -> AsyncIterator[tuple[list[str], str]]:
    """`count` replicas of `python -m bots http`; their URLs and an API key."""
    with tempfile.TemporaryDirectory() as folder:
        env = {
            **os.environ,
            "LLM_BASE_URL": model_url,
            "REDIS_URL": redis_url,
            "REDIS_KEY_PREFIX": prefix,
            "DATA_DIR": folder,
            "OPS_PORT": "0",
            "LIMITS_USER_MESSAGES": "0",
            "LIMITS_CONVERSATION_MESSAGES": "0",
            "HTTP_KEY_MESSAGES": "0",
            **settings,
        }
        code, key, err = await bots(env, "keys", "create", "bench")
        assert code == 0, err
        running = [Replica({**env, "HTTP_CONSUMER": f"r{n}"}, free_port()) for n in range(count)]
        await asyncio.gather(*(replica.start() for replica in running))
        try:
            yield [replica.url for replica in running], key.strip()
        finally:
            for replica in running:
                await replica.stop()


async def outbox_throughput(redis: Redis, deliveries: int) -> None:
    arrived = asyncio.Event()
    taken = 0

    async def handle(request: web.Request) -> web.Response:
        nonlocal taken
        await request.read()
        taken += 1
        if taken == deliveries:
            arrived.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner, port = await serve(app)
    hook = Webhook(
        f"http://127.0.0.1:{port}/hook",
        SECRET.encode(),
        redis,
        stream="bench:outbox:{throughput}",
        consumer="bench",
    )
    try:
        async with hook:
            started = time.monotonic()
            for n in range(deliveries):
                await hook.send(f"c{n % TALKERS}", {"n": n, "text": "x" * 200})
            queued = time.monotonic() - started
            await asyncio.wait_for(arrived.wait(), 600)
            seconds = time.monotonic() - started
    finally:
        await runner.cleanup()
    print(
        f"3. outbox: {deliveries} deliveries over {TALKERS} conversations: "
        f"{deliveries / seconds:.0f} deliveries/s ({queued:.1f} s to queue, "
        f"{seconds:.1f} s until the last arrived)"
    )


class Receiver:
    """A webhook receiver that answers 503 while `down`; counts what it took, by id."""

    def __init__(self) -> None:
        self.down = True
        self.taken: Counter[str] = Counter()
        self.replies: set[str] = set()
        self.refused = 0
        self.arrived = asyncio.Event()

    async def took(self, replies: set[str]) -> None:
        """Wait until every one of `replies` has been delivered."""
        while not replies <= self.replies:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 900)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.down:
            self.refused += 1
            return web.Response(status=503)
        self.taken[request.headers["Parley-Delivery"]] += 1
        self.replies.add(str(body.get("reply_id")))
        self.arrived.set()
        return web.Response(status=204)


async def outage(redis_url: str, outage_s: float, every: float) -> None:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner, port = await serve(app)
    settings = {"HTTP_WEBHOOK_URL": f"http://127.0.0.1:{port}/hook", "HTTP_WEBHOOK_SECRET": SECRET}
    prefix = f"bench-outage-{os.getpid()}"
    sent: set[str] = set()
    async with AsyncExitStack() as stack:
        stack.push_async_callback(runner.cleanup)
        model_url = await stack.enter_async_context(stub_model_server("Logged."))
        folder = stack.enter_context(tempfile.TemporaryDirectory())
        env = {
            **os.environ,
            "LLM_BASE_URL": model_url,
            "REDIS_URL": redis_url,
            "REDIS_KEY_PREFIX": prefix,
            "DATA_DIR": folder,
            "OPS_PORT": "0",
            "LIMITS_USER_MESSAGES": "0",
            "LIMITS_CONVERSATION_MESSAGES": "0",
            "HTTP_KEY_MESSAGES": "0",
            **settings,
        }
        code, key, err = await bots(env, "keys", "create", "bench")
        assert code == 0, err
        pair = [Replica({**env, "HTTP_CONSUMER": f"r{n}"}, free_port()) for n in range(2)]
        await asyncio.gather(*(replica.start() for replica in pair))
        for replica in pair:
            stack.push_async_callback(replica.stop)
        headers = {"Authorization": f"Bearer {key.strip()}"}
        started = time.monotonic()
        ends = started + outage_s

        async def talker(n: int) -> None:
            await asyncio.sleep(every * n / TALKERS)  # spread out
            while time.monotonic() < ends:
                url = pair[n % 2].url
                with contextlib.suppress(httpx.TransportError):  # a replica restarting
                    async with httpx.AsyncClient(base_url=url, headers=headers) as api:
                        answer = await api.post(
                            f"/v1/conversations/t{n}/messages",
                            json={"text": f"ticket {n}", "stream": False},
                        )
                        if answer.status_code == 200:
                            sent.add(answer.json()["reply_id"])
                await asyncio.sleep(every)

        async def restarts() -> None:
            await asyncio.sleep(outage_s / 3)
            await pair[0].restart()
            await asyncio.sleep(outage_s / 3)
            await asyncio.gather(pair[0].restart(), pair[1].restart())

        await asyncio.gather(restarts(), *(talker(n) for n in range(TALKERS)))
        receiver.down = False
        back = time.monotonic()
        await receiver.took(sent)
        drained = time.monotonic() - back
    lost = len(sent - receiver.replies)
    duplicates = sum(count - 1 for count in receiver.taken.values())
    print(
        f"   receiver down {outage_s:.0f} s, {TALKERS} conversations, replicas restarted "
        f"twice: {len(sent)} replies, {lost} deliveries lost, {duplicates} duplicates, "
        f"{receiver.refused} attempts refused, drained {drained:.1f} s after it was back"
    )


async def main(args: argparse.Namespace) -> None:
    print(f"machine: {machine()}")
    async with embedded_redis() as (redis, url):
        await line_cost(redis, args.messages)
        await throughput(url, args.seconds, args.clients)
        await outbox_throughput(redis, args.deliveries)
        await outage(url, args.outage, args.every)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--deliveries", type=int, default=5000)
    parser.add_argument("--outage", type=float, default=600.0, help="seconds the receiver is down")
    parser.add_argument(
        "--every", type=float, default=30.0, help="seconds between a talker's messages"
    )
    asyncio.run(main(parser.parse_args()))
