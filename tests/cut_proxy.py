"""A loopback TCP proxy whose open connections a test can cut, as a flaky network would."""

from __future__ import annotations

import asyncio
from contextlib import suppress
from types import TracebackType


class CutProxy:
    """Forward 127.0.0.1:`port` to 127.0.0.1:`target`; `cut()` drops every open connection.

    New connections are forwarded as before after a cut, unless `down` is set: then they
    are dropped as they come. Everything the clients sent is kept in `sent`, so a test can
    read the requests. The proxy stops itself when its `async with` ends, or after
    `lifetime` seconds at the latest.
    """

    def __init__(self, target: int, *, lifetime: float = 120.0) -> None:
        self.target = target
        self.lifetime = lifetime
        self.port = 0
        self.sent = bytearray()
        self.down = False
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> CutProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._timer = asyncio.get_running_loop().call_later(self.lifetime, self.cut, True)
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.cut(stop=True)
        if self._server is not None:
            await self._server.wait_closed()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2)

    def cut(self, stop: bool = False) -> int:
        """Abort every open connection, both ways (and stop listening if `stop`);
        return how many connections there were."""
        if stop and self._server is not None:
            self._server.close()
        writers = list(self._open)
        for writer in writers:
            writer.transport.abort()
        self._open.clear()
        return len(writers) // 2

    async def _serve(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        if self.down:
            client_out.transport.abort()
            return
        try:
            server_in, server_out = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            client_out.transport.abort()
            return
        self._open.update((client_out, server_out))
        pipes = {
            asyncio.create_task(self._pipe(client_in, server_out, record=True)),
            asyncio.create_task(self._pipe(server_in, client_out, record=False)),
        }
        self._tasks.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for writer in (client_out, server_out):
                self._open.discard(writer)
                writer.transport.abort()
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            self._tasks.difference_update(pipes)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, record: bool
    ) -> None:
        with suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if record:
                    self.sent += data
                writer.write(data)
                await writer.drain()
