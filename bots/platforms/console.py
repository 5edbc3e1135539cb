"""A local chat in the terminal: type a line, watch the reply stream in."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import TextIO

from bots.core.commands import HELP_TEXT
from bots.core.knowledge import plain_sources
from bots.core.models import Author, ConversationKey, Incoming, Notice, Sources
from bots.core.service import ConversationService

ReadLine = Callable[[], Awaitable[str | None]]

BANNER = "Parley console. Type a message; /help lists commands, /quit or Ctrl-D leaves."
CONSOLE_HELP = HELP_TEXT + "\n/quit   leave (the conversation is kept)"


async def read_stdin_line(prompt: str = "") -> str | None:
    """Read one line from stdin without blocking the event loop; None at end of input.

    A daemon thread does the blocking read, so Ctrl-C or the end of the program never
    waits for it. `input` gives line editing when stdin is a terminal.
    """
    loop = asyncio.get_running_loop()
    line: asyncio.Future[str | None] = loop.create_future()

    def read() -> None:
        try:
            text: str | None = input(prompt) if prompt else sys.stdin.readline() or None
        except EOFError:
            text = None
        loop.call_soon_threadsafe(line.set_result, text)

    threading.Thread(target=read, name="console-input", daemon=True).start()
    return await line


class ConsoleChat:
    """Run a conversation between the terminal's user and the service."""

    def __init__(
        self,
        service: ConversationService,
        key: ConversationKey,
        *,
        author: Author,
        read_line: ReadLine,
        out: TextIO,
    ) -> None:
        self._service = service
        self._key = key
        self._author = author
        self._read_line = read_line
        self._out = out

    async def run(self) -> None:
        self._say(BANNER)
        while (line := await self._read_line()) is not None:
            text = line.rstrip("\r\n")
            command = text.strip().lower()
            if command in ("/quit", "/exit"):
                break
            if command == "/help":
                self._say(CONSOLE_HELP)
            else:
                await self._reply(text)

    async def _reply(self, text: str) -> None:
        """Answer a message or a command; the console's user owns the conversation."""
        incoming = Incoming(self._key, text, author=self._author, is_admin=True)
        self._out.write("parley> ")
        async with aclosing(self._service.respond(incoming)) as parts:
            async for part in parts:
                if isinstance(part, Notice):
                    self._show(part)
                elif isinstance(part, Sources):
                    self._out.write(f"\n{plain_sources(part.items)}")
                elif isinstance(part, str):
                    self._out.write(part)
                    self._out.flush()
        self._out.write("\n")
        self._out.flush()

    def _show(self, message: Notice) -> None:
        self._out.write(f"[{message.text}]")
        self._out.flush()

    def _say(self, text: str) -> None:
        self._out.write(text + "\n")
        self._out.flush()
