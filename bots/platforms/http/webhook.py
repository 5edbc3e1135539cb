"""Push events (finished replies, handoffs) to a helpdesk's URL, signed, through a
durable outbox in Redis.

The body is JSON; the header `Parley-Signature: t=<unix time>,v1=<hex>` carries
HMAC-SHA256(secret, "<t>.<body>"), so the receiver can check both who sent it and that it
is fresh. `Parley-Delivery` stays the same across every attempt of one delivery, in any
replica and across restarts, so the receiver can drop duplicates. Deliveries wait in a
Redis stream (`bots.store.outbox`) until the receiver took them: connection errors,
timeouts, 429 and 5xx answers are retried with capped exponential backoff (429's
Retry-After is honoured) for `HTTP_WEBHOOK_RETRY_HOURS`; other answers end the delivery.
One conversation's events go out in order; other conversations do not wait for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import httpx
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bots.store.outbox import Count, Delivery, Outbox, OutboxPolicy, Reject, Retry

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0


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
    """Queue events for the receiver and deliver them; `async with` runs the deliveries.

    Args:
        url: the receiver.
        secret: the signature's key.
        redis: the shared Redis the outbox lives in.
        stream: the outbox's stream key.
        consumer: this replica's name in the outbox, the same across its restarts.
        policy: backoff, give-up and take-over times.
        timeout: seconds one attempt may take.
        count: told of each outbox event, for metrics.
    """

    def __init__(
        self,
        url: str,
        secret: bytes,
        redis: Redis,
        *,
        stream: str,
        consumer: str,
        policy: OutboxPolicy | None = None,
        timeout: float = TIMEOUT_S,
        count: Count | None = None,
    ) -> None:
        self._url = url
        self._secret = secret
        self._timeout = timeout
        self.outbox = Outbox(
            redis,
            stream=stream,
            consumer=consumer,
            send=self.deliver,
            policy=policy or OutboxPolicy(),
            count=count,
        )
        self._client: httpx.AsyncClient | None = None
        self._running: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Webhook:
        self._client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False)
        self._running = asyncio.create_task(self.outbox.run(), name="webhook-outbox")
        return self

    async def __aexit__(self, *_: object) -> None:
        """Stop delivering: what is not out yet stays queued for the next start."""
        if self._running is not None:
            self._running.cancel()
            await asyncio.gather(self._running, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    async def send(self, key: str, event: dict[str, Any]) -> None:
        """Queue an event; events of one `key` (a conversation) go out in order."""
        try:
            await self.outbox.put(key, event)
        except RedisError as error:
            log.error("webhook: event %s not queued: %s", event.get("type"), error)

    async def deliver(self, delivery: Delivery) -> None:
        """Send one delivery; raise `Retry` while the receiver cannot take it, `Reject`
        when it refused it."""
        assert self._client is not None, "use `async with Webhook(...)`"
        body = json.dumps(delivery.body, ensure_ascii=False).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Parley-Webhook/1",
            "Parley-Delivery": delivery.id,
            "Parley-Attempt": str(delivery.attempts + 1),
            "Parley-Signature": signature(self._secret, int(time.time()), body),
        }
        try:
            answer = await self._client.post(self._url, content=body, headers=headers)
        except httpx.HTTPError as error:
            raise Retry(type(error).__name__) from None
        if answer.is_success:
            return
        outcome = f"HTTP {answer.status_code}"
        if answer.status_code == 429 or answer.status_code >= 500:
            raise Retry(outcome, _retry_after(answer))
        raise Reject(outcome)


def _retry_after(answer: httpx.Response) -> float | None:
    try:
        return float(answer.headers["Retry-After"])
    except (KeyError, ValueError):
        return None
