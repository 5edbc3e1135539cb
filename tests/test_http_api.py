"""The HTTP channel's API over real HTTP on loopback, with a real Redis behind it."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from bots.core.models import PromptMessage
from bots.core.ports import ChatModel, ModelUnavailable
from bots.platforms.http.protocol import ID_PATTERN
from tests.fakes import ScriptedModel
from tests.http_channel import (
    Channel,
    SseEvent,
    events,
    http_channel,
    read_events,
    reply_text,
)


class Answers(ScriptedModel):
    def reply(self, prompt: Sequence[PromptMessage]) -> str:
        return f"You said: {prompt[-1].content}"


@pytest.fixture
async def channel(redis_url: str, key_prefix: str) -> AsyncIterator[Channel]:
    async with http_channel(redis_url, key_prefix, Answers()) as channel:
        yield channel


def client(channel: Channel, key: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(base_url=channel.url, headers=headers, timeout=10)


@asynccontextmanager
async def api_on(
    redis_url: str, key_prefix: str, model: ChatModel, **settings: Any
) -> AsyncIterator[tuple[Channel, httpx.AsyncClient]]:
    """An HTTP channel with this model, and a client holding a fresh key of it."""
    async with (
        http_channel(redis_url, key_prefix, model, **settings) as channel,
        client(channel, await channel.key()) as api,
    ):
        yield channel, api


def post(text: str, **fields: object) -> dict[str, object]:
    return {"text": text, **fields}


async def history(api: httpx.AsyncClient, conversation: str) -> list[tuple[str, str]]:
    answer = await api.get(f"/v1/conversations/{conversation}/messages")
    assert answer.status_code == 200, answer.text
    return [(m["role"], m["content"]) for m in answer.json()["messages"]]


async def test_a_reply_streams_as_events_and_is_recorded(channel: Channel) -> None:
    async with client(channel, await channel.key()) as api:
        async with api.stream("POST", "/v1/conversations/c1/messages", json=post("hi there")) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            got = await read_events(r)
        kinds = [event.kind for event in got]
        assert kinds[0] == "reply" and kinds[-1] == "done"
        assert kinds.count("delta") == 4, "each of the model's pieces is an event"
        assert [event.id for event in got] == list(range(len(got)))
        assert reply_text(got) == got[-1].data["text"] == "You said: hi there"
        assert got[0].data["reply_id"] == r.headers["X-Reply-Id"]
        assert await history(api, "c1") == [
            ("user", "hi there"),
            ("assistant", "You said: hi there"),
        ]


async def test_a_reply_can_be_one_json_answer(channel: Channel) -> None:
    async with client(channel, await channel.key()) as api:
        answer = await api.post("/v1/conversations/c1/messages", json=post("ping", stream=False))
        assert answer.status_code == 200
        body = answer.json()
        assert body["text"] == "You said: ping" and body["notices"] == []
        assert len(body["reply_id"]) == 32


async def test_a_json_answer_says_whether_it_was_recorded(redis_url: str, key_prefix: str) -> None:
    model = Answers()
    async with api_on(redis_url, key_prefix, model) as (_, api):
        answer = await api.post("/v1/conversations/c1/messages", json=post("ping", stream=False))
        assert answer.status_code == 200 and answer.json()["recorded"] is True
        helped = await api.post("/v1/conversations/c1/messages", json=post("/help", stream=False))
        assert helped.status_code == 200 and helped.json()["recorded"] is False
        model.fail_with = ModelUnavailable("down")
        failed = await api.post("/v1/conversations/c1/messages", json=post("hi", stream=False))
        assert failed.status_code == 503 and failed.headers["Retry-After"] == "5"
        assert failed.json()["error"]["code"] == "model_unavailable"
        model.fail_after = 2  # two pieces, then the model fails: an answer cut short
        cut = await api.post("/v1/conversations/c1/messages", json=post("again", stream=False))
        assert cut.status_code == 200 and cut.json()["text"] and cut.json()["recorded"] is False
        assert [kind for kind, _ in await history(api, "c1")] == [
            "user",
            "assistant",
            "user",
            "user",
        ], "only the first exchange was answered whole; the others' messages are kept"


async def test_commands_work_through_the_api(channel: Channel) -> None:
    async with client(channel, await channel.key()) as api:
        await api.post("/v1/conversations/c1/messages", json=post("one", stream=False))
        answer = await api.post("/v1/conversations/c1/messages", json=post("/help", stream=False))
        assert "/reset" in answer.json()["text"]
        assert (await api.delete("/v1/conversations/c1")).status_code == 204
        assert await history(api, "c1") == []


async def test_missing_or_wrong_keys_are_refused(channel: Channel) -> None:
    key = await channel.key()
    for api in (client(channel), client(channel, "pk_not-a-key"), client(channel, key[:-1])):
        async with api:
            answer = await api.get("/v1/conversations/c1/messages")
            assert answer.status_code == 401
            assert answer.headers["WWW-Authenticate"] == "Bearer"
            assert answer.json()["error"]["code"] == "unauthorized"
            answer = await api.post("/v1/conversations/c1/messages", json=post("hi"))
            assert answer.status_code == 401
    assert await channel.keys.revoke("acme") == 1
    async with client(channel, key) as api:
        assert (await api.get("/v1/conversations/c1/messages")).status_code == 401


async def test_keys_are_stored_only_as_hashes(
    channel: Channel, redis_url: str, key_prefix: str
) -> None:
    key = await channel.key()
    raw = Redis.from_url(redis_url)
    try:
        stored = await raw.hgetall(f"{key_prefix}:http:keys")
    finally:
        await raw.aclose()
    [(field, value)] = stored.items()
    assert field == hashlib.sha256(key.encode()).hexdigest().encode()
    assert key[3:] not in repr((field, value))


async def test_an_integration_never_sees_another_ones_conversation(channel: Channel) -> None:
    acme, globex = await channel.key("acme"), await channel.key("globex")
    async with client(channel, acme) as mine, client(channel, globex) as theirs:
        async with mine.stream(
            "POST", "/v1/conversations/shared/messages", json=post("secret")
        ) as r:
            reply_id = (await read_events(r))[0].data["reply_id"]
        assert await history(theirs, "shared") == []
        resumed = await theirs.get(f"/v1/conversations/shared/replies/{reply_id}")
        assert resumed.status_code == 404
        await theirs.post("/v1/conversations/shared/messages", json=post("mine", stream=False))
        assert (await theirs.delete("/v1/conversations/shared")).status_code == 204
        assert await history(mine, "shared") == [
            ("user", "secret"),
            ("assistant", "You said: secret"),
        ]
    rotated = await channel.key("acme")  # a new key of the same integration
    async with client(channel, rotated) as api:
        assert len(await history(api, "shared")) == 2


async def test_each_key_has_its_own_quota(channel: Channel) -> None:
    small, other = await channel.key("small", messages=2, window=60), await channel.key("other")
    async with client(channel, small) as api, client(channel, other) as free:
        for text in ("one", "two"):
            answer = await api.post("/v1/conversations/c/messages", json=post(text, stream=False))
            assert answer.status_code == 200
        refused = await api.post("/v1/conversations/c/messages", json=post("three"))
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        answer = await free.post("/v1/conversations/c/messages", json=post("four", stream=False))
        assert answer.status_code == 200
        assert [text for _, text in await history(api, "c")][::2] == ["one", "two"]


async def test_the_core_limits_apply_per_end_user(redis_url: str, key_prefix: str) -> None:
    async with api_on(redis_url, key_prefix, Answers(), user_messages=1) as (_, api):
        ada = {"id": "ada", "name": "Ada"}
        answer = await api.post(
            "/v1/conversations/c/messages", json=post("1", user=ada, stream=False)
        )
        assert answer.status_code == 200
        answer = await api.post(
            "/v1/conversations/c/messages", json=post("2", user=ada, stream=False)
        )
        assert answer.status_code == 429 and "faster" in answer.json()["error"]["message"]
        async with api.stream(
            "POST", "/v1/conversations/c/messages", json=post("3", user=ada)
        ) as r:
            got = await read_events(r)
        [refusal] = [e.data for e in got if e.kind == "notice"]
        assert refusal["kind"] == "rate_limited" and refusal["retry_after"] > 0
        bob = {"id": "bob"}
        answer = await api.post(
            "/v1/conversations/c/messages", json=post("4", user=bob, stream=False)
        )
        assert answer.status_code == 200, "another user of the same integration is answered"


async def test_oversized_bodies_are_refused_and_nothing_is_stored(
    redis_url: str, key_prefix: str
) -> None:
    async with api_on(redis_url, key_prefix, Answers(), max_body_bytes=2048) as (_, api):
        answer = await api.post("/v1/conversations/c/messages", json=post("x" * 3000))
        assert answer.status_code == 413
        assert answer.json()["error"]["code"] == "too_large"

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
            yield b'{"text": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}'

        answer = await api.post(
            "/v1/conversations/c/messages",
            content=chunked(),
            headers={"Content-Type": "application/json"},
        )
        assert answer.status_code == 413
        assert await history(api, "c") == []


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b'{"text": "hi"', "application/json", 400, "malformed_json"),
        (b"\xff\xfe", "application/json", 400, "malformed_json"),
        (b"text=hi", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (b'{"text": ""}', "application/json", 422, "invalid_request"),
        (b'{"text": "hi", "extra": 1}', "application/json", 422, "invalid_request"),
        (b'{"text": 5}', "application/json", 422, "invalid_request"),
        (b"[]", "application/json", 422, "invalid_request"),
    ],
)
async def test_bad_requests_get_clear_answers(
    channel: Channel, body: bytes, content_type: str, status: int, code: str
) -> None:
    async with client(channel, await channel.key()) as api:
        answer = await api.post(
            "/v1/conversations/c/messages", content=body, headers={"Content-Type": content_type}
        )
        assert answer.status_code == status, answer.text
        assert answer.json()["error"]["code"] == code
        assert answer.json()["error"]["message"]
        assert await history(api, "c") == []


@pytest.mark.parametrize("conversation", ["-starts-with-dash", "x" * 129, "has%20space", "a/b"])
async def test_bad_conversation_ids_are_refused(channel: Channel, conversation: str) -> None:
    assert not re.match(ID_PATTERN, conversation.replace("%20", " "))
    async with client(channel, await channel.key()) as api:
        answer = await api.post(f"/v1/conversations/{conversation}/messages", json=post("hi"))
        assert answer.status_code in (404, 422)
        assert "error" in answer.json()


async def test_a_dropped_stream_is_recorded_whole_and_can_be_read_on(
    redis_url: str, key_prefix: str
) -> None:
    model = Answers(delay=0.05)
    async with api_on(redis_url, key_prefix, model) as (_, api):
        text = "tell me a fairly long story please"
        async with api.stream("POST", "/v1/conversations/c/messages", json=post(text)) as r:
            seen: list[SseEvent] = []
            async for event in events(r):
                seen.append(event)
                if event.kind == "delta":
                    break  # the client goes away mid-reply
        reply_id, last = seen[0].data["reply_id"], seen[-1].id
        assert len(seen) == 2
        expected = f"You said: {text}"
        for _ in range(100):
            if await history(api, "c") == [("user", text), ("assistant", expected)]:
                break
            await asyncio.sleep(0.05)
        assert await history(api, "c") == [("user", text), ("assistant", expected)]
        async with api.stream(
            "GET",
            f"/v1/conversations/c/replies/{reply_id}",
            headers={"Last-Event-ID": str(last)},
        ) as r:
            rest = await read_events(r)
        assert rest[0].id == last + 1
        assert reply_text(seen) + reply_text(rest) == expected


async def test_a_reply_can_be_followed_live_from_the_start(redis_url: str, key_prefix: str) -> None:
    model = Answers(delay=0.02)
    async with api_on(redis_url, key_prefix, model) as (_, api):
        answer = await api.post("/v1/conversations/c/messages", json=post("a b c d e f"))
        reply_id = answer.headers["X-Reply-Id"]
        async with api.stream("GET", f"/v1/conversations/c/replies/{reply_id}") as r:
            again = await read_events(r)
        assert reply_text(again) == "You said: a b c d e f"


async def test_cors_allows_only_listed_origins(redis_url: str, key_prefix: str) -> None:
    shop = "https://shop.example"
    async with http_channel(redis_url, key_prefix, Answers(), cors_origins=(shop,)) as channel:
        for origin, allowed in ((shop, True), ("https://evil.example", False)):
            async with client(channel) as api:
                answer = await api.options(
                    "/v1/conversations/c/messages",
                    headers={
                        "Origin": origin,
                        "Access-Control-Request-Method": "POST",
                        "Access-Control-Request-Headers": "authorization,content-type",
                    },
                )
            granted = answer.headers.get("Access-Control-Allow-Origin")
            assert (granted == origin) is allowed
            assert (answer.status_code == 200) is allowed


async def test_shutdown_lets_a_reply_finish_within_the_grace(
    redis_url: str, key_prefix: str
) -> None:
    model = Answers(delay=0.05)
    async with api_on(redis_url, key_prefix, model, shutdown_seconds=10) as (channel, api):
        async with api.stream("POST", "/v1/conversations/c/messages", json=post("a b c d")) as r:
            stream = events(r)
            assert (await anext(stream)).kind == "reply"
            channel.task.cancel()  # what SIGTERM does
            rest = [event async for event in stream]
        assert reply_text(rest) == "You said: a b c d"
        assert rest[-1].kind == "done" and not rest[-1].data["notices"]
        with pytest.raises(asyncio.CancelledError):
            await channel.task
        with pytest.raises(httpx.ConnectError):
            await api.get("/healthz")
    async with api_on(redis_url, key_prefix, model) as (channel, api):
        assert await history(api, "c") == [
            ("user", "a b c d"),
            ("assistant", "You said: a b c d"),
        ]


async def test_shutdown_ends_a_stuck_reply_with_a_notice_and_no_record(
    redis_url: str, key_prefix: str
) -> None:
    model = Answers()
    async with http_channel(redis_url, key_prefix, model, shutdown_seconds=0.3) as channel:
        model.gates["http/acme/c"] = asyncio.Event()  # the model never answers
        async with client(channel, await channel.key()) as api:
            async with api.stream("POST", "/v1/conversations/c/messages", json=post("hello")) as r:
                stream = events(r)
                assert (await anext(stream)).kind == "reply"
                channel.task.cancel()
                rest = [event async for event in stream]
            [notice] = [e.data for e in rest if e.kind == "notice"]
            assert "restarting" in notice["text"]
            assert rest[-1].kind == "done" and rest[-1].data["text"] == ""
            with pytest.raises(asyncio.CancelledError):
                await channel.task
    async with api_on(redis_url, key_prefix, model) as (channel, api):
        assert await history(api, "c") == [], "nothing half-written"


async def test_the_openapi_document_describes_the_api(channel: Channel) -> None:
    async with client(channel) as api:
        document = (await api.get("/openapi.json")).json()
    paths = document["paths"]
    assert set(paths) == {
        "/v1/conversations/{conversation_id}/messages",
        "/v1/conversations/{conversation_id}/replies/{reply_id}",
        "/v1/conversations/{conversation_id}",
        "/v1/conversations/{conversation_id}/agent-messages",
        "/v1/conversations/{conversation_id}/handoff",
        "/healthz",
    }
    send = paths["/v1/conversations/{conversation_id}/messages"]["post"]
    assert set(send["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert {"401", "413", "429"} <= set(send["responses"])
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
