"""Hand-written fakes of the core's ports, for unit tests of the core."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from bots.core.models import Chunk, ConversationKey, PromptMessage, Turn, Usage
from bots.core.ports import ModelError, StoreUnavailable


class MemoryStore:
    """ContextStore in a dict; `down = True` makes every call fail like a lost Redis."""

    def __init__(self) -> None:
        self.turns: dict[ConversationKey, list[Turn]] = defaultdict(list)
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("memory store is down")

    async def load(self, key: ConversationKey) -> list[Turn]:
        self._check()
        return list(self.turns[key])

    async def append(self, key: ConversationKey, *turns: Turn) -> None:
        self._check()
        self.turns[key].extend(turns)

    async def clear(self, key: ConversationKey) -> None:
        self._check()
        self.turns.pop(key, None)

    async def edit(self, key: ConversationKey, message_id: str, content: str) -> bool:
        self._check()
        for index, turn in enumerate(self.turns[key]):
            if turn.message_id == message_id:
                self.turns[key][index] = dataclasses.replace(turn, content=content)
                return True
        return False

    async def remove(self, key: ConversationKey, message_id: str) -> bool:
        self._check()
        kept = [t for t in self.turns[key] if t.message_id != message_id]
        found, self.turns[key] = len(kept) != len(self.turns[key]), kept
        return found


@dataclass
class ScriptedModel:
    """ChatModel that answers each prompt with `reply(prompt)` split into words.

    `fail_with` raises after `fail_after` chunks; `gate` holds a session's stream until set.
    """

    window: int = 4096
    delay: float = 0.0
    fail_with: ModelError | None = None
    fail_after: int = 0
    prompts: list[list[PromptMessage]] = field(default_factory=list)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)

    def reply(self, prompt: Sequence[PromptMessage]) -> str:
        return f"echo {len(prompt)}: {prompt[-1].content}"

    async def context_window(self) -> int:
        return self.window

    async def stream(
        self, prompt: Sequence[PromptMessage], *, session: str
    ) -> AsyncIterator[Chunk]:
        self.prompts.append(list(prompt))
        if session in self.gates:
            await self.gates[session].wait()
        words = self.reply(prompt).split(" ")
        for index, word in enumerate(words):
            if self.fail_with is not None and index == self.fail_after:
                raise self.fail_with
            if self.delay:
                await asyncio.sleep(self.delay)
            yield Chunk(text=word if index == 0 else " " + word)
        yield Chunk(
            usage=Usage(
                prompt_tokens=sum(len(m.content) for m in prompt), completion_tokens=len(words)
            )
        )
