"""What Parley tells Telegram users, through the real python-telegram-bot: a wait said as
it is when shown, a model that took too long, typing that goes on after "you're in line"."""

from __future__ import annotations

import asyncio

from bots.core.models import ConversationKey
from bots.core.ports import ModelTimedOut
from bots.core.service import ChatPolicy, ConversationService
from bots.store.redis import RedisContextStore
from tests.fake_telegram import person
from tests.fakes import MemoryLimiter, ScriptedModel
from tests.telegram_run import running_telegram

ADA, BOB = person(1, "Ada"), person(2, "Bob")


class Words(ScriptedModel):
    def reply(self, prompt: object) -> str:
        return " ".join(f"word{i}" for i in range(12))


async def test_a_wait_is_said_as_it_is_when_the_notice_is_shown(
    store: RedisContextStore,
) -> None:
    """The limit refuses the second message at once; its notice waits for the first reply,
    whose last edits fail and are retried, so by then the wait is shorter."""
    service = ConversationService(store, Words(delay=0.05), limiter=MemoryLimiter(limit=1))
    async with running_telegram(service) as chat:
        chat.fake.fail_next["editMessageText"] = [502, 502, 502]
        await chat.say(ADA, "first")
        await chat.say(ADA, "second")
        await chat.settle(ADA["id"], 2)
        notice = chat.fake.shown(ADA["id"])[1]
        assert notice.startswith("You're sending messages faster than I can answer")
        assert "try again in 30 s" not in notice and "try again in 2" in notice


async def test_a_model_that_takes_too_long_is_said_so(store: RedisContextStore) -> None:
    service = ConversationService(store, ScriptedModel(fail_with=ModelTimedOut("no answer")))
    async with running_telegram(service) as chat:
        await chat.say(ADA, "hello?")
        await chat.settle(ADA["id"])
        (shown,) = chat.fake.shown(ADA["id"])
        assert shown.startswith("The model took too long to answer") and "cut off" not in shown
    turns = await store.load(ConversationKey("telegram", str(ADA["id"])))
    assert [t.content for t in turns] == ["hello?"], "the message is kept"


async def test_typing_goes_on_after_you_re_in_line(store: RedisContextStore) -> None:
    model = ScriptedModel()
    model.gates[str(ConversationKey("telegram", str(ADA["id"])))] = asyncio.Event()
    service = ConversationService(store, model, policy=ChatPolicy(max_in_flight=1))
    async with running_telegram(service) as chat:
        await chat.say(ADA, "take the only slot")
        await model.started.wait()
        await chat.say(BOB, "and me?")
        await chat.fake.wait_for(lambda: bool(chat.fake.sent[BOB["id"]]), 15)
        queued = chat.fake.calls_to("sendMessage", BOB["id"])[0]
        assert "you're in line" in queued.params["text"]

        def typing_after_the_notice() -> bool:
            typing = chat.fake.calls_to("sendChatAction", BOB["id"])
            return any(call.at > queued.at for call in typing)

        await chat.fake.wait_for(typing_after_the_notice, 15)
        model.gates[str(ConversationKey("telegram", str(ADA["id"])))].set()
        await chat.settle(BOB["id"])
        assert chat.fake.shown(BOB["id"])[0].endswith("echo 1: and me?")
