"""The commands every platform shares, each written once: the table, its handlers, parsing.

`/help`, Telegram's command menu and Discord's slash commands are all generated from
`COMMANDS`. A new command is one `CommandSpec` here (and its handler) plus its test.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bots.core.handoff import ALREADY, NO_DESK, NOT_HANDED_OFF, Handoffs
from bots.core.models import (
    KNOWLEDGE_OFF,
    ConversationKey,
    ConversationState,
    HandoffReason,
    Incoming,
    Notice,
    NoticeKind,
)
from bots.core.notices import notice, wait_text
from bots.core.ports import ChatModel, ContextStore, KnowledgeIndex, Limiter

if TYPE_CHECKING:
    from bots.core.service import ChatPolicy

RESET_TEXT = "Conversation forgotten; let's start over."
RESET_STOPS_REPLY = "Reset: this reply stops here."

# "/name", "/name@bot" (Telegram's form in groups), then arguments after a space. A
# path such as "/usr/bin" is not a command: a slash right after the name is not allowed.
_COMMAND = re.compile(r"/([A-Za-z][A-Za-z0-9_]*)(?:@\w+)?(?:\s+(.*))?", re.DOTALL)
_FIRST_WORD = re.compile(r"(\S*)\s*(.*)", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Command:
    """A message read as a command."""

    name: str  # lower case, without the slash
    args: str


def parse_command(text: str) -> Command | None:
    """Read a message as a command, or return None when it is an ordinary message."""
    match = _COMMAND.fullmatch(text.strip())
    if match is None:
        return None
    return Command(match[1].lower(), (match[2] or "").strip())


class Shared(enum.Enum):
    """What an action changes, and so when it takes an admin."""

    CONVERSATION = "conversation"  # a group's conversation, unless each member has their own
    CHANNEL = "channel"  # a channel's option (persona, adapter...), in groups always shared


@dataclass(frozen=True, slots=True)
class Option:
    """An argument an action takes, as platforms with forms (Discord) ask for it."""

    name: str
    summary: str
    choices: tuple[str, ...] = ()
    required: bool = False


@dataclass(frozen=True, slots=True)
class Call:
    """One run of a command: who asked, where, the arguments, and what handlers may use."""

    incoming: Incoming
    key: ConversationKey
    word: str  # the action's word, lower case ("set", "on"); "" when none was given
    text: str  # the arguments after that word
    store: ContextStore
    model: ChatModel
    limiter: Limiter | None
    policy: ChatPolicy
    knowledge: KnowledgeIndex | None = None  # None: knowledge bases are not set up
    handoffs: Handoffs | None = None  # None: no people answer on this server


Handler = Callable[[Call], Awaitable[str | Notice]]


@dataclass(frozen=True, slots=True)
class Action:
    """One thing a command does, chosen by the first word of its arguments.

    Args:
        word: that word; "" for no arguments; None for any arguments no other action takes.
        run: the handler; it answers with the text to show.
        summary: one line, for platforms that list actions (Discord's subcommands).
        option: what follows the word.
        admins: in a group, only admins may run it when it changes what is shared this way.
        refusal: what a member who is not an admin is told instead.
    """

    word: str | None
    run: Handler
    summary: str = ""
    option: Option | None = None
    admins: Shared | None = None
    refusal: str = ""

    def refuses(self, incoming: Incoming, key: ConversationKey) -> bool:
        """Whether this action needs an admin here and the asker is not one."""
        if self.admins is None or not incoming.in_group or incoming.is_admin:
            return False
        return self.admins is Shared.CHANNEL or key.user is None


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """A command as every platform offers it.

    Args:
        name: what follows the slash.
        summary: one line for command menus (Telegram, Discord).
        help: its line in /help.
        actions: what it does, by the first word of its arguments.
        option: its one argument, on platforms with forms, when it has no subcommands.
        subcommands: platforms with forms offer each worded action as a subcommand.
        usage: the answer to arguments no action takes; empty: the action for none runs.
        asks_model: answered by the model, streamed (the service's reply flow, /retry).
        waits_in_line: it acts on the turns, so it waits for the replies before it (/reset,
            /retry); the others read or set the channel's options and answer at once.
        ends_reply: a reply still under way in the conversation stops first (/reset).
    """

    name: str
    summary: str
    help: str
    actions: tuple[Action, ...] = ()
    option: Option | None = None
    subcommands: bool = False
    usage: str = ""
    asks_model: bool = False
    waits_in_line: bool = False
    ends_reply: bool = False

    def action_for(self, args: str) -> tuple[Action, str, str] | None:
        """The action its arguments choose, with its word and the text after it."""
        word, rest = _first_word(args)
        by_word = {action.word: action for action in self.actions}
        if word in by_word:
            return by_word[word], word, rest
        if args and None in by_word:
            return by_word[None], "", args
        if args and not self.usage and "" in by_word:
            return by_word[""], "", args
        return None


def _first_word(args: str) -> tuple[str, str]:
    match = _FIRST_WORD.fullmatch(args)
    assert match is not None  # every text matches
    return match[1].lower(), match[2].strip()


# ----------------------------------------------------------------------------- handlers


async def _help(call: Call) -> str:
    return HELP_TEXT


async def _reset(call: Call) -> str:
    await call.store.clear(call.key)
    return RESET_TEXT


async def _usage(call: Call) -> str:
    user = user_of(call.incoming)
    if call.limiter is None or user is None:
        return "Token use isn't counted here."
    usage = await call.limiter.usage(user)
    if usage.budget is None:
        return f"You have used {usage.used:,} tokens today (UTC); there is no daily limit."
    return (
        f"You have used {usage.used:,} of your {usage.budget:,} tokens today; the count "
        f"starts again in {wait_text(usage.resets_in)} (midnight UTC)."
    )


async def _persona_show(call: Call) -> str:
    persona = (await call.store.state(call.key.channel_key)).persona
    if persona is None:
        return "No persona is set here; I use the default system prompt."
    return f"My persona here:\n{persona}"


async def _persona_set(call: Call) -> str:
    persona, limit = call.text, call.policy.max_persona_chars
    if not persona:
        return "Say who I should be: /persona set <text>."
    if len(persona) > limit:
        return f"A persona can be at most {limit:,} characters; that one has {len(persona):,}."
    await call.store.set_option(call.key.channel_key, "persona", persona)
    return "Persona set; it applies from the next message."


async def _persona_clear(call: Call) -> str:
    await call.store.set_option(call.key.channel_key, "persona", None)
    return "Persona cleared; I use the default system prompt again."


async def _adapter_show(call: Call) -> str:
    current = (await call.store.state(call.key.channel_key)).adapter
    answering = f"the adapter {current}" if current else "the base model"
    return f"I answer here with {answering}. {_served(await call.model.adapters())}"


async def _adapter_off(call: Call) -> str:
    await call.store.set_option(call.key.channel_key, "adapter", None)
    return "I answer here with the base model again."


async def _adapter_choose(call: Call) -> str:
    name = call.text
    if name not in (served := await call.model.adapters()):
        return f"No adapter is served as {name}. {_served(served)}"
    await call.store.set_option(call.key.channel_key, "adapter", name)
    return f"I answer here with the adapter {name} from the next message."


async def _collect_show(call: Call) -> str:
    chosen = (await call.store.state(call.key.channel_key)).collect
    collected = call.policy.collect_default if chosen is None else chosen
    how = "by default" if chosen is None else "as an admin chose"
    if collected:
        return f"This conversation may be exported to train me ({how})."
    return f"This conversation is not exported for training ({how})."


async def _collect_set(call: Call) -> str:
    await call.store.set_option(call.key.channel_key, "collect", call.word)
    return await _collect_show(call)


async def knowledge_here(
    store: ContextStore, incoming: Incoming, channel: ConversationState, policy: ChatPolicy
) -> str | None:
    """The knowledge base answering in a channel: its own choice (/kb use, /kb off), else
    its server's (/kb server), else the platform's (an HTTP integration's), else KB_DEFAULT."""
    chosen = channel.knowledge
    if chosen is None and incoming.scope is not None:
        chosen = (await store.state(incoming.scope)).knowledge
    if chosen == KNOWLEDGE_OFF:
        return None
    return chosen or incoming.knowledge or policy.knowledge_default


async def _kb_show(call: Call) -> str:
    if call.knowledge is None:
        return _NO_KNOWLEDGE
    channel = await call.store.state(call.key.channel_key)
    current = await knowledge_here(call.store, call.incoming, channel, call.policy)
    scope = await call.store.state(call.incoming.scope) if call.incoming.scope else None
    if channel.knowledge is not None:
        how = "as an admin chose for this channel"
    elif scope is not None and scope.knowledge is not None:
        how = "as an admin chose for this server"
    else:
        how = "by default"
    if current is None:
        answer = f"I answer here without a knowledge base ({how})."
    else:
        answer = f"I answer here from the knowledge base {current} ({how})."
    return f"{answer} {_knowledge_bases(await call.knowledge.names())}"


async def _kb_use(call: Call) -> str:
    return await _kb_choose(call, call.key.channel_key, "here")


async def _kb_server(call: Call) -> str:
    if call.incoming.scope is None:
        return "This chat belongs to no server; /kb use <name> chooses one for it."
    return await _kb_choose(call, call.incoming.scope, "in every channel of this server")


async def _kb_choose(call: Call, where: ConversationKey, said: str) -> str:
    """Attach the knowledge base the arguments name (or `off`, or `default`) to a place."""
    name = call.text.strip().lower()
    if call.knowledge is None:
        return _NO_KNOWLEDGE
    if not name:
        return f"Say which one: /kb {call.word} <name>, off or default."
    return await _kb_set(call, where, said, name)


async def _kb_set(call: Call, where: ConversationKey, said: str, name: str) -> str:
    if name == "default":
        await call.store.set_option(where, "kb", None)
        return await _kb_show(call)
    if name == KNOWLEDGE_OFF:
        await call.store.set_option(where, "kb", KNOWLEDGE_OFF)
        return f"I answer {said} without a knowledge base from the next message."
    assert call.knowledge is not None  # a name comes only through _kb_choose, which checked
    if not await call.knowledge.exists(name):
        known = _knowledge_bases(await call.knowledge.names())
        return f"There is no knowledge base {name}. {known}"
    await call.store.set_option(where, "kb", name)
    return f"I answer {said} from the knowledge base {name} from the next message."


async def _kb_off(call: Call) -> str:
    return await _kb_set(call, call.key.channel_key, "here", KNOWLEDGE_OFF)


async def _kb_default(call: Call) -> str:
    return await _kb_set(call, call.key.channel_key, "here", "default")


def _knowledge_bases(names: list[str]) -> str:
    return f"Knowledge bases: {', '.join(names) or 'none'}."


def _served(adapters: list[str]) -> str:
    return f"Served adapters: {', '.join(adapters) or 'none'}."


async def _human(call: Call) -> str | Notice:
    people = call.handoffs
    if people is None or not people.offered(call.key.platform):
        return NO_DESK
    if await people.hand_off(call.key, HandoffReason.ASKED):
        return notice(NoticeKind.HANDED_OFF)
    return ALREADY


async def _bot(call: Call) -> str:
    people = call.handoffs
    if people is None or not await people.hand_back(call.key, "user"):
        return NOT_HANDED_OFF
    return notice(NoticeKind.HANDED_BACK).text


def user_of(incoming: Incoming) -> str | None:
    """Name the sender for limits and budgets: ids are only unique within a platform."""
    return f"{incoming.key.platform}:{incoming.author.id}" if incoming.author else None


# ----------------------------------------------------------------------------- the table

_PERSONA_ADMINS = "Only admins can change my persona in a group."
_ADAPTER_ADMINS = "Only admins can choose the adapter in a group."
_COLLECT_ADMINS = "Only admins can change whether a group's conversation is collected."
_KB_ADMINS = "Only admins can choose the knowledge base in a group."
_NO_KNOWLEDGE = "Knowledge bases are not set up on this server."

COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec(
        "reset",
        "Forget this conversation",
        "forget this conversation and start over",
        (
            Action(
                "",
                _reset,
                admins=Shared.CONVERSATION,
                refusal="Only admins can reset a conversation the whole group shares.",
            ),
        ),
        waits_in_line=True,
        ends_reply=True,
    ),
    CommandSpec(
        "retry",
        "Answer my last message again",
        "answer your last message again",
        asks_model=True,
        waits_in_line=True,
    ),
    CommandSpec(
        "usage", "My tokens today", "how many tokens you have used today", (Action("", _usage),)
    ),
    CommandSpec(
        "persona",
        "Show or set (admins) who I am here",
        "show who I am here; admins: /persona set <text>, /persona clear",
        (
            Action("", _persona_show),
            Action("show", _persona_show, "Show the persona of this conversation"),
            Action(
                "set",
                _persona_set,
                "Set the persona (admins)",
                Option("text", "who I should be here", required=True),
                Shared.CHANNEL,
                _PERSONA_ADMINS,
            ),
            Action(
                "clear",
                _persona_clear,
                "Back to the default system prompt (admins)",
                admins=Shared.CHANNEL,
                refusal=_PERSONA_ADMINS,
            ),
        ),
        subcommands=True,
        usage="Use /persona, /persona set <text> or /persona clear.",
    ),
    CommandSpec(
        "adapter",
        "Show or choose (admins) the fine-tuned model here",
        "show the fine-tuned model answering here; admins: /adapter <name>, /adapter off",
        (
            Action("", _adapter_show),
            Action("off", _adapter_off, admins=Shared.CHANNEL, refusal=_ADAPTER_ADMINS),
            Action(None, _adapter_choose, admins=Shared.CHANNEL, refusal=_ADAPTER_ADMINS),
        ),
        option=Option("name", "an adapter's name, or off for the base model"),
    ),
    CommandSpec(
        "collect",
        "Show or set (admins) whether this chat may train me",
        "show whether this conversation may train me; admins: /collect on, /collect off",
        (
            Action("", _collect_show),
            Action("on", _collect_set, admins=Shared.CHANNEL, refusal=_COLLECT_ADMINS),
            Action("off", _collect_set, admins=Shared.CHANNEL, refusal=_COLLECT_ADMINS),
        ),
        option=Option("choice", "on or off", choices=("on", "off")),
        usage="Use /collect, /collect on or /collect off.",
    ),
    CommandSpec(
        "kb",
        "Show or choose (admins) the documentation I answer from",
        "show the knowledge base I answer from; admins: /kb use <name>, /kb off, /kb default,"
        " /kb server <name> (every channel of a Discord server)",
        (
            Action("", _kb_show),
            Action("show", _kb_show, "Show the knowledge base answering here"),
            Action(
                "use",
                _kb_use,
                "Answer from a knowledge base (admins)",
                Option("name", "the knowledge base's name", required=True),
                admins=Shared.CHANNEL,
                refusal=_KB_ADMINS,
            ),
            Action(
                "off",
                _kb_off,
                "Answer without one (admins)",
                admins=Shared.CHANNEL,
                refusal=_KB_ADMINS,
            ),
            Action(
                "default",
                _kb_default,
                "Back to the default (admins)",
                admins=Shared.CHANNEL,
                refusal=_KB_ADMINS,
            ),
            Action(
                "server",
                _kb_server,
                "Choose one for every channel of this Discord server (admins)",
                Option("name", "a knowledge base's name, off, or default", required=True),
                admins=Shared.CHANNEL,
                refusal=_KB_ADMINS,
            ),
        ),
        subcommands=True,
        usage="Use /kb, /kb use <name>, /kb off, /kb default or /kb server <name>.",
    ),
    CommandSpec(
        "human",
        "Talk to a person",
        "hand this conversation to a person; I stay quiet until they hand it back",
        (Action("", _human),),
    ),
    CommandSpec(
        "bot",
        "Talk to the bot again",
        "take this conversation back from the people answering it",
        (
            Action(
                "",
                _bot,
                admins=Shared.CONVERSATION,
                refusal="Only admins can take a conversation the whole group shares back.",
            ),
        ),
    ),
    CommandSpec("help", "How to talk to Parley", "show this help", (Action("", _help),)),
)
_BY_NAME = {spec.name: spec for spec in COMMANDS}


def find_command(name: str) -> CommandSpec | None:
    """The command of that name (lower case, no slash), or None for an unknown one."""
    return _BY_NAME.get(name)


def help_text(commands: tuple[CommandSpec, ...] = COMMANDS) -> str:
    """The /help answer: what Parley does, then a line per command."""
    lines = [f"{'/' + spec.name:<9} {spec.help}" for spec in commands]
    return "\n".join(["Talk to me and I answer, remembering this conversation.", *lines])


HELP_TEXT = help_text()
