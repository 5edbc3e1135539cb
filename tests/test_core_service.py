"""The conversation flow, on in-memory fakes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing

from bots.core.context import bound_tokens
from bots.core.models import (
    Author,
    ConversationKey,
    Incoming,
    NoticeKind,
    ReplyPart,
    Role,
    Turn,
)
from bots.core.ports import ModelInterrupted, ModelRejected, ModelUnavailable, StoreUnavailable
from bots.core.service import ChatPolicy, ConversationService
from tests.fakes import MemoryStore, ScriptedModel, collect, notices, text_of

KEY = ConversationKey("test", "chan")


def make(
    model: ScriptedModel | None = None, **options: int
) -> tuple[ConversationService, MemoryStore, ScriptedModel]:
    store, model = MemoryStore(), model or ScriptedModel()
    policy = ChatPolicy(system_prompt="Be brief.", **options)  # type: ignore[arg-type]
    return ConversationService(store, model, policy=policy), store, model


async def test_reply_streams_and_both_turns_are_recorded() -> None:
    service, store, _ = make()
    parts = await collect(service, Incoming(KEY, "hello"))
    assert len([p for p in parts if isinstance(p, str)]) > 1, "the reply arrives in pieces"
    assert text_of(parts) == "echo 2: hello"
    turns = store.turns[KEY]
    assert [(t.role, t.content) for t in turns] == [
        (Role.USER, "hello"),
        (Role.ASSISTANT, "echo 2: hello"),
    ]
    assert turns[1].usage is not None and turns[1].usage.completion_tokens == 3


async def test_each_request_carries_the_earlier_turns() -> None:
    service, _, model = make()
    await collect(service, Incoming(KEY, "one"))
    await collect(service, Incoming(KEY, "two"))
    assert [(m.role, m.content) for m in model.prompts[1]] == [
        (Role.SYSTEM, "Be brief."),
        (Role.USER, "one"),
        (Role.ASSISTANT, "echo 2: one"),
        (Role.USER, "two"),
    ]


async def test_empty_message_gets_a_hint_and_nothing_is_stored() -> None:
    service, store, model = make()
    parts = await collect(service, Incoming(KEY, " \n\t "))
    assert notices(parts) == [NoticeKind.EMPTY_MESSAGE]
    assert not store.turns[KEY] and not model.prompts


async def test_one_conversation_is_answered_in_arrival_order() -> None:
    service, store, model = make(ScriptedModel(delay=0.01))
    first = asyncio.create_task(collect(service, Incoming(KEY, "first")))
    second = asyncio.create_task(collect(service, Incoming(KEY, "second")))
    await asyncio.gather(first, second)
    assert [t.content for t in store.turns[KEY]] == [
        "first",
        "echo 2: first",
        "second",
        "echo 4: second",
    ]
    assert model.prompts[1][-2].content == "echo 2: first", "the second saw the first's reply"


async def test_other_conversations_do_not_wait_for_a_slow_one() -> None:
    model = ScriptedModel(gates={str(KEY): asyncio.Event()})
    service, _, _ = make(model)
    slow = asyncio.create_task(collect(service, Incoming(KEY, "slow")))
    other = ConversationKey("test", "other")
    parts = await asyncio.wait_for(collect(service, Incoming(other, "quick")), 1.0)
    assert text_of(parts) == "echo 2: quick" and not slow.done()
    model.gates[str(KEY)].set()
    await slow
    assert service.active_conversations == 0, "locks are forgotten when idle"


async def test_model_unavailable_keeps_the_user_turn_only() -> None:
    service, store, _ = make(ScriptedModel(fail_with=ModelUnavailable("down")))
    parts = await collect(service, Incoming(KEY, "are you there?"))
    assert notices(parts) == [NoticeKind.MODEL_UNAVAILABLE] and text_of(parts) == ""
    assert [(t.role, t.content) for t in store.turns[KEY]] == [(Role.USER, "are you there?")]


async def test_model_rejection_is_reported_as_such() -> None:
    service, _, _ = make(ScriptedModel(fail_with=ModelRejected("401")))
    assert notices(await collect(service, Incoming(KEY, "hi"))) == [NoticeKind.MODEL_REJECTED]


async def test_interrupted_reply_stores_no_partial_answer() -> None:
    service, store, _ = make(ScriptedModel(fail_with=ModelInterrupted("cut"), fail_after=2))
    parts = await collect(service, Incoming(KEY, "tell me"))
    assert text_of(parts) == "echo 2:" and notices(parts) == [NoticeKind.REPLY_INTERRUPTED]
    assert [t.role for t in store.turns[KEY]] == [Role.USER]


async def test_store_down_answers_with_a_notice_and_recovers() -> None:
    service, store, model = make()
    store.down = True
    assert notices(await collect(service, Incoming(KEY, "hi"))) == [NoticeKind.STORE_UNAVAILABLE]
    assert not model.prompts, "no model call without context"
    store.down = False
    assert text_of(await collect(service, Incoming(KEY, "hi"))) == "echo 2: hi"


async def test_reply_that_cannot_be_saved_is_still_delivered_with_a_notice() -> None:
    class ReadOnlyStore(MemoryStore):
        async def append(self, key: ConversationKey, *turns: Turn, **options: object) -> bool:
            raise StoreUnavailable("read-only replica")

    service = ConversationService(ReadOnlyStore(), ScriptedModel())
    parts = await collect(service, Incoming(KEY, "hi"))
    assert text_of(parts) == "echo 1: hi" and notices(parts) == [NoticeKind.STORE_UNAVAILABLE]


async def test_oversized_message_is_shortened_to_fit_with_a_notice() -> None:
    service, store, model = make(ScriptedModel(window=1000), reply_tokens=200)
    parts = await collect(service, Incoming(KEY, "word " * 50_000))
    assert notices(parts) == [NoticeKind.MESSAGE_SHORTENED]
    assert await model.count_tokens(model.prompts[0]) <= 800
    assert text_of(parts).startswith("echo 2: word word")
    assert len(store.turns[KEY][0].content) <= 16_000 + 6, "the stored text is capped too"


async def test_message_over_the_character_cap_is_cut_before_it_is_stored() -> None:
    service, store, model = make(max_message_chars=100)
    parts = await collect(service, Incoming(KEY, "a" * 500))
    assert notices(parts) == [NoticeKind.MESSAGE_SHORTENED]
    assert store.turns[KEY][0].content == "a" * 100 + " [...]"
    assert bound_tokens(model.prompts[0]) < 200


async def test_group_messages_name_their_authors() -> None:
    service, store, model = make()
    author = Author("42", "Ada")
    await collect(service, Incoming(KEY, "hi all", author=author, in_group=True))
    await collect(service, Incoming(KEY, "private", author=author, in_group=False))
    assert model.prompts[1][1].content == "Ada: hi all"
    assert store.turns[KEY][2].name is None


async def test_closing_a_reply_early_releases_the_conversation() -> None:
    service, _, _ = make(ScriptedModel(delay=0.01))
    async with aclosing(service.respond(Incoming(KEY, "long answer please"))) as parts:
        async for _ in parts:
            break
    parts_after = await asyncio.wait_for(collect(service, Incoming(KEY, "next")), 1.0)
    assert text_of(parts_after).startswith("echo")
    assert service.active_conversations == 0


async def test_lone_surrogates_are_replaced_before_anything_is_stored() -> None:
    service, store, model = make()
    parts = await collect(service, Incoming(KEY, "bad \ud800 byte", author=Author("1", "x\udfff")))
    assert text_of(parts) == "echo 2: bad \ufffd byte"
    assert store.turns[KEY][0].content == "bad \ufffd byte"
    assert all(m.content.encode("utf-8") for m in model.prompts[0])


async def test_replies_follow_call_order_not_consumption_order() -> None:
    service, store, _ = make(ScriptedModel(delay=0.005))
    first = service.respond(Incoming(KEY, "first"))
    second = service.respond(Incoming(KEY, "second"))
    later = asyncio.create_task(drain(second))  # starts consuming before the first
    await asyncio.sleep(0)  # one turn of the loop: it waits in line now
    await drain(first)
    await later
    assert [t.content for t in store.turns[KEY]][::2] == ["first", "second"]


async def test_a_reply_never_consumed_does_not_block_the_conversation() -> None:
    service, _, _ = make()
    abandoned = service.respond(Incoming(KEY, "never read"))
    del abandoned
    parts = await asyncio.wait_for(collect(service, Incoming(KEY, "next")), 1.0)
    assert text_of(parts) == "echo 2: next"
    assert service.active_conversations == 0


async def test_leaving_the_line_early_keeps_the_order_for_those_behind() -> None:
    model = ScriptedModel(gates={str(KEY): asyncio.Event()})
    service, store, _ = make(model)
    running = asyncio.create_task(collect(service, Incoming(KEY, "one")))
    await model.started.wait()
    quitter = service.respond(Incoming(KEY, "two"))
    waiting = asyncio.create_task(drain(quitter))
    third = asyncio.create_task(collect(service, Incoming(KEY, "three")))
    await asyncio.sleep(0)  # one turn of the loop: both wait in line now
    waiting.cancel()
    await asyncio.wait({waiting})
    await asyncio.sleep(0)  # a turn in which the third could (wrongly) move up
    assert not third.done(), "the third still waits for the first"
    model.gates[str(KEY)].set()
    await asyncio.gather(running, third)
    assert [t.content for t in store.turns[KEY]][::2] == ["one", "three"]


async def drain(parts: AsyncGenerator[ReplyPart, None]) -> None:
    async with aclosing(parts):
        async for _ in parts:
            pass
