"""Serving an ASGI app inside Parley's own process: its socket, uvicorn without signals,
and the limits on how slowly and how large a client may send a request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from bots.platforms.errors import PlatformSetupError

BACKLOG = 2048

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadLimits:
    """How long a client may take to send a request, and how large its head may be."""

    header_timeout: float = 10.0  # seconds for the request line and headers
    body_timeout: float = 30.0  # seconds for the whole body, once the headers are in
    max_header_bytes: int = 16_384  # the request line and headers together


class ServerConfig(uvicorn.Config):
    """uvicorn's config for an app in Parley's process: no logging set-up, no lifespan,
    no websockets, and HTTP/1.1 read with `ReadLimits` (`LimitedH11`)."""

    def __init__(self, app: ASGIApp, limits: ReadLimits, **options: Any) -> None:
        super().__init__(
            app,
            http=LimitedH11,
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            backlog=BACKLOG,
            **options,
        )
        self.limits = limits


class LimitedHead(h11.Connection):
    """h11's server side, refusing a request head over `max_bytes` (431) whether it comes
    in parts (h11 checks those) or in one read (h11 does not)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_bytes)
        self.max_bytes = max_bytes

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        event = super().next_event()
        if isinstance(event, h11.Request):
            size = len(event.target) + sum(len(name) + len(value) for name, value in event.headers)
            if size > self.max_bytes:
                raise h11.RemoteProtocolError("Request head too large", error_status_hint=431)
        return event


class LimitedH11(H11Protocol):
    """uvicorn's h11 protocol with deadlines: a client has `header_timeout` to send a
    request's head (from the connection or the previous response) and then
    `body_timeout` for its whole body, or the connection is closed; requests h11 cannot
    read are answered in JSON, as the apps answer."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        assert isinstance(config, ServerConfig)
        self.limits = config.limits
        self.conn = LimitedHead(self.limits.max_header_bytes)
        self.sending: str | None = None  # "head" or "body": what the client is sending
        self.deadline: asyncio.TimerHandle | None = None
        self.refused = False  # answered a request h11 could not read

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        if self.refused:  # answered and half-closed: the rest is read only to be dropped
            return
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.deadline is not None:
            self.deadline.cancel()

    def _watch(self) -> None:
        """Start the deadline of the part of a request the client now owes, if it changed."""
        state = self.conn.their_state
        sending = "head" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
        if sending == self.sending:
            return
        self.sending = sending
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if sending is not None and not self.transport.is_closing():
            limits = self.limits
            timeout = limits.header_timeout if sending == "head" else limits.body_timeout
            self.deadline = self.loop.call_later(timeout, self._too_slow)

    def _too_slow(self) -> None:
        # Closed without an answer, as nginx does on its client timeouts: a client this
        # slow is more likely holding connections open than reading one.
        self.deadline = None
        log.info(
            "closed a connection from %s: the request's %s came too slowly",
            self.client,
            self.sending,
        )
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this from its `except h11.RemoteProtocolError`, so the error is at hand.
        error = sys.exception()
        self.refused = True
        if self.deadline is not None:
            self.deadline.cancel()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app reads no more, and its answer goes nowhere
            self.cycle.message_event.set()
        if self.conn.our_state not in {h11.IDLE, h11.SEND_RESPONSE}:  # an answer was under way
            self.transport.close()
            return
        status = error.error_status_hint if isinstance(error, h11.RemoteProtocolError) else 400
        if status == 431:
            code = "headers_too_large"
            message = f"The request's headers are over {self.limits.max_header_bytes:,} bytes."
        elif status == 501:  # a transfer coding h11 does not read
            code, message = "not_implemented", f"The server cannot read the request: {error}."
        else:
            code, message = "malformed_request", f"The request is not valid HTTP/1.1: {error}."
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        response = h11.Response(status_code=status, headers=headers)
        for event in (response, h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event) or b"")
        # Closing with the request unread would reset the connection, and the client's
        # TCP would drop the answer: half-close, and close when the client does or at the
        # header timeout.
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.deadline = self.loop.call_later(self.limits.header_timeout, self.transport.close)


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
