"""The Chatwoot agent bot: Parley's share of a reply's time, and replies through an outage.

Chatwoot is the local fake (`tests/fake_chatwoot.py`: its signed webhooks, its
Application API); the bot runs as `python -m bots chatwoot` composes it (the webhook
checked and queued in Redis, handled, the reply queued and posted through the durable
outbox) over an embedded Redis and a stub model that answers at once, so what is timed
is Parley's part plus the fake's HTTP.

1. Latency: MESSAGES customer messages, one at a time, across CONVERSATIONS
   conversations; each timed from the start of the webhook's POST to the reply's
   arrival in Chatwoot (both clocked by the fake).
2. Outage: 100 conversations talking (a message each every 3 s) while Chatwoot's API
   answers 503 for 30 s; then it is back. Counted: replies lost (a customer message
   with no reply posted), duplicates (a reply posted twice), and the time from recovery
   until every message sent before it has its reply, with the default retry cap (60 s)
   and a 5 s one.

    python -m bench.chatwoot_delivery [--messages 300] [--outage 30]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

from pydantic import SecretStr
from redis.asyncio import Redis

from bench.common import PacedModel, machine, percentile
from bots.core.handoff import Handoffs
from bots.core.service import ConversationService
from bots.platforms.chatwoot import run_chatwoot
from bots.runtime import context_store, open_redis
from bots.settings import ChatwootSettings, RedisSettings
from tests.conftest import free_port
from tests.fake_chatwoot import Conversation, FakeChatwoot

CONVERSATIONS = 20
TALKERS = 100
EVERY_S = 3.0


@asynccontextmanager
async def agent_bot(
    redis: Redis, chatwoot: FakeChatwoot, prefix: str, retry_max: float
) -> AsyncIterator[None]:
    """The agent bot in this process, answering `chatwoot`'s webhooks."""
    model = PacedModel(tokens_per_second=100_000, echo=True)
    model.tokens = 10
    store = context_store(redis, RedisSettings(key_prefix=prefix))
    service = ConversationService(store, model, handoffs=Handoffs(store, store))
    port = free_port()
    settings = ChatwootSettings(
        url=chatwoot.base_url,
        bot_token=SecretStr(chatwoot.token),
        webhook_secret=SecretStr(chatwoot.secret or ""),
        accounts=frozenset({1}),
        port=port,
        retry_max_seconds=retry_max,
        consumer="bench",
        typing=False,
    )
    chatwoot.bot_url = f"http://127.0.0.1:{port}/chatwoot"
    task = asyncio.create_task(run_chatwoot(service, settings, redis, prefix=prefix))
    try:
        await _listening(port)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _listening(port: int) -> None:
    for _ in range(500):
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        await asyncio.sleep(0.01)
    raise RuntimeError("the agent bot did not start")


async def latency(redis: Redis, messages: int) -> list[float]:
    async with FakeChatwoot() as chatwoot:
        inbox = chatwoot.add_inbox(chatwoot.add_account())
        chats = [chatwoot.add_conversation(inbox, f"C{n}") for n in range(CONVERSATIONS)]
        async with agent_bot(redis, chatwoot, "bench-latency", retry_max=1.0):
            seconds = []
            for number in range(messages):
                chat = chats[number % len(chats)]
                before = len(chatwoot.bot_replies(chat))
                asked = await chatwoot.customer_says(chat, f"question {number}")
                await chatwoot.wait_for(partial(_answered, chatwoot, chat, before))
                # From the webhook's POST to the reply's arrival: the fake's own queueing
                # of one conversation's webhooks before it is left out.
                (delivery,) = [
                    d
                    for d in chatwoot.deliveries_for(chat, "message_created")
                    if d.payload["id"] == asked.id
                ]
                posted = chatwoot.bot_replies(chat)[before].created_at
                seconds.append(posted - delivery.attempts[0].at)
    return seconds


def _asked(reply: str | None) -> str:
    """The message a reply answers: the stub model's reply repeats it ("T7: message 3: …")."""
    found = re.search(r"message \d+", reply or "")
    return found[0] if found else ""


def _replied(chatwoot: FakeChatwoot) -> set[tuple[int, str]]:
    return {(m.conversation.id, _asked(m.content)) for m in chatwoot.posted}


def _answered(chatwoot: FakeChatwoot, chat: Conversation, before: int) -> bool:
    return len(chatwoot.bot_replies(chat)) > before


async def outage(redis: Redis, seconds: float, retry_max: float) -> dict[str, float]:
    async with FakeChatwoot() as chatwoot:
        inbox = chatwoot.add_inbox(chatwoot.add_account())
        chats = [chatwoot.add_conversation(inbox, f"T{n}") for n in range(TALKERS)]
        asked: Counter[int] = Counter()
        prefix = f"bench-outage-{retry_max:g}"
        async with agent_bot(redis, chatwoot, prefix, retry_max=retry_max):

            async def talk(chat: Conversation, until: float, offset: float) -> None:
                await asyncio.sleep(offset)
                while time.monotonic() < until:
                    asked[chat.id] += 1
                    await chatwoot.customer_says(chat, f"message {asked[chat.id]}")
                    await asyncio.sleep(EVERY_S)

            start = time.monotonic()
            until = start + seconds + 2 * EVERY_S
            talking = [
                asyncio.create_task(talk(chat, until, index * EVERY_S / TALKERS))
                for index, chat in enumerate(chats)
            ]
            await asyncio.sleep(EVERY_S)  # everyone has talked once, Chatwoot up
            chatwoot.down()
            await asyncio.sleep(seconds)
            chatwoot.up()
            recovered = time.monotonic()
            waiting = {
                (chat.id, f"message {n}") for chat in chats for n in range(1, asked[chat.id] + 1)
            }
            await chatwoot.wait_for(lambda: waiting <= _replied(chatwoot), within=600)
            drained = time.monotonic() - recovered
            await asyncio.gather(*talking)
            expected = sum(asked.values())
            await chatwoot.wait_for(lambda: len(_replied(chatwoot)) >= expected, within=600)
            await asyncio.sleep(2 * retry_max)  # a duplicate would have time to land
    posted = Counter((m.conversation.id, _asked(m.content)) for m in chatwoot.posted)
    return {
        "messages": expected,
        "posted": len(chatwoot.posted),
        "lost": expected - len(posted),
        "duplicates": sum(count - 1 for count in posted.values()),
        "refused": chatwoot.refused,
        "drain_s": drained,
    }


async def main(messages: int, seconds: float) -> None:
    print(machine())
    settings = RedisSettings()
    with tempfile.TemporaryDirectory() as folder:
        async with open_redis(settings, Path(folder)) as redis:
            await report(redis, messages, seconds)


async def report(redis: Redis, messages: int, seconds: float) -> None:
    samples = await latency(redis, messages)
    print(
        f"customer message -> reply in Chatwoot ({messages} messages, stub model): "
        f"p50 {percentile(samples, 0.5) * 1000:.1f} ms, "
        f"p99 {percentile(samples, 0.99) * 1000:.1f} ms"
    )
    for cap in (60.0, 5.0):
        got = await outage(redis, seconds, cap)
        print(
            f"outage {seconds:.0f} s, {TALKERS} conversations, retry cap {cap:.0f} s: "
            f"{got['messages']:.0f} messages, {got['posted']:.0f} replies posted, "
            f"lost {got['lost']:.0f}, duplicates {got['duplicates']:.0f}, "
            f"{got['refused']:.0f} calls refused, drained {got['drain_s']:.1f} s "
            "after recovery"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--outage", type=float, default=30.0)
    args = parser.parse_args()
    asyncio.run(main(args.messages, args.outage))
