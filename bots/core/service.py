"""The one conversation flow: commands, limits, context, the model's reply, the record."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from bots.core.commands import HELP_TEXT, Command, parse_command
from bots.core.context import SHORTENED_SUFFIX, ContextFitter, Fitted
from bots.core.line import ArrivalLine, Place
from bots.core.models import (
    Admission,
    ConversationKey,
    Incoming,
    Notice,
    NoticeKind,
    ReplyPart,
    Role,
    Turn,
    Usage,
)
from bots.core.ports import (
    AdapterUnknown,
    ChatModel,
    ContextStore,
    Limiter,
    ModelError,
    ModelInterrupted,
    ModelRejected,
    NoObserver,
    Observer,
    StoreUnavailable,
)
from bots.core.text import clean_name, is_blank, neutralize, sanitize, special_token_pattern

log = logging.getLogger(__name__)

RESET_TEXT = "Conversation forgotten; let's start over."

_NOTICES = {
    NoticeKind.EMPTY_MESSAGE: "Send me some text and I'll answer.",
    NoticeKind.MESSAGE_SHORTENED: (
        "Your message is longer than I can read at once; I read only its beginning."
    ),
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
    NoticeKind.QUEUED: "Many people are talking to me right now; you're in line.",
}


def notice(kind: NoticeKind, text: str | None = None, retry_after: float | None = None) -> Notice:
    """Build the user-facing notice of a kind, with its standard text unless one is given."""
    return Notice(kind, text if text is not None else _NOTICES[kind], retry_after)


def wait_text(seconds: float) -> str:
    """Say a wait the way people do: "12 s", "3 min", "5 h 20 min"."""
    seconds = max(1, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    hours, minutes = divmod(-(-seconds // 60), 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


def limited_notice(admission: Admission) -> Notice:
    """Tell a refused user which limit they met and when to try again."""
    wait = wait_text(admission.retry_after)
    if admission.reason == "budget":
        text = f"You've used today's tokens; the count starts again in {wait} (midnight UTC)."
        return notice(NoticeKind.BUDGET_SPENT, text, admission.retry_after)
    if admission.reason == "conversation":
        text = f"This conversation is getting more messages than I can answer; try in {wait}."
    else:
        text = f"You're sending messages faster than I can answer; try again in {wait}."
    return notice(NoticeKind.RATE_LIMITED, text, admission.retry_after)


@dataclass(frozen=True, slots=True)
class ChatPolicy:
    """How conversations are held (from the CHAT_*, LLM_REPLY_TOKENS and LIMITS_* settings).

    Args:
        system_prompt: the default system prompt; empty keeps the model's own.
        reply_tokens: room kept in the context for the reply.
        trim_target: share of the budget a prompt keeps after a trim (1.0: sliding window).
        max_message_chars: longer messages are cut here before they are stored.
        max_persona_chars: the longest persona an admin may set.
        per_user_in_groups: in groups, each member has a conversation of their own.
        max_in_flight: model requests at once from this process; more wait in line.
        collect_default: conversations may be exported for training unless an admin says no.
    """

    system_prompt: str = ""
    reply_tokens: int = 512
    trim_target: float = 0.5
    max_message_chars: int = 16_000
    max_persona_chars: int = 4_000
    per_user_in_groups: bool = False
    max_in_flight: int = 64
    collect_default: bool = False


class ConversationService:
    """Answer incoming messages and commands, keeping each conversation's context.

    Messages of one conversation are answered one at a time, in arrival order;
    different conversations proceed concurrently, at most `max_in_flight` model
    requests at once.
    """

    def __init__(
        self,
        store: ContextStore,
        model: ChatModel,
        *,
        limiter: Limiter | None = None,
        policy: ChatPolicy = ChatPolicy(),
        observer: Observer | None = None,
    ) -> None:
        self._store = store
        self._observer: Observer = observer or NoObserver()
        self._model = model
        self._limiter = limiter
        self._policy = policy
        self._fitter = ContextFitter(model.count_tokens, target=policy.trim_target)
        self._line = ArrivalLine()
        self._slots = asyncio.Semaphore(policy.max_in_flight)
        self._markers: re.Pattern[str] | None = None

    @property
    def active_conversations(self) -> int:
        return len(self._line)

    def conversation_of(self, incoming: Incoming) -> ConversationKey:
        """The conversation a message belongs to: its channel's, or in groups its author's."""
        if self._policy.per_user_in_groups and incoming.in_group and incoming.author:
            return dataclasses.replace(incoming.key, user=incoming.author.id)
        return incoming.key

    async def edit(self, edited: Incoming) -> bool:
        """Update the stored turn of an edited message (by its `message_id`); False if none."""
        if edited.message_id is None:
            return False
        key = self.conversation_of(edited)
        async with self._line.hold(key):
            return await self._store.edit(key, edited.message_id, sanitize(edited.text))

    async def forget(self, deleted: Incoming) -> bool:
        """Remove a deleted message (by its `message_id`) from the context; False if none."""
        if deleted.message_id is None:
            return False
        key = self.conversation_of(deleted)
        async with self._line.hold(key):
            return await self._store.remove(key, deleted.message_id)

    async def history(self, key: ConversationKey) -> list[Turn]:
        """Return a conversation's stored turns, oldest first."""
        return await self._store.load(key)

    async def reset(self, key: ConversationKey) -> None:
        """Forget a conversation's turns (its persona stays), after the replies in line."""
        async with self._line.hold(key):
            await self._store.clear(key)

    def respond(self, incoming: Incoming) -> AsyncGenerator[ReplyPart, None]:
        """Stream the answer to a message or command: text, and notices from Parley.

        The message takes its place in its conversation's line when this is called, so
        replies come in the order of the calls. Consume the stream to the end or close it
        (`contextlib.aclosing`): the conversation waits for it while it is open.
        """
        key = self.conversation_of(incoming)
        return self._respond(incoming, key, self._line.join(key))

    async def _respond(
        self, incoming: Incoming, key: ConversationKey, place: Place
    ) -> AsyncGenerator[ReplyPart, None]:
        platform, observer = key.platform, self._observer
        started = time.monotonic()
        observer.received(platform)
        answered = False
        try:
            await place.wait()
            text = sanitize(incoming.text)
            command = parse_command(text)
            if command is not None:
                parts = self._command(command, incoming, key)
            elif is_blank(text):
                parts = _one(notice(NoticeKind.EMPTY_MESSAGE))
            else:
                turn, cut = self._user_turn(incoming, text)
                parts = self._reply(incoming, key, turn, cut=cut)
            from_model = command is None or command.name == "retry"
            async for part in parts:
                if isinstance(part, Notice):
                    observer.noticed(platform, part.kind)
                elif part:
                    if from_model and not answered:
                        observer.first_token(platform, time.monotonic() - started)
                    answered = True
                yield part
        finally:
            place.leave()
            seconds = time.monotonic() - started
            observer.finished(platform, seconds, answered=answered)
            log.info(
                "message %s in %.3f s",
                "answered" if answered else "not answered",
                seconds,
                extra={"conversation": str(key)},
            )

    def _user_turn(self, incoming: Incoming, text: str) -> tuple[Turn, bool]:
        """The turn to store: the text cut at `max_message_chars` (and whether it was), the
        author named in groups."""
        limit = self._policy.max_message_chars
        cut = len(text) > limit
        if cut:
            text = text[:limit] + SHORTENED_SUFFIX
        author = incoming.author
        name = clean_name(author.display_name) if incoming.in_group and author else None
        return Turn(Role.USER, text, name=name or None, message_id=incoming.message_id), cut

    async def _command(
        self, command: Command, incoming: Incoming, key: ConversationKey
    ) -> AsyncGenerator[ReplyPart, None]:
        if command.name == "retry":
            async for part in self._reply(incoming, key, None):
                yield part
            return
        try:
            if command.name == "help":
                yield HELP_TEXT
            elif command.name == "reset":
                yield await self._reset(incoming, key)
            elif command.name == "usage":
                yield await self._usage(incoming)
            elif command.name == "persona":
                yield await self._persona(command.args, incoming, key)
            elif command.name == "adapter":
                yield await self._adapter(command.args, incoming, key)
            elif command.name == "collect":
                yield await self._collect(command.args, incoming, key)
            else:
                yield f"I don't know /{command.name}.\n{HELP_TEXT}"
        except StoreUnavailable:
            yield notice(NoticeKind.STORE_UNAVAILABLE)
        except ModelError as error:
            yield self._model_notice(error)

    async def _reset(self, incoming: Incoming, key: ConversationKey) -> str:
        shared = incoming.in_group and key.user is None
        if shared and not incoming.is_admin:
            return "Only admins can reset a conversation the whole group shares."
        await self._store.clear(key)
        return RESET_TEXT

    async def _usage(self, incoming: Incoming) -> str:
        user = _user_of(incoming)
        if self._limiter is None or user is None:
            return "Token use isn't counted here."
        usage = await self._limiter.usage(user)
        if usage.budget is None:
            return f"You have used {usage.used:,} tokens today (UTC); there is no daily limit."
        return (
            f"You have used {usage.used:,} of your {usage.budget:,} tokens today; the count "
            f"starts again in {wait_text(usage.resets_in)} (midnight UTC)."
        )

    async def _persona(self, args: str, incoming: Incoming, key: ConversationKey) -> str:
        action, _, text = args.replace("\n", " ", 1).partition(" ")
        channel = key.channel_key
        if action in ("", "show"):
            persona = (await self._store.state(channel)).persona
            if persona is None:
                return "No persona is set here; I use the default system prompt."
            return f"My persona here:\n{persona}"
        if action not in ("set", "clear"):
            return "Use /persona, /persona set <text> or /persona clear."
        if incoming.in_group and not incoming.is_admin:
            return "Only admins can change my persona in a group."
        if action == "clear":
            await self._store.set_option(channel, "persona", None)
            return "Persona cleared; I use the default system prompt again."
        persona = text.strip()
        if not persona:
            return "Say who I should be: /persona set <text>."
        if len(persona) > self._policy.max_persona_chars:
            return (
                f"A persona can be at most {self._policy.max_persona_chars:,} characters; "
                f"that one has {len(persona):,}."
            )
        await self._store.set_option(channel, "persona", persona)
        return "Persona set; it applies from the next message."

    async def _adapter(self, args: str, incoming: Incoming, key: ConversationKey) -> str:
        channel, name = key.channel_key, args.strip()
        if not name:
            current = (await self._store.state(channel)).adapter
            answering = f"the adapter {current}" if current else "the base model"
            return f"I answer here with {answering}. {_served(await self._model.adapters())}"
        if incoming.in_group and not incoming.is_admin:
            return "Only admins can choose the adapter in a group."
        if name == "off":
            await self._store.set_option(channel, "adapter", None)
            return "I answer here with the base model again."
        if name not in (served := await self._model.adapters()):
            return f"No adapter is served as {name}. {_served(served)}"
        await self._store.set_option(channel, "adapter", name)
        return f"I answer here with the adapter {name} from the next message."

    async def _collect(self, args: str, incoming: Incoming, key: ConversationKey) -> str:
        channel, choice = key.channel_key, args.strip().lower()
        if choice in ("on", "off"):
            if incoming.in_group and not incoming.is_admin:
                return "Only admins can change whether a group's conversation is collected."
            await self._store.set_option(channel, "collect", choice)
        elif choice:
            return "Use /collect, /collect on or /collect off."
        chosen = (await self._store.state(channel)).collect
        collected = self._policy.collect_default if chosen is None else chosen
        how = "by default" if chosen is None else "as an admin chose"
        if collected:
            return f"This conversation may be exported to train me ({how})."
        return f"This conversation is not exported for training ({how})."

    async def _reply(
        self, incoming: Incoming, key: ConversationKey, turn: Turn | None, *, cut: bool = False
    ) -> AsyncGenerator[ReplyPart, None]:
        """Answer `turn`, or with None answer the last user turn again (/retry)."""
        user = _user_of(incoming)
        replacing: int | None = None
        try:
            if self._limiter is not None:
                admission = await self._limiter.admit(user, key)
                if not admission.admitted:
                    yield limited_notice(admission)
                    return
            history = await self._store.load(key)
            state = await self._store.state(key)
            channel = state if key == key.channel_key else await self._store.state(key.channel_key)
            if turn is None:
                last = _last_user_turn(history)
                if last is None:
                    yield "There is no message of yours to answer again yet."
                    return
                turn, history, replacing = history[last], history[:last], history[last].seq
            adapter = channel.adapter
            budget = await self._model.context_window() - self._policy.reply_tokens
            markers = await self._special_tokens()
            persona = channel.persona
            fitted = await self._fitter.fit(
                persona if persona is not None else self._policy.system_prompt,
                history,
                turn,
                window_start=state.window_start,
                budget=budget,
                clean=lambda text: neutralize(text, markers),
            )
        except StoreUnavailable:
            log.warning("context store unavailable", extra={"conversation": str(key)})
            yield notice(NoticeKind.STORE_UNAVAILABLE)
            return
        except ModelError as error:
            if turn is not None and replacing is None:
                await self._keep_user_turn(key, turn)
            yield self._model_notice(error)
            return
        if fitted.shortened or cut:
            yield notice(NoticeKind.MESSAGE_SHORTENED)
        async for part in self._stream_and_record(key, turn, fitted, replacing, user, adapter):
            yield part

    async def _stream_and_record(
        self,
        key: ConversationKey,
        user_turn: Turn,
        fitted: Fitted,
        replacing: int | None,
        user: str | None,
        adapter: str | None,
    ) -> AsyncGenerator[ReplyPart, None]:
        pieces: list[str] = []
        usage: Usage | None = None
        if self._slots.locked():
            yield notice(NoticeKind.QUEUED)
        async with self._slots:
            self._observer.model_calls(key.platform, 1)
            try:
                parts = self._model.stream(fitted.messages, session=str(key), adapter=adapter)
                async for chunk in parts:
                    if chunk.text:
                        pieces.append(chunk.text)
                        yield chunk.text
                    if chunk.usage is not None:
                        usage = chunk.usage
            except ModelError as error:
                if replacing is None:
                    await self._keep_user_turn(key, user_turn)
                yield self._model_notice(error)
                return
            finally:
                self._observer.model_calls(key.platform, -1)
        reply = Turn(Role.ASSISTANT, "".join(pieces), usage=usage)
        try:
            await self._store.append(
                key, user_turn, reply, replacing=replacing, window_start=fitted.window_start
            )
        except StoreUnavailable:
            log.warning("reply not recorded: store unavailable", extra={"conversation": str(key)})
            yield notice(
                NoticeKind.STORE_UNAVAILABLE,
                "I couldn't save this exchange, so I may not remember it.",
            )
        if self._limiter is not None and user is not None and usage is not None:
            try:
                await self._limiter.charge(user, usage.prompt_tokens + usage.completion_tokens)
            except StoreUnavailable:
                log.warning("token use not counted: store unavailable")

    async def _special_tokens(self) -> re.Pattern[str]:
        """The spellings of the model's special tokens, asked of the model once."""
        if self._markers is None:
            self._markers = special_token_pattern(await self._model.special_tokens())
        return self._markers

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
        if isinstance(error, AdapterUnknown):
            text = "The adapter chosen here is not served any more; an admin can pick another."
            return notice(NoticeKind.MODEL_REJECTED, text + " Your message is kept.")
        if isinstance(error, ModelRejected):
            return notice(NoticeKind.MODEL_REJECTED)
        if isinstance(error, ModelInterrupted):
            return notice(NoticeKind.REPLY_INTERRUPTED)
        return notice(NoticeKind.MODEL_UNAVAILABLE)


def _user_of(incoming: Incoming) -> str | None:
    """Name the sender for limits and budgets: ids are only unique within a platform."""
    return f"{incoming.key.platform}:{incoming.author.id}" if incoming.author else None


def _served(adapters: list[str]) -> str:
    return f"Served adapters: {', '.join(adapters) or 'none'}."


def _last_user_turn(history: Sequence[Turn]) -> int | None:
    for index in range(len(history) - 1, -1, -1):
        if history[index].role is Role.USER and history[index].seq is not None:
            return index
    return None


async def _one(part: ReplyPart) -> AsyncGenerator[ReplyPart, None]:
    yield part
