"""Helpers the benchmarks share: percentiles, the machine they ran on, local servers, a
Redis store and the check that it kept every exchange, injected platform failures."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from openai import AsyncOpenAI
from redis.asyncio import Redis

from bots.core.context import bound_tokens
from bots.core.models import Chunk, PromptMessage, Role, Usage
from bots.knowledge.ingest import Ingest, IngestOptions, Outcome
from bots.llm.embeddings import OpenAIEmbedder
from bots.runtime import connect_redis, context_store, open_redis
from bots.settings import RedisSettings
from bots.store.embedded import EmbeddedRedis
from bots.store.knowledge import RedisKnowledge
from bots.store.redis import RedisContextStore
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def percentile(samples: list[float], share: float) -> float:
    """Return the `share` quantile (0..1) of samples, interpolated."""
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=1000, method="inclusive")[round(share * 1000) - 1]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Render a Markdown table, as docs/BENCHMARKS.md keeps them."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def memory_mib(pid: int, field: str = "VmRSS") -> float:
    """A process's memory from /proc, in MiB: resident now (VmRSS) or at its peak (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> str:
    """Describe this machine in one line: CPU model, cores, memory, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory_gib:.0f} GiB, Python {platform.python_version()}"
    )


def failure_options(description: str | None) -> argparse.Namespace:
    """Parse `--fail-share` (the share of the bot's sends and edits that fail with a 5xx)
    and `--seed` (of the random draw) from the command line."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--fail-share", type=float, default=0.0, help="0 to 1; default 0")
    parser.add_argument("--seed", type=int, default=0, help="seed of the failures drawn")
    return parser.parse_args()


@asynccontextmanager
async def redis_store() -> AsyncIterator[RedisContextStore]:
    """The conversation store as Parley runs it by default: an embedded Redis of its own."""
    settings = RedisSettings()
    with tempfile.TemporaryDirectory() as folder:
        async with open_redis(settings, Path(folder)) as redis:
            yield context_store(redis, settings)


async def lost_turns(store: RedisContextStore, exchanges: Iterable[tuple[str, str]]) -> int:
    """Count the exchanges (user text, whole answer) the store does not hold as a user turn
    followed by its answer."""
    held: Counter[tuple[str, str]] = Counter()
    async for key in store.conversations():
        turns = await store.load(key)
        held.update(
            (asked.content, answer.content)
            for asked, answer in itertools.pairwise(turns)
            if asked.role is Role.USER and answer.role is Role.ASSISTANT
        )
    return sum((Counter(exchanges) - held).values())


@asynccontextmanager
async def stub_model_server(text: str | None = None) -> AsyncIterator[str]:
    """Run the fake OpenAI server in its own process; yield its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "tests.fake_openai", "--port", str(port)]
    if text is not None:
        command += ["--text", text]
    process = await asyncio.create_subprocess_exec(
        *command, cwd=ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    assert process.stdout is not None
    await asyncio.wait_for(process.stdout.readline(), 30)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        await process.wait()


class StubModel:
    """What every stub chat model shares: an 8k context, counted by bytes, no adapters."""

    async def context_window(self) -> int:
        return 8192

    async def count_tokens(self, prompt: Sequence[PromptMessage]) -> int:
        return bound_tokens(prompt)

    async def special_tokens(self) -> list[str]:
        return []

    async def adapters(self) -> list[str]:
        return []


class PacedModel(StubModel):
    """A stub chat model streaming `tokens` five-character tokens at a fixed rate.

    With `echo`, the reply starts with the user's message, so each reply is recognisable.
    It remembers when it yielded its last token.
    """

    def __init__(self, tokens_per_second: float = 50, *, echo: bool = False) -> None:
        self.tokens_per_second = tokens_per_second
        self.echo = echo
        self.tokens = 0
        self.last_token_at = 0.0

    def expected(self, message: str) -> str:
        words = "".join(f"w{index % 1000:03d} " for index in range(self.tokens))
        return (f"{message}: " if self.echo else "") + words

    async def stream(
        self, prompt: Sequence[PromptMessage], *, session: str, adapter: str | None = None
    ) -> AsyncIterator[Chunk]:
        if self.echo:
            yield Chunk(text=f"{prompt[-1].content}: ")
        for index in range(self.tokens):
            await asyncio.sleep(1 / self.tokens_per_second)
            yield Chunk(text=f"w{index % 1000:03d} ")
            self.last_token_at = time.monotonic()
        yield Chunk(usage=Usage(len(prompt), self.tokens))


@asynccontextmanager
async def embedding_server(base_url: str | None = None) -> AsyncIterator[str]:
    """The bundled embedding model served by vLLM (started here), or one already running."""
    from tests.conftest import running_engine

    if base_url:
        yield base_url
        return
    with tempfile.TemporaryDirectory() as folder:
        async with running_engine(Path(folder), "embeddings") as url:
            yield url


@asynccontextmanager
async def embedder_at(base_url: str) -> AsyncIterator[OpenAIEmbedder]:
    """A client of an embedding server, as the bots make one."""
    async with AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0) as client:
        yield OpenAIEmbedder(client, model="parley-embed")


@dataclass
class HelpCentre:
    """The knowledge base's test set, ingested into a Redis 8 of its own."""

    redis: Redis
    index: RedisKnowledge
    embedder: OpenAIEmbedder
    outcomes: list[Outcome]
    seconds: float  # the ingest's wall time

    @property
    def passages(self) -> int:
        return sum(outcome.passages for outcome in self.outcomes)


@asynccontextmanager
async def help_centre(embed_url: str | None = None) -> AsyncIterator[HelpCentre]:
    """An embedded Redis 8 and an embedding server, with `tests/kb_corpus` ingested as "help"."""
    from tests.knowledge_set import DOCS

    with tempfile.TemporaryDirectory() as folder:
        async with (
            EmbeddedRedis(Path(folder), port=free_port()) as redis_url,
            embedding_server(embed_url) as url,
            embedder_at(url) as embedder,
        ):
            redis = connect_redis(redis_url)
            try:
                index = RedisKnowledge(redis, prefix="bench")
                adding = Ingest(index, embedder, "help", IngestOptions())
                await adding.prepare(embedder.model)
                started = time.perf_counter()
                outcomes = await adding.add([DOCS])
                seconds = time.perf_counter() - started
                yield HelpCentre(redis, index, embedder, outcomes, seconds)
            finally:
                await redis.aclose()
