"""Server-Sent Event streams the HTTP channel holds at once, and its time to first byte.

The server runs in a process of its own as `python -m bots http` composes it (API key
check, the key's quota, the core's limits and context on a real Redis) over a stub
model that sends its first token at once and then one token every TOKEN_GAP seconds,
so each reply stays open for HOLD seconds. A client process opens STREAMS streams at
RATE per second, all open together at the peak, and times for each:

- time to first byte: the request sent to the response's headers in;
- time to first token: to the first `delta` event, which the model produced at once,
  so all of it is Parley's overhead (HTTP, key, limits, Redis, SSE) plus the client's.

Unloaded figures (one stream at a time) come from the same run, before the load. Then
the same again with the server on Python's defaults (asyncio's event loop, default GC
settings), to show what the tuning in `bots.runtime` is worth.

    python -m bench.http_streams [--streams 1000] [--rate 100]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.common import ROOT, StubModel, machine, memory_mib, percentile
from bots.core.models import Chunk, PromptMessage, Usage
from bots.core.service import ChatPolicy
from bots.runtime import event_loop, tune_gc
from bots.store.embedded import EmbeddedRedis
from tests.conftest import free_port
from tests.http_channel import http_channel

TOKENS = 40
TOKEN_GAP = 0.5  # seconds between tokens after the first: each reply is open ~20 s
UNLOADED = 50


class HeldModel(StubModel):
    """First token at once, then one every TOKEN_GAP seconds."""

    async def stream(
        self, prompt: Sequence[PromptMessage], *, session: str, adapter: str | None = None
    ) -> AsyncIterator[Chunk]:
        for index in range(TOKENS):
            if index:
                await asyncio.sleep(TOKEN_GAP)
            yield Chunk(text=f"w{index:02d} ")
        yield Chunk(usage=Usage(len(prompt), TOKENS))


async def serve(redis_url: str, port: int, key_file: Path, *, tuned: bool) -> None:
    """The server process: the HTTP channel over the held model, on 127.0.0.1:port."""
    async with http_channel(
        redis_url,
        "bench-http",
        HeldModel(),
        user_messages=20,
        conversation_messages=60,
        policy=ChatPolicy(max_in_flight=10_000),
        port=port,
        key_messages=1_000_000,
        reply_keep_seconds=5,
    ) as channel:
        await asyncio.to_thread(key_file.write_text, await channel.key("bench"))
        if tuned:
            tune_gc()  # as `python -m bots` does once set up
        await channel.task


@dataclass
class Load:
    first_byte: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    open_now: int = 0
    peak: int = 0
    failed: list[str] = field(default_factory=list)


async def one_stream(
    session: aiohttp.ClientSession, url: str, conversation: str, load: Load, *, hold: bool = True
) -> None:
    """Send a message and read its stream, to the end (`hold`) or to the first token."""
    started = time.perf_counter()
    try:
        async with session.post(
            f"{url}/v1/conversations/{conversation}/messages", json={"text": "hello"}
        ) as response:
            load.first_byte.append(time.perf_counter() - started)
            if response.status != 200:
                load.failed.append(f"HTTP {response.status}")
                return
            load.open_now += 1
            load.peak = max(load.peak, load.open_now)
            try:
                seen_token, tail = False, b""
                async for chunk in response.content.iter_any():  # cheaper than line by line
                    window, tail = tail + chunk, chunk[-16:]
                    if not seen_token and b"event: delta" in window:
                        load.first_token.append(time.perf_counter() - started)
                        seen_token = True
                        if not hold:
                            break
                    if b"event: done" in window:
                        break
                if not seen_token:
                    load.failed.append("no token")
            finally:
                load.open_now -= 1
    except (aiohttp.ClientError, TimeoutError) as error:
        load.failed.append(type(error).__name__)


async def drive(url: str, key: str, streams: int, rate: float) -> tuple[Load, Load]:
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as s:
        for index in range(10):  # connections, code paths and Redis scripts warm up
            await one_stream(s, url, f"warm-{index}", Load(), hold=False)
        unloaded = Load()
        for index in range(UNLOADED):
            await one_stream(s, url, f"alone-{index}", unloaded, hold=False)
        load = Load()
        tasks = []
        started = time.perf_counter()
        for index in range(streams):
            delay = started + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_stream(s, url, f"c-{index}", load)))
        await asyncio.gather(*tasks)
    return unloaded, load


def show(name: str, samples: list[float]) -> str:
    if not samples:
        return f"{name}: none"
    ms = [value * 1000 for value in samples]
    return (
        f"{name}: p50 {percentile(ms, 0.5):.1f} ms, p99 {percentile(ms, 0.99):.1f} ms, "
        f"max {max(ms):.1f} ms"
    )


@dataclass
class Run:
    unloaded: Load
    load: Load
    peak_rss: float


async def run(streams: int, rate: float, *, tuned: bool) -> Run:
    """Start a server process (tuned as `python -m bots` runs, or on Python's defaults)."""
    with tempfile.TemporaryDirectory() as scratch:
        async with EmbeddedRedis(Path(scratch) / "redis", port=free_port()) as redis_url:
            port, key_file = free_port(), Path(scratch) / "key"
            server = await asyncio.create_subprocess_exec(
                *[sys.executable, "-m", "bench.http_streams", "--serve", str(port)],
                *["--redis", redis_url, "--key-file", str(key_file)],
                *([] if tuned else ["--defaults"]),
                cwd=ROOT,
                stderr=asyncio.subprocess.DEVNULL,
            )
            for _ in range(600):
                if key_file.exists() or server.returncode is not None:
                    break
                await asyncio.sleep(0.05)
            try:
                url = f"http://127.0.0.1:{port}"
                unloaded, load = await drive(url, key_file.read_text(), streams, rate)
                return Run(unloaded, load, memory_mib(server.pid, "VmHWM"))
            finally:
                server.terminate()
                await server.wait()


async def main(streams: int, rate: float) -> None:
    gc.disable()  # the client is the measuring instrument: its own pauses are not Parley's
    print(f"machine: {machine()}")
    print(f"{streams} streams opened at {rate:.0f}/s, each open ~{(TOKENS - 1) * TOKEN_GAP:.0f} s")
    for tuned in (True, False):
        result = await run(streams, rate, tuned=tuned)
        load = result.load
        print(
            "as `python -m bots` runs (uvloop, start-up frozen out of the GC, rarer full "
            "collections):"
            if tuned
            else "on Python's defaults (asyncio's loop and GC settings), for comparison:"
        )
        print(
            f"  peak open at once: {load.peak}; failed: {len(load.failed)} "
            f"{sorted(set(load.failed))}; server's peak memory (RSS): {result.peak_rss:.0f} MiB"
        )
        print("  one stream at a time:")
        print("    " + show("time to first byte", result.unloaded.first_byte))
        print("    " + show("time to first token", result.unloaded.first_token))
        print(f"  {streams} streams:")
        print("    " + show("time to first byte", load.first_byte))
        print("    " + show("time to first token", load.first_token))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0, help="new streams per second")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--redis", help=argparse.SUPPRESS)
    parser.add_argument("--key-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--defaults", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:  # tuned, the server runs on the event loop `python -m bots` uses
        loop = asyncio.new_event_loop if args.defaults else event_loop
        with asyncio.Runner(loop_factory=loop) as runner:
            runner.run(serve(args.redis, args.serve, args.key_file, tuned=not args.defaults))
    else:
        asyncio.run(main(args.streams, args.rate))
