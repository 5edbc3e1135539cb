"""Discord's staff channel through real discord.py code paths, against the fake Discord."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from bots.core.handoff import ALREADY, Handoffs
from bots.core.models import (
    ConversationKey,
    Handoff,
    HandoffReason,
    NoticeKind,
    People,
    Role,
    Turn,
)
from bots.core.notices import notice
from bots.core.service import ConversationService
from bots.delivery.inflight import InFlight
from bots.ops import Metrics
from bots.platforms.discord import run_discord
from bots.platforms.discord_staff import (
    BOT_HAS_IT,
    HANDED_BACK,
    StaffChannelError,
    code_of,
    conversation_in,
    opening,
    thread_name,
)
from bots.settings import DiscordSettings
from bots.store.redis import RedisContextStore
from tests.fake_discord import (
    DM_CHANNEL_ID,
    GUILD_ID,
    OPEN_CHANNEL_ID,
    ROLE_STAFF,
    SNOWFLAKE,
    STAFF_CHANNEL_ID,
    Call,
    FakeDiscord,
    thread,
    user,
)
from tests.test_discord_bot import ADA, FixedModel, echo, interaction

GRACE = user(SNOWFLAKE + 2, "grace")
DM = ConversationKey("discord", f"dm/{DM_CHANNEL_ID}")
OPEN = ConversationKey("discord", f"{GUILD_ID}/{OPEN_CHANNEL_ID}")
HANDED_OFF = notice(NoticeKind.HANDED_OFF).text
HANDED_BACK_NOTICE = f"-# {notice(NoticeKind.HANDED_BACK).text}"


@dataclass
class Staffed:
    fake: FakeDiscord
    model: FixedModel
    store: RedisContextStore
    in_flight: InFlight

    def posts(self, channel: int) -> list[Call]:
        """The messages the bot posted in a channel or thread (not threads it started)."""
        path = f"/channels/{channel}/messages"
        return [c for c in self.fake.calls if c.method == "POST" and c.path == path]

    def texts(self, channel: int) -> list[str]:
        return [c.body["content"] for c in self.posts(channel)]

    def thread_of(self, key: ConversationKey) -> int:
        (found,) = [t for t in self.fake.threads.values() if conversation_in(t["name"]) == key]
        return int(found["id"])

    async def posted(self, channel: int, count: int) -> list[str]:
        """Wait for `count` posts in `channel`, and for every reply to be delivered."""
        await self.fake.wait_for(lambda: len(self.posts(channel)) >= count)
        await asyncio.wait_for(self.in_flight.idle(), 10)
        return self.texts(channel)

    async def shown(self, channel: int, text: str) -> None:
        """Wait until the bot posted `text` in `channel`."""
        await self.fake.wait_for(lambda: text in self.texts(channel))

    async def archived(self, thread_id: int) -> None:
        """Wait until the bot archived the thread."""
        metadata = self.fake.threads[str(thread_id)]["thread_metadata"]
        await self.fake.wait_for(lambda: metadata["archived"])

    async def reopen(self, thread_id: int) -> None:
        """What Discord does when a member writes in an archived thread: unarchive it."""
        reopened = self.fake.threads[str(thread_id)]
        reopened["thread_metadata"]["archived"] = False
        await self.fake.dispatch("THREAD_UPDATE", reopened)

    async def say(self, channel: int, content: str, author: dict[str, Any] = ADA) -> None:
        message = self.fake.message(channel, content, author=author, guild=channel != DM_CHANNEL_ID)
        await self.fake.dispatch("MESSAGE_CREATE", message)

    async def opened(self, key: ConversationKey) -> int:
        """Wait for the conversation's thread; its id."""

        def has_thread() -> bool:
            return any(conversation_in(t["name"]) == key for t in self.fake.threads.values())

        await self.fake.wait_for(has_thread)
        return self.thread_of(key)


@pytest.fixture
def role() -> int | None:
    return None


@pytest.fixture
async def staffed(store: RedisContextStore, role: int | None) -> AsyncIterator[Staffed]:
    model = FixedModel(echo)
    async with FakeDiscord() as fake:
        settings = DiscordSettings(
            token="test-token",  # type: ignore[arg-type]
            open_channels=frozenset({OPEN_CHANNEL_ID}),
            staff_channel=STAFF_CHANNEL_ID,
            staff_role=role,
            api_base_url=fake.api_base,
            gateway_url=fake.gateway_url,
        )
        metrics, in_flight = Metrics(), InFlight()
        handoffs = Handoffs(store, store, observer=metrics)
        service = ConversationService(store, model, observer=metrics, handoffs=handoffs)
        running = asyncio.create_task(run_discord(service, settings, in_flight))
        await asyncio.wait_for(fake.identified.wait(), 10)
        await fake.wait_for(lambda: bool(fake.calls_to("PUT", "/commands")), 10)
        assert handoffs.offered("discord"), "the desk is attached at start"
        yield Staffed(fake, model, store, in_flight)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


def no_pings(call: Call) -> bool:
    mentions = call.body["allowed_mentions"]
    return mentions["parse"] == [] and not mentions.get("roles") and not mentions.get("users")


async def test_a_dm_asking_for_a_person_opens_a_thread_with_its_context_pinging_nobody(
    staffed: Staffed,
) -> None:
    await staffed.say(DM_CHANNEL_ID, "my invoice is wrong @everyone")
    await staffed.posted(DM_CHANNEL_ID, 1)
    await staffed.say(DM_CHANNEL_ID, "/human")
    told = await staffed.posted(DM_CHANNEL_ID, 2)
    assert told[1] == f"-# {HANDED_OFF}\n"  # the notice, as a phrase hands off too

    thread_id = await staffed.opened(DM)
    (starter,) = staffed.posts(STAFF_CHANNEL_ID)
    assert starter.message_id == str(thread_id), "the thread starts from the opening post"
    assert no_pings(starter)
    text = starter.body["content"]
    assert "the user asked for a person" in text and code_of(DM) in text
    assert "my invoice is wrong @\u200beveryone" in text, "the context, its mentions escaped"
    assert "You said: my invoice is wrong" in text and len(text) <= 2000
    assert staffed.fake.threads[str(thread_id)]["name"].endswith(f" · dm/{DM_CHANNEL_ID}")

    prompts = len(staffed.model.prompts)
    await staffed.say(DM_CHANNEL_ID, "hello? anyone?")
    relayed = await staffed.posted(thread_id, 1)
    assert relayed == ["**user:** hello? anyone?"] and no_pings(staffed.posts(thread_id)[0])
    assert len(staffed.model.prompts) == prompts, "no model call"
    turns = await staffed.store.load(DM)
    assert (turns[-1].content, turns[-1].people) == ("hello? anyone?", People.ASKED)
    await staffed.say(DM_CHANNEL_ID, "/human")
    await staffed.shown(DM_CHANNEL_ID, ALREADY)
    assert staffed.texts(DM_CHANNEL_ID).count(f"-# {HANDED_OFF}\n") == 1, "told once"
    assert len(staffed.posts(STAFF_CHANNEL_ID)) == 1, "one thread"


async def test_a_message_people_answer_gets_no_reply_from_the_bot(staffed: Staffed) -> None:
    await staffed.say(DM_CHANNEL_ID, "/human")
    thread_id = await staffed.opened(DM)
    await staffed.say(DM_CHANNEL_ID, "hello? anyone?")
    await staffed.posted(thread_id, 1)
    assert staffed.texts(DM_CHANNEL_ID) == [f"-# {HANDED_OFF}\n"]


async def test_staff_answer_in_the_thread_note_and_hand_back_with_bot(staffed: Staffed) -> None:
    await staffed.say(OPEN_CHANNEL_ID, "can I talk to a human?")
    told = await staffed.posted(OPEN_CHANNEL_ID, 1)
    assert told == [f"-# {HANDED_OFF}\n"]
    thread_id = await staffed.opened(OPEN)
    assert "> **ada:** can I talk to a human?" in staffed.texts(STAFF_CHANNEL_ID)[0]
    assert staffed.fake.threads[str(thread_id)]["name"] == f"ada · {code_of(OPEN)}"

    await staffed.say(thread_id, "Try turning it off and on, <@1>.", author=GRACE)
    shown = await staffed.posted(OPEN_CHANNEL_ID, 2)
    assert shown[1] == "**grace:** Try turning it off and on, <@1>."
    assert no_pings(staffed.posts(OPEN_CHANNEL_ID)[1]), "staff text pings nobody either"
    await staffed.say(thread_id, "/note she tried that already", author=GRACE)
    await staffed.say(thread_id, "/bot", author=GRACE)
    back = await staffed.posted(OPEN_CHANNEL_ID, 3)
    assert back[2] == HANDED_BACK_NOTICE, "no note was sent"
    await staffed.archived(thread_id)
    assert staffed.texts(thread_id)[-1] == "Back with the bot: handed back by staff."

    reply, note = (await staffed.store.load(OPEN))[-2:]
    assert (reply.role, reply.people, reply.name) == (Role.ASSISTANT, People.REPLY, "grace")
    assert reply.content == "Try turning it off and on, <@1>."
    assert (note.role, note.people, note.content) == (
        Role.ASSISTANT,
        People.NOTE,
        "she tried that already",
    )
    await staffed.say(OPEN_CHANNEL_ID, "it works now, thanks")
    answered = await staffed.posted(OPEN_CHANNEL_ID, 4)
    assert answered[3] == "You said: ada: it works now, thanks", "the model answers again"
    prompt = "\n".join(m.content for m in staffed.model.prompts[-1])
    assert "Try turning it off and on" in prompt and "she tried that already" in prompt


@pytest.mark.parametrize("role", [ROLE_STAFF])
async def test_the_staff_role_is_pinged_once_and_nobody_else_ever(staffed: Staffed) -> None:
    await staffed.say(OPEN_CHANNEL_ID, f"talk to a human <@&{ROLE_STAFF}> @here")
    await staffed.posted(OPEN_CHANNEL_ID, 1)
    thread_id = await staffed.opened(OPEN)
    (starter,) = staffed.posts(STAFF_CHANNEL_ID)
    assert starter.body["content"].startswith(f"<@&{ROLE_STAFF}> A conversation needs a person")
    assert starter.body["allowed_mentions"] == {"parse": [], "roles": [ROLE_STAFF]}
    assert starter.body["content"].count(f"<@&{ROLE_STAFF}>") == 1, "the context's is escaped"

    await staffed.say(OPEN_CHANNEL_ID, f"still there? <@&{ROLE_STAFF}>")
    await staffed.posted(thread_id, 1)
    await staffed.say(thread_id, "Yes!", author=GRACE)
    await staffed.shown(OPEN_CHANNEL_ID, "**grace:** Yes!")
    posts = [c for c in staffed.fake.calls if c.body and "allowed_mentions" in c.body]
    assert [c for c in posts if not no_pings(c)] == [starter]


async def test_bot_slash_command_in_the_thread_hands_back(staffed: Staffed) -> None:
    await staffed.say(DM_CHANNEL_ID, "/human")
    await staffed.posted(DM_CHANNEL_ID, 1)
    thread_id = await staffed.opened(DM)
    channel = {**staffed.fake.threads[str(thread_id)]}
    command = {**interaction("bot", thread_id, user=GRACE), "channel": channel}
    await staffed.fake.dispatch("INTERACTION_CREATE", command)
    await staffed.fake.wait_for(lambda: bool(staffed.fake.answers()))
    assert staffed.fake.answers()[0].body["content"] == HANDED_BACK
    told = await staffed.posted(DM_CHANNEL_ID, 2)
    assert told[1] == HANDED_BACK_NOTICE
    assert await staffed.store.handoff(DM, 0) == (None, None)

    await staffed.archived(thread_id)
    await staffed.reopen(thread_id)
    await staffed.say(thread_id, "one more thing", author=GRACE)
    assert (await staffed.posted(thread_id, 2))[-1] == BOT_HAS_IT, "not sent: the bot has it"
    assert len(staffed.texts(DM_CHANNEL_ID)) == 2


async def test_a_thread_another_replica_opened_is_found_in_discord(staffed: Staffed) -> None:
    """No replica keeps the mapping: the handoff is in Redis, the thread's name in Discord."""
    thread_id = SNOWFLAKE + 7000
    opened = thread(thread_id, f"ada · {code_of(DM)}", STAFF_CHANNEL_ID)
    staffed.fake.threads[str(thread_id)] = opened
    await staffed.fake.dispatch("THREAD_CREATE", {**opened, "newly_created": True})
    assert await staffed.store.hand_off(DM, Handoff(HandoffReason.ASKED))

    await staffed.say(DM_CHANNEL_ID, "are you there?")
    assert await staffed.posted(thread_id, 1) == ["**user:** are you there?"]
    await staffed.say(thread_id, "I am.", author=GRACE)
    await staffed.shown(DM_CHANNEL_ID, "**grace:** I am.")
    assert not staffed.posts(STAFF_CHANNEL_ID), "no second thread"


@pytest.mark.parametrize(
    "key",
    [
        DM,
        OPEN,
        ConversationKey("discord", f"{GUILD_ID}/{OPEN_CHANNEL_ID}", str(SNOWFLAKE + 9)),
        ConversationKey("discord", f"{GUILD_ID}/{OPEN_CHANNEL_ID}", None, str(SNOWFLAKE + 1)),
        ConversationKey("discord", f"{GUILD_ID}/{OPEN_CHANNEL_ID}", "12", str(SNOWFLAKE + 1)),
    ],
)
def test_a_thread_name_gives_its_conversation_back(key: ConversationKey) -> None:
    name = thread_name(key, [])
    assert len(name) <= 100 and conversation_in(name) == key
    assert conversation_in(f"renamed {name}") == key
    assert conversation_in("a thread somebody started") is None


def test_the_opening_post_keeps_the_newest_context_within_discords_limit() -> None:
    recent = [Turn(Role.USER, f"message {n} " + "x" * 500) for n in range(10)]
    post = opening(DM, Handoff(HandoffReason.FAILURES), recent, 2000)
    assert len(post) <= 2000 and "message 9 " in post and "message 0 " not in post
    assert "several messages in a row went unanswered" in post
    huge = opening(DM, Handoff(HandoffReason.ASKED), [Turn(Role.USER, "y" * 5000)], 2000)
    assert len(huge) <= 2000 and huge.endswith("y…")


async def test_a_staff_channel_the_bot_cannot_read_stops_it_at_start(
    store: RedisContextStore,
) -> None:
    async with FakeDiscord() as fake:
        settings = DiscordSettings(
            token="test-token",  # type: ignore[arg-type]
            staff_channel=SNOWFLAKE + 999,
            api_base_url=fake.api_base,
            gateway_url=fake.gateway_url,
        )
        service = ConversationService(store, FixedModel(echo), handoffs=Handoffs(store, store))
        with pytest.raises(StaffChannelError, match="cannot be read: Unknown Channel"):
            await asyncio.wait_for(run_discord(service, settings), 10)
