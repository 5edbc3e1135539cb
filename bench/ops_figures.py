"""A bot process as operators see it: start-up to ready, and memory with 10,000 conversations.

The process is `python -m bots http` (its ops endpoints on, JSON logs), against a stub
model server and Redis on loopback, each in a process of its own:

- start-up: from spawning the process to its `/readyz` answering 200 (Redis and the model
  server reachable), five times;
- memory: resident set size (VmRSS) once ready, then after one message in each of 10,000
  conversations (50 at a time, through the HTTP API), whose context lives in Redis.
  Finished replies stay readable for HTTP_REPLY_KEEP_SECONDS (120 s), so they are in
  that figure; the goal is under 150 MB;
- the bot image's own layer: the virtual environment `deploy/docker/bots.Dockerfile`
  builds (the same pip command, then pip and setuptools removed), measured on disk. The
  base image (python:3.11 slim) is not measured: that needs a Docker engine.

    python -m bench.ops_figures [--conversations 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from bench.common import ROOT, machine, memory_mib, stub_model_server
from bots.store.embedded import EmbeddedRedis
from tests.conftest import free_port

STARTS = 5
AT_ONCE = 50


@asynccontextmanager
async def bot_process(env: dict[str, str]) -> AsyncIterator[tuple[int, float]]:
    """Start `python -m bots http`; yield its pid and the seconds until /readyz said 200."""
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "bots", "http"],
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    ready = f"http://127.0.0.1:{env['OPS_PORT']}/readyz"
    try:
        async with httpx.AsyncClient(timeout=1) as client:
            while True:
                assert process.returncode is None, "the bot process exited"
                try:
                    if (await client.get(ready)).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.01)
        yield process.pid, time.perf_counter() - started
    finally:
        process.terminate()
        await process.wait()


async def create_key(env: dict[str, str]) -> str:
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "bots", "keys", "create", "bench"],
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await process.communicate()
    return out.decode().strip()


async def converse(url: str, key: str, conversations: int) -> int:
    """One message in each conversation, AT_ONCE at a time; return how many were answered."""
    answered = 0
    queue = iter(range(conversations))
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:

        async def worker() -> None:
            nonlocal answered
            for index in queue:
                reply = await client.post(
                    f"/v1/conversations/c-{index}/messages",
                    json={"text": f"hello from {index}", "stream": False},
                )
                answered += reply.status_code == 200 and bool(reply.json()["text"])

        await asyncio.gather(*(worker() for _ in range(AT_ONCE)))
    return answered


def image_layer_mib(scratch: Path) -> float:
    """Build the bot image's virtual environment as its Dockerfile does; return its size."""
    source, venv = scratch / "src", scratch / "venv"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("bots", "inference"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--quiet", "--disable-pip-version-check"]
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = [*pip, "install", "--no-cache-dir", "--prefer-binary", ".[discord,telegram,http]"]
    subprocess.run(install, cwd=source, check=True)
    subprocess.run([*pip, "uninstall", "--yes", "pip", "setuptools"], check=True)
    total = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
    return total / 2**20


async def main(conversations: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        layer = await asyncio.to_thread(image_layer_mib, Path(scratch))
        async with (
            EmbeddedRedis(Path(scratch) / "redis", port=free_port()) as redis_url,
            stub_model_server("Noted; I will pass it on.") as model_url,
        ):
            env = {
                **os.environ,
                "REDIS_URL": redis_url,
                "LLM_BASE_URL": model_url,
                "DATA_DIR": str(Path(scratch) / "data"),
                "HTTP_PORT": str(free_port()),
                "HTTP_KEY_MESSAGES": "0",
                "OPS_PORT": str(free_port()),
                "LOG_FORMAT": "json",
                "LIMITS_CONVERSATION_MESSAGES": "0",
            }
            key = await create_key(env)
            starts = []
            for _ in range(STARTS):
                async with bot_process(env) as (_, seconds):
                    starts.append(seconds)
            async with bot_process(env) as (pid, _):
                ready_rss = memory_mib(pid)
                began = time.perf_counter()
                answered = await converse(
                    f"http://127.0.0.1:{env['HTTP_PORT']}", key, conversations
                )
                took = time.perf_counter() - began
                after_rss, peak = memory_mib(pid), memory_mib(pid, "VmHWM")
    print(f"machine: {machine()}")
    print(f"bot image's own layer (its virtual environment): {layer:.0f} MiB")
    print(
        f"start-up to ready (/readyz 200), {STARTS} starts: median "
        f"{statistics.median(starts):.2f} s, min {min(starts):.2f} s, max {max(starts):.2f} s"
    )
    print(
        f"{conversations} conversations, one message each ({answered} answered in {took:.1f} s, "
        f"{answered / took:.0f}/s)"
    )
    print(
        f"memory (RSS): {ready_rss:.0f} MiB when ready, {after_rss:.0f} MiB after "
        f"{conversations} conversations (peak {peak:.0f} MiB)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=10_000)
    asyncio.run(main(parser.parse_args().conversations))
