"""The console chat, driven line by line."""

from __future__ import annotations

import io
from collections.abc import Iterator

from bots.core.models import Author, ConversationKey, Role
from bots.core.service import ConversationService
from bots.platforms.console import ConsoleChat, ReadLine
from tests.fakes import MemoryStore, ScriptedModel

KEY = ConversationKey("console", "me")


def lines(*typed: str) -> ReadLine:
    queue: Iterator[str | None] = iter(typed)

    async def read() -> str | None:
        return next(queue, None)

    return read


async def run(store: MemoryStore, *typed: str) -> str:
    out = io.StringIO()
    service = ConversationService(store, ScriptedModel())
    await ConsoleChat(
        service, KEY, author=Author("me", "me"), read_line=lines(*typed), out=out
    ).run()
    return out.getvalue()


async def test_chat_streams_replies_and_remembers() -> None:
    store = MemoryStore()
    screen = await run(store, "hello\n", "again\n")
    assert "parley> echo 1: hello\n" in screen and "parley> echo 3: again\n" in screen
    assert [t.role for t in store.turns[KEY]] == [Role.USER, Role.ASSISTANT] * 2


async def test_reset_help_unknown_and_quit() -> None:
    store = MemoryStore()
    screen = await run(store, "hi\n", "/reset\n", "/help\n", "/nope\n", "/quit\n", "unreached\n")
    assert "Conversation forgotten" in screen
    assert screen.count("/reset    forget this conversation") == 2, "help, and help after /nope"
    assert "/quit   leave" in screen
    assert "I don't know /nope" in screen
    assert not store.turns[KEY], "reset cleared, and nothing after /quit was sent"


async def test_persona_retry_and_usage_work_in_the_console() -> None:
    store = MemoryStore()
    screen = await run(store, "/persona set You are terse.\n", "hi\n", "/retry\n", "/usage\n")
    assert "Persona set" in screen and store.options[KEY]["persona"] == "You are terse."
    assert screen.count("parley> echo 2: hi") == 2, "answered, then answered again"
    assert len(store.turns[KEY]) == 2 and "Token use isn't counted here." in screen


async def test_store_outage_is_reported_and_the_chat_goes_on() -> None:
    store = MemoryStore()
    store.down = True
    screen = await run(store, "hi\n", "/reset\n")
    assert screen.count("can't reach my conversation memory") == 2
