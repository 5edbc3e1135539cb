"""The interfaces the core needs from the outside world, and the errors they raise."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from bots.core.models import Chunk, ConversationKey, PromptMessage, Turn


class StoreUnavailable(Exception):
    """The context store could not be reached or answered with an error."""


class ModelError(Exception):
    """Base of the errors a chat model raises."""


class ModelUnavailable(ModelError):
    """The model server could not be reached, timed out, or is overloaded."""


class ModelRejected(ModelError):
    """The model server refused the request (bad key, unknown model, invalid request)."""


class ModelInterrupted(ModelError):
    """The reply stream broke after it had started."""


class ContextStore(Protocol):
    async def load(self, key: ConversationKey) -> list[Turn]:
        """Return the conversation's stored turns, oldest first."""
        ...

    async def append(self, key: ConversationKey, *turns: Turn) -> None:
        """Append turns atomically: all of them are stored, or none."""
        ...

    async def clear(self, key: ConversationKey) -> None:
        """Forget the conversation."""
        ...

    async def edit(self, key: ConversationKey, message_id: str, content: str) -> bool:
        """Replace the text of the turn that came from a platform message; False if none."""
        ...

    async def remove(self, key: ConversationKey, message_id: str) -> bool:
        """Delete the turn that came from a platform message; False if none."""
        ...


class ChatModel(Protocol):
    def stream(self, prompt: Sequence[PromptMessage], *, session: str) -> AsyncIterator[Chunk]:
        """Stream the reply to a prompt; `session` names the conversation for cache affinity."""
        ...

    async def context_window(self) -> int:
        """Return the model's maximum context length in tokens."""
        ...
