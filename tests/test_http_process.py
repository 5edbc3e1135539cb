"""The real `python -m bots http` and `python -m bots keys` processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from bots.core.models import ConversationKey
from bots.store.redis import RedisContextStore
from tests.conftest import free_port, start_bots
from tests.fake_openai import FakeOpenAI, Reply
from tests.http_channel import events, reply_text

STORY = "Once upon a time a small bot answered every customer before lunch. " * 3


async def bots(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await start_bots(*args, env=env)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@asynccontextmanager
async def http_process(env: dict[str, str]) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run `python -m bots http` until it has announced its address; kill it if still up."""
    server = await start_bots("http", env=env)
    try:
        assert server.stderr is not None
        banner = await asyncio.wait_for(server.stderr.readline(), 60)
        assert b"HTTP channel on http://127.0.0.1:" in banner, banner
        yield server
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()


async def test_sigterm_lets_the_streamed_reply_finish(
    redis_url: str, key_prefix: str, store: RedisContextStore, tmp_path: Path
) -> None:
    port = free_port()
    async with FakeOpenAI([Reply(STORY, chunk_chars=8, delay=0.04)]) as model:
        env = {
            **os.environ,
            "LLM_BASE_URL": model.base_url,
            "REDIS_URL": redis_url,
            "REDIS_KEY_PREFIX": key_prefix,
            "DATA_DIR": str(tmp_path),
            "HTTP_PORT": str(port),
        }
        code, key, err = await bots(env, "keys", "create", "acme")
        assert code == 0 and key.startswith("pk_"), err
        key = key.strip()
        code, listed, _ = await bots(env, "keys", "list")
        assert code == 0 and " acme " in listed and key not in listed

        async with (
            http_process(env) as server,
            httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}
            ) as api,
        ):
            async with api.stream(
                "POST", "/v1/conversations/c1/messages", json={"text": "tell me a story"}
            ) as response:
                stream = events(response)
                first = [await anext(stream), await anext(stream)]
                assert first[1].kind == "delta"
                server.send_signal(signal.SIGTERM)
                rest = [event async for event in stream]
            assert reply_text(first + rest) == STORY
            assert rest[-1].kind == "done" and rest[-1].data["notices"] == []
            assert await asyncio.wait_for(server.wait(), 30) == 0
        stored = await store.load(ConversationKey("http", "acme", "c1"))
        assert [(t.role.value, t.content) for t in stored] == [
            ("user", "tell me a story"),
            ("assistant", STORY),
        ]
        code, _, err = await bots(env, "keys", "revoke", "acme")
        assert code == 0 and "revoked 1" in err
        code, _, err = await bots(env, "keys", "create", "Not A Name")
        assert code == 2 and "integration name" in err


async def test_a_taken_port_is_a_clear_error(redis_url: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {
            **os.environ,
            "LLM_BASE_URL": "http://127.0.0.1:9/v1",
            "REDIS_URL": redis_url,
            "DATA_DIR": str(tmp_path),
            "HTTP_PORT": str(taken.getsockname()[1]),
        }
        code, _, err = await bots(env, "http")
    assert code == 1 and "cannot listen on 127.0.0.1:" in err
