"""The Discord bot through real discord.py code paths, against a local fake of Discord."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bots.core.commands import COMMANDS
from bots.core.models import ConversationKey, PromptMessage, Role
from bots.core.service import ConversationService
from bots.delivery.inflight import CLOSED_NOTICE, RESTART_NOTICE, InFlight
from bots.delivery.split import split_message
from bots.ops import Metrics
from bots.platforms.discord import (
    INTENT_HELP,
    AccessPolicy,
    DiscordSetupError,
    intents,
    run_discord,
    shard_of,
)
from bots.settings import DiscordSettings
from bots.store.redis import RedisContextStore
from tests.conftest import start_bots
from tests.fake_discord import (
    BOT_ID,
    BOT_USER,
    CHANNEL_ID,
    DM_CHANNEL_ID,
    GUILD_ID,
    INTERACTION_WINDOW,
    OPEN_CHANNEL_ID,
    ROLE_MEMBER,
    ROLE_MUTED,
    SNOWFLAKE,
    THREAD_ID,
    TIMESTAMP,
    Call,
    FakeDiscord,
    user,
)
from tests.fake_openai import FakeOpenAI, Reply
from tests.fakes import ScriptedModel

ADA_ID = SNOWFLAKE + 1
ADA = user(ADA_ID, "ada")
BOT_MENTION = {
    **BOT_USER,
    "member": {"roles": [], "joined_at": TIMESTAMP, "deaf": False, "mute": False, "flags": 0},
}


class FixedModel(ScriptedModel):
    """Answers every prompt with `answer(prompt)`."""

    def __init__(self, answer: Callable[[Sequence[PromptMessage]], str], delay: float = 0.0):
        super().__init__(delay=delay)
        self.answer = answer

    def reply(self, prompt: Sequence[PromptMessage]) -> str:
        return self.answer(prompt)


@dataclass
class Bot:
    fake: FakeDiscord
    model: FixedModel
    store: RedisContextStore
    in_flight: InFlight
    metrics: Metrics

    def sent(self, channel: int) -> list[str]:
        return [
            c.body["content"] for c in self.fake.calls_to("POST", f"/channels/{channel}/messages")
        ]

    def edits(self, channel: int) -> list[str]:
        return [
            c.body["content"] for c in self.fake.calls_to("PATCH", f"/channels/{channel}/messages/")
        ]

    def shown(self, channel: int) -> list[str]:
        """The final text of each message the bot posted in a channel, in posting order."""
        final: dict[str, str] = {}
        for call in self.fake.calls:
            if call.path.startswith(f"/channels/{channel}/messages") and call.message_id:
                final[call.message_id] = call.body["content"]
        return list(final.values())

    async def say(
        self,
        channel: int,
        content: str,
        *,
        author: dict[str, Any] = ADA,
        roles: list[int] | None = None,
        mentions: list[dict[str, Any]] | None = None,
        reply_to: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Post a user's message to the bot through the gateway."""
        message = self.fake.message(
            channel, content, author=author, guild=channel != DM_CHANNEL_ID,
            roles=roles, mentions=mentions, reply_to=reply_to,
        )  # fmt: skip
        await self.fake.dispatch("MESSAGE_CREATE", message)
        return message

    async def settle(self, channel: int, count: int = 1, within: float = 15.0) -> None:
        """Wait for `count` replies in `channel`, then until every reply is delivered."""
        await self.fake.wait_for(lambda: len(self.sent(channel)) >= count, within)
        await asyncio.wait_for(self.in_flight.idle(), within)

    async def command_answer(self, count: int = 1) -> str:
        """The private answer to the `count`-th slash command (at once, or after a deferral)."""
        await self.fake.wait_for(lambda: len(self.fake.answers()) >= count)
        answer = self.fake.answers()[count - 1]
        message = answer.body if answer.path.startswith("/webhooks/") else answer.body["data"]
        assert message["flags"] == 64, "ephemeral"
        assert message["allowed_mentions"]["parse"] == [], "no pings"
        return str(message["content"])

    def deferrals(self) -> list[Call]:
        """The interactions acknowledged in time to be answered later (callback type 5)."""
        return [
            c
            for c in self.fake.calls_to("POST", "/callback")
            if c.body["type"] == 5 and c.status == 200
        ]


def echo(prompt: Sequence[PromptMessage]) -> str:
    return f"You said: {prompt[-1].content}"


@pytest.fixture
def settings() -> DiscordSettings:
    return DiscordSettings(
        token="test-token",  # type: ignore[arg-type]
        open_channels=frozenset({OPEN_CHANNEL_ID}),
        deny_roles=frozenset({ROLE_MUTED}),
    )


@pytest.fixture
async def bot(
    settings: DiscordSettings, store: RedisContextStore, request: pytest.FixtureRequest
) -> AsyncIterator[Bot]:
    answer = getattr(request, "param", echo)
    model = FixedModel(answer)
    async with FakeDiscord() as fake:
        configured = settings.model_copy(
            update={"api_base_url": fake.api_base, "gateway_url": fake.gateway_url}
        )
        metrics, in_flight = Metrics(), InFlight()
        service = ConversationService(store, model, observer=metrics)
        running = asyncio.create_task(run_discord(service, configured, in_flight))
        await asyncio.wait_for(fake.identified.wait(), 10)
        await fake.wait_for(lambda: bool(fake.calls_to("PUT", "/commands")), 10)
        yield Bot(fake, model, store, in_flight, metrics)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_a_dm_is_answered_with_no_pings_allowed(bot: Bot) -> None:
    await bot.say(DM_CHANNEL_ID, "hello there")
    await bot.settle(DM_CHANNEL_ID)
    (post,) = bot.fake.calls_to("POST", f"/channels/{DM_CHANNEL_ID}/messages")
    assert post.body["content"] == "You said: hello there"
    assert post.body["allowed_mentions"]["parse"] == []
    assert not post.body["allowed_mentions"].get("replied_user"), "Discord defaults it to false"
    assert str(post.body["message_reference"]["channel_id"]) == str(DM_CHANNEL_ID)
    assert bot.fake.calls_to("POST", f"/channels/{DM_CHANNEL_ID}/typing")
    turns = await bot.store.load(ConversationKey("discord", f"dm/{DM_CHANNEL_ID}"))
    assert [(t.role, t.content) for t in turns] == [
        (Role.USER, "hello there"),
        (Role.ASSISTANT, "You said: hello there"),
    ]


async def test_a_guild_message_needs_a_mention_a_reply_or_an_open_channel(bot: Bot) -> None:
    await bot.say(CHANNEL_ID, "just chatting among humans")
    await bot.say(CHANNEL_ID, f"<@{BOT_ID}> what's up?", mentions=[BOT_MENTION])
    await bot.settle(CHANNEL_ID)
    assert bot.sent(CHANNEL_ID) == ["You said: ada: what's up?"], "the author is named"
    reply_to = bot.fake.message(CHANNEL_ID, "You said: ada: what's up?", author=BOT_USER)
    await bot.say(CHANNEL_ID, "and then?", reply_to=reply_to)
    await bot.say(OPEN_CHANNEL_ID, "anyone?")
    await bot.settle(CHANNEL_ID, 2)
    await bot.settle(OPEN_CHANNEL_ID)
    assert bot.sent(CHANNEL_ID)[1] == "You said: ada: and then?"
    assert bot.sent(OPEN_CHANNEL_ID) == ["You said: ada: anyone?"]
    history = await bot.store.load(ConversationKey("discord", f"{GUILD_ID}/{CHANNEL_ID}"))
    assert [t.name for t in history if t.role is Role.USER] == ["ada", "ada"], "authors named"


async def test_bots_and_denied_roles_get_no_model_call(bot: Bot) -> None:
    await bot.say(OPEN_CHANNEL_ID, "I am a bot", author=user(SNOWFLAKE + 7, "otherbot", bot=True))
    await bot.say(OPEN_CHANNEL_ID, "I am muted", roles=[ROLE_MUTED])
    await bot.say(OPEN_CHANNEL_ID, "I am a member", roles=[ROLE_MEMBER])
    await bot.settle(OPEN_CHANNEL_ID)
    assert bot.sent(OPEN_CHANNEL_ID) == ["You said: ada: I am a member"]
    assert len(bot.model.prompts) == 1


@pytest.mark.parametrize(
    "bot",
    [lambda _: f"Hey @everyone and @here, <@&{ROLE_MEMBER}> <@{ADA_ID}> look!"],
    indirect=True,
)
async def test_mentions_in_model_output_notify_nobody(bot: Bot) -> None:
    await bot.say(DM_CHANNEL_ID, "ping them")
    await bot.settle(DM_CHANNEL_ID)
    (post,) = bot.fake.calls_to("POST", f"/channels/{DM_CHANNEL_ID}/messages")
    assert "@everyone" in post.body["content"]
    assert post.body["allowed_mentions"]["parse"] == []
    assert all(
        c.body["allowed_mentions"]["parse"] == [] for c in bot.fake.calls_to("PATCH", "/messages/")
    )


LONG = (
    "Intro paragraph.\n\n"
    + "Some prose. " * 150
    + "\n```python\n"
    + "\n".join(f"print({i})  # line {i}" for i in range(150))
    + "\n```\nThat is all."
)


@pytest.mark.parametrize("bot", [lambda _: LONG], indirect=True)
async def test_a_long_answer_continues_in_new_messages_with_code_fences_repaired(bot: Bot) -> None:
    await bot.say(DM_CHANNEL_ID, "write a lot")
    await bot.settle(DM_CHANNEL_ID, 3)
    shown = bot.shown(DM_CHANNEL_ID)
    assert len(shown) == 3 and all(len(text) <= 2000 for text in shown)
    assert shown[1].rstrip().endswith("```") and shown[2].startswith("```python\n")
    assert shown == [piece.text for piece in split_message(LONG, 2000)]


async def test_a_thread_is_its_own_conversation(bot: Bot) -> None:
    await bot.say(THREAD_ID, f"<@{BOT_ID}> in the thread", mentions=[BOT_MENTION])
    await bot.settle(THREAD_ID)
    thread = ConversationKey("discord", f"{GUILD_ID}/{CHANNEL_ID}", str(THREAD_ID))
    assert [t.content for t in await bot.store.load(thread)][:1] == ["in the thread"]
    assert await bot.store.load(ConversationKey("discord", f"{GUILD_ID}/{CHANNEL_ID}")) == []


async def test_edits_and_deletes_of_user_messages_change_the_context(bot: Bot) -> None:
    first = await bot.say(DM_CHANNEL_ID, "my name is Ada")
    await bot.settle(DM_CHANNEL_ID)
    second = await bot.say(DM_CHANNEL_ID, "I like tea")
    await bot.settle(DM_CHANNEL_ID, 2)
    await bot.fake.dispatch("MESSAGE_UPDATE", {**first, "content": "my name is Adele"})
    await bot.fake.dispatch(
        "MESSAGE_DELETE", {"id": second["id"], "channel_id": str(DM_CHANNEL_ID)}
    )
    key = ConversationKey("discord", f"dm/{DM_CHANNEL_ID}")
    for _ in range(50):
        users = [t.content for t in await bot.store.load(key) if t.role is Role.USER]
        if users == ["my name is Adele"]:
            break
        await asyncio.sleep(0.1)
    assert users == ["my name is Adele"]


async def test_two_messages_together_are_answered_in_order_and_both_stored(bot: Bot) -> None:
    bot.model.delay = 0.05
    await asyncio.gather(bot.say(OPEN_CHANNEL_ID, "first"), bot.say(OPEN_CHANNEL_ID, "second"))
    await bot.settle(OPEN_CHANNEL_ID, 2)
    assert bot.shown(OPEN_CHANNEL_ID) == ["You said: ada: first", "You said: ada: second"]
    history = await bot.store.load(ConversationKey("discord", f"{GUILD_ID}/{OPEN_CHANNEL_ID}"))
    assert [t.content for t in history] == [
        "first",
        "You said: ada: first",
        "second",
        "You said: ada: second",
    ]


async def test_a_429_on_an_edit_is_waited_out_and_the_final_text_arrives(bot: Bot) -> None:
    bot.model.delay = 0.05
    bot.fake.script_429["PATCH /channels/"] = [0.5]
    await bot.say(DM_CHANNEL_ID, " ".join(f"w{i}" for i in range(60)))
    await bot.settle(DM_CHANNEL_ID)
    limited = [c for c in bot.fake.calls if c.method == "PATCH"]
    assert len(limited) >= 2, "the rate-limited edit was retried"
    assert bot.shown(DM_CHANNEL_ID) == ["You said: " + " ".join(f"w{i}" for i in range(60))]


async def test_slash_commands_are_registered_on_start_up(bot: Bot) -> None:
    (put,) = bot.fake.calls_to("PUT", "/commands")
    names = sorted(command["name"] for command in put.body)
    assert names == [
        "adapter", "bot", "collect", "help", "human", "kb", "persona", "reset", "retry", "usage"
    ]  # fmt: skip


async def test_the_bot_asks_only_for_the_intents_it_needs(bot: Bot) -> None:
    assert bot.fake.intents == intents().value
    assert not intents().members and not intents().presences


async def test_a_refused_privileged_intent_says_which_switch_to_turn_on(
    settings: DiscordSettings, store: RedisContextStore
) -> None:
    async with FakeDiscord(reject_intents=True) as fake:
        configured = settings.model_copy(
            update={"api_base_url": fake.api_base, "gateway_url": fake.gateway_url}
        )
        service = ConversationService(store, FixedModel(echo))
        with pytest.raises(DiscordSetupError) as raised:
            await asyncio.wait_for(run_discord(service, configured), 20)
    assert str(raised.value) == INTENT_HELP and "Message Content Intent" in INTENT_HELP


async def test_run_starts_the_discord_bot_when_its_token_is_set(tmp_path: Path) -> None:
    token = "MTAxODk.secret-discord-token.do-not-log"
    async with FakeDiscord() as fake, FakeOpenAI([Reply("Hi from the model")]) as model:
        env = {
            **os.environ,
            "DISCORD_TOKEN": token,
            "DISCORD_API_BASE_URL": fake.api_base,
            "DISCORD_GATEWAY_URL": fake.gateway_url,
            "LLM_BASE_URL": model.base_url,
            "DATA_DIR": str(tmp_path / "data"),
            "LOG_LEVEL": "DEBUG",
            "DISCORD_SHARD_COUNT": "4",  # as the third pod of a StatefulSet
            "DISCORD_SHARD_IDS": "ordinal",
            "HOSTNAME": "parley-discord-2",
        }
        env.pop("REDIS_URL", None)
        process = await start_bots("run", env=env, cwd=tmp_path)
        try:
            await fake.wait_for(lambda: bool(fake.calls_to("PUT", "/commands")), 30)
            await asyncio.wait_for(fake.identified.wait(), 10)
            await asyncio.sleep(0.5)
            await fake.dispatch(
                "MESSAGE_CREATE", fake.message(DM_CHANNEL_ID, "hello", author=ADA, guild=False)
            )
            posted = f"/channels/{DM_CHANNEL_ID}/messages"
            await fake.wait_for(lambda: bool(fake.calls_to("POST", posted)), 15)
        finally:
            process.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()[-2000:]
    assert fake.calls_to("POST", posted)[0].body["content"] == "Hi from the model"
    assert token not in (out + err).decode(), "the token never reaches a log"
    assert b"DEBUG" in err, "debug logging was on"
    assert fake.shard == [2, 4], "identified as shard 2 of 4"


@pytest.mark.parametrize(
    ("count", "ids", "host", "expected"),
    [
        (None, None, "parley-discord-0", None),
        (3, "ordinal", "parley-discord-2", (2, 3)),
        (3, "1", "anything", (1, 3)),
        (3, "ordinal", "parley-discord", "does not end in a number"),
        (3, "3", "x", "outside DISCORD_SHARD_COUNT=3"),
        (3, "0,1", "x", "one shard per process"),
        (3, None, "x", "both"),
    ],
)
def test_shards_come_from_the_settings_or_the_pod_ordinal(
    count: int | None, ids: str | None, host: str, expected: object
) -> None:
    settings = DiscordSettings(shard_count=count, shard_ids=ids)
    if isinstance(expected, str):
        with pytest.raises(DiscordSetupError, match=expected):
            shard_of(settings, host)
    else:
        assert shard_of(settings, host) == expected


MANAGE_CHANNELS = str(1 << 4)
_INTERACTION_IDS = itertools.count(SNOWFLAKE + 5000)


def interaction(
    name: str,
    channel: int,
    *,
    permissions: str = "0",
    options: list[dict[str, Any]] | None = None,
    user: dict[str, Any] = ADA,
) -> dict[str, Any]:
    """An application command invocation, as the gateway delivers it."""
    return {
        "id": str(next(_INTERACTION_IDS)),
        "application_id": str(SNOWFLAKE + 901),
        "type": 2,
        "token": "interaction-token",
        "version": 1,
        "guild_id": str(GUILD_ID),
        "channel_id": str(channel),
        "channel": {"id": str(channel), "type": 0, "guild_id": str(GUILD_ID), "name": "general"},
        "member": {
            "user": user, "roles": [], "joined_at": TIMESTAMP, "deaf": False, "mute": False,
            "flags": 0, "permissions": permissions,
        },
        "data": {"id": str(SNOWFLAKE + 6000), "name": name, "type": 1, "options": options or []},
        "locale": "en-US",
        "guild_locale": "en-US",
        "app_permissions": "0",
        "entitlements": [],
        "authorizing_integration_owners": {},
        "context": 0,
        "attachment_size_limit": 8388608,
    }  # fmt: skip


async def test_reset_slash_command_clears_the_channel_and_answers_privately(bot: Bot) -> None:
    await bot.say(OPEN_CHANNEL_ID, "remember me")
    await bot.settle(OPEN_CHANNEL_ID)
    key = ConversationKey("discord", f"{GUILD_ID}/{OPEN_CHANNEL_ID}")
    assert await bot.store.load(key)
    await bot.fake.dispatch("INTERACTION_CREATE", interaction("reset", OPEN_CHANNEL_ID))
    refused = await bot.command_answer()
    assert refused.startswith("Only admins") and await bot.store.load(key)
    moderator = interaction("reset", OPEN_CHANNEL_ID, permissions=MANAGE_CHANNELS)
    await bot.fake.dispatch("INTERACTION_CREATE", moderator)
    assert "forgotten" in await bot.command_answer(2)
    assert await bot.store.load(key) == []


async def test_persona_slash_commands_set_show_and_clear(bot: Bot) -> None:
    def persona(action: str, permissions: str = MANAGE_CHANNELS, **value: str) -> dict[str, Any]:
        options = [{"name": k, "type": 3, "value": v} for k, v in value.items()]
        subcommand = [{"name": action, "type": 1, "options": options}]
        return interaction("persona", CHANNEL_ID, permissions=permissions, options=subcommand)

    await bot.fake.dispatch("INTERACTION_CREATE", persona("set", "0", text="Be rude."))
    assert (await bot.command_answer(1)).startswith("Only admins")
    await bot.fake.dispatch("INTERACTION_CREATE", persona("set", text="Speak like a pirate."))
    assert (await bot.command_answer(2)).startswith("Persona set")
    await bot.fake.dispatch("INTERACTION_CREATE", persona("show", "0"))
    assert (await bot.command_answer(3)).endswith("Speak like a pirate.")
    await bot.say(CHANNEL_ID, f"<@{BOT_ID}> ahoy", mentions=[BOT_MENTION])
    await bot.settle(CHANNEL_ID)
    assert bot.model.prompts[-1][0].content == "Speak like a pirate."


async def test_retry_answers_again_in_the_channel_and_usage_answers_privately(bot: Bot) -> None:
    await bot.say(OPEN_CHANNEL_ID, "question")
    await bot.settle(OPEN_CHANNEL_ID)
    await bot.fake.dispatch("INTERACTION_CREATE", interaction("retry", OPEN_CHANNEL_ID))
    assert (await bot.command_answer()).startswith("Answering your last message again")
    await bot.settle(OPEN_CHANNEL_ID, 2)
    assert bot.shown(OPEN_CHANNEL_ID) == ["You said: ada: question"] * 2
    key = ConversationKey("discord", f"{GUILD_ID}/{OPEN_CHANNEL_ID}")
    assert len(await bot.store.load(key)) == 2, "the answer was replaced, not added"
    await bot.fake.dispatch("INTERACTION_CREATE", interaction("usage", OPEN_CHANNEL_ID))
    assert await bot.command_answer(2) == "Token use isn't counted here."


def test_access_policy_allow_and_deny_lists() -> None:
    policy = AccessPolicy(
        DiscordSettings(
            allow_guilds=frozenset({1}),
            deny_channels=frozenset({13}),
            allow_roles=frozenset({5}),
            deny_users=frozenset({666}),
            allow_dms=False,
        )
    )

    def admits(guild: int | None = 1, channel: int = 12, user: int = 7, role: int = 5) -> bool:
        return policy.admits(guild=guild, channel=channel, user=user, roles=frozenset({role}))

    assert admits()
    assert not admits(guild=2), "guild not on the allow list"
    assert not admits(channel=13), "denied channel"
    assert not admits(role=6), "no allowed role"
    assert not admits(user=666), "denied user"
    assert not admits(guild=None), "DMs off"


async def test_a_channel_where_the_bot_may_not_post_does_not_stop_it(bot: Bot) -> None:
    bot.fake.forbidden.add(f"POST /channels/{OPEN_CHANNEL_ID}/messages")
    await bot.say(OPEN_CHANNEL_ID, "can you hear me?")
    await bot.fake.wait_for(lambda: bool(bot.sent(OPEN_CHANNEL_ID)))
    await bot.say(DM_CHANNEL_ID, "and here?")
    await bot.settle(DM_CHANNEL_ID)
    assert bot.shown(DM_CHANNEL_ID) == ["You said: and here?"]


@pytest.mark.parametrize(("grace", "gated"), [(10.0, False), (0.3, True)])
async def test_stopping_finishes_or_ends_a_streamed_reply(
    store: RedisContextStore, settings: DiscordSettings, grace: float, gated: bool
) -> None:
    """What SIGTERM does: a reply in progress ends whole within the grace, or with a notice."""
    model = FixedModel(lambda _: "one two three four five six seven eight", delay=0.1)
    key = ConversationKey("discord", f"dm/{DM_CHANNEL_ID}")
    if gated:
        model.gates[str(key)] = asyncio.Event()  # the model never answers
    async with FakeDiscord() as fake:
        configured = settings.model_copy(
            update={
                "api_base_url": fake.api_base,
                "gateway_url": fake.gateway_url,
                "shutdown_seconds": grace,
            }
        )
        in_flight = InFlight()
        service = ConversationService(store, model)
        running = asyncio.create_task(run_discord(service, configured, in_flight))
        await asyncio.wait_for(fake.identified.wait(), 10)
        bot = Bot(fake, model, store, in_flight, Metrics())
        await bot.say(DM_CHANNEL_ID, "tell me")
        if gated:
            await fake.wait_for(lambda: bool(fake.calls_to("POST", "/typing")), 10)
        else:
            await fake.wait_for(lambda: bool(bot.sent(DM_CHANNEL_ID)), 10)
        running.cancel()
        await asyncio.wait_for(in_flight.stopping(), 10)
        with contextlib.suppress(aiohttp.ClientConnectionResetError):  # the gateway may be gone
            await bot.say(DM_CHANNEL_ID, "anyone there?")  # while stopping: not taken
        await asyncio.gather(running, return_exceptions=True)
    turns = await store.load(key)
    shown = [text for text in bot.shown(DM_CHANNEL_ID) if text != CLOSED_NOTICE]
    if gated:
        assert shown == [RESTART_NOTICE]
        assert turns == [], "nothing half-written"
    else:
        assert shown == ["one two three four five six seven eight"]
        assert [t.content for t in turns] == ["tell me", "one two three four five six seven eight"]
    assert len(model.prompts) == 1


async def test_slash_commands_are_the_core_s_command_table(bot: Bot) -> None:
    (put,) = bot.fake.calls_to("PUT", "/commands")
    registered = {command["name"]: command for command in put.body}
    assert list(registered) == [spec.name for spec in COMMANDS]
    for spec in COMMANDS:
        assert registered[spec.name]["description"] == spec.summary
    persona = {sub["name"]: sub for sub in registered["persona"]["options"]}
    assert list(persona) == ["show", "set", "clear"] and {o["type"] for o in persona.values()} == {
        1
    }
    (text,) = persona["set"]["options"]
    assert (text["name"], text["type"], text["required"]) == ("text", 3, True)
    (choice,) = registered["collect"]["options"]
    assert [c["value"] for c in choice["choices"]] == ["on", "off"] and not choice.get("required")
    (name,) = registered["adapter"]["options"]
    assert name["name"] == "name" and name["description"].startswith("an adapter's name")
    assert "options" not in registered["reset"] or not registered["reset"]["options"]


async def test_slash_command_options_reach_the_core_as_its_command_text(bot: Bot) -> None:
    option = {"name": "choice", "type": 3, "value": "on"}
    collect = interaction("collect", CHANNEL_ID, permissions=MANAGE_CHANNELS, options=[option])
    await bot.fake.dispatch("INTERACTION_CREATE", collect)
    assert await bot.command_answer() == (
        "This conversation may be exported to train me (as an admin chose)."
    )
    await bot.fake.dispatch("INTERACTION_CREATE", interaction("adapter", CHANNEL_ID))
    assert await bot.command_answer(2) == (
        "I answer here with the base model. Served adapters: none."
    )


async def test_an_edit_is_read_like_a_new_message_and_cut_like_one(
    bot: Bot, store: RedisContextStore
) -> None:
    first = await bot.say(CHANNEL_ID, f"<@{BOT_ID}> hello", mentions=[BOT_MENTION])
    await bot.settle(CHANNEL_ID)
    key = ConversationKey("discord", f"{GUILD_ID}/{CHANNEL_ID}")
    edited = {**first, "content": f"<@{BOT_ID}> hello again"}
    await bot.fake.dispatch("MESSAGE_UPDATE", edited)
    for _ in range(50):  # the edit lands in Redis with no reply to wait for
        if (turns := await store.load(key))[0].content != "hello":
            break
        await asyncio.sleep(0.1)
    assert turns[0].content == "hello again", "no @Parley left in the text"


async def test_a_slash_command_is_answered_in_time_while_a_reply_is_under_way(bot: Bot) -> None:
    key = ConversationKey("discord", f"{GUILD_ID}/{OPEN_CHANNEL_ID}")
    bot.model.gates[str(key)] = gate = asyncio.Event()
    await bot.say(OPEN_CHANNEL_ID, "a long story, please")
    await asyncio.wait_for(bot.model.started.wait(), 10)
    await bot.fake.dispatch("INTERACTION_CREATE", interaction("usage", OPEN_CHANNEL_ID))
    assert await bot.command_answer() == "Token use isn't counted here."
    (deferral,) = bot.deferrals()
    assert deferral.body["data"]["flags"] == 64, "thinking…, privately"
    assert deferral.at - bot.fake.interactions[deferral.path.split("/")[2]] < INTERACTION_WINDOW
    assert not bot.sent(OPEN_CHANNEL_ID), "the reply is still under way"
    gate.set()
    await bot.settle(OPEN_CHANNEL_ID)
    assert bot.shown(OPEN_CHANNEL_ID) == ["You said: ada: a long story, please"]


async def test_reset_ends_a_reply_whose_model_hangs_and_answers_in_time(bot: Bot) -> None:
    key = ConversationKey("discord", f"{GUILD_ID}/{OPEN_CHANNEL_ID}")
    await bot.say(OPEN_CHANNEL_ID, "remember me")
    await bot.settle(OPEN_CHANNEL_ID)
    bot.model.gates[str(key)], bot.model.started = asyncio.Event(), asyncio.Event()  # hangs
    await bot.say(OPEN_CHANNEL_ID, "are you there?")
    await asyncio.wait_for(bot.model.started.wait(), 10)
    reset = interaction("reset", OPEN_CHANNEL_ID, permissions=MANAGE_CHANNELS)
    await bot.fake.dispatch("INTERACTION_CREATE", reset)
    assert (await bot.command_answer()).startswith("Conversation forgotten")
    assert len(bot.deferrals()) == 1
    await bot.settle(OPEN_CHANNEL_ID, 2)
    assert bot.shown(OPEN_CHANNEL_ID)[1].rstrip() == "-# Reset: this reply stops here."
    assert await bot.store.load(key) == [], "forgotten, and the ended reply stored nothing"


@pytest.fixture(params=[logging.WARNING, logging.ERROR])
def http_log_level(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> int:
    """discord.http's log level, as LOG_LEVEL sets it before the bot starts."""
    level: int = request.param
    caplog.set_level(level, logger="discord.http")
    return level


async def test_discord_s_429s_are_counted_for_the_platform_whatever_the_log_level(
    http_log_level: int, bot: Bot, caplog: pytest.LogCaptureFixture
) -> None:
    bot.model.delay = 0.05
    bot.fake.script_429["PATCH /channels/"] = [0.2, 0.2]
    await bot.say(DM_CHANNEL_ID, " ".join(f"w{i}" for i in range(60)))
    await bot.settle(DM_CHANNEL_ID)
    assert len([c for c in bot.fake.calls if c.status == 429]) == 2
    assert bot.metrics.sample("parley_platform_rate_limited_total", platform="discord") == 2
    logged = [r for r in caplog.records if r.getMessage().startswith("We are being rate limited")]
    assert len(logged) == (2 if http_log_level == logging.WARNING else 0), "shown if asked for"


async def test_a_message_that_arrives_while_stopping_is_told_to_come_back(
    store: RedisContextStore, settings: DiscordSettings
) -> None:
    model = FixedModel(echo)
    model.gates[str(ConversationKey("discord", f"dm/{DM_CHANNEL_ID}"))] = asyncio.Event()
    async with FakeDiscord() as fake:
        configured = settings.model_copy(
            update={"api_base_url": fake.api_base, "gateway_url": fake.gateway_url,
                    "shutdown_seconds": 5.0}
        )  # fmt: skip
        in_flight = InFlight()
        service = ConversationService(store, model)
        running = asyncio.create_task(run_discord(service, configured, in_flight))
        await asyncio.wait_for(fake.identified.wait(), 10)
        bot = Bot(fake, model, store, in_flight, Metrics())
        await bot.say(DM_CHANNEL_ID, "tell me")  # its reply holds the shutdown for a while
        await fake.wait_for(lambda: bool(fake.calls_to("POST", "/typing")), 10)
        running.cancel()
        await asyncio.wait_for(in_flight.stopping(), 10)
        await bot.say(DM_CHANNEL_ID, "anyone there?")
        await fake.wait_for(lambda: CLOSED_NOTICE in bot.sent(DM_CHANNEL_ID), 10)
        await asyncio.gather(running, return_exceptions=True)
    assert len(model.prompts) == 1, "the late message cost no model call"
