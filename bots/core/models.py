"""Small value types the core and every adapter share."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class Role(enum.StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


@dataclass(frozen=True, slots=True)
class ConversationKey:
    """Identify one conversation: a platform, a channel or chat, and an optional thread."""

    platform: str
    channel: str
    thread: str | None = None

    def __post_init__(self) -> None:
        if not self.platform or not self.channel:
            raise ValueError("a conversation key needs a platform and a channel")

    def __str__(self) -> str:
        parts = [self.platform, self.channel]
        if self.thread is not None:
            parts.append(self.thread)
        return "/".join(parts)


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts the model server reported for one request."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Turn:
    """One stored message of a conversation."""

    role: Role
    content: str
    name: str | None = None
    at: float = field(default_factory=time.time)
    usage: Usage | None = None
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class Author:
    id: str
    display_name: str


@dataclass(frozen=True, slots=True)
class Incoming:
    """A message from a user, already translated out of its platform's types."""

    key: ConversationKey
    text: str
    author: Author | None = None
    in_group: bool = False
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class PromptMessage:
    """One message as the model receives it."""

    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a streamed model reply: text, or the final usage report."""

    text: str = ""
    usage: Usage | None = None


class NoticeKind(enum.StrEnum):
    EMPTY_MESSAGE = "empty_message"
    MESSAGE_SHORTENED = "message_shortened"
    MODEL_UNAVAILABLE = "model_unavailable"
    MODEL_REJECTED = "model_rejected"
    REPLY_INTERRUPTED = "reply_interrupted"
    STORE_UNAVAILABLE = "store_unavailable"


@dataclass(frozen=True, slots=True)
class Notice:
    """A message from Parley itself, shown to the user beside or instead of a reply."""

    kind: NoticeKind
    text: str


ReplyPart = str | Notice
"""What a reply stream yields: model text deltas, and notices from Parley."""
