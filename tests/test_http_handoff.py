"""Handing HTTP conversations to people: the API, the webhook's events, and the way back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import web

from bots.core.handoff import HandoffPolicy
from bots.platforms.http.webhook import verify
from tests.http_channel import Channel, http_channel, read_events
from tests.loopback import serve
from tests.test_http_api import Answers, client, history, post

SECRET = b"whsec-handoff-0123456789"
PEOPLE = HandoffPolicy(idle_seconds=0)


@dataclass
class Desk:
    """The integration's webhook receiver: every event, its signature checked, in a queue."""

    url: str = ""
    events: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    forged: list[bytes] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(SECRET, request.headers.get("Parley-Signature", ""), body):
            self.forged.append(body)
            return web.Response(status=401)
        await self.events.put(json.loads(body))
        return web.Response(status=204)

    async def next(self, kind: str) -> dict[str, Any]:
        """The next event of this type (reply.finished and others in between are skipped)."""
        while True:
            event = await asyncio.wait_for(self.events.get(), 10)
            if event["type"] == kind:
                return event


@pytest.fixture
async def desk() -> AsyncIterator[Desk]:
    found = Desk()
    app = web.Application()
    app.router.add_post("/hook", found.handle)
    runner, port = await serve(app)
    found.url = f"http://127.0.0.1:{port}/hook"
    yield found
    await runner.cleanup()
    assert found.forged == []


@asynccontextmanager
async def staffed(
    redis_url: str, key_prefix: str, desk: Desk, model: Answers
) -> AsyncIterator[tuple[Channel, httpx.AsyncClient]]:
    """An HTTP channel whose conversations can go to people, its webhook at `desk`."""
    async with (
        http_channel(
            redis_url,
            key_prefix,
            model,
            handoff=PEOPLE,
            webhook_url=desk.url,
            webhook_secret=SECRET.decode(),
        ) as channel,
        client(channel, await channel.key("helpdesk")) as api,
    ):
        yield channel, api


async def say(api: httpx.AsyncClient, conversation: str, text: str) -> dict[str, Any]:
    answer = await api.post(
        f"/v1/conversations/{conversation}/messages", json=post(text, stream=False)
    )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def test_a_phrase_hands_off_and_the_users_messages_go_to_the_desk(
    redis_url: str, key_prefix: str, desk: Desk
) -> None:
    model = Answers()
    async with staffed(redis_url, key_prefix, desk, model) as (_, api):
        assert (await say(api, "t-1", "where is my parcel"))["handed_off"] is False
        asked = await say(api, "t-1", "I want to talk to a human")
        assert asked["text"] == "" and asked["handed_off"] is True
        assert [n["kind"] for n in asked["notices"]] == ["handed_off"]
        opened = await desk.next("conversation.handoff")
        assert opened["integration"] == "helpdesk" and opened["conversation_id"] == "t-1"
        assert opened["reason"] == "asked" and opened["at"] > 0
        assert [(m["role"], m["content"]) for m in opened["recent"]] == [
            ("user", "where is my parcel"),
            ("assistant", "You said: where is my parcel"),
            ("user", "I want to talk to a human"),
        ]

        asked_model = len(model.prompts)
        async with api.stream("POST", "/v1/conversations/t-1/messages", json=post("hello?")) as r:
            done = (await read_events(r))[-1]
        assert done.kind == "done"
        assert done.data["handed_off"] is True and done.data["text"] == ""
        assert done.data["notices"] == [], "said plainly by handed_off, not by a failure"
        assert len(model.prompts) == asked_model, "the model is not asked while people answer"
        relayed = await desk.next("conversation.message")
        assert relayed["conversation_id"] == "t-1"
        assert relayed["message"]["role"] == "user" and relayed["message"]["content"] == "hello?"
        state = await api.get("/v1/conversations/t-1/handoff")
        assert state.status_code == 200
        assert state.json() == {
            "conversation_id": "t-1",
            "handed_off": True,
            "reason": "asked",
            "since": opened["at"],
        }


async def test_people_answer_then_hand_back_and_the_bot_reads_their_reply(
    redis_url: str, key_prefix: str, desk: Desk
) -> None:
    model = Answers()
    async with staffed(redis_url, key_prefix, desk, model) as (_, api):
        await say(api, "t-2", "my refund is late")
        taken = await api.post("/v1/conversations/t-2/handoff")
        assert taken.status_code == 201, taken.text
        assert taken.json()["handed_off"] is True and taken.json()["reason"] == "staff"
        assert (await desk.next("conversation.handoff"))["reason"] == "staff"

        reply = await api.post(
            "/v1/conversations/t-2/agent-messages",
            json={"text": "Your refund went out today.", "name": "Sam"},
        )
        assert reply.status_code == 201, reply.text
        stored = reply.json()
        assert stored["role"] == "agent" and stored["name"] == "Sam"
        assert stored["content"] == "Your refund went out today." and stored["seq"] == 3
        note = await api.post(
            "/v1/conversations/t-2/agent-messages",
            json={"text": "refund id R-77", "name": "Sam", "note": True},
        )
        assert note.status_code == 201 and note.json()["role"] == "note"
        assert (await say(api, "t-2", "thanks!"))["handed_off"] is True

        shown = [
            ("user", "my refund is late"),
            ("assistant", "You said: my refund is late"),
            ("agent", "Your refund went out today."),
            ("user", "thanks!"),
        ]
        assert await history(api, "t-2") == shown, "the user's side never sees notes"
        staff = (await api.get("/v1/conversations/t-2/messages?notes=true")).json()
        assert [m["role"] for m in staff["messages"]] == [
            "user",
            "assistant",
            "agent",
            "note",
            "user",
        ]
        assert staff["handed_off"] is True
        later = (await api.get("/v1/conversations/t-2/messages?after=3")).json()["messages"]
        assert [m["content"] for m in later] == ["thanks!"]

        assert (await api.delete("/v1/conversations/t-2/handoff")).status_code == 204
        returned = await desk.next("conversation.returned")
        assert returned["by"] == "api" and returned["conversation_id"] == "t-2"
        assert (await api.get("/v1/conversations/t-2/handoff")).json()["handed_off"] is False

        answer = await say(api, "t-2", "is it really sent?")
        assert answer["text"].endswith("is it really sent?") and answer["handed_off"] is False
        said = [m.content for m in model.prompts[-1] if m.role.value == "assistant"]
        assert "Your refund went out today." in said[-1], "people's reply is the bot's context"
        assert "refund id R-77" in said[-1] and "not shown to the user" in said[-1]


async def test_an_agent_reply_hands_the_conversation_off_first(
    redis_url: str, key_prefix: str, desk: Desk
) -> None:
    model = Answers()
    async with staffed(redis_url, key_prefix, desk, model) as (_, api):
        await say(api, "t-3", "hello")
        note = await api.post(
            "/v1/conversations/t-3/agent-messages", json={"text": "VIP", "note": True}
        )
        assert note.status_code == 201
        assert (await api.get("/v1/conversations/t-3/handoff")).json()["handed_off"] is False
        reply = await api.post(
            "/v1/conversations/t-3/agent-messages", json={"text": "Hi, I'm Ana."}
        )
        assert reply.status_code == 201 and reply.json()["name"] is None
        assert (await desk.next("conversation.handoff"))["reason"] == "staff"
        state = (await api.get("/v1/conversations/t-3/handoff")).json()
        assert state["handed_off"] is True and state["reason"] == "staff"
        asked = len(model.prompts)
        assert (await say(api, "t-3", "hi Ana"))["text"] == ""
        assert len(model.prompts) == asked


async def test_handoff_routes_are_scoped_and_say_what_is_wrong(
    redis_url: str, key_prefix: str, desk: Desk
) -> None:
    async with staffed(redis_url, key_prefix, desk, Answers()) as (channel, api):
        await say(api, "mine", "hello")
        async with client(channel, await channel.key("globex")) as theirs:
            for method, path, body in (
                ("GET", "handoff", None),
                ("POST", "handoff", None),
                ("DELETE", "handoff", None),
                ("POST", "agent-messages", {"text": "I'm staff, trust me"}),
            ):
                for who, conversation in ((theirs, "mine"), (api, "never-started")):
                    answer = await who.request(
                        method, f"/v1/conversations/{conversation}/{path}", json=body
                    )
                    assert answer.status_code == 404, (method, path, answer.text)
                    assert answer.json()["error"]["code"] == "not_found"
            assert await history(theirs, "mine") == []
        async with client(channel) as anonymous:
            assert (await anonymous.post("/v1/conversations/mine/handoff")).status_code == 401
            answer = await anonymous.post(
                "/v1/conversations/mine/agent-messages", json={"text": "x"}
            )
            assert answer.status_code == 401

        not_yet = await api.delete("/v1/conversations/mine/handoff")
        assert not_yet.status_code == 409 and not_yet.json()["error"]["code"] == "not_handed_off"
        assert (await api.post("/v1/conversations/mine/handoff")).status_code == 201
        again = await api.post("/v1/conversations/mine/handoff")
        assert again.status_code == 409 and again.json()["error"]["code"] == "already_handed_off"
        for body, status, code in (
            ({"text": ""}, 422, "invalid_request"),
            ({"text": "hi", "note": "yes"}, 422, "invalid_request"),
            ({"text": "hi", "name": ""}, 422, "invalid_request"),
            ({"text": "hi", "role": "assistant"}, 422, "invalid_request"),
            ({"name": "Sam"}, 422, "invalid_request"),
        ):
            answer = await api.post("/v1/conversations/mine/agent-messages", json=body)
            assert answer.status_code == status, (body, answer.text)
            assert answer.json()["error"]["code"] == code and answer.json()["error"]["message"]
        malformed = await api.post(
            "/v1/conversations/mine/agent-messages",
            content=b'{"text": "hi"',
            headers={"Content-Type": "application/json"},
        )
        assert malformed.status_code == 400
        assert (await api.get("/v1/conversations/mine/messages?after=-1")).status_code == 422
        assert await history(api, "mine") == [("user", "hello"), ("assistant", "You said: hello")]


async def test_without_people_the_handoff_routes_say_so(redis_url: str, key_prefix: str) -> None:
    async with (
        http_channel(redis_url, key_prefix, Answers()) as channel,
        client(channel, await channel.key()) as api,
    ):
        await say(api, "c", "hello")
        answer = await api.post("/v1/conversations/c/handoff")
        assert answer.status_code == 409
        assert answer.json()["error"]["code"] == "handoff_unavailable"
        assert (await say(api, "c", "talk to a human"))["text"] == "You said: talk to a human"
