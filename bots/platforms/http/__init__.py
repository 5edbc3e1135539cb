"""The HTTP channel (`python -m bots http`): an API for integrations and a web chat."""

from __future__ import annotations

import asyncio
import logging
import math
import sys
from contextlib import AsyncExitStack

import uvicorn

from bots.core.ports import ApiKeys
from bots.core.service import ConversationService
from bots.platforms.errors import PlatformSetupError
from bots.platforms.http.app import create_app
from bots.platforms.http.desk import WebhookDesk
from bots.platforms.http.replies import Reply, ReplyHub
from bots.platforms.http.serving import PLATFORM, Quota
from bots.platforms.http.webhook import Webhook
from bots.platforms.listening import BACKLOG, Server, listen
from bots.settings import HttpSettings

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
    }


async def run_http(
    service: ConversationService, settings: HttpSettings, keys: ApiKeys, quota: Quota | None
) -> None:
    """Serve the API and the widget until cancelled; then end gracefully.

    On cancellation (SIGTERM) the socket stops taking connections, replies in progress
    get `HTTP_SHUTDOWN_SECONDS` to finish (streams see them end), and the rest end with
    a notice; nothing half-written is recorded.
    """
    if settings.webhook_url and settings.webhook_secret is None:
        raise HttpSetupError("HTTP_WEBHOOK_URL is set but HTTP_WEBHOOK_SECRET is not")
    sock = listen(settings.host, settings.port)
    async with AsyncExitStack() as stack:
        on_finished = None
        webhook: Webhook | None = None
        if settings.webhook_url and settings.webhook_secret is not None:
            hook = webhook = await stack.enter_async_context(
                Webhook(
                    settings.webhook_url,
                    settings.webhook_secret.get_secret_value().encode(),
                    attempts=settings.webhook_attempts,
                )
            )

            async def on_finished(reply: Reply) -> None:
                hook.send(webhook_event(reply))

        if service.handoffs is not None:  # always a desk, so integrators can hand off
            service.handoffs.attach(PLATFORM, WebhookDesk(webhook))
        hub = ReplyHub(service, keep_seconds=settings.reply_keep_seconds, on_finished=on_finished)
        config = uvicorn.Config(
            create_app(service, keys, hub, settings, quota),
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=math.ceil(settings.shutdown_seconds) + 5,
            backlog=BACKLOG,
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
