"""The real Telegram bot against the local fake Bot API, for tests that need one running."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from bots.core.service import ConversationService
from bots.delivery.inflight import InFlight
from bots.platforms.telegram import run_telegram
from bots.settings import TelegramSettings
from tests.fake_telegram import TOKEN, FakeTelegram, private_chat


@dataclass
class RunningTelegram:
    fake: FakeTelegram
    in_flight: InFlight
    task: asyncio.Task[None]

    async def say(self, sender: dict[str, Any], text: str) -> None:
        """A private message from `sender`."""
        await self.fake.push({"chat": private_chat(sender), "from": sender, "text": text})

    async def settle(self, chat_id: int, count: int = 1) -> None:
        """Wait for `count` replies in the chat, then until every reply is delivered."""
        await self.fake.wait_for(lambda: len(self.fake.sent[chat_id]) >= count, 30)
        await asyncio.wait_for(self.in_flight.idle(), 30)

    async def stop(self) -> None:
        """Stop the bot as SIGTERM does (replies in progress get the shutdown grace)."""
        await self.fake.end_polls()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@asynccontextmanager
async def running_telegram(
    service: ConversationService, **settings: Any
) -> AsyncIterator[RunningTelegram]:
    """Run the bot with `service` until the block ends; `settings` are TelegramSettings'."""
    in_flight = InFlight()
    async with FakeTelegram() as fake:
        configured = TelegramSettings(
            token=TOKEN,  # type: ignore[arg-type]
            poll_timeout=1,
            base_url=fake.base_url,
            **settings,
        )
        task = asyncio.create_task(run_telegram(service, configured, in_flight))
        await fake.wait_for(lambda: bool(fake.calls_to("getUpdates")), 15)
        running = RunningTelegram(fake, in_flight, task)
        try:
            yield running
        finally:
            await running.stop()
