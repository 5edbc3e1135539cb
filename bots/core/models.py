"""Small value types the core and every adapter share."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Literal


class Role(enum.StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


@dataclass(frozen=True, slots=True)
class ConversationKey:
    """Identify one conversation: a platform, a channel or chat, an optional thread, and
    a user when each member of a group has a conversation of their own."""

    platform: str
    channel: str
    thread: str | None = None
    user: str | None = None

    def __post_init__(self) -> None:
        if not self.platform or not self.channel:
            raise ValueError("a conversation key needs a platform and a channel")

    def __str__(self) -> str:
        parts = [self.platform, self.channel]
        if self.thread is not None:
            parts.append(self.thread)
        if self.user is not None:
            parts.append(f"user={self.user}")
        return "/".join(parts)

    @property
    def channel_key(self) -> ConversationKey:
        """The key of the whole channel (or thread) this conversation is held in."""
        return ConversationKey(self.platform, self.channel, self.thread)


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
    seq: int | None = None  # the store numbers a conversation's turns 1, 2, 3... as it records them
    # A user turn answered from a knowledge base: its name and the ids of the passages the
    # model read with the turn (the text stays in the index, not in the history).
    knowledge: str | None = None
    passages: tuple[str, ...] = ()
    # Turns of a conversation handed to people (see `bots.core.handoff`): a person's reply
    # or private note, or a user's message that people were to answer; None: the bot's.
    people: People | None = None


class People(enum.StrEnum):
    """What a turn of a handed-off conversation is."""

    REPLY = "reply"  # a person's answer to the user (an assistant turn)
    NOTE = "note"  # a private note among the staff, never shown to the user (assistant)
    ASKED = "asked"  # a user's message while people answer (a user turn)


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
    is_admin: bool = False  # may change what the whole conversation shares (persona, reset)
    # The knowledge base the platform answers from here (an HTTP integration's); a
    # channel's own choice (/kb) comes first, the KB_DEFAULT setting last.
    knowledge: str | None = None
    # The wider place the channel belongs to (a Discord server), whose options apply
    # where the channel sets none (/kb server).
    scope: ConversationKey | None = None


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
    MODEL_TIMED_OUT = "model_timed_out"
    STORE_UNAVAILABLE = "store_unavailable"
    RATE_LIMITED = "rate_limited"
    BUDGET_SPENT = "budget_spent"
    QUEUED = "queued"
    KNOWLEDGE_UNAVAILABLE = "knowledge_unavailable"
    HANDED_OFF = "handed_off"
    HANDED_BACK = "handed_back"


@dataclass(frozen=True, slots=True)
class Notice:
    """A message from Parley itself, shown to the user beside or instead of a reply."""

    kind: NoticeKind
    text: str
    retry_after: float | None = None  # for limits: seconds until the user may try again
    # For limits: the text with "{wait}" for the wait, and when the wait ends
    # (time.monotonic()), so that a notice shown later says the wait left then.
    wording: str | None = None
    until: float | None = None


@dataclass(frozen=True, slots=True)
class Passage:
    """A piece of an operator's document, as the knowledge base keeps it."""

    id: str
    doc: str  # the document's id in its knowledge base (its path there)
    titles: tuple[str, ...]  # the title path: the document's title, then its headings
    link: str | None  # where a reader finds it: a URL, or the file's path and anchor
    text: str


@dataclass(frozen=True, slots=True)
class Hit:
    """A passage found for a question, with its relevance (cosine similarity, -1 to 1)."""

    passage: Passage
    score: float


@dataclass(frozen=True, slots=True)
class Source:
    """Where an answer comes from, as users are shown it."""

    title: str
    link: str | None


@dataclass(frozen=True, slots=True)
class Sources:
    """The sources of the answer just streamed; comes last in its reply."""

    items: tuple[Source, ...]


@dataclass(frozen=True, slots=True)
class Quiet:
    """The bot stays quiet on purpose: people answer this conversation (a reply's only part)."""


ReplyPart = str | Notice | Sources | Quiet
"""What a reply stream yields: model text deltas, notices from Parley, and the sources."""


@dataclass(frozen=True, slots=True)
class ConversationState:
    """What Parley keeps about a conversation beside its turns.

    Persona, adapter and collection are the channel's options, set by its admins.
    `window_start` numbers the oldest turn the model still sees: the prompt's history
    starts there, so it stays the same from turn to turn until the next trim (see
    `bots.core.context`).
    """

    persona: str | None = None
    window_start: int | None = None
    adapter: str | None = None  # the fine-tuned adapter answering here; None: the base model
    collect: bool | None = None  # transcripts may be exported for training; None: the default
    knowledge: str | None = None  # the knowledge base answering here, "off"; None: the default


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer of a rate limiter: go ahead, or wait `retry_after` seconds."""

    admitted: bool
    retry_after: float = 0.0
    reason: str = ""  # which limit refused: "user", "conversation" or "budget"


ADMITTED = Admission(True)


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """A user's tokens today and their daily budget (None: no budget)."""

    used: int
    budget: int | None
    resets_in: float  # seconds until the day (UTC) turns


ChannelOption = Literal["persona", "adapter", "collect", "kb"]
"""The options an admin sets for a channel, stored as text ("on"/"off" for collect)."""

KNOWLEDGE_OFF = "off"
"""The `kb` option's value that turns the default knowledge base off in a channel."""


@dataclass(frozen=True, slots=True)
class Integration:
    """Who an API key of the HTTP channel belongs to, and its own message quota."""

    name: str
    key_id: str  # the first characters of the key's hash: safe to log and to show
    created: float
    messages: int | None = None  # None: the channel's default quota
    window: float | None = None
    knowledge: str | None = None  # the knowledge base its conversations answer from


class HandoffReason(enum.StrEnum):
    """Why a conversation went to people."""

    ASKED = "asked"  # the user wrote /human or a hand-off phrase
    NO_ANSWER = "no_answer"  # the knowledge base had nothing for the question
    FAILURES = "failures"  # several messages in a row went unanswered
    STAFF = "staff"  # staff took it (Chatwoot's status, the API)


@dataclass(frozen=True, slots=True)
class Handoff:
    """A conversation handed to people: why, and since when (epoch seconds)."""

    reason: HandoffReason
    since: float = field(default_factory=time.time)
