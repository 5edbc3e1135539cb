"""What operators see of a bot process: Prometheus metrics, health, readiness, JSON logs.

Every bot process serves `GET /healthz` (the event loop answers), `GET /readyz` (Redis
and the model server answer; 503 with which one does not) and `GET /metrics` on
OPS_HOST:OPS_PORT. Logs go to stderr as text, or one JSON object per line with
LOG_FORMAT=json; either way every secret the settings hold is masked in every line,
whichever library wrote it (httpx logs Telegram's URL, which carries the bot token).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, SecretStr

from bots.core.models import HandoffReason, NoticeKind

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
ERRORS = {
    NoticeKind.MODEL_UNAVAILABLE,
    NoticeKind.MODEL_REJECTED,
    NoticeKind.REPLY_INTERRUPTED,
    NoticeKind.MODEL_TIMED_OUT,
    NoticeKind.STORE_UNAVAILABLE,
}
LIMITS = {NoticeKind.RATE_LIMITED, NoticeKind.BUDGET_SPENT}
READY_TIMEOUT_S = 2.0


class Metrics:
    """The core's Observer, kept as Prometheus metrics in a registry of its own."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()

        def counter(name: str, documentation: str, *labels: str) -> Counter:
            return Counter(name, documentation, ["platform", *labels], registry=registry)

        def histogram(name: str, documentation: str) -> Histogram:
            return Histogram(
                name, documentation, ["platform"], buckets=LATENCY_BUCKETS, registry=registry
            )

        self._received = counter("parley_messages_received", "Messages and commands received.")
        self._answered = counter("parley_messages_answered", "Messages answered with some text.")
        self._failed = counter(
            "parley_errors", "Answers that failed, by kind (model, store...).", "kind"
        )
        self._limited = counter(
            "parley_rate_limited", "Messages refused by a limit or budget.", "reason"
        )
        self._platform_limited = counter(
            "parley_platform_rate_limited", "429s from the platform's API while delivering."
        )
        self._handed_off = counter(
            "parley_handoffs", "Conversations handed to people, by why.", "reason"
        )
        self._handed_back = counter(
            "parley_handbacks", "Handed-off conversations back with the bot, by whom.", "by"
        )
        self._outbox = counter(
            "parley_outbox", "Durable deliveries: queued, delivered, retried, given up.",
            "outbox", "event",
        )  # fmt: skip
        self._in_flight = Gauge(
            "parley_replies_in_flight",
            "Model requests in progress.",
            ["platform"],
            registry=registry,
        )
        self._first_token = histogram(
            "parley_time_to_first_token_seconds",
            "From a message's arrival to the model's first text.",
        )
        self._reply = histogram(
            "parley_reply_seconds", "From a message's arrival to the end of its answer."
        )

    def sample(self, name: str, **labels: str) -> float:
        """The current value of one sample (0 when it was never set)."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def exposition(self) -> bytes:
        """Every metric in Prometheus's text format."""
        return generate_latest(self.registry)

    def received(self, platform: str) -> None:
        self._received.labels(platform).inc()

    def first_token(self, platform: str, seconds: float) -> None:
        self._first_token.labels(platform).observe(seconds)

    def noticed(self, platform: str, kind: NoticeKind) -> None:
        if kind in ERRORS:
            self._failed.labels(platform, kind.value).inc()
        elif kind in LIMITS:
            self._limited.labels(platform, kind.value).inc()

    def finished(self, platform: str, seconds: float, *, answered: bool) -> None:
        self._reply.labels(platform).observe(seconds)
        if answered:
            self._answered.labels(platform).inc()

    def model_calls(self, platform: str, change: int) -> None:
        self._in_flight.labels(platform).inc(change)

    def platform_limited(self, platform: str) -> None:
        self._platform_limited.labels(platform).inc()

    def outbox(self, platform: str, name: str) -> Callable[[str], None]:
        """What counts one outbox's events ("queued", "delivered"...)."""
        return lambda event: self._outbox.labels(platform, name, event).inc()

    def handed_off(self, platform: str, reason: HandoffReason) -> None:
        self._handed_off.labels(platform, reason.value).inc()

    def handed_back(self, platform: str, by: str) -> None:
        self._handed_back.labels(platform, by).inc()


# ----------------------------------------------------------------------------- endpoints

Probe = Callable[[], Awaitable[bool]]


@asynccontextmanager
async def ops_server(
    host: str, port: int, probes: dict[str, Probe], metrics: Metrics
) -> AsyncIterator[None]:
    """Serve /healthz, /readyz (every probe true) and /metrics until the block ends."""
    if not port:
        yield
        return

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, path, *_ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            status, content_type, body = await answer(
                method, path.split("?", 1)[0], probes, metrics
            )
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


async def answer(
    method: str, path: str, probes: dict[str, Probe], metrics: Metrics
) -> tuple[str, str, bytes]:
    if method != "GET":
        return "405 Method Not Allowed", "text/plain", b"GET only\n"
    if path == "/healthz":
        return "200 OK", "application/json", b'{"status": "ok"}\n'
    if path == "/metrics":
        return "200 OK", CONTENT_TYPE_LATEST, metrics.exposition()
    if path == "/readyz":
        names = list(probes)
        results = await asyncio.gather(*(_probe(probes[name]) for name in names))
        checks = dict(zip(names, results, strict=True))
        ready = all(results)
        body = json.dumps({"ready": ready, **checks}).encode() + b"\n"
        return ("200 OK" if ready else "503 Service Unavailable"), "application/json", body
    return "404 Not Found", "text/plain", b"/healthz, /readyz or /metrics\n"


async def _probe(probe: Probe) -> bool:
    try:
        return await asyncio.wait_for(probe(), READY_TIMEOUT_S)
    except Exception:  # a probe that fails in any way is a "not ready"
        return False


# ----------------------------------------------------------------------------- logs


def secrets_of(settings: BaseModel) -> list[str]:
    """Every secret value in the settings, and the password part of secret URLs."""
    found: list[str] = []
    for value in _values(settings):
        if isinstance(value, SecretStr) and (secret := value.get_secret_value()):
            found.append(secret)
            password = urlsplit(secret).password if "://" in secret else None
            if password:
                found.append(password)
    return sorted(set(found), key=len, reverse=True)


def _values(model: BaseModel) -> Iterable[Any]:
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from _values(value)
        else:
            yield value


# Secrets no setting names: API keys of the HTTP channel, Telegram tokens in URLs.
SECRET_SHAPES = re.compile(r"pk_[A-Za-z0-9_-]{16,}|\bbot\d{5,}:[A-Za-z0-9_-]{20,}")


class Redact(logging.Filter):
    """Mask secrets in a record's final text (message and arguments, formatted)."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        escaped = [re.escape(secret) for secret in secrets if len(secret) >= 4]
        self._pattern = re.compile("|".join([*escaped, SECRET_SHAPES.pattern]))

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        masked = self._pattern.sub("***", text)
        if masked != text:
            record.msg, record.args = masked, None
        if record.exc_text:
            record.exc_text = self._pattern.sub("***", record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, conversation, error."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        conversation = getattr(record, "conversation", None)
        if conversation is not None:
            entry["conversation"] = conversation
        if record.exc_text or record.exc_info:
            entry["error"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return json.dumps(entry, ensure_ascii=False)
