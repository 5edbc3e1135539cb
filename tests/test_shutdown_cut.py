"""A reply a shutdown cuts short: its partial message becomes the notice, on both bots."""

from __future__ import annotations

import asyncio

from bots.core.models import ConversationKey
from bots.core.service import ConversationService
from bots.delivery.inflight import RESTART_NOTICE, InFlight
from bots.platforms.discord import run_discord
from bots.settings import DiscordSettings
from bots.store.redis import RedisContextStore
from tests.fake_discord import DM_CHANNEL_ID, SNOWFLAKE, FakeDiscord, user
from tests.fake_telegram import person
from tests.fakes import ScriptedModel
from tests.telegram_run import running_telegram

LONG = " ".join(f"word{i}" for i in range(40))


class Slow(ScriptedModel):
    def reply(self, prompt: object) -> str:
        return LONG


async def test_discord_edits_the_partial_reply_into_the_restart_notice(
    store: RedisContextStore,
) -> None:
    model = Slow(delay=0.2)
    async with FakeDiscord() as fake:
        settings = DiscordSettings(
            token="test-token",  # type: ignore[arg-type]
            api_base_url=fake.api_base,
            gateway_url=fake.gateway_url,
            shutdown_seconds=0.3,
        )
        running = asyncio.create_task(
            run_discord(ConversationService(store, model), settings, InFlight())
        )
        await asyncio.wait_for(fake.identified.wait(), 10)
        message = fake.message(DM_CHANNEL_ID, "tell me", author=user(SNOWFLAKE + 1, "ada"))
        await fake.dispatch("MESSAGE_CREATE", message)
        posted = f"/channels/{DM_CHANNEL_ID}/messages"
        await fake.wait_for(lambda: bool(fake.calls_to("POST", posted)), 10)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        (post,) = fake.calls_to("POST", posted)
        assert post.body["content"].startswith("word0") and post.body["content"] != LONG
        last = [c for c in fake.calls if c.path.startswith(posted)][-1]
        assert last.method == "PATCH" and last.body["content"] == RESTART_NOTICE
    assert await store.load(ConversationKey("discord", f"dm/{DM_CHANNEL_ID}")) == []


async def test_telegram_edits_the_partial_reply_into_the_restart_notice(
    store: RedisContextStore,
) -> None:
    model, ada = Slow(delay=0.2), person(1, "Ada")
    service = ConversationService(store, model)
    async with running_telegram(service, shutdown_seconds=0.3) as bot:
        await bot.say(ada, "tell me")
        await bot.fake.wait_for(lambda: bool(bot.fake.sent[ada["id"]]), 10)
        await bot.stop()
    fake = bot.fake
    assert fake.shown(ada["id"]) == [RESTART_NOTICE], "one message, now the notice"
    assert await store.load(ConversationKey("telegram", str(ada["id"]))) == []
