"""The one conversation flow: load context, ask the model, stream the reply, record it."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Hashable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from bots.core.models import (
    ConversationKey,
    Incoming,
    Notice,
    NoticeKind,
    PromptMessage,
    ReplyPart,
    Role,
    Turn,
    Usage,
)
from bots.core.ports import (
    ChatModel,
    ContextStore,
    ModelError,
    ModelInterrupted,
    ModelRejected,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

HELP_TEXT = (
    "Talk to me and I answer, remembering this conversation.\n"
    "/reset  forget this conversation and start over\n"
    "/help   show this help"
)

RESET_TEXT = "Conversation forgotten; let's start over."

# Tokens a chat template adds around each message (role markers, separators).
MESSAGE_OVERHEAD_TOKENS = 8
SHORTENED_SUFFIX = " [...]"

_NOTICES = {
    NoticeKind.EMPTY_MESSAGE: "Send me some text and I'll answer.",
    NoticeKind.MODEL_UNAVAILABLE: (
        "The model is unavailable right now. Your message is kept; try again in a moment."
    ),
    NoticeKind.MODEL_REJECTED: (
        "The model server refused the request; an operator should check its configuration. "
        "Your message is kept."
    ),
    NoticeKind.REPLY_INTERRUPTED: (
        "The reply was cut off by the model server. Your message is kept; try again."
    ),
    NoticeKind.STORE_UNAVAILABLE: (
        "I can't reach my conversation memory right now; try again in a moment."
    ),
}


def notice(kind: NoticeKind, text: str | None = None) -> Notice:
    """Build the user-facing notice of a kind, with its standard text unless one is given."""
    return Notice(kind, text if text is not None else _NOTICES[kind])


_LONE_SURROGATES = re.compile("[\ud800-\udfff]")


def sanitize(text: str) -> str:
    """Replace lone surrogates (undecodable input) with U+FFFD so the text encodes as UTF-8."""
    return _LONE_SURROGATES.sub("\ufffd", text)


def estimate_tokens(text: str) -> int:
    """Bound a text's token count from above.

    A byte-level BPE tokenizer (GPT-2 family, SmolLM2, Llama 3, Qwen) never emits more
    tokens than the text has UTF-8 bytes, so the byte count is a safe upper bound.
    """
    return len(text.encode("utf-8")) + MESSAGE_OVERHEAD_TOKENS


def shorten_to_tokens(text: str, tokens: int) -> str:
    """Cut `text` so that `estimate_tokens` of the result is at most `tokens`."""
    budget = tokens - MESSAGE_OVERHEAD_TOKENS - len(SHORTENED_SUFFIX)
    if budget <= 0:
        return ""
    cut = text.encode("utf-8")[:budget].decode("utf-8", "ignore")
    return cut + SHORTENED_SUFFIX


@dataclass(frozen=True, slots=True)
class Prompt:
    messages: list[PromptMessage]
    shortened: bool


def render(turn: Turn) -> PromptMessage:
    """Turn a stored turn into the message the model sees, naming group authors."""
    if turn.role is Role.USER and turn.name:
        return PromptMessage(turn.role, f"{turn.name}: {turn.content}")
    return PromptMessage(turn.role, turn.content)


def build_prompt(
    system_prompt: str, history: Sequence[Turn], new: Turn, *, budget_tokens: int
) -> Prompt:
    """Fit the system prompt, the newest history and the new turn into a token budget.

    The new message is shortened when it cannot fit on its own; history is dropped
    oldest first.
    """
    system = [PromptMessage(Role.SYSTEM, system_prompt)] if system_prompt else []
    left = budget_tokens - sum(estimate_tokens(m.content) for m in system)
    current = render(new)
    shortened = estimate_tokens(current.content) > left
    if shortened:
        current = PromptMessage(current.role, shorten_to_tokens(current.content, left))
    left -= estimate_tokens(current.content)
    kept: list[PromptMessage] = []
    for turn in reversed(history):
        message = render(turn)
        left -= estimate_tokens(message.content)
        if left < 0:
            break
        kept.append(message)
    kept.reverse()
    return Prompt([*system, *kept, current], shortened)


class Place:
    """A place in one conversation's line: its turn comes when everyone before has left.

    Leaving is idempotent, and happens when the holder is garbage collected too, so a
    reply stream that was created but never consumed cannot block the conversation.
    """

    def __init__(self, before: asyncio.Future[None] | None, done: asyncio.Future[None]) -> None:
        self._before = before
        self.done = done

    async def wait(self) -> None:
        if self._before is not None:
            await asyncio.shield(self._before)

    def leave(self) -> None:
        if self.done.done():
            return
        if self._before is None or self._before.done():
            self.done.set_result(None)
        else:  # left before its turn: the next in line still waits for the one before
            self._before.add_done_callback(lambda _: self.leave())

    def __del__(self) -> None:
        if not self.done.get_loop().is_closed():
            self.leave()


class ArrivalLine:
    """Serve each key's holders strictly in the order they arrived; keys run concurrently."""

    def __init__(self) -> None:
        self._last: dict[Hashable, asyncio.Future[None]] = {}

    def __len__(self) -> int:
        return len(self._last)

    def join(self, key: Hashable) -> Place:
        """Take a place now, synchronously: call order is arrival order."""
        done = asyncio.get_running_loop().create_future()
        place = Place(self._last.get(key), done)
        self._last[key] = done
        done.add_done_callback(lambda _: self._forget(key, done))
        return place

    def _forget(self, key: Hashable, done: asyncio.Future[None]) -> None:
        if self._last.get(key) is done:
            del self._last[key]

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        place = self.join(key)
        try:
            await place.wait()
            yield
        finally:
            place.leave()


class ConversationService:
    """Answer incoming messages with the model, keeping each conversation's context.

    Messages of one conversation are answered one at a time, in arrival order;
    different conversations proceed concurrently.
    """

    def __init__(
        self,
        store: ContextStore,
        model: ChatModel,
        *,
        system_prompt: str = "",
        reply_tokens: int = 512,
    ) -> None:
        self._store = store
        self._model = model
        self._system_prompt = system_prompt
        self._reply_tokens = reply_tokens
        self._line = ArrivalLine()

    @property
    def active_conversations(self) -> int:
        return len(self._line)

    async def reset(self, key: ConversationKey) -> str:
        """Forget a conversation; return what to tell the user, a notice if the store is down."""
        try:
            async with self._line.hold(key):
                await self._store.clear(key)
        except StoreUnavailable:
            return notice(NoticeKind.STORE_UNAVAILABLE).text
        return RESET_TEXT

    async def edit(self, key: ConversationKey, message_id: str, text: str) -> bool:
        """Update the stored turn of an edited user message; False if it is not in context."""
        async with self._line.hold(key):
            return await self._store.edit(key, message_id, sanitize(text))

    async def forget(self, key: ConversationKey, message_id: str) -> bool:
        """Remove a deleted user message from the context; False if it is not there."""
        async with self._line.hold(key):
            return await self._store.remove(key, message_id)

    async def history(self, key: ConversationKey) -> list[Turn]:
        """Return a conversation's stored turns, oldest first."""
        return await self._store.load(key)

    def respond(self, incoming: Incoming) -> AsyncGenerator[ReplyPart, None]:
        """Stream the reply to a message: model text deltas, and notices from Parley.

        The message takes its place in its conversation's line when this is called, so
        replies come in the order of the calls. Consume the stream to the end or close it
        (`contextlib.aclosing`): the conversation waits for it while it is open.
        """
        return self._respond(incoming, self._line.join(incoming.key))

    async def _respond(self, incoming: Incoming, place: Place) -> AsyncGenerator[ReplyPart, None]:
        try:
            await place.wait()
            async for part in self._answer(incoming):
                yield part
        finally:
            place.leave()

    async def _answer(self, incoming: Incoming) -> AsyncGenerator[ReplyPart, None]:
        text = sanitize(incoming.text)
        if not text.strip():
            yield notice(NoticeKind.EMPTY_MESSAGE)
            return
        author = incoming.author
        name = sanitize(author.display_name) if incoming.in_group and author else None
        user_turn = Turn(Role.USER, text, name=name, message_id=incoming.message_id)
        try:
            history = await self._store.load(incoming.key)
            budget = await self._model.context_window() - self._reply_tokens
        except StoreUnavailable:
            log.warning("context store unavailable", extra={"conversation": str(incoming.key)})
            yield notice(NoticeKind.STORE_UNAVAILABLE)
            return
        except ModelError as error:
            await self._keep_user_turn(incoming.key, user_turn)
            yield self._model_notice(error)
            return
        prompt = build_prompt(self._system_prompt, history, user_turn, budget_tokens=budget)
        if prompt.shortened:
            yield notice(
                NoticeKind.MESSAGE_SHORTENED,
                "Your message is longer than I can read at once; I read only its beginning.",
            )
        async for part in self._stream_and_record(incoming.key, user_turn, prompt):
            yield part

    async def _stream_and_record(
        self, key: ConversationKey, user_turn: Turn, prompt: Prompt
    ) -> AsyncGenerator[ReplyPart, None]:
        pieces: list[str] = []
        usage: Usage | None = None
        try:
            async for chunk in self._model.stream(prompt.messages, session=str(key)):
                if chunk.text:
                    pieces.append(chunk.text)
                    yield chunk.text
                if chunk.usage is not None:
                    usage = chunk.usage
        except ModelError as error:
            await self._keep_user_turn(key, user_turn)
            yield self._model_notice(error)
            return
        reply = Turn(Role.ASSISTANT, "".join(pieces), usage=usage)
        try:
            await self._store.append(key, user_turn, reply)
        except StoreUnavailable:
            log.warning("reply not recorded: store unavailable", extra={"conversation": str(key)})
            yield notice(
                NoticeKind.STORE_UNAVAILABLE,
                "I couldn't save this exchange, so I may not remember it.",
            )

    async def _keep_user_turn(self, key: ConversationKey, user_turn: Turn) -> None:
        try:
            await self._store.append(key, user_turn)
        except StoreUnavailable:
            log.warning(
                "user turn not recorded: store unavailable", extra={"conversation": str(key)}
            )

    @staticmethod
    def _model_notice(error: ModelError) -> Notice:
        log.warning("model call failed: %s", error)
        if isinstance(error, ModelRejected):
            return notice(NoticeKind.MODEL_REJECTED)
        if isinstance(error, ModelInterrupted):
            return notice(NoticeKind.REPLY_INTERRUPTED)
        return notice(NoticeKind.MODEL_UNAVAILABLE)
