"""The context store against a real Redis server."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from bots.core.models import ConversationKey, ConversationState, Role, Turn, Usage
from bots.core.ports import StoreUnavailable
from bots.store.redis import RedisContextStore, conversation_slot
from tests.conftest import free_port

KEY = ConversationKey("discord", "guild-1:chan-2", "thread-3")


async def test_turns_round_trip_with_every_field(store: RedisContextStore) -> None:
    turns = [
        Turn(Role.USER, "héllo 👋 <|im_end|>", name="Ada", at=1.5),
        Turn(Role.ASSISTANT, "hi\n```py\nx\n```", at=2.5, usage=Usage(30, 7)),
    ]
    await store.append(KEY, *turns)
    numbered = [dataclasses.replace(turn, seq=seq) for seq, turn in enumerate(turns, 1)]
    assert await store.load(KEY) == numbered


async def test_concurrent_appends_lose_nothing_and_keep_pairs_together(
    store: RedisContextStore,
) -> None:
    async def exchange(i: int) -> None:
        await store.append(KEY, Turn(Role.USER, f"q{i}"), Turn(Role.ASSISTANT, f"a{i}"))

    await asyncio.gather(*(exchange(i) for i in range(100)))
    turns = await store.load(KEY)
    assert len(turns) == 200
    pairs = [(turns[j].content, turns[j + 1].content) for j in range(0, 200, 2)]
    assert all(q[1:] == a[1:] and q[0] == "q" and a[0] == "a" for q, a in pairs)
    assert sorted(int(q[1:]) for q, _ in pairs) == list(range(100))


async def test_cap_keeps_the_newest_turns(redis_client: Redis, key_prefix: str) -> None:
    store = RedisContextStore(redis_client, prefix=key_prefix, max_turns=10, ttl_seconds=60)
    for i in range(8):
        await store.append(KEY, Turn(Role.USER, f"q{i}"), Turn(Role.ASSISTANT, f"a{i}"))
    assert [t.content for t in await store.load(KEY)] == [
        f"{kind}{i}" for i in range(3, 8) for kind in "qa"
    ]


async def test_conversation_expires_and_each_append_renews_it(
    redis_client: Redis, key_prefix: str
) -> None:
    store = RedisContextStore(redis_client, prefix=key_prefix, max_turns=10, ttl_seconds=1)
    await store.append(KEY, Turn(Role.USER, "soon gone"))
    assert 0 < await redis_client.pttl(store.redis_key(KEY)) <= 1000
    await asyncio.sleep(1.3)
    assert await store.load(KEY) == []


async def test_keys_that_look_alike_never_share_context(store: RedisContextStore) -> None:
    a = ConversationKey("telegram", "a:b", "c")
    b = ConversationKey("telegram", "a", "b:c")
    c = ConversationKey("telegram", "a:b:c")
    await store.append(a, Turn(Role.USER, "secret of a"))
    assert await store.load(b) == [] and await store.load(c) == []
    await store.clear(b)
    assert [t.content for t in await store.load(a)] == ["secret of a"]


parts = st.text(min_size=1, max_size=8, alphabet=st.sampled_from("abu=:{}%/ _é"))
keys = st.builds(ConversationKey, parts, parts, st.none() | parts, st.none() | parts)


@given(keys, keys)
def test_distinct_conversations_have_distinct_redis_keys(
    first: ConversationKey, second: ConversationKey
) -> None:
    assert (conversation_slot(first) == conversation_slot(second)) == (first == second)


@given(keys)
def test_every_key_is_one_cluster_hash_tag(key: ConversationKey) -> None:
    slot = conversation_slot(key)
    assert slot.startswith("{") and slot.endswith("}")
    assert "{" not in slot[1:-1] and "}" not in slot[1:-1]


async def test_clear_forgets_one_conversation(store: RedisContextStore) -> None:
    other = ConversationKey("discord", "elsewhere")
    await store.append(KEY, Turn(Role.USER, "x"))
    await store.append(other, Turn(Role.USER, "y"))
    await store.clear(KEY)
    assert await store.load(KEY) == [] and len(await store.load(other)) == 1


async def test_an_unreadable_record_is_skipped_not_fatal(
    store: RedisContextStore, redis_client: Redis
) -> None:
    await store.append(KEY, Turn(Role.USER, "before"))
    await redis_client.rpush(store.redis_key(KEY), b"\xff not json")
    await store.append(KEY, Turn(Role.ASSISTANT, "after"))
    assert [t.content for t in await store.load(KEY)] == ["before", "after"]


async def test_unreachable_redis_raises_store_unavailable() -> None:
    client = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    store = RedisContextStore(client, prefix="x", max_turns=10, ttl_seconds=60)
    with pytest.raises(StoreUnavailable):
        await store.load(KEY)
    with pytest.raises(StoreUnavailable):
        await store.append(KEY, Turn(Role.USER, "lost?"))
    await client.aclose()


async def test_a_turn_is_edited_and_removed_by_its_message_id(store: RedisContextStore) -> None:
    await store.append(KEY, Turn(Role.USER, "first", message_id="m1"), Turn(Role.ASSISTANT, "a"))
    await store.append(KEY, Turn(Role.USER, "second", message_id="m2"), Turn(Role.ASSISTANT, "b"))
    assert await store.edit(KEY, "m1", "first, edited")
    assert await store.remove(KEY, "m2")
    assert not await store.edit(KEY, "m404", "nothing") and not await store.remove(KEY, "m404")
    turns = await store.load(KEY)
    assert [(t.content, t.message_id) for t in turns] == [
        ("first, edited", "m1"),
        ("a", None),
    ], "a deleted message takes its answer with it"


async def test_deleting_a_message_removes_only_its_own_answer(store: RedisContextStore) -> None:
    await store.append(KEY, Turn(Role.USER, "unanswered", message_id="m0"))  # its reply failed
    await store.append(KEY, Turn(Role.USER, "first", message_id="m1"), Turn(Role.ASSISTANT, "a"))
    await store.append(KEY, Turn(Role.USER, "second", message_id="m2"), Turn(Role.ASSISTANT, "b"))
    assert await store.remove(KEY, "m0")
    assert [t.content for t in await store.load(KEY)] == ["first", "a", "second", "b"]
    assert await store.remove(KEY, "m1")
    assert [t.content for t in await store.load(KEY)] == ["second", "b"]


async def test_turns_are_numbered_in_order_across_appends_and_trims(
    redis_client: Redis, key_prefix: str
) -> None:
    store = RedisContextStore(redis_client, prefix=key_prefix, max_turns=4, ttl_seconds=60)
    for index in range(5):
        await store.append(KEY, Turn(Role.USER, f"q{index}"), Turn(Role.ASSISTANT, f"a{index}"))
    assert [t.seq for t in await store.load(KEY)] == [7, 8, 9, 10]


async def test_a_regenerated_answer_replaces_the_exchange_atomically(
    store: RedisContextStore,
) -> None:
    await store.append(KEY, Turn(Role.USER, "q1"), Turn(Role.ASSISTANT, "a1"))
    await store.append(KEY, Turn(Role.USER, "q2"), Turn(Role.ASSISTANT, "a2"))
    question = (await store.load(KEY))[2]
    assert await store.append(
        KEY, question, Turn(Role.ASSISTANT, "a2 again"), replacing=question.seq
    )
    assert [t.content for t in await store.load(KEY)] == ["q1", "a1", "q2", "a2 again"]
    assert not await store.append(KEY, Turn(Role.ASSISTANT, "stale"), replacing=question.seq)
    assert [t.content for t in await store.load(KEY)][-1] == "a2 again", "nothing stored"


async def test_window_start_and_persona_are_kept_beside_the_turns(
    store: RedisContextStore, redis_client: Redis
) -> None:
    assert await store.state(KEY) == ConversationState()
    await store.append(KEY, Turn(Role.USER, "q"), window_start=7)
    await store.set_option(KEY, "persona", "Tu es un chat. 🐈")
    assert await store.state(KEY) == ConversationState("Tu es un chat. 🐈", 7)
    assert 0 < await redis_client.ttl(store.redis_key(KEY, "win")) <= 3600
    await store.clear(KEY)
    assert await store.state(KEY) == ConversationState("Tu es un chat. 🐈", None)
    assert await store.load(KEY) == []
    await store.set_option(KEY, "persona", None)
    assert await store.state(KEY) == ConversationState()


async def test_every_key_of_a_conversation_is_in_one_cluster_slot(store: RedisContextStore) -> None:
    tags = {
        store.redis_key(KEY, kind).split("{", 1)[1] for kind in ("ctx", "win", "seq", "persona")
    }
    assert len(tags) == 1
