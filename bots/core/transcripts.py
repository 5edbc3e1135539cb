"""Stored conversations as fine-tuning data: OpenAI chat messages, optionally redacted.

Turns are rendered as prompts render them (`bots.core.prompt`, and joined where roles would
not alternate, as `bots.core.context.alternating` does for prompts), special-token
spellings broken as in prompts, so a model is trained on what it would read.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from bots.core.context import alternating
from bots.core.models import Role, Turn
from bots.core.prompt import system_message
from bots.core.text import neutralize, special_token_pattern

# Platform mention forms: Discord's <@123>, <@!123>, <@&123>; Telegram's @username.
_MENTION = re.compile(r"<@[!&]?\d+>|@\w{3,}")
# The common chat templates' special tokens. Prompts also break the served tokenizer's
# own (its /tokenizer_info list), which an export, made without the model, cannot know.
_MARKERS = special_token_pattern()


@dataclass(frozen=True, slots=True)
class Window:
    """Which turns to export: written at or after `since`, before `until` (epoch seconds)."""

    since: float | None = None
    until: float | None = None

    def holds(self, turn: Turn) -> bool:
        return (self.since is None or turn.at >= self.since) and (
            self.until is None or turn.at < self.until
        )


def transcript(
    turns: Sequence[Turn],
    *,
    system: str = "",
    window: Window = Window(),
    redact: bool = False,
    people: bool = True,
) -> list[dict[str, str]] | None:
    """Render a conversation as chat messages; None when it holds no answered message.

    The messages start with a user turn and end with an answer. Group members are named
    as the model saw them ("Ada: hi"); with `redact`, names become "User 1", "User 2"...
    in order of appearance, everywhere in the text, and mentions become "@user". Without
    `people`, the turns of a handoff (people's replies and notes, and the user's messages
    to them) are left out.
    """
    kept = [t for t in turns if window.holds(t) and (people or t.people is None)]
    while kept and kept[0].role is not Role.USER:
        kept.pop(0)
    while kept and kept[-1].role is not Role.ASSISTANT:
        kept.pop()
    if not kept:
        return None
    aliases: dict[str, str] = {}
    if redact:
        for name in dict.fromkeys(t.name for t in kept if t.name):
            alias = f"User {len(set(aliases.values())) + 1}"
            # Each part of a name too ("Ada" of "Ada Lovelace"): better too much than a leak.
            for part in [name, *(p for p in name.split() if len(p) >= 3)]:
                aliases.setdefault(part, alias)

    def model_text(text: str) -> str:
        return neutralize(text, _MARKERS)

    def turn_text(text: str) -> str:
        return model_text(_redacted(text, aliases) if redact else text)

    history = [entry.message for entry in alternating(kept, turn_text)]  # as prompts join them
    messages = [*system_message(system, model_text), *history]
    return [{"role": m.role.value, "content": m.content} for m in messages]


def _redacted(text: str, aliases: dict[str, str]) -> str:
    text = _MENTION.sub("@user", text)
    for name in sorted(aliases, key=len, reverse=True):  # "Ada Lovelace" before "Ada"
        text = re.sub(rf"(?<!\w){re.escape(name)}(?!\w)", aliases[name], text)
    return text
