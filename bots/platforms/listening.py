"""Serving an ASGI app inside Parley's own process: its socket, and uvicorn without signals."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import uvicorn

from bots.platforms.errors import PlatformSetupError

BACKLOG = 2048


class Server(uvicorn.Server):
    """uvicorn without its own signal handling: Parley's process handles SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listen(host: str, port: int) -> socket.socket:
    """Open the listening socket first: a taken port is a clear error, not an exit, and
    connections queue from the moment the address is announced."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise PlatformSetupError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock.listen(BACKLOG)
    return sock
