"""Transcripts for fine-tuning: what is exported, how, and only when opted in."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from pathlib import Path

from bots.core.models import ConversationKey, Role, Turn
from bots.core.transcripts import Window, transcript
from bots.export import Selection, export
from bots.store.redis import RedisContextStore
from tests.fake_openai import FakeOpenAI, Reply
from tests.test_console_process import chat, console_env

ROOM = ConversationKey("telegram", "-100")


def turns() -> list[Turn]:
    return [
        Turn(Role.ASSISTANT, "left over from before", at=1.0),
        Turn(Role.USER, "hi, ask <@123> or @bob_smith", name="Ada Lovelace", at=2.0),
        Turn(Role.ASSISTANT, "Hello Ada Lovelace!", at=3.0),
        Turn(Role.USER, "Ada here again", name="Ada Lovelace", at=4.0),
        Turn(Role.ASSISTANT, "Welcome back.", at=5.0),
        Turn(Role.USER, "unanswered", name="Bob", at=6.0),
    ]


def test_a_transcript_starts_with_a_user_and_ends_with_an_answer() -> None:
    messages = transcript(turns(), system="Be kind.")
    assert messages == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Ada Lovelace: hi, ask <@123> or @bob_smith"},
        {"role": "assistant", "content": "Hello Ada Lovelace!"},
        {"role": "user", "content": "Ada Lovelace: Ada here again"},
        {"role": "assistant", "content": "Welcome back."},
    ]


def test_redaction_replaces_names_everywhere_and_mentions() -> None:
    messages = transcript(turns(), redact=True)
    assert messages is not None
    text = json.dumps(messages)
    assert "Ada" not in text and "bob_smith" not in text and "123" not in text
    assert messages[0]["content"] == "User 1: hi, ask @user or @user"
    assert messages[1]["content"] == "Hello User 1!"


def test_a_date_window_keeps_only_its_turns() -> None:
    messages = transcript(turns(), window=Window(since=3.5, until=5.5))
    assert [m["content"] for m in messages or []] == [
        "Ada Lovelace: Ada here again",
        "Welcome back.",
    ]
    assert transcript(turns(), window=Window(since=10.0)) is None


async def test_export_takes_opted_in_conversations_once_with_their_persona(
    store: RedisContextStore,
) -> None:
    other = ConversationKey("discord", "1/2")
    member = ConversationKey("telegram", "-100", user="7")
    for key in (ROOM, other, member):
        await store.append(key, Turn(Role.USER, f"q {key}"), Turn(Role.ASSISTANT, "a"))
    await store.set_option(ROOM, "collect", "on")
    await store.set_option(ROOM, "persona", "Be a pirate.")
    await store.set_option(other, "collect", "off")
    out = io.StringIO()
    written = await export(store, out, Selection(), collect_default=True, system_prompt="")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert written == len(lines) == 2, "the room and its member's own conversation"
    assert sorted(line["messages"][1]["content"] for line in lines) == [
        f"q {ROOM}",
        f"q {member}",
    ]
    assert all(
        line["messages"][0] == {"role": "system", "content": "Be a pirate."} for line in lines
    )
    only = io.StringIO()
    chosen = Selection(conversation=str(member))
    assert await export(store, only, chosen, collect_default=False, system_prompt="") == 1


async def test_conversations_held_through_the_console_are_exported_only_when_opted_in(
    tmp_path: Path,
) -> None:
    env = console_env("", tmp_path / "data")
    async with FakeOpenAI([Reply("Noted.")]) as server:
        env["LLM_BASE_URL"] = server.base_url
        opted = {**env, "CONSOLE_CONVERSATION": "opted"}
        await chat(opted, tmp_path, "/collect on", "first question", "second question")
        await chat({**env, "CONSOLE_CONVERSATION": "private"}, tmp_path, "a secret")
        await chat(opted, tmp_path, "third question")
    out = tmp_path / "train.jsonl"
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "bots", "export", "--out", str(out), "--platform", "console"],
        cwd=tmp_path, env={**os.environ, **env}, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    assert err.decode().strip() == "exported 1 conversations"
    (line,) = out.read_text().splitlines()
    messages = json.loads(line)["messages"]
    questions = ["first question", "second question", "third question"]
    assert messages == [
        message
        for question in questions
        for message in (
            {"role": "user", "content": question},
            {"role": "assistant", "content": "Noted."},
        )
    ]
    assert "secret" not in out.read_text()
