"""The one conversation flow: commands, limits, context, the model's reply, the record."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from bots.core.commands import (
    HELP_TEXT,
    RESET_STOPS_REPLY,
    Action,
    Call,
    Command,
    CommandSpec,
    find_command,
    knowledge_here,
    parse_command,
    user_of,
)
from bots.core.context import SHORTENED_SUFFIX, ContextFitter, Fitted
from bots.core.handoff import ALREADY, OFFER, Handoffs
from bots.core.knowledge import Retriever, ground, sources_of
from bots.core.line import ArrivalLine, Stoppable, held
from bots.core.models import (
    ConversationKey,
    ConversationState,
    HandoffReason,
    Incoming,
    Notice,
    NoticeKind,
    Passage,
    People,
    Quiet,
    ReplyPart,
    Role,
    Source,
    Sources,
    Turn,
    Usage,
)
from bots.core.notices import (
    NOT_SAVED,
    knowledge_notice,
    limited_notice,
    model_notice,
    notice,
    shortened_notice,
)
from bots.core.ports import (
    ChatModel,
    ContextStore,
    KnowledgeUnavailable,
    Limiter,
    Line,
    ModelError,
    NoObserver,
    Observer,
    Place,
    PromptTooLong,
    StoreUnavailable,
)
from bots.core.prompt import system_of
from bots.core.reasoning import ReasoningFilter, hide_reasoning
from bots.core.text import clean_name, is_blank, neutralize, sanitize, special_token_pattern

log = logging.getLogger(__name__)


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
        show_reasoning: stream a reasoning model's `<think>` blocks to users (never stored).
        knowledge_default: the knowledge base conversations answer from unless /kb says.
        free_answers: with nothing relevant in the knowledge base, the model answers anyway.
        no_answer: the answer instead, when it does not.
    """

    system_prompt: str = ""
    reply_tokens: int = 512
    trim_target: float = 0.5
    max_message_chars: int = 16_000
    max_persona_chars: int = 4_000
    per_user_in_groups: bool = False
    max_in_flight: int = 64
    collect_default: bool = False
    show_reasoning: bool = False
    knowledge_default: str | None = None
    free_answers: bool = False
    no_answer: str = "I don't have that in my documentation."


class ConversationService:
    """Answer incoming messages and commands, keeping each conversation's context.

    Messages of one conversation are answered one at a time, in arrival order;
    different conversations proceed concurrently, at most `max_in_flight` model
    requests at once. Commands on options answer at once; /reset ends a reply under way.
    """

    def __init__(
        self,
        store: ContextStore,
        model: ChatModel,
        *,
        limiter: Limiter | None = None,
        policy: ChatPolicy = ChatPolicy(),
        observer: Observer | None = None,
        knowledge: Retriever | None = None,
        handoffs: Handoffs | None = None,
        line: Line | None = None,
    ) -> None:
        self._store = store
        self._handoffs = handoffs
        self._knowledge = knowledge
        self._observer: Observer = observer or NoObserver()
        self._model = model
        self._limiter = limiter
        self._policy = policy
        self._fitter = ContextFitter(model.count_tokens, target=policy.trim_target)
        self._line: Line = line if line is not None else ArrivalLine()
        self._line.on_stop(self._stop_reply_here)
        self._underway: dict[ConversationKey, Stoppable] = {}  # the reply each line serves
        self._slots = asyncio.Semaphore(policy.max_in_flight)
        self._markers: re.Pattern[str] | None = None

    @property
    def observer(self) -> Observer:
        """Where this service reports what it does; platforms report their own events there."""
        return self._observer

    @property
    def handoffs(self) -> Handoffs | None:
        """Where conversations go to people; platforms attach their staff desks there."""
        return self._handoffs

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
        text, _ = self._cut(sanitize(edited.text))
        async with held(self._line, key):
            return await self._store.edit(key, edited.message_id, text)

    async def forget(self, deleted: Incoming) -> bool:
        """Remove a deleted message (by its `message_id`) from the context; False if none."""
        if deleted.message_id is None:
            return False
        key = self.conversation_of(deleted)
        async with held(self._line, key):
            return await self._store.remove(key, deleted.message_id)

    async def history(self, key: ConversationKey) -> list[Turn]:
        """Return a conversation's stored turns, oldest first."""
        return await self._store.load(key)

    async def reset(self, key: ConversationKey) -> None:
        """Forget a conversation's turns (its persona stays): a reply under way stops; the
        replies still waiting in line before this are answered first."""
        self._stop_reply(key)
        async with held(self._line, key):
            await self._store.clear(key)

    async def from_people(
        self, key: ConversationKey, text: str, *, name: str | None = None, note: bool = False
    ) -> None:
        """Store what a person wrote in a conversation: a reply the user was shown, or a
        staff note (`note`) they were not. Either is context for the bot, never answered."""
        kind = People.NOTE if note else People.REPLY
        turn = Turn(
            Role.ASSISTANT, sanitize(text), name=clean_name(name or "") or None, people=kind
        )
        async with held(self._line, key):
            await self._store.append(key, turn)
            if self._handoffs is not None:
                await self._handoffs.current(key, touch=True)

    def respond(self, incoming: Incoming) -> AsyncGenerator[ReplyPart, None]:
        """Stream the answer to a message or command: text, and notices from Parley.

        A message, /reset or /retry takes its place in its conversation's line when this is
        called, so replies come in the order of the calls; other commands answer at once.
        Consume the stream to the end or close it (`contextlib.aclosing`): the
        conversation waits for it while it is open.
        """
        key = self.conversation_of(incoming)
        text = sanitize(incoming.text)
        command = parse_command(text)
        if command is None:
            return self._respond(key, self._message(incoming, key, text), self._line.join(key))
        parts, place = self._command(command, incoming, key)
        return self._respond(key, parts, place, from_model=_asks_model(command))

    def _stop_reply(self, key: ConversationKey) -> None:
        """End the reply under way in `key`, in whichever process serves it."""
        self._line.stop(key)

    def _stop_reply_here(self, key: ConversationKey) -> None:
        if (underway := self._underway.get(key)) is not None:
            underway.stop()

    async def _respond(
        self,
        key: ConversationKey,
        parts: AsyncGenerator[ReplyPart, None],
        place: Place | None,
        *,
        from_model: bool = True,
    ) -> AsyncGenerator[ReplyPart, None]:
        platform, observer = key.platform, self._observer
        started = time.monotonic()
        observer.received(platform)
        answered = False
        underway = Stoppable()
        try:
            if place is not None:
                try:
                    await place.wait()
                except StoreUnavailable:
                    log.warning("line unavailable", extra={"conversation": str(key)})
                    yield notice(NoticeKind.STORE_UNAVAILABLE)
                    return
            if from_model:  # the reply this line serves now, which a /reset may end
                self._underway[key] = underway
            async for part in underway.run(parts):
                if isinstance(part, Notice):
                    observer.noticed(platform, part.kind)
                elif isinstance(part, str) and part:
                    if from_model and not answered:
                        observer.first_token(platform, time.monotonic() - started)
                    answered = True
                yield part
            if underway.stopped:  # the user's own choice, not a failure: not counted as one
                yield notice(NoticeKind.REPLY_INTERRUPTED, RESET_STOPS_REPLY)
        finally:
            if place is not None:
                place.leave()
            if self._underway.get(key) is underway:
                del self._underway[key]
            seconds = time.monotonic() - started
            observer.finished(platform, seconds, answered=answered)
            log.info(
                "message %s in %.3f s",
                "answered" if answered else "not answered",
                seconds,
                extra={"conversation": str(key)},
            )

    def _cut(self, text: str) -> tuple[str, bool]:
        """A user's text cut at `max_message_chars`, and whether it was."""
        limit = self._policy.max_message_chars
        if len(text) <= limit:
            return text, False
        return text[:limit] + SHORTENED_SUFFIX, True

    def _user_turn(self, incoming: Incoming, text: str) -> tuple[Turn, bool]:
        """The turn to store: the text cut at `max_message_chars` (and whether it was), the
        author named in groups."""
        text, cut = self._cut(text)
        author = incoming.author
        name = clean_name(author.display_name) if incoming.in_group and author else None
        return Turn(Role.USER, text, name=name or None, message_id=incoming.message_id), cut

    def _message(
        self, incoming: Incoming, key: ConversationKey, text: str
    ) -> AsyncGenerator[ReplyPart, None]:
        if is_blank(text):
            return _one(notice(NoticeKind.EMPTY_MESSAGE))
        turn, cut = self._user_turn(incoming, text)
        return self._reply(incoming, key, turn, cut=cut)

    def _command(
        self, command: Command, incoming: Incoming, key: ConversationKey
    ) -> tuple[AsyncGenerator[ReplyPart, None], Place | None]:
        """A command's answer, and its place in line if it acts on the turns.

        Only /reset and /retry wait for the replies before them; the others read or set the
        channel's options, and a refusal changes nothing, so they answer at once.
        """
        spec = find_command(command.name)
        if spec is None:
            return _one(f"I don't know /{command.name}.\n{HELP_TEXT}"), None
        if spec.asks_model:  # /retry: the last message, answered again
            return self._reply(incoming, key, None), self._place_for(spec, key)
        chosen = spec.action_for(command.args)
        if chosen is None:
            return _one(spec.usage), None
        action, word, text = chosen
        if action.refuses(incoming, key):
            return _one(action.refusal), None
        if spec.ends_reply:  # /reset: the reply under way stops here, then the turns go
            self._stop_reply(key)
        call = Call(
            incoming,
            key,
            word,
            text,
            self._store,
            self._model,
            self._limiter,
            self._policy,
            self._knowledge.index if self._knowledge is not None else None,
            self._handoffs,
        )
        return self._run(action, call), self._place_for(spec, key)

    def _place_for(self, spec: CommandSpec, key: ConversationKey) -> Place | None:
        return self._line.join(key) if spec.waits_in_line else None

    async def _run(self, action: Action, call: Call) -> AsyncGenerator[ReplyPart, None]:
        try:
            yield await action.run(call)
        except StoreUnavailable:
            yield notice(NoticeKind.STORE_UNAVAILABLE)
        except ModelError as error:
            yield model_notice(error)

    async def _reply(
        self, incoming: Incoming, key: ConversationKey, turn: Turn | None, *, cut: bool = False
    ) -> AsyncGenerator[ReplyPart, None]:
        """Answer `turn`, or with None answer the last user turn again (/retry)."""
        user = user_of(incoming)
        replacing: int | None = None
        people = self._handoffs if self._handoffs and self._handoffs.offered(key.platform) else None
        try:
            if people is not None and await people.current(key, touch=True) is not None:
                if turn is None:
                    yield ALREADY
                    return
                turn = dataclasses.replace(turn, people=People.ASKED)
                await self._store.append(key, turn)  # context for the person, and later the bot
                await people.relay(key, turn)
                yield Quiet()
                return
            if people is not None and turn is not None and people.asks_for_people(turn.content):
                await self._store.append(key, dataclasses.replace(turn, people=People.ASKED))
                yield await self._hand_off(people, key, HandoffReason.ASKED)
                return
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
            name = await self._knowledge_of(incoming, channel)
            turn = await self._grounded(name, turn, history)
            if turn.knowledge is not None and not turn.passages and not self._policy.free_answers:
                # Nothing relevant: no answer is made up; people may have one.
                if people is not None and people.policy.on_no_answer == "hand_off":
                    await self._store.append(key, dataclasses.replace(turn, people=People.ASKED))
                    yield await self._hand_off(people, key, HandoffReason.NO_ANSWER)
                    return
                yield self._policy.no_answer
                if people is not None and people.policy.on_no_answer == "offer":
                    yield f"\n{OFFER}"  # said, not stored: the stored answer stays the same
                answer = Turn(Role.ASSISTANT, self._policy.no_answer)
                await self._record_answer(key, turn, answer.content, replacing)
                if people is not None and people.failed_in_a_row(
                    [*history, turn, answer], self._policy.no_answer
                ):
                    yield await self._hand_off(people, key, HandoffReason.FAILURES)
                return
            passages = await self._passages_of([*history, turn])
            adapter = channel.adapter
            budget = await self._model.context_window() - self._policy.reply_tokens
            markers = await self._special_tokens()

            async def fit(start: int | None = state.window_start) -> Fitted:
                *read_history, read_turn = ground([*history, turn], passages, start or 0)
                return await self._fitter.fit(
                    system_of(channel.persona, self._policy.system_prompt),
                    read_history,
                    read_turn,
                    window_start=start,
                    budget=budget,
                    clean=lambda text: neutralize(text, markers),
                )

            fitted = await fit()
            if passages and fitted.window_start is not None:
                # The window moved: passages given with a turn now left out are given
                # with the next turn that has them, as the next prompt will give them.
                moved, fitted = fitted.window_start, await fit(fitted.window_start)
                if fitted.window_start is None:  # it fits from there: store that start
                    fitted = dataclasses.replace(fitted, window_start=moved)
        except StoreUnavailable:
            log.warning("context store unavailable", extra={"conversation": str(key)})
            yield notice(NoticeKind.STORE_UNAVAILABLE)
            return
        except ModelError as error:
            if turn is not None and replacing is None:
                await self._keep_user_turn(key, turn)
            yield model_notice(error)
            if (handed := await self._hand_off_after_failures(key)) is not None:
                yield handed
            return
        except KnowledgeUnavailable as error:
            log.warning("knowledge base unavailable: %s", error, extra={"conversation": str(key)})
            if turn is not None and replacing is None:
                await self._keep_user_turn(key, turn)
            yield knowledge_notice(error)
            return
        if fitted.shortened or cut:  # a stored cut's text ends at `max_message_chars`
            whole = len(sanitize(incoming.text)) if cut else len(turn.content)
            yield shortened_notice(min(fitted.read, self._policy.max_message_chars), whole)
        sources = sources_of([passages[pid] for pid in turn.passages if pid in passages])
        parts = self._stream_and_record(key, turn, fitted, fit, replacing, user, adapter, sources)
        async for part in parts:
            yield part

    async def _hand_off(
        self, people: Handoffs, key: ConversationKey, reason: HandoffReason
    ) -> str | Notice:
        """Hand the conversation to people: the user is told once, when it happens."""
        if await people.hand_off(key, reason):
            return notice(NoticeKind.HANDED_OFF)
        return ALREADY

    async def _hand_off_after_failures(self, key: ConversationKey) -> Notice | None:
        """After a failed reply: people take over when too many failed in a row."""
        people = self._handoffs
        if people is None or not people.offered(key.platform):
            return None
        try:
            if not people.failed_in_a_row(await self._store.load(key), self._policy.no_answer):
                return None
            if await people.hand_off(key, HandoffReason.FAILURES):
                return notice(NoticeKind.HANDED_OFF)
        except StoreUnavailable:
            log.warning("no handoff: store unavailable", extra={"conversation": str(key)})
        return None

    async def _knowledge_of(self, incoming: Incoming, channel: ConversationState) -> str | None:
        """The knowledge base answering here (see `knowledge_here`)."""
        if self._knowledge is None:
            return None
        return await knowledge_here(self._store, incoming, channel, self._policy)

    async def _grounded(self, name: str | None, turn: Turn, history: Sequence[Turn]) -> Turn:
        """The turn with the passages that answer it (a retried turn keeps its own)."""
        if name is None or self._knowledge is None or turn.passages:
            return turn
        last = _last_user_turn(history)
        previous = history[last].content if last is not None else None
        hits = await self._knowledge.retrieve(name, turn.content, previous)
        ids = tuple(hit.passage.id for hit in hits)
        return dataclasses.replace(turn, knowledge=name, passages=ids)

    async def _passages_of(self, turns: Sequence[Turn]) -> dict[str, Passage]:
        """The passages the turns were answered with, as the index holds them now."""
        wanted: dict[str, list[str]] = {}
        for turn in turns:
            if turn.knowledge is not None and turn.passages:
                wanted.setdefault(turn.knowledge, []).extend(turn.passages)
        if self._knowledge is None or not wanted:
            return {}
        found: dict[str, Passage] = {}
        for name, ids in wanted.items():
            found.update(await self._knowledge.index.passages(name, list(dict.fromkeys(ids))))
        return found

    async def _record_answer(
        self, key: ConversationKey, turn: Turn, text: str, replacing: int | None
    ) -> None:
        """Store an exchange Parley answered itself, without the model."""
        try:
            await self._store.append(key, turn, Turn(Role.ASSISTANT, text), replacing=replacing)
        except StoreUnavailable:
            log.warning("reply not recorded: store unavailable", extra={"conversation": str(key)})

    async def _stream_and_record(
        self,
        key: ConversationKey,
        user_turn: Turn,
        fitted: Fitted,
        refit: Callable[[], Awaitable[Fitted]],
        replacing: int | None,
        user: str | None,
        adapter: str | None,
        sources: tuple[Source, ...] = (),
    ) -> AsyncGenerator[ReplyPart, None]:
        pieces: list[str] = []  # as the model wrote them, reasoning included
        usage: Usage | None = None
        shown = None if self._policy.show_reasoning else ReasoningFilter()
        if self._slots.locked():
            yield notice(NoticeKind.QUEUED)
        async with self._slots:
            self._observer.model_calls(key.platform, 1)
            try:
                for attempt in (1, 2):
                    parts = self._model.stream(fitted.messages, session=str(key), adapter=adapter)
                    try:
                        async for chunk in parts:
                            if chunk.text:
                                pieces.append(chunk.text)
                                if text := chunk.text if shown is None else shown.feed(chunk.text):
                                    yield text
                            if chunk.usage is not None:
                                usage = chunk.usage
                        break
                    except PromptTooLong:
                        if pieces or attempt == 2:
                            raise
                        # The model counts by the strict bound from now on: fit again, once.
                        fitted = await refit()
                if shown is not None and (rest := shown.finish()):
                    yield rest
            except ModelError as error:
                if replacing is None:
                    await self._keep_user_turn(key, user_turn)
                yield model_notice(error)
                if (handed := await self._hand_off_after_failures(key)) is not None:
                    yield handed
                return
            finally:
                self._observer.model_calls(key.platform, -1)
        if sources:
            yield Sources(sources)
        # Only the answer is recorded: reasoning never reaches the next prompt or an export.
        reply = Turn(Role.ASSISTANT, hide_reasoning("".join(pieces)), usage=usage)
        if (underway := self._underway.get(key)) is not None:
            underway.finish()  # the reply is whole: a /reset now waits until it is stored
        try:
            await self._store.append(
                key, user_turn, reply, replacing=replacing, window_start=fitted.window_start
            )
        except StoreUnavailable:
            log.warning("reply not recorded: store unavailable", extra={"conversation": str(key)})
            yield notice(NoticeKind.STORE_UNAVAILABLE, NOT_SAVED)
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


def _asks_model(command: Command) -> bool:
    spec = find_command(command.name)
    return spec is not None and spec.asks_model


def _last_user_turn(history: Sequence[Turn]) -> int | None:
    for index in range(len(history) - 1, -1, -1):
        if history[index].role is Role.USER and history[index].seq is not None:
            return index
    return None


async def _one(part: ReplyPart) -> AsyncGenerator[ReplyPart, None]:
    yield part
