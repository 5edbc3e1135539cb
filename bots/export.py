"""`python -m bots export`: the conversations opted in to collection, as JSONL for training.

Each line is one conversation in the OpenAI chat format, `{"messages": [...]}`, starting
with the conversation's persona (or CHAT_SYSTEM_PROMPT) as the system message when there
is one, its turns worded as the model read them (`bots.core.transcripts`). A conversation
is exported when its channel's admin said `/collect on`, or, when nobody said either, if
CHAT_COLLECT_DEFAULT is true.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TextIO

from bots.core.ports import ContextStore, StoreUnavailable
from bots.core.prompt import system_of
from bots.core.transcripts import Window, transcript
from bots.runtime import context_store, open_redis
from bots.settings import BotSettings, SettingsError, load_settings
from bots.store.embedded import EmbeddedRedisError


@dataclass(frozen=True)
class Selection:
    """Which conversations and turns to export, and how.

    `conversation` is a key as Parley prints it (`telegram/-1001234`); a channel's key
    selects its members' own conversations too.
    """

    platform: str | None = None
    conversation: str | None = None
    window: Window = field(default_factory=Window)
    redact: bool = False
    people: bool = True  # the turns of handoffs: people's replies and the messages to them


async def export(
    store: ContextStore,
    out: TextIO,
    selection: Selection,
    *,
    collect_default: bool,
    system_prompt: str,
) -> int:
    """Write the selected, opted-in conversations as JSONL; return how many were written."""
    written = 0
    async for key in store.conversations():
        if selection.platform and key.platform != selection.platform:
            continue
        if selection.conversation and selection.conversation not in (
            str(key),
            str(key.channel_key),
        ):
            continue
        channel = await store.state(key.channel_key)
        if not (collect_default if channel.collect is None else channel.collect):
            continue
        messages = transcript(
            await store.load(key),
            system=system_of(channel.persona, system_prompt),
            window=selection.window,
            redact=selection.redact,
            people=selection.people,
        )
        if messages is not None:
            out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
            written += 1
    return written


def day(text: str) -> float:
    """Read a YYYY-MM-DD date as the epoch second its day starts, in UTC."""
    return datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.UTC).timestamp()


async def run_export(settings: BotSettings, selection: Selection, out: TextIO) -> int:
    async with open_redis(settings.redis, settings.data_dir) as redis:
        store = context_store(redis, settings.redis)
        return await export(
            store,
            out,
            selection,
            collect_default=settings.chat.collect_default,
            system_prompt=settings.chat.system_prompt,
        )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bots export", description=__doc__)
    parser.add_argument("--out", default="-", help="JSONL file to write (default: stdout)")
    parser.add_argument("--platform", help="only this platform: console, discord, telegram...")
    parser.add_argument("--conversation", help="only this conversation, e.g. telegram/-1001234")
    parser.add_argument("--since", type=day, help="only turns from this day on (YYYY-MM-DD, UTC)")
    parser.add_argument("--until", type=day, help="only turns before this day (YYYY-MM-DD, UTC)")
    parser.add_argument("--redact", action="store_true", help="replace members' names and mentions")
    parser.add_argument(
        "--without-people",
        action="store_true",
        help="leave out handoffs: people's replies and notes, and the user's messages to them",
    )
    args = parser.parse_args(argv)
    selection = Selection(
        args.platform,
        args.conversation,
        Window(args.since, args.until),
        args.redact,
        people=not args.without_people,
    )
    try:
        settings = load_settings(BotSettings)
        path = args.out
        with nullcontext(sys.stdout) if path == "-" else open(path, "w", encoding="utf-8") as out:
            written = asyncio.run(run_export(settings, selection, out))
    except (SettingsError, EmbeddedRedisError, StoreUnavailable, OSError) as error:
        print(f"parley: {error}", file=sys.stderr)
        return 1
    print(f"exported {written} conversations", file=sys.stderr)
    return 0
