"""Messages per second through the conversation service, with an instant model.

The model is an in-process stub that streams a fixed 20-piece reply at once, so the
figure is the ceiling of the core plus the Redis store (load the context, append both
turns atomically) on this machine, Redis on loopback.

    python -m bench.service_throughput [--conversations 200] [--messages 25]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from pathlib import Path

from redis.asyncio import Redis

from bench.common import StubModel, machine
from bots.core.models import Chunk, ConversationKey, Incoming, PromptMessage, Usage
from bots.core.service import ConversationService
from bots.store.embedded import EmbeddedRedis
from bots.store.redis import RedisContextStore
from tests.conftest import free_port

REPLY = [f"word{i} " for i in range(20)]


class InstantModel(StubModel):
    """A model that answers at once, so only Parley's own work is timed."""

    async def stream(
        self, prompt: Sequence[PromptMessage], *, session: str, adapter: str | None = None
    ) -> AsyncIterator[Chunk]:
        for piece in REPLY:
            yield Chunk(text=piece)
        yield Chunk(usage=Usage(len(prompt), len(REPLY)))


async def conversation(service: ConversationService, index: int, messages: int) -> None:
    key = ConversationKey("bench", f"throughput-{index}")
    for turn in range(messages):
        async with aclosing(service.respond(Incoming(key, f"message {turn}"))) as parts:
            async for _ in parts:
                pass


async def main(conversations: int, messages: int) -> None:
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as folder:
        async with EmbeddedRedis(Path(folder), port=free_port()) as url:
            redis = Redis.from_url(url, max_connections=conversations)
            store = RedisContextStore(redis, prefix="bench", max_turns=40, ttl_seconds=600)
            service = ConversationService(store, InstantModel())
            await conversation(service, -1, 5)
            started, cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(
                *(conversation(service, i, messages) for i in range(conversations))
            )
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            total = conversations * messages
            print(f"{total} messages in {conversations} conversations: {elapsed:.2f} s")
            print(f"throughput: {total / elapsed:.0f} messages/s")
            print(f"bot process CPU per message: {1000 * cpu / total:.3f} ms")
            await redis.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--messages", type=int, default=25, help="messages per conversation")
    options = parser.parse_args()
    asyncio.run(main(options.conversations, options.messages))
