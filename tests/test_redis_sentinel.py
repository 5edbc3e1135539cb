"""Redis through Sentinel: a real master and a real Sentinel process on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from bots.core.models import ConversationKey, Role, Turn
from bots.runtime import context_store, open_redis
from bots.settings import RedisSettings
from bots.store.embedded import EmbeddedRedis, redis_server_binary, responds
from tests.conftest import free_port


@pytest.fixture
async def sentinel(tmp_path: Path) -> AsyncIterator[tuple[str, int]]:
    """A master and one Sentinel watching it as "parley-master"; yield the Sentinel's address."""
    async with EmbeddedRedis(tmp_path / "master", port=free_port()) as master_url:
        master_port = int(master_url.rsplit(":", 1)[1].split("/")[0])
        port = free_port()
        config = tmp_path / "sentinel.conf"  # Sentinel rewrites its own configuration
        config.write_text(
            f"port {port}\nbind 127.0.0.1\n"
            f"sentinel monitor parley-master 127.0.0.1 {master_port} 1\n"
        )
        process = await asyncio.create_subprocess_exec(
            redis_server_binary(), str(config), "--sentinel",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            for _ in range(100):
                if await responds(f"redis://127.0.0.1:{port}"):
                    break
                await asyncio.sleep(0.05)
            yield "127.0.0.1", port
        finally:
            process.terminate()
            await process.wait()


async def test_conversations_are_kept_on_the_master_sentinel_names(
    sentinel: tuple[str, int], tmp_path: Path
) -> None:
    host, port = sentinel
    settings = RedisSettings(
        url="redis://127.0.0.1:1/0",  # type: ignore[arg-type]  # unused with Sentinels
        sentinels=(f"{host}:{port}",),
        sentinel_master="parley-master",
        key_prefix="sentinel-test",
    )
    key = ConversationKey("telegram", "42")
    async with open_redis(settings, tmp_path) as redis:
        store = context_store(redis, settings)
        await store.append(key, Turn(Role.USER, "hello"), Turn(Role.ASSISTANT, "hi"))
        assert [t.content for t in await store.load(key)] == ["hello", "hi"]
        info = await redis.info("replication")
        assert info["role"] == "master"
    # The turns are on the master the Sentinel named.
    asker = Redis(host=host, port=port)
    try:
        master_host, master_port = await asker.execute_command(  # type: ignore[no-untyped-call]
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "parley-master"
        )
    finally:
        await asker.aclose()
    direct = Redis(host=master_host.decode(), port=int(master_port))
    try:
        assert await direct.keys("sentinel-test:*")
    finally:
        await direct.aclose()


def test_sentinel_addresses_are_checked() -> None:
    with pytest.raises(ValueError, match="pattern"):
        RedisSettings(sentinels=("no-port",))
    assert RedisSettings(sentinels="a:26379, b:26379").sentinels == ("a:26379", "b:26379")  # type: ignore[arg-type]
