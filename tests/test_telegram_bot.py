"""The Telegram bot: the real python-telegram-bot Application against a local fake Bot API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from bots.core.commands import COMMANDS
from bots.core.models import ConversationKey, PromptMessage, Role
from bots.core.service import ConversationService
from bots.delivery.inflight import RESTART_NOTICE, InFlight
from bots.delivery.split import split_message
from bots.ops import Metrics
from bots.platforms.telegram import ONLY_TEXT, run_telegram
from bots.settings import TelegramSettings
from bots.store.redis import RedisContextStore
from tests.conftest import free_port
from tests.fake_telegram import (
    BOT,
    MEDIA,
    TOKEN,
    FakeTelegram,
    channel,
    group_chat,
    person,
    private_chat,
)
from tests.fakes import ScriptedModel

ADA = person(1, "Ada")
BOB = person(2, "Bob")
GROUP = group_chat(-1001)
FORUM = group_chat(-1002, forum=True)
CHANNEL = channel(-1003)


class FixedModel(ScriptedModel):
    def __init__(self, answer: Callable[[Sequence[PromptMessage]], str]) -> None:
        super().__init__()
        self.answer = answer

    def reply(self, prompt: Sequence[PromptMessage]) -> str:
        return self.answer(prompt)


def echo(prompt: Sequence[PromptMessage]) -> str:
    return f"You said: {prompt[-1].content}"


@dataclass
class Bot:
    fake: FakeTelegram
    model: FixedModel
    store: RedisContextStore
    in_flight: InFlight
    metrics: Metrics

    async def say(self, chat: dict[str, Any], text: str, **extra: Any) -> dict[str, Any]:
        return await self.post(chat, text=text, **extra)

    async def post(self, chat: dict[str, Any], **fields: Any) -> dict[str, Any]:
        """Send a message of any shape (text, caption, media) from `sender` (Ada)."""
        sender = fields.pop("sender", ADA)
        return await self.fake.push({"chat": chat, "from": sender, **fields})

    async def settle(self, chat_id: int, count: int = 1, within: float = 20.0) -> None:
        """Wait for `count` replies in the chat, then until every reply is delivered."""
        await self.fake.wait_for(lambda: len(self.fake.sent[chat_id]) >= count, within)
        await asyncio.wait_for(self.in_flight.idle(), within)


@pytest.fixture
def settings() -> TelegramSettings:
    return TelegramSettings(token=TOKEN, trigger_prefix="!ask", poll_timeout=1)  # type: ignore[arg-type]


@pytest.fixture
async def bot(
    settings: TelegramSettings, store: RedisContextStore, request: pytest.FixtureRequest
) -> AsyncIterator[Bot]:
    model, in_flight, metrics = FixedModel(getattr(request, "param", echo)), InFlight(), Metrics()
    async with FakeTelegram() as fake:
        configured = settings.model_copy(update={"base_url": fake.base_url})
        service = ConversationService(store, model, observer=metrics)
        running = asyncio.create_task(run_telegram(service, configured, in_flight))
        await fake.wait_for(lambda: bool(fake.calls_to("getUpdates")), 15)
        yield Bot(fake, model, store, in_flight, metrics)
        await fake.end_polls()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_a_private_chat_is_answered_in_html_with_typing_first(bot: Bot) -> None:
    await bot.say(private_chat(ADA), "hello <there> & co")
    await bot.settle(ADA["id"])
    assert bot.fake.shown(ADA["id"]) == ["You said: hello <there> & co"]
    (send,) = bot.fake.calls_to("sendMessage", ADA["id"])
    assert send.params["parse_mode"] == "HTML"
    assert send.params["text"] == "You said: hello &lt;there&gt; &amp; co"
    typing = bot.fake.calls_to("sendChatAction", ADA["id"])
    assert typing and typing[0].at <= send.at and typing[0].params["action"] == "typing"
    turns = await bot.store.load(ConversationKey("telegram", str(ADA["id"])))
    assert [(t.role, t.content) for t in turns] == [
        (Role.USER, "hello <there> & co"),
        (Role.ASSISTANT, "You said: hello <there> & co"),
    ]


async def test_commands_are_registered(bot: Bot) -> None:
    names = ["start", *(spec.name for spec in COMMANDS)]
    assert names[-3:] == ["human", "bot", "help"]
    assert [c["command"] for c in bot.fake.commands] == names
    descriptions = [c["description"] for c in bot.fake.commands[1:]]
    assert descriptions == [spec.summary for spec in COMMANDS], "the menu is the core's table"


async def test_in_groups_only_mentions_replies_and_the_prefix_are_answered(bot: Bot) -> None:
    await bot.say(GROUP, "just humans talking")
    await bot.say(GROUP, "@parley_bot what's up?")
    await bot.settle(GROUP["id"])
    await bot.say(GROUP, "and then?", reply_to_message=bot.fake.bot_message(GROUP, "earlier"))
    await bot.settle(GROUP["id"], 2)
    await bot.say(GROUP, "!ask anyone?", sender=BOB)
    await bot.settle(GROUP["id"], 3)
    assert bot.fake.shown(GROUP["id"]) == [
        "You said: Ada: what's up?",
        "You said: Ada: and then?",
        "You said: Bob: anyone?",
    ]
    assert len(bot.model.prompts) == 3, "the humans' chatter cost no model call"


async def test_a_forum_topic_is_its_own_conversation(bot: Bot) -> None:
    await bot.say(FORUM, "@parley_bot in topic 5", message_thread_id=5, is_topic_message=True)
    await bot.settle(FORUM["id"])
    (send,) = bot.fake.calls_to("sendMessage", FORUM["id"])
    assert send.params["message_thread_id"] == 5
    topic = ConversationKey("telegram", str(FORUM["id"]), "5")
    assert [t.content for t in await bot.store.load(topic)][:1] == ["in topic 5"]
    assert await bot.store.load(ConversationKey("telegram", str(FORUM["id"]))) == []


LONG = (
    "Here is the code:\n```python\n"
    + "".join(f"print('line {i}')  # a <comment> & more\n" for i in range(250))
    + "```\nDone."
)


@pytest.mark.parametrize("bot", [lambda _: LONG], indirect=True)
async def test_a_9000_character_answer_continues_with_its_code_block(bot: Bot) -> None:
    assert len(LONG) > 9000
    await bot.say(private_chat(ADA), "long please")
    await bot.settle(ADA["id"], 3)
    shown = bot.fake.shown(ADA["id"])
    assert len(shown) == len(split_message(LONG, 4096)) == 3
    assert all(len(text) <= 4096 for text in shown)
    sends = [c.params["text"] for c in bot.fake.calls_to("sendMessage", ADA["id"])]
    assert all(text.count("<pre>") == text.count("</pre>") for text in sends)
    assert "".join(shown).count("print('line") == 250


MARKDOWN_TRAPS = "Use *stars*, _under_scores_, [brackets](x), `a<b`, **bold** & 2 < 3 > 1 \\"


@pytest.mark.parametrize("bot", [lambda _: MARKDOWN_TRAPS], indirect=True)
async def test_markdown_that_would_break_markdown_v2_is_delivered(bot: Bot) -> None:
    await bot.say(private_chat(ADA), "format")
    await bot.settle(ADA["id"])
    assert bot.fake.shown(ADA["id"]) == [  # Markdown rendered; the relative link as its text
        "Use stars, under_scores, brackets, a<b, bold & 2 < 3 > 1 \\"
    ]
    assert all(c.status == 200 for c in bot.fake.calls_to("sendMessage"))


async def test_if_telegram_still_refuses_the_html_the_text_goes_plain(bot: Bot) -> None:
    bot.fake.reject_html = 1
    await bot.say(private_chat(ADA), "**hi**")
    await bot.settle(ADA["id"])
    refused, plain = bot.fake.calls_to("sendMessage", ADA["id"])[:2]
    assert refused.status == 400 and plain.status == 200 and "parse_mode" not in plain.params
    assert bot.fake.shown(ADA["id"])[0].startswith("You said:")


@pytest.mark.parametrize("bot", [lambda _: " ".join(f"w{i}" for i in range(120))], indirect=True)
async def test_flood_control_mid_stream_keeps_the_final_text(bot: Bot) -> None:
    bot.model.delay = 0.03
    bot.fake.edit_interval = 3.0
    counted_before = platform_429s(bot)
    await bot.say(private_chat(ADA), "stream")
    await bot.settle(ADA["id"])
    assert bot.fake.too_many() >= 1, "the fake's flood control fired"
    assert bot.fake.shown(ADA["id"]) == [" ".join(f"w{i}" for i in range(120))]
    assert platform_429s(bot) - counted_before == bot.fake.too_many(), "each 429 is in the metric"


def platform_429s(bot: Bot) -> float:
    return bot.metrics.sample("parley_platform_rate_limited_total", platform="telegram")


async def test_two_chats_at_once_and_two_messages_in_one_chat(bot: Bot) -> None:
    bot.model.delay = 0.02
    await asyncio.gather(
        bot.say(private_chat(ADA), "first"),
        bot.say(private_chat(ADA), "second"),
        bot.say(private_chat(BOB), "other chat"),
    )
    await bot.settle(ADA["id"], 2)
    await bot.settle(BOB["id"])
    assert bot.fake.shown(ADA["id"]) == ["You said: first", "You said: second"]
    assert bot.fake.shown(BOB["id"]) == ["You said: other chat"]
    turns = await bot.store.load(ConversationKey("telegram", str(ADA["id"])))
    assert [t.content for t in turns] == ["first", "You said: first", "second", "You said: second"]


async def test_reset_clears_the_conversation(bot: Bot) -> None:
    await bot.say(private_chat(ADA), "remember")
    await bot.settle(ADA["id"])
    await bot.say(
        private_chat(ADA), "/reset", entities=[{"type": "bot_command", "offset": 0, "length": 6}]
    )
    await bot.settle(ADA["id"], 2)
    assert bot.fake.shown(ADA["id"])[-1] == "Conversation forgotten; let's start over."
    assert await bot.store.load(ConversationKey("telegram", str(ADA["id"]))) == []


def command(text: str) -> dict[str, Any]:
    return {"entities": [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]}


async def test_in_a_group_only_its_administrators_set_the_persona(bot: Bot) -> None:
    bot.fake.group_owners.add(BOB["id"])
    await bot.say(GROUP, "/persona set You are a pirate.", **command("/persona"))
    await bot.settle(GROUP["id"])
    assert bot.fake.shown(GROUP["id"])[-1] == "Only admins can change my persona in a group."
    text = "/persona@parley_bot set You are a pirate."
    await bot.say(GROUP, text, sender=BOB, **command(text))
    await bot.settle(GROUP["id"], 2)
    assert bot.fake.shown(GROUP["id"])[-1].startswith("Persona set")
    state = await bot.store.state(ConversationKey("telegram", str(GROUP["id"])))
    assert state.persona == "You are a pirate."
    await bot.say(GROUP, "@parley_bot hello")
    await bot.settle(GROUP["id"], 3)
    assert bot.model.prompts[-1][0].content == "You are a pirate."


async def test_commands_for_another_bot_are_left_alone(bot: Bot) -> None:
    await bot.say(GROUP, "/usage@other_bot", **command("/usage@other_bot"))
    await bot.say(GROUP, "/usage", **command("/usage"))
    await bot.settle(GROUP["id"])
    assert len(bot.fake.sent[GROUP["id"]]) == 1
    assert bot.fake.shown(GROUP["id"]) == ["Token use isn't counted here."]


async def test_retry_answers_again_and_unknown_commands_get_help(bot: Bot) -> None:
    await bot.say(private_chat(ADA), "question")
    await bot.settle(ADA["id"])
    await bot.say(private_chat(ADA), "/retry", **command("/retry"))
    await bot.say(private_chat(ADA), "/frobnicate", **command("/frobnicate"))
    await bot.settle(ADA["id"], 3)
    shown = bot.fake.shown(ADA["id"])
    assert shown[:2] == ["You said: question"] * 2
    assert shown[2].startswith("I don't know /frobnicate.") and "/persona" in shown[2]
    turns = await bot.store.load(ConversationKey("telegram", str(ADA["id"])))
    assert [t.content for t in turns] == ["question", "You said: question"]


async def test_only_the_bots_own_mention_addresses_it_and_only_it_is_cut(bot: Bot) -> None:
    for text in ("@parley_bot2 hi", "ask @parley_botany", "someone@parley_bot.example"):
        await bot.say(GROUP, text)
    await bot.say(GROUP, "tell @parley_botany 🙂 hi @PARLEY_BOT")
    await bot.settle(GROUP["id"])
    by_name = {"type": "text_mention", "offset": 0, "length": 6, "user": BOT}
    await bot.say(GROUP, "Parley what now?", entities=[by_name])
    await bot.settle(GROUP["id"], 2)
    assert bot.fake.shown(GROUP["id"]) == [
        "You said: Ada: tell @parley_botany 🙂 hi",
        "You said: Ada: what now?",
    ]
    assert len(bot.model.prompts) == 2


async def test_an_edit_updates_the_stored_turn_and_is_not_answered(bot: Bot) -> None:
    asked = await bot.say(GROUP, "@parley_bot what is 2+2?")
    await bot.settle(GROUP["id"])
    await bot.fake.edit(asked, text="@parley_bot what is 3+3?")
    await bot.say(GROUP, "@parley_bot and then?")
    await bot.settle(GROUP["id"], 2)
    assert bot.fake.shown(GROUP["id"]) == [
        "You said: Ada: what is 2+2?",
        "You said: Ada: and then?",
    ]
    turns = await bot.store.load(ConversationKey("telegram", str(GROUP["id"])))
    assert [t.content for t in turns] == [
        "what is 3+3?",
        "You said: Ada: what is 2+2?",
        "and then?",
        "You said: Ada: and then?",
    ]
    helped = await bot.say(private_chat(ADA), "/help", **command("/help"))
    await bot.settle(ADA["id"])
    await bot.fake.edit(helped, text="/help me", **command("/help me"))
    await bot.say(private_chat(ADA), "ping")
    await bot.settle(ADA["id"], 2)
    assert bot.fake.shown(ADA["id"])[1:] == ["You said: ping"], "an edited command is not run"


async def test_private_media_are_told_what_is_read_and_captions_answered(bot: Bot) -> None:
    await bot.post(private_chat(ADA), caption="what is this?", **MEDIA["photo"])
    for kind in ("photo", "sticker", "voice", "document", "location"):
        await bot.post(private_chat(ADA), **MEDIA[kind])
    await bot.settle(ADA["id"], 6)
    assert sorted(bot.fake.shown(ADA["id"])) == sorted(
        ["You said: what is this?"] + [ONLY_TEXT] * 5
    )
    assert len(bot.model.prompts) == 1, "media without words cost no model call"


async def test_in_groups_captions_and_media_follow_the_addressing_rules(bot: Bot) -> None:
    await bot.post(GROUP, **MEDIA["photo"])
    await bot.post(GROUP, caption="nice view, @parley_botany", **MEDIA["photo"])
    await bot.post(GROUP, caption="@parley_bot where is this?", **MEDIA["document"])
    await bot.settle(GROUP["id"])
    earlier = bot.fake.bot_message(GROUP, "earlier")
    await bot.post(GROUP, reply_to_message=earlier, **MEDIA["sticker"])
    await bot.settle(GROUP["id"], 2)
    assert bot.fake.shown(GROUP["id"]) == ["You said: Ada: where is this?", ONLY_TEXT]
    assert len(bot.model.prompts) == 1


@pytest.mark.parametrize(
    ("settings", "answered"),
    [
        (TelegramSettings(token=TOKEN, poll_timeout=1), False),  # type: ignore[arg-type]
        (TelegramSettings(token=TOKEN, poll_timeout=1, answer_channel_posts=True), True),  # type: ignore[arg-type]
    ],
)
async def test_channel_posts_are_answered_only_when_configured(bot: Bot, answered: bool) -> None:
    post = {"chat": CHANNEL, "sender_chat": CHANNEL, "text": "Version 2 is out!"}
    await bot.fake.push(post, "channel_post")
    await bot.say(private_chat(ADA), "hello")
    await bot.settle(ADA["id"])
    await bot.settle(CHANNEL["id"], int(answered))
    assert bot.fake.shown(CHANNEL["id"]) == (["You said: Version 2 is out!"] if answered else [])
    assert len(bot.model.prompts) == 1 + answered


@pytest.mark.parametrize("bot", [lambda _: LONG], indirect=True)
async def test_in_groups_an_answer_replies_to_its_question(bot: Bot) -> None:
    asked = await bot.say(GROUP, "@parley_bot long please", sender=BOB)
    await bot.settle(GROUP["id"], 3)
    first, *rest = bot.fake.calls_to("sendMessage", GROUP["id"])
    reply = {"message_id": asked["message_id"], "allow_sending_without_reply": True}
    assert first.params["reply_parameters"] == reply
    assert rest and all("reply_parameters" not in c.params for c in rest), "continuations"
    await bot.say(private_chat(ADA), "hi")
    await bot.settle(ADA["id"], 3)
    private = bot.fake.calls_to("sendMessage", ADA["id"])
    assert all("reply_parameters" not in c.params for c in private), "one asker: no quote"


def secret(token: str) -> dict[str, str]:
    return {"X-Telegram-Bot-Api-Secret-Token": token}


async def test_a_webhook_with_a_wrong_secret_is_rejected(store: RedisContextStore) -> None:
    port = free_port()
    async with FakeTelegram() as fake:
        settings = TelegramSettings(
            token=TOKEN,  # type: ignore[arg-type]
            base_url=fake.base_url,
            webhook_url="https://bots.example.com/telegram",
            webhook_secret="s3cret-webhook-token",  # type: ignore[arg-type]
            webhook_listen="127.0.0.1",
            webhook_port=port,
        )
        service = ConversationService(store, FixedModel(echo))
        running = asyncio.create_task(run_telegram(service, settings))
        await fake.wait_for(lambda: bool(fake.calls_to("setWebhook")), 15)
        assert fake.webhook["secret_token"] == "s3cret-webhook-token"
        message = {"message_id": 1, "date": 0, "chat": private_chat(ADA), "from": ADA}
        update = {"update_id": 1, "message": {**message, "text": "via hook"}}
        url = f"http://127.0.0.1:{port}/telegram"
        async with httpx.AsyncClient() as client:
            for _ in range(50):
                try:
                    wrong = await client.post(url, json=update, headers=secret("nope"))
                    break
                except httpx.ConnectError:
                    await asyncio.sleep(0.1)
            right = await client.post(
                url,
                json=update,
                headers={"X-Telegram-Bot-Api-Secret-Token": "s3cret-webhook-token"},
            )
        assert wrong.status_code == 403 and right.status_code == 200
        await fake.wait_for(lambda: bool(fake.sent[ADA["id"]]), 10)
        assert not fake.calls_to("getUpdates"), "webhook mode does not poll"
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert fake.shown(ADA["id"]) == ["You said: via hook"]


@pytest.mark.parametrize(
    "settings",
    [TelegramSettings(token=TOKEN, allowed_users=frozenset({1}), poll_timeout=1)],  # type: ignore[arg-type]
)
async def test_only_allowed_users_are_answered(bot: Bot) -> None:
    await bot.say(private_chat(BOB), "let me in", sender=BOB)
    await bot.say(private_chat(ADA), "hello")
    await bot.settle(ADA["id"])
    assert bot.fake.shown(ADA["id"]) == ["You said: hello"]
    assert bot.fake.shown(BOB["id"]) == [] and len(bot.model.prompts) == 1


@pytest.mark.parametrize(("grace", "gated"), [(10.0, False), (0.3, True)])
async def test_stopping_finishes_or_ends_a_streamed_reply(
    store: RedisContextStore, settings: TelegramSettings, grace: float, gated: bool
) -> None:
    """What SIGTERM does: a reply in progress ends whole within the grace, or with a notice."""
    text = "one two three four five six seven eight"
    model = FixedModel(lambda _: text)
    model.delay = 0.15
    key = ConversationKey("telegram", str(ADA["id"]))
    if gated:
        model.gates[str(key)] = asyncio.Event()  # the model never answers
    async with FakeTelegram() as fake:
        configured = settings.model_copy(
            update={"base_url": fake.base_url, "shutdown_seconds": grace}
        )
        in_flight, metrics = InFlight(), Metrics()
        service = ConversationService(store, model, observer=metrics)
        running = asyncio.create_task(run_telegram(service, configured, in_flight))
        await fake.wait_for(lambda: bool(fake.calls_to("getUpdates")), 15)
        bot = Bot(fake, model, store, in_flight, metrics)
        await bot.say(private_chat(ADA), "tell me")
        if gated:
            await fake.wait_for(lambda: bool(fake.calls_to("sendChatAction")), 10)
        else:
            await fake.wait_for(lambda: bool(fake.sent[ADA["id"]]), 10)
        await fake.end_polls()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    turns = await store.load(key)
    if gated:
        assert fake.shown(ADA["id"]) == [RESTART_NOTICE]
        assert turns == [], "nothing half-written"
    else:
        assert fake.shown(ADA["id"]) == [text]
        assert [t.content for t in turns] == ["tell me", text]
