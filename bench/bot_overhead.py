"""Overhead of the bot tier per message, against a stub model server and Redis on loopback.

The stub answers every request at once (a 180-character reply in 20 SSE chunks), so what
a message's latency measures is Parley's own work, composed as `python -m bots` composes
it: the rate-limit and budget checks, loading the context and the conversation's state
from Redis, building the prompt, the HTTP request and the streamed parse in the OpenAI
client, the atomic append of both turns, and counting the user's tokens.

Two loads, C conversations at once in each:
- paced: each conversation sends a message every `--interval` seconds on average
  (Poisson arrivals), as people chatting do; the latency is the per-message overhead.
- saturated: each conversation sends its next message as soon as the last is answered;
  the latency then is mostly queueing behind the other C-1, and messages/s is the
  ceiling of one bot process with the stub server sharing the machine.

    python -m bench.bot_overhead [--messages 20] [--interval 2.0]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from contextlib import aclosing
from pathlib import Path

from redis.asyncio import Redis

from bench.common import machine, percentile, stub_model_server
from bots.__main__ import open_backend
from bots.core.models import Author, ConversationKey, Incoming
from bots.core.service import ConversationService
from bots.runtime import event_loop, tune_gc
from bots.settings import BotSettings
from bots.store.embedded import EmbeddedRedis
from tests.conftest import free_port

CONCURRENCY = (1, 50, 200)


async def conversation(
    service: ConversationService, index: int, messages: int, interval: float
) -> list[float]:
    key = ConversationKey("bench", f"overhead-{index}")
    pace = random.Random(index)
    latencies = []
    for turn in range(messages):
        if interval:
            await asyncio.sleep(pace.expovariate(1 / interval))
        started = time.perf_counter()
        incoming = Incoming(key, f"message {turn}", author=Author(str(index), "bench"))
        async with aclosing(service.respond(incoming)) as parts:
            async for _ in parts:
                pass
        latencies.append(time.perf_counter() - started)
    return latencies


async def measure(
    base_url: str, redis_url: str, concurrency: int, messages: int, interval: float
) -> list[float]:
    """Time messages through the service as `python -m bots` composes it, limits included."""
    settings = BotSettings(
        _env_file=None,  # type: ignore[call-arg]
        redis={"url": redis_url, "key_prefix": "bench", "context_max_turns": 40},  # type: ignore[arg-type]
        llm={"base_url": base_url, "api_key": "bench", "context_tokens": 8192, "reply_tokens": 64},  # type: ignore[arg-type]
        limits={"user_messages": 1_000_000, "conversation_messages": 1_000_000},  # type: ignore[arg-type]
    )
    async with open_backend(settings) as backend:
        service = backend.service
        tune_gc()  # as `python -m bots` does once set up
        await conversation(service, -1, 3, 0)  # warm up connections
        runs = [conversation(service, i, messages, interval) for i in range(concurrency)]
        latencies = [value for run in await asyncio.gather(*runs) for value in run]
    redis = Redis.from_url(redis_url)
    await redis.flushdb()
    await redis.aclose()
    return latencies


async def main(messages: int, interval: float) -> None:
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as folder:
        async with (
            EmbeddedRedis(Path(folder), port=free_port()) as redis_url,
            stub_model_server() as base_url,
        ):
            print("| load | concurrent conversations | messages | p50 ms | p99 ms | messages/s |")
            print("|---|---|---|---|---|---|")
            for load, pause in ((f"paced, 1 per {interval:g} s each", interval), ("saturated", 0)):
                for concurrency in CONCURRENCY:
                    started = time.perf_counter()
                    latencies = await measure(base_url, redis_url, concurrency, messages, pause)
                    rate = len(latencies) / (time.perf_counter() - started)
                    p50, p99 = (1000 * percentile(latencies, q) for q in (0.5, 0.99))
                    print(
                        f"| {load} | {concurrency} | {len(latencies)} "
                        f"| {p50:.2f} | {p99:.2f} | {rate:.1f} |"
                    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20, help="messages per conversation")
    parser.add_argument("--interval", type=float, default=2.0, help="mean seconds between messages")
    options = parser.parse_args()
    with asyncio.Runner(loop_factory=event_loop) as runner:  # the loop `python -m bots` uses
        runner.run(main(options.messages, options.interval))
