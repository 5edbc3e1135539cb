"""The Chatwoot agent bot end to end: the real `python -m bots chatwoot` process, a fake
Chatwoot speaking its webhooks and Application API, a fake model, and real Redis."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from bots.core.models import People, Role
from bots.platforms.chatwoot.events import conversation_key
from bots.store.redis import RedisContextStore
from tests.conftest import free_port, start_bots
from tests.fake_chatwoot import FakeChatwoot, rails_json
from tests.fake_openai import FakeOpenAI, Reply

ANSWER = "Restart the router, then wait a minute."


@pytest.fixture
async def model() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI([Reply(ANSWER)]) as fake:
        yield fake


@pytest.fixture
async def chatwoot() -> AsyncIterator[FakeChatwoot]:
    async with FakeChatwoot() as fake:
        yield fake


def bot_env(
    chatwoot: FakeChatwoot, model: FakeOpenAI, redis_url: str, prefix: str, tmp: Path, port: int
) -> dict[str, str]:
    return {
        **os.environ,
        "LLM_BASE_URL": model.base_url,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": prefix,
        "DATA_DIR": str(tmp),
        "CHATWOOT_URL": chatwoot.base_url,
        "CHATWOOT_BOT_TOKEN": chatwoot.token,
        "CHATWOOT_WEBHOOK_SECRET": chatwoot.secret or "",
        "CHATWOOT_ACCOUNTS": "1",
        "CHATWOOT_PORT": str(port),
        "CHATWOOT_RETRY_MAX_SECONDS": "0.2",
        "CHATWOOT_CONSUMER": "replica-1",
        "OPS_PORT": "0",
    }


@asynccontextmanager
async def agent_bot(env: dict[str, str]) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run `python -m bots chatwoot` until it has announced its address; kill it if still up."""
    process = await start_bots("chatwoot", env=env)
    assert process.stderr is not None
    drained: asyncio.Task[bytes] | None = None
    try:
        banner = await asyncio.wait_for(process.stderr.readline(), 60)
        assert b"Chatwoot agent bot on http://127.0.0.1:" in banner, banner
        drained = asyncio.create_task(process.stderr.read())  # a full pipe would block it
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if drained is not None:
            log = (await drained).decode()
            assert "Traceback" not in log, log


@pytest.fixture
def env(
    chatwoot: FakeChatwoot, model: FakeOpenAI, redis_url: str, key_prefix: str, tmp_path: Path
) -> dict[str, str]:
    port = free_port()
    chatwoot.bot_url = f"http://127.0.0.1:{port}/chatwoot"
    return bot_env(chatwoot, model, redis_url, key_prefix, tmp_path, port)


def prompt_of(model: FakeOpenAI, index: int = -1) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = model.completions()[index].body["messages"]
    return messages


async def test_customers_are_answered_people_take_over_and_give_it_back(
    chatwoot: FakeChatwoot, model: FakeOpenAI, env: dict[str, str], store: RedisContextStore
) -> None:
    account = chatwoot.add_account()
    inbox = chatwoot.add_inbox(account)
    team = chatwoot.add_team(account)
    chat = chatwoot.add_conversation(inbox)
    key = conversation_key(account.id, chat.display_id)
    env["CHATWOOT_HANDOFF_TEAM"] = str(team.id)
    async with agent_bot(env):
        await chatwoot.customer_says(chat, "my router blinks red")
        await chatwoot.wait_for(lambda: len(chatwoot.bot_replies(chat)) == 1)
        assert chatwoot.bot_replies(chat)[0].content == ANSWER
        assert chatwoot.typing(chat) == ["on", "off"]

        # The customer asks for a person: told once, the conversation opens for the team.
        await chatwoot.customer_says(chat, "I want to talk to a human")
        await chatwoot.wait_for(lambda: chatwoot.status_of(chat) == "open")
        await chatwoot.wait_for(lambda: len(chatwoot.bot_replies(chat)) == 2)
        assert "A person will answer here" in (chatwoot.bot_replies(chat)[1].content or "")
        await chatwoot.wait_for(lambda: [a.team for a in chatwoot.assignments] == [team])

        # People talk; the bot stores it all and says nothing.
        await chatwoot.customer_says(chat, "it is the X2 model")
        await chatwoot.agent_says(chat, "Hold the reset button for ten seconds.")
        await chatwoot.agent_note(chat, "known firmware bug on the X2")

        # Back to pending: the bot answers again (events of a conversation are handled in
        # order, so by then it has stored what people said), reading all of it.
        await chatwoot.set_status(chat, "pending")
        await chatwoot.customer_says(chat, "that worked, thanks")
        await chatwoot.wait_for(lambda: len(chatwoot.bot_replies(chat)) == 3)
        assert len(model.completions()) == 2  # the hand-off and people's part cost none
        read = "\n".join(m["content"] for m in prompt_of(model))
        assert "it is the X2 model" in read
        assert "Hold the reset button for ten seconds." in read
        assert "known firmware bug on the X2" in read
        turns = await store.load(key)
        assert [(t.role, t.people) for t in turns[2:]] == [
            (Role.USER, People.ASKED),
            (Role.USER, People.ASKED),
            (Role.ASSISTANT, People.REPLY),
            (Role.ASSISTANT, People.NOTE),
            (Role.USER, None),
            (Role.ASSISTANT, None),
        ]
        assert turns[4].name == "Alex"
    assert len(chatwoot.posted) == 3  # nothing posted twice


async def test_forged_stale_and_foreign_webhooks_are_refused(
    chatwoot: FakeChatwoot, model: FakeOpenAI, env: dict[str, str]
) -> None:
    account = chatwoot.add_account()
    other = chatwoot.add_account("Other")
    chat = chatwoot.add_conversation(chatwoot.add_inbox(account))
    foreign = chatwoot.add_conversation(chatwoot.add_inbox(other))
    async with agent_bot(env):
        await chatwoot.customer_says(foreign, "hello from another account")
        await chatwoot.settled()
        # Refused (and, as Chatwoot does with a bot that fails, opened for its people).
        refused = chatwoot.deliveries_for(foreign)
        assert [(d.event, d.status) for d in refused] == [
            ("message_created", 403),
            ("conversation_opened", 403),
        ]
        message = refused[0].payload
        forged = {**message, "account": {"id": account.id, "name": "Acme"}}
        assert await chatwoot.send_raw(forged, secret="not-the-secret") == 401
        assert await chatwoot.send_raw(forged, sign=False) == 401
        stale = {"X-Chatwoot-Timestamp": "1000000000"}
        assert await chatwoot.send_raw(forged, headers=stale) == 401
        assert await chatwoot.send_raw(b"{not json") == 400
        assert await chatwoot.send_raw(rails_json({"event": "message_created"})) == 400
        # A delivery Chatwoot sends again is handled once.
        await chatwoot.customer_says(chat, "hi")
        await chatwoot.wait_for(lambda: len(chatwoot.bot_replies(chat)) == 1)
        again = chatwoot.deliveries_for(chat, "message_created")[0].payload
        assert await chatwoot.send_raw(again) == 200
    assert len(chatwoot.bot_replies(chat)) == 1
    assert len(model.completions()) == 1


async def test_an_outage_then_a_restart_lose_no_reply_and_post_none_twice(
    chatwoot: FakeChatwoot, model: FakeOpenAI, env: dict[str, str]
) -> None:
    inbox = chatwoot.add_inbox(chatwoot.add_account())
    chats = [chatwoot.add_conversation(inbox, f"Customer {n}") for n in range(6)]
    chatwoot.down()
    async with agent_bot(env) as bot:
        for chat in chats[:3]:
            await chatwoot.customer_says(chat, "hello?")
        await chatwoot.wait_for(lambda: chatwoot.refused >= 6, within=90)  # retried, refused
        bot.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(bot.wait(), 90) == 0
    assert chatwoot.posted == []
    async with agent_bot(env):  # the same replica, restarted; Chatwoot still down
        for chat in chats[3:]:
            await chatwoot.customer_says(chat, "hello?")
        refused = chatwoot.refused
        await chatwoot.wait_for(lambda: chatwoot.refused >= refused + 3, within=90)
        chatwoot.up()
        await chatwoot.wait_for(lambda: len(chatwoot.posted) == 6, within=90)
        await asyncio.sleep(0)  # nothing further is due; a duplicate would be a bug below
    assert sorted(len(chatwoot.bot_replies(chat)) for chat in chats) == [1] * 6
    assert all(chatwoot.bot_replies(chat)[0].content == ANSWER for chat in chats)
