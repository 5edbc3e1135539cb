"""Transient platform errors while a reply streams: retried, the final text arrives, the
exchange is kept; a platform that refuses for good still leaves the exchange recorded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from bots.core.models import ConversationKey, Role
from bots.core.service import ConversationService
from bots.delivery.inflight import InFlight
from bots.ops import Metrics
from bots.platforms.discord import run_discord
from bots.settings import DiscordSettings
from bots.store.redis import RedisContextStore
from tests.fake_discord import DM_CHANNEL_ID, SNOWFLAKE, FakeDiscord, user
from tests.fake_telegram import FakeTelegram, person
from tests.fakes import ScriptedModel
from tests.telegram_run import RunningTelegram, running_telegram

ADA = person(1, "Ada")
ANSWER = " ".join(f"word{i}" for i in range(30))


class Long(ScriptedModel):
    def reply(self, prompt: object) -> str:
        return ANSWER


@dataclass
class Running:
    bot: RunningTelegram
    metrics: Metrics

    @property
    def fake(self) -> FakeTelegram:
        return self.bot.fake


@pytest.fixture
async def telegram(store: RedisContextStore) -> AsyncIterator[Running]:
    metrics = Metrics()
    service = ConversationService(store, Long(delay=0.05), observer=metrics)
    async with running_telegram(service) as bot:
        yield Running(bot, metrics)


async def ask(running: Running, text: str) -> None:
    """Send a message; wait until a send was tried and every reply is over."""
    await running.bot.say(ADA, text)
    await running.fake.wait_for(lambda: any(c.method == "sendMessage" for c in running.fake.calls))
    await asyncio.wait_for(running.bot.in_flight.idle(), 30)


async def test_a_502_on_send_and_on_edits_is_retried_and_the_final_text_arrives(
    telegram: Running, store: RedisContextStore
) -> None:
    telegram.fake.fail_next["sendMessage"] = [502]
    telegram.fake.fail_next["editMessageText"] = [502, 500]
    await ask(telegram, "tell me")
    assert telegram.fake.shown(ADA["id"]) == [ANSWER]
    assert sum(c.status in (500, 502) for c in telegram.fake.calls) == 3
    turns = await store.load(ConversationKey("telegram", str(ADA["id"])))
    assert [(t.role, t.content) for t in turns] == [
        (Role.USER, "tell me"),
        (Role.ASSISTANT, ANSWER),
    ]


async def test_a_chat_that_refuses_for_good_still_keeps_the_exchange(
    telegram: Running, store: RedisContextStore
) -> None:
    telegram.fake.fail_next["sendMessage"] = [403] * 20  # the bot was blocked meanwhile
    await ask(telegram, "are you there?")
    turns = await store.load(ConversationKey("telegram", str(ADA["id"])))
    assert [(t.role, t.content) for t in turns] == [
        (Role.USER, "are you there?"),
        (Role.ASSISTANT, ANSWER),
    ], "the model's answer is not thrown away"
    assert telegram.metrics.sample("parley_messages_answered_total", platform="telegram") == 1


@dataclass
class RunningDiscord:
    fake: FakeDiscord
    in_flight: InFlight

    async def say(self, text: str) -> dict[str, object]:
        message = self.fake.message(DM_CHANNEL_ID, text, author=user(SNOWFLAKE + 1, "ada"))
        await self.fake.dispatch("MESSAGE_CREATE", message)
        return message

    async def settle(self, count: int) -> None:
        posted = f"/channels/{DM_CHANNEL_ID}/messages"
        await self.fake.wait_for(lambda: len(self.fake.calls_to("POST", posted)) >= count, 30)
        await asyncio.wait_for(self.in_flight.idle(), 30)

    def shown(self) -> list[str]:
        final: dict[str, str] = {}
        for call in self.fake.calls:
            if call.path.startswith(f"/channels/{DM_CHANNEL_ID}/messages") and call.message_id:
                final[call.message_id] = call.body["content"]
        return list(final.values())


@pytest.fixture
async def discord_bot(store: RedisContextStore) -> AsyncIterator[RunningDiscord]:
    in_flight = InFlight()
    async with FakeDiscord() as fake:
        settings = DiscordSettings(
            token="test-token",  # type: ignore[arg-type]
            api_base_url=fake.api_base,
            gateway_url=fake.gateway_url,
        )
        service = ConversationService(store, Long(delay=0.05))
        running = asyncio.create_task(run_discord(service, settings, in_flight))
        await asyncio.wait_for(fake.identified.wait(), 10)
        yield RunningDiscord(fake, in_flight)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


DM = ConversationKey("discord", f"dm/{DM_CHANNEL_ID}")


async def test_discord_5xx_on_send_and_edit_is_retried_and_the_final_text_arrives(
    discord_bot: RunningDiscord, store: RedisContextStore
) -> None:
    discord_bot.fake.fail_next[f"POST /channels/{DM_CHANNEL_ID}/messages"] = [503]
    discord_bot.fake.fail_next[f"PATCH /channels/{DM_CHANNEL_ID}/messages"] = [503, 503]
    await discord_bot.say("tell me")
    await discord_bot.settle(2)  # the refused send, then the one that went through
    assert discord_bot.shown() == [ANSWER]
    assert sum(c.status == 503 for c in discord_bot.fake.calls) == 3
    assert [t.content for t in await store.load(DM)] == ["tell me", ANSWER]


async def test_deleting_a_discord_message_removes_its_answer_from_the_context(
    discord_bot: RunningDiscord, store: RedisContextStore
) -> None:
    first = await discord_bot.say("my name is Ada")
    await discord_bot.settle(1)
    await discord_bot.say("I like tea")
    await discord_bot.settle(2)
    deleted = {"id": first["id"], "channel_id": str(DM_CHANNEL_ID)}
    await discord_bot.fake.dispatch("MESSAGE_DELETE", deleted)
    for _ in range(50):  # the delete lands in Redis with no reply to wait for
        if len(turns := await store.load(DM)) == 2:
            break
        await asyncio.sleep(0.1)
    assert [t.content for t in turns] == ["I like tea", ANSWER], "the exchange is gone"
