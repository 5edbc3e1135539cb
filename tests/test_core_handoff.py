"""Handing a conversation to people: who may, what the user is told, what is kept.

The service runs on the real Redis store (the handoff state is its scripts), a scripted
model, and a staff desk that records what it is told.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from redis.asyncio import Redis

from bots.core.handoff import ALREADY, NO_DESK, OFFER, HandoffPolicy, Handoffs
from bots.core.knowledge import RetrievalPolicy, Retriever
from bots.core.models import (
    Author,
    ConversationKey,
    HandoffReason,
    Incoming,
    NoticeKind,
    People,
    Quiet,
    Role,
)
from bots.core.ports import ModelUnavailable
from bots.core.service import ChatPolicy, ConversationService
from bots.core.transcripts import transcript
from bots.knowledge.ingest import Ingest, IngestOptions
from bots.ops import Metrics
from bots.store.knowledge import RedisKnowledge
from bots.store.redis import RedisContextStore
from tests.fakes import MemoryDesk, ScriptedModel, WordEmbedder, collect, notices, text_of

KEY = ConversationKey("test", "dm-1")
ADA = Author("1", "Ada")
DEFAULTS, CHAT = HandoffPolicy(), ChatPolicy()


def make(
    store: RedisContextStore,
    *,
    desk: MemoryDesk | None = None,
    model: ScriptedModel | None = None,
    policy: HandoffPolicy = DEFAULTS,
    chat: ChatPolicy = CHAT,
    retriever: Retriever | None = None,
    metrics: Metrics | None = None,
) -> tuple[ConversationService, ScriptedModel, MemoryDesk]:
    model = model or ScriptedModel()
    desk = desk or MemoryDesk()
    handoffs = Handoffs(store, store, policy, metrics)
    handoffs.attach("test", desk)
    service = ConversationService(
        store, model, policy=chat, handoffs=handoffs, knowledge=retriever, observer=metrics
    )
    return service, model, desk


def said(text: str, key: ConversationKey = KEY, **fields: object) -> Incoming:
    return Incoming(key, text, author=ADA, **fields)  # type: ignore[arg-type]


async def test_a_phrase_hands_off_the_user_is_told_once_and_every_message_is_kept(
    store: RedisContextStore,
) -> None:
    service, model, desk = make(store)
    await collect(service, said("hello"))
    parts = await collect(service, said("Can I TALK to a   human please?"))
    assert notices(parts) == [NoticeKind.HANDED_OFF]
    assert text_of(parts) == ""
    [opened] = desk.events
    assert opened[:3] == ("opened", KEY, HandoffReason.ASKED)
    recent = opened[3]
    assert isinstance(recent, list)
    assert recent[-1] == "Can I TALK to a   human please?"  # the context staff see
    for text in ("are you there?", "I also want to talk to a human"):
        assert await collect(service, said(text)) == [Quiet()]  # silent, not told again
    assert len(model.prompts) == 1  # only "hello" reached the model
    assert desk.events[1:] == [
        ("relayed", KEY, "are you there?"),
        ("relayed", KEY, "I also want to talk to a human"),
    ]
    turns = await store.load(KEY)
    assert [(t.role, t.people) for t in turns[2:]] == [(Role.USER, People.ASKED)] * 3


async def test_people_answer_then_hand_back_and_the_bot_reads_what_they_said(
    store: RedisContextStore,
) -> None:
    service, model, desk = make(store)
    await collect(service, said("my router blinks red"))
    assert notices(await collect(service, said("/human"))) == [NoticeKind.HANDED_OFF]
    await collect(service, said("it's the model X2"))
    await service.from_people(KEY, "Unplug it for ten seconds.", name="Grace")
    await service.from_people(KEY, "customer on the old firmware", name="Grace", note=True)
    assert service.handoffs is not None
    assert await service.handoffs.hand_back(KEY, "staff")
    assert desk.events[-1] == ("returned", KEY, "staff")
    await collect(service, said("it works now, thanks"))
    prompt = model.prompts[-1]
    roles = [m.role for m in prompt]
    assert all(a is not b for a, b in itertools.pairwise(roles)), "roles must alternate"
    assistant = prompt[-2]
    assert assistant.role is Role.ASSISTANT
    assert "Unplug it for ten seconds." in assistant.content
    assert "[Staff note from Grace, not shown to the user] customer on the old" in (
        assistant.content
    )
    assert "it's the model X2" in prompt[-3].content  # asked of people, still context
    # Fine-tuning data can leave the people's part out, or keep it.
    turns = await store.load(KEY)
    with_people = transcript(turns)
    without = transcript(turns, people=False)
    assert with_people is not None and without is not None
    assert any("Unplug it" in m["content"] for m in with_people)
    assert not any("Unplug it" in m["content"] or "X2" in m["content"] for m in without)


async def test_human_where_no_people_answer_says_so_and_changes_nothing(
    store: RedisContextStore,
) -> None:
    service, _, desk = make(store)
    elsewhere = ConversationKey("console", "local")
    assert await collect(service, said("/human", elsewhere)) == [NO_DESK]
    parts = await collect(service, said("let me talk to a human", elsewhere))
    assert text_of(parts).startswith("echo")  # the phrase is an ordinary message there
    assert desk.events == []


async def test_bot_takes_it_back_and_in_a_shared_group_only_admins_may(
    store: RedisContextStore,
) -> None:
    service, _, desk = make(store)
    group = ConversationKey("test", "group-1")
    await collect(service, said("/human", group, in_group=True))
    refused = await collect(service, said("/bot", group, in_group=True))
    assert text_of(refused).startswith("Only admins")
    assert await collect(service, said("/human", group, in_group=True)) == [ALREADY]
    back = await collect(service, said("/bot", group, in_group=True, is_admin=True))
    assert back == ["You're talking with the bot again."]
    assert desk.events[-1] == ("returned", group, "user")
    assert text_of(await collect(service, said("hi", group, in_group=True))).startswith("echo")


async def test_an_idle_handoff_lapses_back_to_the_bot(
    store: RedisContextStore, redis_client: Redis
) -> None:
    metrics = Metrics()
    service, _, desk = make(store, metrics=metrics)
    await collect(service, said("/human"))
    assert await collect(service, said("anyone?")) == [Quiet()]
    # An hour of silence, as Redis's clock will see it: the last activity moved back.
    await redis_client.hset(store.redis_key(KEY, "handoff"), "last", 0)
    assert text_of(await collect(service, said("hello again"))).startswith("echo")
    assert desk.events[-1] == ("returned", KEY, "idle")
    assert metrics.sample("parley_handbacks_total", platform="test", by="idle") == 1
    assert metrics.sample("parley_handoffs_total", platform="test", reason="asked") == 1


async def test_repeated_failures_hand_off(store: RedisContextStore) -> None:
    model = ScriptedModel(fail_with=ModelUnavailable("down"))
    service, _, desk = make(store, model=model, policy=HandoffPolicy(after_failures=2))
    first = await collect(service, said("one"))
    assert notices(first) == [NoticeKind.MODEL_UNAVAILABLE]
    second = await collect(service, said("two"))
    assert notices(second) == [NoticeKind.MODEL_UNAVAILABLE, NoticeKind.HANDED_OFF]
    assert desk.events[0][:3] == ("opened", KEY, HandoffReason.FAILURES)
    assert desk.events[0][3] == ["one", "two"]
    model.fail_with = None
    assert await collect(service, said("three")) == [Quiet()]  # people have it now


async def test_two_replicas_agree_and_only_one_opens_the_handoff(
    store: RedisContextStore,
) -> None:
    desk = MemoryDesk()
    first, first_model, _ = make(store, desk=desk)
    second, second_model, _ = make(store, desk=desk)
    assert first.handoffs is not None and second.handoffs is not None
    opened = [await first.handoffs.hand_off(KEY, HandoffReason.STAFF) for _ in range(2)]
    opened.append(await second.handoffs.hand_off(KEY, HandoffReason.STAFF))
    assert opened == [True, False, False]
    assert await collect(second, said("hi")) == [Quiet()]
    assert first_model.prompts == second_model.prompts == []
    assert await second.handoffs.hand_back(KEY, "staff")
    assert not await first.handoffs.hand_back(KEY, "staff")  # once
    assert [e[0] for e in desk.events] == ["opened", "relayed", "returned"]


async def test_a_failing_staff_desk_loses_nothing(store: RedisContextStore) -> None:
    service, model, _ = make(store, desk=MemoryDesk(down=True))
    assert notices(await collect(service, said("talk to a person"))) == [NoticeKind.HANDED_OFF]
    assert await collect(service, said("still there?")) == [Quiet()]
    assert [t.content for t in await store.load(KEY)] == ["talk to a person", "still there?"]
    assert model.prompts == []


@pytest.fixture
async def help_index(redis_client: Redis, key_prefix: str, tmp_path: Path) -> Retriever:
    index = RedisKnowledge(redis_client, prefix=key_prefix)
    (tmp_path / "router.md").write_text("# Router\n\n## Reset\n\nHold the reset button.\n")
    adding = Ingest(index, WordEmbedder(), "help", IngestOptions(max_tokens=80))
    await adding.prepare("word-hash")
    await adding.add([tmp_path])
    return Retriever(WordEmbedder(), index, RetrievalPolicy(top_k=2, threshold=0.3))


async def test_no_answer_in_the_knowledge_base_offers_a_person(
    store: RedisContextStore, help_index: Retriever
) -> None:
    chat = ChatPolicy(knowledge_default="help")
    service, model, desk = make(store, retriever=help_index, chat=chat)
    parts = await collect(service, said("what is the price of the premium plan?"))
    assert text_of(parts) == f"{chat.no_answer}\n{OFFER}"
    assert [t.content for t in await store.load(KEY)][-1] == chat.no_answer  # as stored
    assert model.prompts == [] and desk.events == []


async def test_no_answer_can_hand_off_at_once_or_after_a_few(
    store: RedisContextStore, help_index: Retriever
) -> None:
    chat = ChatPolicy(knowledge_default="help")
    policy = HandoffPolicy(on_no_answer="hand_off")
    service, _, desk = make(store, retriever=help_index, chat=chat, policy=policy)
    parts = await collect(service, said("what is the price of the premium plan?"))
    assert notices(parts) == [NoticeKind.HANDED_OFF]
    assert desk.events[0][:3] == ("opened", KEY, HandoffReason.NO_ANSWER)
    other = ConversationKey("test", "dm-2")
    policy = HandoffPolicy(on_no_answer="never", after_failures=2)
    service, _, desk = make(store, retriever=help_index, chat=chat, policy=policy)
    assert text_of(await collect(service, said("what does it cost?", other))) == chat.no_answer
    parts = await collect(service, said("and the price in euros?", other))
    assert notices(parts) == [NoticeKind.HANDED_OFF]
    assert desk.events[0][:3] == ("opened", other, HandoffReason.FAILURES)
