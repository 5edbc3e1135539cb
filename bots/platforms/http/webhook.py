"""Push each finished reply to a helpdesk's URL, signed, retried with backoff.

The body is JSON; the header `Parley-Signature: t=<unix time>,v1=<hex>` carries
HMAC-SHA256(secret, "<t>.<body>"), so the receiver can check both who sent it and that it
is fresh. `Parley-Delivery` stays the same across the retries of one delivery, so the
receiver can drop duplicates. Connection errors, timeouts, 429 and 5xx answers are
retried (429's Retry-After is honoured); other answers end the delivery.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from typing import Any

import httpx

log = logging.getLogger(__name__)

QUEUE_SIZE = 10_000
WORKERS = 4
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The `Parley-Signature` header value for a body sent at `timestamp`."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: bytes, header: str, body: bytes, *, tolerance: float = 300.0) -> bool:
    """Check a `Parley-Signature` header, as a receiver would (for tests and examples)."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    expected = signature(secret, timestamp, body)
    fresh = abs(time.time() - timestamp) <= tolerance
    return fresh and hmac.compare_digest(expected, header)


class Webhook:
    """Deliver events from a bounded queue with a few workers; `async with` runs them.

    A full queue drops the event with an error in the log rather than holding replies
    back. On exit, queued deliveries get `drain_seconds` to go out.
    """

    def __init__(
        self,
        url: str,
        secret: bytes,
        *,
        attempts: int = 6,
        timeout: float = 10.0,
        first_backoff: float = FIRST_BACKOFF_S,
        drain_seconds: float = 10.0,
    ) -> None:
        self._url = url
        self._secret = secret
        self._attempts = attempts
        self._timeout = timeout
        self._first_backoff = first_backoff
        self._drain_seconds = drain_seconds
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_SIZE)
        self._workers: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Webhook:
        self._client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False)
        self._workers = [asyncio.create_task(self._work()) for _ in range(WORKERS)]
        return self

    async def __aexit__(self, *_: object) -> None:
        try:
            await asyncio.wait_for(self._queue.join(), self._drain_seconds)
        except TimeoutError:
            log.error("webhook: %d deliveries not sent at shutdown", self._queue.qsize())
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def send(self, event: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            log.error("webhook: queue full, event dropped")

    async def _work(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self.deliver(event)
            except Exception:
                log.exception("webhook: delivery failed")
            finally:
                self._queue.task_done()

    async def deliver(self, event: dict[str, Any]) -> bool:
        """Send one event, retrying; True once the receiver answered 2xx."""
        assert self._client is not None, "use `async with Webhook(...)`"
        body = json.dumps(event, ensure_ascii=False).encode()
        delivery = uuid.uuid4().hex
        backoff = self._first_backoff
        for attempt in range(1, self._attempts + 1):
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "Parley-Webhook/1",
                "Parley-Delivery": delivery,
                "Parley-Attempt": str(attempt),
                "Parley-Signature": signature(self._secret, int(time.time()), body),
            }
            wait = backoff
            try:
                answer = await self._client.post(self._url, content=body, headers=headers)
            except httpx.HTTPError as error:
                outcome = type(error).__name__
            else:
                if answer.is_success:
                    return True
                outcome = f"HTTP {answer.status_code}"
                if answer.status_code != 429 and answer.status_code < 500:
                    log.error("webhook: delivery %s refused (%s)", delivery, outcome)
                    return False
                wait = max(wait, _retry_after(answer))
            if attempt < self._attempts:
                log.warning("webhook: attempt %d failed (%s); retrying", attempt, outcome)
                await asyncio.sleep(min(wait, MAX_BACKOFF_S))
                backoff *= 2
        log.error("webhook: delivery %s given up after %d attempts", delivery, self._attempts)
        return False


def _retry_after(answer: httpx.Response) -> float:
    try:
        return float(answer.headers.get("Retry-After", 0))
    except ValueError:
        return 0.0
