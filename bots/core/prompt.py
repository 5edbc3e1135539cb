"""How stored turns read to the model: one rendering for prompts and training transcripts.

A group member's turn reads "Ada: hi"; other turns read as their content. Prompt
building (`bots.core.context`) and the export of transcripts (`bots.core.transcripts`)
both render through here, so a model is trained on conversations exactly as it read them.
"""

from __future__ import annotations

from collections.abc import Callable

from bots.core.models import People, PromptMessage, Role, Turn

Clean = Callable[[str], str]
"""What is done to every text the model reads (see `text.neutralize`)."""


def plain(text: str) -> str:
    """Leave a text as it is."""
    return text


def system_of(persona: str | None, default: str) -> str:
    """The system prompt a conversation is answered with: its persona, or the default."""
    return persona if persona is not None else default


def system_message(system: str, clean: Clean = plain) -> list[PromptMessage]:
    """Render the system prompt (a persona or the default): none when it is empty."""
    return [PromptMessage(Role.SYSTEM, clean(system))] if system else []


def render(turn: Turn, clean: Clean = plain) -> PromptMessage:
    """Render a stored turn as the message the model reads, naming group authors.

    A person's reply reads as the assistant's (the support side answered); a staff note
    reads as the assistant's too, marked as never shown to the user.
    """
    if turn.role is Role.USER and turn.name:
        return PromptMessage(turn.role, clean(f"{turn.name}: {turn.content}"))
    if turn.people is People.NOTE:
        by = f" from {turn.name}" if turn.name else ""
        return PromptMessage(
            turn.role, clean(f"[Staff note{by}, not shown to the user] {turn.content}")
        )
    return PromptMessage(turn.role, clean(turn.content))
