"""Hand-written fakes of the core's ports, and helpers to read answers, for unit tests."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from bots.core.knowledge import words
from bots.core.models import (
    ADMITTED,
    Admission,
    ChannelOption,
    Chunk,
    ConversationKey,
    ConversationState,
    Handoff,
    Incoming,
    Notice,
    NoticeKind,
    PromptMessage,
    ReplyPart,
    Role,
    TokenUsage,
    Turn,
    Usage,
)
from bots.core.ports import KnowledgeUnavailable, ModelError, StoreUnavailable
from bots.core.service import ConversationService


class MemoryStore:
    """ContextStore in a dict; `down = True` makes every call fail like a lost Redis."""

    def __init__(self) -> None:
        self.turns: dict[ConversationKey, list[Turn]] = defaultdict(list)
        self.windows: dict[ConversationKey, int] = {}
        self.counters: dict[ConversationKey, int] = defaultdict(int)
        self.options: dict[ConversationKey, dict[str, str]] = defaultdict(dict)
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("memory store is down")

    async def load(self, key: ConversationKey) -> list[Turn]:
        self._check()
        return list(self.turns[key])

    async def append(
        self,
        key: ConversationKey,
        *turns: Turn,
        replacing: int | None = None,
        window_start: int | None = None,
    ) -> bool:
        self._check()
        stored = self.turns[key]
        if replacing is not None:
            found = [i for i, t in enumerate(stored) if t.role is Role.USER and t.seq == replacing]
            if not found:
                return False
            del stored[found[-1] :]
        for turn in turns:
            self.counters[key] += 1
            stored.append(dataclasses.replace(turn, seq=self.counters[key]))
        if window_start is not None:
            self.windows[key] = window_start
        return True

    async def state(self, key: ConversationKey) -> ConversationState:
        self._check()
        options = self.options[key]
        collect = options.get("collect")
        return ConversationState(
            options.get("persona"),
            self.windows.get(key),
            options.get("adapter"),
            None if collect is None else collect == "on",
            options.get("kb"),
        )

    async def set_option(
        self, key: ConversationKey, option: ChannelOption, value: str | None
    ) -> None:
        self._check()
        if value is None:
            self.options[key].pop(option, None)
        else:
            self.options[key][option] = value

    async def conversations(self) -> AsyncIterator[ConversationKey]:
        self._check()
        for key, turns in list(self.turns.items()):
            if turns:
                yield key

    async def clear(self, key: ConversationKey) -> None:
        self._check()
        self.turns.pop(key, None)
        self.windows.pop(key, None)

    async def edit(self, key: ConversationKey, message_id: str, content: str) -> bool:
        self._check()
        for index, turn in enumerate(self.turns[key]):
            if turn.message_id == message_id:
                self.turns[key][index] = dataclasses.replace(turn, content=content)
                return True
        return False

    async def remove(self, key: ConversationKey, message_id: str) -> bool:
        self._check()
        turns = self.turns[key]
        found = next((i for i, t in enumerate(turns) if t.message_id == message_id), None)
        if found is None:
            return False
        end = found + 1
        if turns[found].role is Role.USER:  # its answer goes with it
            while end < len(turns) and turns[end].role is Role.ASSISTANT:
                end += 1
        del turns[found:end]
        return True


@dataclass
class ScriptedModel:
    """ChatModel that answers each prompt with `reply(prompt)` split into words.

    `fail_with` raises after `fail_after` chunks; `gate` holds a session's stream until set;
    `started` is set once a prompt has reached the model.
    """

    window: int = 4096
    delay: float = 0.0
    fail_with: ModelError | None = None
    fail_after: int = 0
    prompts: list[list[PromptMessage]] = field(default_factory=list)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    counted: int = 0
    served_adapters: list[str] = field(default_factory=list)
    asked_adapters: list[str | None] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    def reply(self, prompt: Sequence[PromptMessage]) -> str:
        return f"echo {len(prompt)}: {prompt[-1].content}"

    async def context_window(self) -> int:
        return self.window

    async def special_tokens(self) -> Sequence[str]:
        return ["<|im_start|>", "<|im_end|>", "<repo_name>"]

    async def adapters(self) -> list[str]:
        return list(self.served_adapters)

    async def count_tokens(self, prompt: Sequence[PromptMessage]) -> int:
        """Count like a tokenizer of one token per word, plus the template's markers."""
        self.counted += 1
        return sum(len(m.content.split()) + 4 for m in prompt) + 3

    async def stream(
        self, prompt: Sequence[PromptMessage], *, session: str, adapter: str | None = None
    ) -> AsyncIterator[Chunk]:
        self.prompts.append(list(prompt))
        self.asked_adapters.append(adapter)
        self.started.set()
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


class MemoryLimiter:
    """Limiter counting in dicts: `limit` messages per user, `budget` tokens a day."""

    def __init__(self, *, limit: int | None = None, budget: int | None = None) -> None:
        self.limit = limit
        self.budget = budget
        self.admitted: dict[str, int] = defaultdict(int)
        self.tokens: dict[str, int] = defaultdict(int)

    async def admit(self, user: str | None, conversation: ConversationKey) -> Admission:
        if user is None:
            return ADMITTED
        if self.budget is not None and self.tokens[user] >= self.budget:
            return Admission(False, 3600.0, "budget")
        if self.limit is not None and self.admitted[user] >= self.limit:
            return Admission(False, 30.0, "user")
        self.admitted[user] += 1
        return ADMITTED

    async def charge(self, user: str, tokens: int) -> None:
        self.tokens[user] += tokens

    async def usage(self, user: str) -> TokenUsage:
        return TokenUsage(self.tokens[user], self.budget, 3600.0)


async def collect(service: ConversationService, incoming: Incoming) -> list[ReplyPart]:
    """Read a whole answer: its text pieces and notices."""
    async with aclosing(service.respond(incoming)) as parts:
        return [part async for part in parts]


def text_of(parts: list[ReplyPart]) -> str:
    return "".join(p for p in parts if isinstance(p, str))


def notices(parts: list[ReplyPart]) -> list[NoticeKind]:
    return [p.kind for p in parts if isinstance(p, Notice)]


@dataclass
class WordEmbedder:
    """Embedder whose vectors are the hashed words of a text: shared words, close vectors.

    `fail_after` embedding calls succeed, then each raises KnowledgeUnavailable (None: never).
    """

    dimension: int = 64
    fail_after: int | None = None
    calls: int = 0
    embedded: list[str] = field(default_factory=list)
    model: str = "word-hash"

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KnowledgeUnavailable("embedding server failed: connection refused")
        self.calls += 1
        self.embedded += texts
        return [self._vector(text) for text in texts]

    async def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(text.split()) for text in texts]

    def _vector(self, text: str) -> list[float]:
        vector = [0.0] * self.dimension
        for word in words(text):
            digest = hashlib.sha256(word.encode()).digest()
            vector[digest[0] % self.dimension] += 1.0 if digest[1] % 2 else -1.0
        norm = math.sqrt(sum(x * x for x in vector)) or 1.0
        return [x / norm for x in vector] if any(vector) else [1.0] + [0.0] * (self.dimension - 1)


@dataclass
class MemoryDesk:
    """StaffDesk keeping what it was told: ("opened", key, reason, recent contents), ("relayed",
    key, text), ("returned", key, by). `down = True` makes every call fail."""

    events: list[tuple[object, ...]] = field(default_factory=list)
    down: bool = False

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("the staff desk is down")

    async def opened(self, key: ConversationKey, handoff: Handoff, recent: Sequence[Turn]) -> None:
        self._check()
        self.events.append(("opened", key, handoff.reason, [t.content for t in recent]))

    async def relayed(self, key: ConversationKey, turn: Turn) -> None:
        self._check()
        self.events.append(("relayed", key, turn.content))

    async def returned(self, key: ConversationKey, by: str) -> None:
        self._check()
        self.events.append(("returned", key, by))
