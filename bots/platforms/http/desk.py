"""The HTTP channel's staff desk: the integration's own people, told through its webhook.

When a conversation goes to people, each message its user writes meanwhile, and when it
comes back to the bot, the webhook (`HTTP_WEBHOOK_URL`) gets an event, signed and
retried like `reply.finished`. People answer with `POST …/agent-messages`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from bots.core.models import ConversationKey, Handoff, Turn
from bots.platforms.http.serving import message_out
from bots.platforms.http.webhook import Webhook


class WebhookDesk:
    """A `StaffDesk` for the HTTP platform; without a webhook it tells nobody (integrators
    then read `GET …/handoff` and the history), so handing off through the API still works.

    Args:
        webhook: where the events go; None: no webhook is set up.
    """

    def __init__(self, webhook: Webhook | None) -> None:
        self._webhook = webhook

    async def opened(self, key: ConversationKey, handoff: Handoff, recent: Sequence[Turn]) -> None:
        await self._send(
            key,
            "conversation.handoff",
            reason=handoff.reason.value,
            at=handoff.since,
            recent=[message_out(turn).model_dump() for turn in recent],
        )

    async def relayed(self, key: ConversationKey, turn: Turn) -> None:
        message = message_out(turn).model_dump()
        await self._send(key, "conversation.message", at=turn.at, message=message)

    async def returned(self, key: ConversationKey, by: str) -> None:
        await self._send(key, "conversation.returned", by=by, at=time.time())

    async def _send(self, key: ConversationKey, kind: str, **fields: Any) -> None:
        if self._webhook is not None:
            event = {"type": kind, "integration": key.channel, "conversation_id": key.thread}
            await self._webhook.send(str(key), {**event, **fields})
