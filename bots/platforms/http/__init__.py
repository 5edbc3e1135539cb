"""The HTTP channel (`python -m bots http`): an API for integrations and a web chat."""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import sys
from contextlib import AsyncExitStack

from redis.asyncio import Redis

from bots.core.ports import ApiKeys
from bots.core.service import ConversationService
from bots.ops import Metrics
from bots.platforms.errors import PlatformSetupError
from bots.platforms.http.app import create_app
from bots.platforms.http.desk import WebhookDesk
from bots.platforms.http.replies import Reply, ReplyHub
from bots.platforms.http.serving import PLATFORM, Quota
from bots.platforms.http.webhook import TIMEOUT_S as WEBHOOK_TIMEOUT_S
from bots.platforms.http.webhook import Webhook
from bots.platforms.listening import ReadLimits, Server, ServerConfig, listen
from bots.settings import HttpSettings
from bots.store.outbox import OutboxPolicy
from bots.store.replies import RedisReplyLog

log = logging.getLogger(__name__)


class HttpSetupError(PlatformSetupError):
    """The HTTP channel cannot start: a port in use, a webhook without its secret."""


def webhook_event(reply: Reply) -> dict[str, object]:
    key = reply.key
    return {
        "type": "reply.finished",
        "integration": key.channel,
        "conversation_id": key.thread,
        "reply_id": reply.id,
        "message": reply.message,
        "reply": reply.text,
        "notices": [notice.kind.value for notice in reply.notices],
        "recorded": reply.recorded,
    }


async def run_http(
    service: ConversationService,
    settings: HttpSettings,
    keys: ApiKeys,
    quota: Quota | None,
    *,
    redis: Redis,
    prefix: str,
    metrics: Metrics | None = None,
) -> None:
    """Serve the API and the widget until cancelled; then end gracefully.

    On cancellation (SIGTERM) the socket stops taking connections, replies in progress
    get `HTTP_SHUTDOWN_SECONDS` to finish (streams see them end), and the rest end with
    a notice; nothing half-written is recorded. Replies' events are kept in Redis for
    resumes on any replica; webhook events wait in Redis until the receiver took them.
    """
    if settings.webhook_url and settings.webhook_secret is None:
        raise HttpSetupError("HTTP_WEBHOOK_URL is set but HTTP_WEBHOOK_SECRET is not")
    sock = listen(settings.host, settings.port)
    async with AsyncExitStack() as stack:
        on_finished = None
        webhook: Webhook | None = None
        if settings.webhook_url and settings.webhook_secret is not None:
            longest = settings.webhook_retry_max_seconds
            policy = OutboxPolicy(
                first_backoff=min(1.0, longest),
                max_backoff=longest,
                give_up_after=settings.webhook_retry_hours * 3600.0,
                claim_after=max(3 * longest, 2 * WEBHOOK_TIMEOUT_S),
            )
            hook = webhook = await stack.enter_async_context(
                Webhook(
                    settings.webhook_url,
                    settings.webhook_secret.get_secret_value().encode(),
                    redis,
                    stream=f"{prefix}:outbox:{{http-webhook}}",
                    consumer=settings.consumer or socket.gethostname(),
                    policy=policy,
                    count=metrics.outbox(PLATFORM, "webhook") if metrics is not None else None,
                )
            )

            async def on_finished(reply: Reply) -> None:
                await hook.send(str(reply.key), webhook_event(reply))

        if service.handoffs is not None:  # always a desk, so integrators can hand off
            service.handoffs.attach(PLATFORM, WebhookDesk(webhook))
        log = await stack.enter_async_context(
            RedisReplyLog(redis, prefix=prefix, keep_seconds=settings.reply_keep_seconds)
        )
        hub = ReplyHub(
            service,
            keep_seconds=settings.reply_keep_seconds,
            on_finished=on_finished,
            log=log,
        )
        config = ServerConfig(
            create_app(service, keys, hub, settings, quota),
            ReadLimits(settings.header_timeout, settings.body_timeout, settings.max_header_bytes),
            timeout_graceful_shutdown=math.ceil(settings.shutdown_seconds) + 5,
        )
        server = Server(config)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        print(
            f"HTTP channel on http://{host}:{sock.getsockname()[1]} "
            "(web chat: /chat, API: /openapi.json)",
            file=sys.stderr,
            flush=True,
        )
        try:
            await asyncio.wait({serving})
        finally:
            server.should_exit = True
            await hub.close(settings.shutdown_seconds)
            await asyncio.wait({serving})
            sock.close()
        serving.result()
