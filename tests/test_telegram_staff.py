"""The Telegram staff group: real python-telegram-bot replicas, real Redis, the fake Bot API.

Every replica runs in webhook mode, as replicas behind a load balancer do, and the test
chooses which one each update reaches; all of them talk to the one fake Telegram.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from bots.core.handoff import HandoffPolicy, Handoffs
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
from bots.platforms.telegram import run_telegram
from bots.platforms.telegram_staff import (
    ALREADY_BACK,
    MAX_CHARS,
    USAGE,
    fit_lines,
    key_in,
    opened_post,
    tag_of,
)
from bots.settings import TelegramSettings
from bots.store.redis import RedisContextStore
from tests.conftest import free_port
from tests.fake_telegram import BOT, TOKEN, FakeTelegram, group_chat, person, private_chat, visible
from tests.fakes import ScriptedModel

ADA = person(1, "Ada")
SAM = person(50, "Sam")
STAFF = group_chat(-100500)
STAFF_ID = STAFF["id"]
ADA_KEY = ConversationKey("telegram", str(ADA["id"]))
HANDED_OFF = notice(NoticeKind.HANDED_OFF).text
HANDED_BACK = notice(NoticeKind.HANDED_BACK).text


@dataclass
class Replica:
    url: str
    service: ConversationService
    in_flight: InFlight
    task: asyncio.Task[None]


@dataclass
class World:
    """One Telegram, one Redis, one model; several bot replicas answering through them."""

    fake: FakeTelegram
    model: ScriptedModel
    store: RedisContextStore
    replicas: list[Replica] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def deliver(self, fields: dict[str, Any], replica: int = 0) -> dict[str, Any]:
        """Telegram gets a message and POSTs its update to this replica's webhook."""
        message = await self.fake.push(fields)
        update = {"update_id": next(self._ids), "message": message}
        async with httpx.AsyncClient() as client:
            for _ in range(100):  # the webhook server listens just after setWebhook
                try:
                    answered = await client.post(self.replicas[replica].url, json=update)
                    break
                except httpx.ConnectError:
                    await asyncio.sleep(0.05)
        assert answered.status_code == 200
        return message

    async def user_says(self, text: str, replica: int = 0) -> None:
        chat = {**private_chat(ADA), "username": ADA["username"]}  # as Telegram's has it
        await self.deliver({"chat": chat, "from": ADA, "text": text}, replica)

    async def staff_says(
        self, text: str, post: int | None = None, replica: int = 0, sender: dict[str, Any] = SAM
    ) -> None:
        """A staff member writes in the staff chat, replying to the bot's post `post`."""
        fields: dict[str, Any] = {"chat": STAFF, "from": sender, "text": text}
        if post is not None:
            fields["reply_to_message"] = self.post(post)
        await self.deliver(fields, replica)

    def post(self, index: int) -> dict[str, Any]:
        """The bot's `index`th post in the staff chat, as Telegram nests it in a reply."""
        message_id = self.fake.sent[STAFF_ID][index]
        text = self.fake.messages[STAFF_ID][message_id]
        return {"message_id": message_id, "date": 0, "chat": STAFF, "from": BOT, "text": text}

    def posts(self) -> list[str]:
        return self.fake.shown(STAFF_ID)

    def user_sees(self) -> list[str]:
        return self.fake.shown(ADA["id"])

    async def settle(self, staff: int, user: int) -> None:
        """Wait for this many staff posts and user messages, then for every replica."""
        await self.fake.wait_for(
            lambda: len(self.posts()) >= staff and len(self.user_sees()) >= user, 15
        )
        for replica in self.replicas:
            await asyncio.wait_for(replica.in_flight.idle(), 15)
        assert (len(self.posts()), len(self.user_sees())) == (staff, user)


@pytest.fixture
async def world(redis_client: Redis, key_prefix: str) -> AsyncIterator[World]:
    async with FakeTelegram() as fake:
        world = World(fake, ScriptedModel(), _store(redis_client, key_prefix))
        for _ in range(2):
            port = free_port()
            store = _store(redis_client, key_prefix)  # a replica of its own: nothing shared
            service = ConversationService(
                store, world.model, handoffs=Handoffs(store, store, HandoffPolicy())
            )
            settings = TelegramSettings(
                token=TOKEN,  # type: ignore[arg-type]
                base_url=fake.base_url,
                webhook_url=f"https://bots.example.com/{port}",
                webhook_listen="127.0.0.1",
                webhook_port=port,
                staff_chat=STAFF_ID,
            )
            in_flight = InFlight()
            task = asyncio.create_task(run_telegram(service, settings, in_flight))
            world.replicas.append(
                Replica(f"http://127.0.0.1:{port}/telegram", service, in_flight, task)
            )
        await fake.wait_for(lambda: len(fake.calls_to("setWebhook")) >= 2, 15)
        yield world
        for replica in world.replicas:
            replica.task.cancel()
        await asyncio.gather(*(r.task for r in world.replicas), return_exceptions=True)


def _store(client: Redis, prefix: str) -> RedisContextStore:
    return RedisContextStore(client, prefix=prefix, max_turns=500, ttl_seconds=3600)


async def handed_off(world: World) -> None:
    """Ada talks to the bot, then asks for a human: one answer, one notice, one post."""
    await world.user_says("hello")
    await world.settle(staff=0, user=1)
    await world.user_says("I want to talk to a human")
    await world.settle(staff=1, user=2)


async def test_asking_for_a_human_posts_the_conversation_with_its_context(world: World) -> None:
    await handed_off(world)
    assert world.user_sees() == ["echo 1: hello", HANDED_OFF], "told once, no model answer"
    assert world.posts() == [
        "Handed to people: Ada (@ada) (asked for a person)\n"
        "User: hello\n"
        "Bot: echo 1: hello\n"
        "User: I want to talk to a human\n"
        "Reply to this post to answer; reply /note … for staff only; reply /bot to hand it back.\n"
        "#c_1"
    ]
    (post,) = world.fake.calls_to("sendMessage", STAFF_ID)
    assert post.params["parse_mode"] == "HTML" and "<blockquote expandable>" in post.params["text"]
    assert len(world.model.prompts) == 1

    await world.user_says("my order <#42> is late")
    await world.settle(staff=2, user=2)
    assert world.posts()[1] == "User: my order <#42> is late\n#c_1"
    assert len(world.model.prompts) == 1, "while people answer, the model is not asked"


async def test_a_message_people_answer_gets_no_reply_from_the_bot(world: World) -> None:
    await handed_off(world)
    await world.user_says("anyone there?")
    await world.settle(staff=2, user=2)
    assert world.user_sees() == ["echo 1: hello", HANDED_OFF], "nothing, not an empty reply"


async def test_a_staff_reply_reaches_the_user_and_the_bot_reads_it_after_bot(
    world: World,
) -> None:
    await handed_off(world)
    await world.staff_says("Your order <ships> today & arrives Friday.", post=0)
    await world.settle(staff=1, user=3)
    assert world.user_sees()[2] == "Sam: Your order <ships> today & arrives Friday."
    (_, _, *sent) = world.fake.calls_to("sendMessage", ADA["id"])
    assert sent[0].params["text"] == (
        "<b>Sam</b>: Your order &lt;ships&gt; today &amp; arrives Friday."
    )
    *_, reply = await world.store.load(ADA_KEY)
    assert (reply.role, reply.people, reply.name, reply.content) == (
        Role.ASSISTANT,
        People.REPLY,
        "Sam",
        "Your order <ships> today & arrives Friday.",
    )

    await world.staff_says("/bot", post=0)
    await world.settle(staff=2, user=4)
    assert world.user_sees()[3] == HANDED_BACK
    assert world.posts()[1] == "Back with the bot: handed back by staff.\n#c_1"
    assert await world.replicas[0].service.handoffs.current(ADA_KEY) is None  # type: ignore[union-attr]
    await world.staff_says("/bot", post=1)  # the "back with the bot" post names it too
    await world.settle(staff=3, user=4)
    assert world.posts()[2] == ALREADY_BACK
    await world.staff_says("PS: tracking is in your email.", post=0)  # a follow-up still goes
    await world.settle(staff=3, user=5)
    assert world.user_sees()[4] == "Sam: PS: tracking is in your email."

    await world.user_says("thanks!")
    await world.settle(staff=3, user=6)
    assert world.user_sees()[5].endswith("thanks!"), "the model answers again"
    prompt = world.model.prompts[-1]
    assert any(
        m.role is Role.ASSISTANT and "Your order <ships> today & arrives Friday." in m.content
        for m in prompt
    ), prompt


async def test_a_replica_that_never_saw_the_post_answers_it(world: World) -> None:
    """No state in the process: replica 1 reads the conversation from the post replied to."""
    await handed_off(world)  # through replica 0
    await world.staff_says("Hi Ada, Sam here.", post=0, replica=1)
    await world.settle(staff=1, user=3)
    assert world.user_sees()[2] == "Sam: Hi Ada, Sam here."
    await world.user_says("great", replica=0)  # replica 0 sees the handoff replica 1 kept
    await world.settle(staff=2, user=3)
    assert world.posts()[1] == "User: great\n#c_1"
    await world.staff_says("/bot@parley_bot", post=1, replica=1)
    await world.settle(staff=3, user=4)
    assert world.user_sees()[3] == HANDED_BACK
    await world.user_says("one more question", replica=0)
    await world.settle(staff=3, user=5)
    assert world.user_sees()[4].endswith("one more question")
    assert len(world.model.prompts) == 2


async def test_chatter_notes_other_bots_and_stray_commands_do_not_reach_the_user(
    world: World,
) -> None:
    await handed_off(world)
    await world.staff_says("who takes this one?")  # staff talking among themselves
    await world.staff_says("on it", post=0, sender={**person(60, "Helper"), "is_bot": True})
    await world.staff_says("/note she ordered twice", post=0)
    await world.staff_says("/bot")  # not a reply: how to use it
    await world.settle(staff=2, user=2)
    assert world.posts()[1] == USAGE
    assert world.user_sees() == ["echo 1: hello", HANDED_OFF]
    *_, note = await world.store.load(ADA_KEY)
    assert (note.people, note.name, note.content) == (People.NOTE, "Sam", "she ordered twice")
    assert len(world.model.prompts) == 1, "the staff chat never reaches the model"


async def test_a_staff_post_survives_bad_gateways(world: World) -> None:
    await world.user_says("hello")
    await world.settle(staff=0, user=1)
    world.fake.fail_next["sendMessage"] = [502, 502]  # the staff post's first two tries
    await world.user_says("/human")
    await world.settle(staff=1, user=2)
    assert world.posts()[0].endswith("#c_1") and world.user_sees()[1] == HANDED_OFF


def test_a_tag_names_each_kind_of_conversation_and_reads_back() -> None:
    for key in (
        ConversationKey("telegram", "123"),
        ConversationKey("telegram", "-100123", "5"),
        ConversationKey("telegram", "-100123", None, "42"),
        ConversationKey("telegram", "-100123", "5", "42"),
    ):
        assert key_in(f"User: hi\n{tag_of(key)}") == key
    assert tag_of(ConversationKey("telegram", "-100123", "5", "42")) == "#c_n100123_t5_u42"
    assert key_in("User: #c_999 is mine\nnot a tag") is None, "only the last line counts"
    assert key_in("Sam: see #c_2") is None


def test_a_long_context_keeps_the_latest_turns_within_telegrams_limit() -> None:
    turns = [Turn(Role.USER, f"message {i} " + "x" * 500) for i in range(20)]
    html = opened_post("Ada", Handoff(HandoffReason.ASKED), turns, "#c_1")
    shown = visible(html, "HTML")
    assert len(shown) <= MAX_CHARS and shown.endswith("#c_1")
    assert "message 19 " in shown and "message 0 " not in shown and "\n…\n" in shown
    assert fit_lines(["a" * 10_000], 100) == ["a" * 97 + "…"]
    assert fit_lines(["one", "two"], 100) == ["one", "two"]
