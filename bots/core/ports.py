"""The interfaces the core needs from the outside world, and the errors they raise."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from bots.core.models import (
    Admission,
    ChannelOption,
    Chunk,
    ConversationKey,
    ConversationState,
    Handoff,
    HandoffReason,
    Hit,
    Integration,
    NoticeKind,
    Passage,
    PromptMessage,
    TokenUsage,
    Turn,
)


class StoreUnavailable(Exception):
    """The context store could not be reached or answered with an error."""


class LineLost(StoreUnavailable):
    """A write came from a holder whose turn in the conversation's line had already ended
    (its lease lapsed and another replica took over): refused, so nothing is interleaved."""


class ModelError(Exception):
    """Base of the errors a chat model raises."""


class ModelUnavailable(ModelError):
    """The model server could not be reached, timed out, or is overloaded."""


class ModelTimedOut(ModelUnavailable):
    """The model server took longer than the read timeout to send the next piece."""


class ModelRejected(ModelError):
    """The model server refused the request (bad key, unknown model, invalid request)."""


class PromptTooLong(ModelRejected):
    """The model server refused a prompt as longer than its context."""


class AdapterUnknown(ModelRejected):
    """The server does not serve the adapter asked for."""


class ModelInterrupted(ModelError):
    """The reply stream broke after it had started."""


class KnowledgeUnavailable(Exception):
    """The knowledge base could not be searched: its embedding server or its index failed."""


class KnowledgeMissing(KnowledgeUnavailable):
    """No knowledge base of that name exists."""


class ContextStore(Protocol):
    async def load(self, key: ConversationKey) -> list[Turn]:
        """Return the conversation's stored turns, oldest first."""
        ...

    async def append(
        self,
        key: ConversationKey,
        *turns: Turn,
        replacing: int | None = None,
        window_start: int | None = None,
    ) -> bool:
        """Append turns atomically: all of them are stored and numbered, or none.

        `replacing` first drops the user turn of that number and every turn after it (a
        regenerated answer replaces the old exchange); if that turn is gone, nothing is
        stored and the result is False. `window_start` moves the conversation's context
        window in the same step.
        """
        ...

    async def state(self, key: ConversationKey) -> ConversationState:
        """Return what is kept beside the turns: persona, context window start."""
        ...

    async def set_option(
        self, key: ConversationKey, option: ChannelOption, value: str | None
    ) -> None:
        """Set a channel option (persona, adapter, collect), or clear it with None."""
        ...

    def conversations(self) -> AsyncIterator[ConversationKey]:
        """Yield the key of every stored conversation, once each, in no order."""
        ...

    async def clear(self, key: ConversationKey) -> None:
        """Forget the conversation's turns and window; its persona stays."""
        ...

    async def edit(self, key: ConversationKey, message_id: str, content: str) -> bool:
        """Replace the text of the turn that came from a platform message; False if none."""
        ...

    async def remove(self, key: ConversationKey, message_id: str) -> bool:
        """Delete the turn that came from a platform message, and the answer to it (the
        assistant turns right after a user's); False if none."""
        ...


class Place(Protocol):
    """A place in one conversation's line, taken on arrival."""

    async def wait(self) -> None:
        """Return when everyone before has left (`StoreUnavailable` if it cannot tell)."""
        ...

    def leave(self) -> None:
        """Give the turn to the next in line; idempotent, also before the turn came."""
        ...


class Line(Protocol):
    """Each conversation's messages answered one at a time, in arrival order, whichever
    process took them; different conversations run concurrently."""

    def join(self, key: ConversationKey) -> Place:
        """Take a place now, synchronously: the order of calls is the order of arrival."""
        ...

    def stop(self, key: ConversationKey) -> None:
        """Ask whoever serves `key` now, in any process, to end the reply under way."""
        ...

    def on_stop(self, stop: Callable[[ConversationKey], None]) -> None:
        """Call `stop` when a reply served here is asked to end."""
        ...

    def __len__(self) -> int:
        """Conversations with a place taken in this process."""
        ...


class HandoffStore(Protocol):
    """Which conversations are handed to people, kept beside their turns for every replica."""

    async def hand_off(self, key: ConversationKey, handoff: Handoff) -> bool:
        """Hand the conversation to people; False when it already was (nothing changes)."""
        ...

    async def handoff(
        self, key: ConversationKey, idle_seconds: float, *, touch: bool = False
    ) -> tuple[Handoff | None, Handoff | None]:
        """The conversation's handoff, and the one that just lapsed.

        A handoff with no activity for `idle_seconds` (0: never) lapses: it is ended here,
        in the same step, and returned second. `touch` counts this as activity.
        """
        ...

    async def hand_back(self, key: ConversationKey) -> Handoff | None:
        """End the conversation's handoff; the one ended, or None when there was none."""
        ...


class StaffDesk(Protocol):
    """Where people answer handed-off conversations of one platform (a staff chat, a help
    desk, a webhook): told when one opens, of each message in it, and when it ends."""

    async def opened(self, key: ConversationKey, handoff: Handoff, recent: Sequence[Turn]) -> None:
        """A conversation was handed to people; `recent` is its latest context."""
        ...

    async def relayed(self, key: ConversationKey, turn: Turn) -> None:
        """The user wrote while people answer."""
        ...

    async def returned(self, key: ConversationKey, by: str) -> None:
        """The bot answers again: handed back by `by` ("staff", "user", "idle"...)."""
        ...


class ChatModel(Protocol):
    def stream(
        self, prompt: Sequence[PromptMessage], *, session: str, adapter: str | None = None
    ) -> AsyncIterator[Chunk]:
        """Stream the reply to a prompt; `session` names the conversation for cache affinity.

        `adapter` asks for a fine-tuned adapter the server serves, instead of the base model.
        """
        ...

    async def adapters(self) -> list[str]:
        """List the names of the fine-tuned adapters the server serves for this model."""
        ...

    async def context_window(self) -> int:
        """Return the model's maximum context length in tokens."""
        ...

    async def count_tokens(self, prompt: Sequence[PromptMessage]) -> int:
        """Count the tokens the model reads for this prompt, chat template included."""
        ...

    async def special_tokens(self) -> Sequence[str]:
        """List the texts the served tokenizer reads as special tokens (may be empty)."""
        ...


class Embedder(Protocol):
    """The embedding model of the knowledge base."""

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed each text as one unit-length vector; raises KnowledgeUnavailable."""
        ...

    async def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Count the embedding model's tokens of each text (special tokens left out)."""
        ...


class KnowledgeIndex(Protocol):
    """Knowledge bases' passages, searched by their vectors."""

    async def search(
        self,
        name: str,
        vectors: Sequence[Sequence[float]],
        count: int,
        discounts: Sequence[float] = (),
    ) -> list[Hit]:
        """The `count` passages closest to any of `vectors`, best first, scored by cosine
        less the discount given for that vector (a passage's best score counts).

        Raises KnowledgeMissing for an unknown knowledge base.
        """
        ...

    async def passages(self, name: str, ids: Sequence[str]) -> dict[str, Passage]:
        """The passages of these ids still in the knowledge base, by id."""
        ...

    async def exists(self, name: str) -> bool:
        """Whether a knowledge base of that name exists."""
        ...

    async def names(self) -> list[str]:
        """The names of every knowledge base, sorted."""
        ...


class Limiter(Protocol):
    async def admit(self, user: str | None, conversation: ConversationKey) -> Admission:
        """Count one message against the user's and the conversation's limits, if admitted."""
        ...

    async def charge(self, user: str, tokens: int) -> None:
        """Add tokens to the user's total for today."""
        ...

    async def usage(self, user: str) -> TokenUsage:
        """Return the user's tokens today and daily budget."""
        ...


class ApiKeys(Protocol):
    """The HTTP channel's API keys, looked up by the key a request presents."""

    async def find(self, key: str) -> Integration | None:
        """The integration a key belongs to, or None for an unknown or revoked key."""
        ...


class Observer(Protocol):
    """What the service reports as it works, for metrics (all calls must be cheap)."""

    def received(self, platform: str) -> None:
        """A message or command arrived."""
        ...

    def first_token(self, platform: str, seconds: float) -> None:
        """The model's first text, `seconds` after the message arrived."""
        ...

    def noticed(self, platform: str, kind: NoticeKind) -> None:
        """Parley told the user something (a limit, a failure, a wait)."""
        ...

    def finished(self, platform: str, seconds: float, *, answered: bool) -> None:
        """The answer ended after `seconds`; `answered`: some text reached the user."""
        ...

    def model_calls(self, platform: str, change: int) -> None:
        """Model requests in flight went up (1) or down (-1)."""
        ...

    def platform_limited(self, platform: str) -> None:
        """The platform's API answered a delivery call with a 429."""
        ...

    def handed_off(self, platform: str, reason: HandoffReason) -> None:
        """A conversation went to people."""
        ...

    def handed_back(self, platform: str, by: str) -> None:
        """A handed-off conversation came back to the bot."""
        ...


class NoObserver:
    """An Observer that keeps nothing."""

    def received(self, platform: str) -> None:
        pass

    def first_token(self, platform: str, seconds: float) -> None:
        pass

    def noticed(self, platform: str, kind: NoticeKind) -> None:
        pass

    def finished(self, platform: str, seconds: float, *, answered: bool) -> None:
        pass

    def model_calls(self, platform: str, change: int) -> None:
        pass

    def platform_limited(self, platform: str) -> None:
        pass

    def handed_off(self, platform: str, reason: HandoffReason) -> None:
        pass

    def handed_back(self, platform: str, by: str) -> None:
        pass
