"""Resources the composition root opens: Redis (given or embedded), the local engine."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import openai
from openai import AsyncOpenAI
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.sentinel import Sentinel

from bots.children import stop_child
from bots.llm.embeddings import OpenAIEmbedder
from bots.settings import KnowledgeSettings, RedisSettings, load_settings
from bots.store.embedded import EmbeddedRedis
from bots.store.redis import RedisContextStore
from inference.settings import InferenceSettings

log = logging.getLogger(__name__)

FULL_COLLECTION_EVERY = 100  # young collections; Python's default is 10

REDIS_TIMEOUT_S = 2.0
# A command waits this long for a free connection when all are busy: under overload the
# event loop is slow to give connections back, and waiting beats failing the message.
REDIS_POOL_WAIT_S = 10.0
ENGINE_START_TIMEOUT_S = 900.0
ENGINE_STOP_TIMEOUT_S = 30.0
EMBED_TIMEOUT_S = 30.0  # one batch of passages on a busy CPU


def event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed (Parley depends on it, except on Windows),
    else asyncio's: same behaviour, less overhead per callback and socket."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def tune_gc() -> None:
    """Keep garbage-collector pauses short while many replies are open at once.

    Call once the process is set up. What is alive then (modules, classes, clients) is
    frozen out of every later collection, and full collections come ten times less often
    than Python's default: with 1,000 replies streaming, a full collection stopped the
    process for 160 ms before and 40 ms after, and came once per ramp instead of every few
    seconds (`python -m bench.http_streams`).
    """
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


@asynccontextmanager
async def open_redis(settings: RedisSettings, data_dir: Path) -> AsyncIterator[Redis]:
    """Connect to the master Sentinel names, to REDIS_URL, or to an embedded Redis
    persisting under `data_dir/redis`."""
    embedded = None if settings.url or settings.sentinels else EmbeddedRedis(data_dir / "redis")
    if settings.sentinels:
        client = connect_sentinel(settings)
    else:
        url = settings.url.get_secret_value() if settings.url else await embedded.start()  # type: ignore[union-attr]
        client = connect_redis(url, max_connections=settings.max_connections)
    try:
        yield client
    finally:
        await client.aclose()
        if embedded is not None:
            await embedded.stop()


def context_store(redis: Redis, settings: RedisSettings) -> RedisContextStore:
    """The conversation store on `redis`, as the REDIS_* settings configure it."""
    return RedisContextStore(
        redis,
        prefix=settings.key_prefix,
        max_turns=settings.context_max_turns,
        ttl_seconds=settings.context_ttl_seconds,
        lease_seconds=settings.line_lease_seconds,
    )


def connect_redis(url: str, *, max_connections: int = 256) -> Redis:
    """Make a client whose commands wait for a free connection instead of failing.

    redis-py's default pool raises "Too many connections" past 100 commands at once,
    which a busy bot reaches; a blocking pool queues them instead.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=REDIS_POOL_WAIT_S,
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        health_check_interval=30,
    )
    return Redis(connection_pool=pool)


def connect_sentinel(settings: RedisSettings) -> Redis:
    """A client of the master that REDIS_SENTINELS know as REDIS_SENTINEL_MASTER.

    It asks the Sentinels where the master is, and asks again after a failover.
    """
    sentinels = []
    for address in settings.sentinels:
        host, _, port = address.rpartition(":")
        sentinels.append((host.strip("[]"), int(port)))
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        sentinels, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
    )
    password = settings.password.get_secret_value() if settings.password else None
    master: Redis = sentinel.master_for(
        settings.sentinel_master,
        password=password,
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        max_connections=settings.max_connections,
        health_check_interval=30,
    )
    return master


def health_url(base_url: str) -> str:
    """Map an OpenAI-compatible base URL (…/v1) to vLLM's /health."""
    return base_url.rstrip("/").removesuffix("/v1") + "/health"


async def is_healthy(base_url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2.0) as client:
            return (await client.get(health_url(base_url))).status_code == 200
    except httpx.HTTPError:
        return False


class EngineStartError(RuntimeError):
    """The local inference service exited or did not become healthy in time."""


@asynccontextmanager
async def local_inference(
    base_url: str,
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    ready_within: float = ENGINE_START_TIMEOUT_S,
    served: str = "chat",
) -> AsyncIterator[None]:
    """Run `python -m inference serve SERVED` until the block ends; reuse one already healthy.

    Its output goes to `log_path`, so the console stays readable. `env` replaces this
    process's environment for it. `served` is "chat" or "embeddings".
    """
    if await is_healthy(base_url):
        yield
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as output:
        process = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "inference", "serve", served],
            stdin=asyncio.subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            env=dict(env or os.environ),
            start_new_session=True,  # Ctrl-C reaches Parley, which then stops the engine
        )
    try:
        await _wait_healthy(process, base_url, log_path, ready_within)
        yield
    finally:
        await stop_child(process, ENGINE_STOP_TIMEOUT_S)


async def _wait_healthy(
    process: asyncio.subprocess.Process, base_url: str, log_path: Path, ready_within: float
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ready_within
    while not await is_healthy(base_url):
        if process.returncode is not None:
            raise EngineStartError(f"the inference service exited; see {log_path}")
        if loop.time() > deadline:
            raise EngineStartError(
                f"the inference service was not ready in {ready_within:.0f} s; see {log_path}"
            )
        await asyncio.sleep(1.0)


@asynccontextmanager
async def open_embedder(
    settings: KnowledgeSettings, data_dir: Path
) -> AsyncIterator[OpenAIEmbedder]:
    """Connect to KB_EMBED_BASE_URL, or start the local embedding model (and stop it after)."""
    async with AsyncExitStack() as stack:
        base_url, api_key = settings.embed_base_url, settings.embed_api_key.get_secret_value()
        model = settings.embed_model
        if base_url is None:
            engine = load_settings(InferenceSettings)
            base_url, model = engine.embed_base_url, engine.embed_served_model_name
            if engine.api_key is not None:
                api_key = engine.api_key.get_secret_value()
            print("Starting the local embedding model...", file=sys.stderr)
            await stack.enter_async_context(
                local_inference(base_url, data_dir / "logs" / "embeddings.log", served="embeddings")
            )
        client = await stack.enter_async_context(
            AsyncOpenAI(
                base_url=base_url,
                api_key=api_key or "none",
                timeout=openai.Timeout(EMBED_TIMEOUT_S, connect=REDIS_TIMEOUT_S),
                max_retries=2,
            )
        )
        yield OpenAIEmbedder(client, model=model, max_tokens=settings.embed_max_tokens)
