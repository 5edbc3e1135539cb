"""The Telegram staff group: handed-off conversations posted there, staff replies relayed.

Nothing is kept in the process. Every post names its conversation on its last line with a
hashtag (`#c_123` for the private chat 123, `#c_n100123_t5_u42` for user 42 in topic 5 of
the group -100123), and a staff member answers by replying to a post: the bot reads the
conversation back from the `reply_to_message` Telegram sends with the reply, so any
replica, before or after a restart, handles it. The hashtag also lets staff click through
to every post of one conversation. Only the bot's own posts are read, and the tag is the
last line the bot wrote, so a user's text cannot name another conversation.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from typing import Literal

from telegram import Bot, Message, ReplyParameters
from telegram.constants import MessageLimit, ParseMode
from telegram.error import BadRequest, Forbidden, NetworkError, RetryAfter, TelegramError

from bots.core.models import ConversationKey, Handoff, HandoffReason, NoticeKind, People, Role, Turn
from bots.core.notices import notice
from bots.core.ports import StoreUnavailable
from bots.core.service import ConversationService
from bots.delivery.split import split_message
from bots.delivery.stream import CallWindow
from bots.platforms.telegram_markup import italic, to_html

log = logging.getLogger(__name__)

MAX_CHARS = MessageLimit.MAX_TEXT_LENGTH  # 4096, counted after the HTML is parsed
ATTEMPTS = 4  # tries of one delivery through 429s and network faults
FIRST_BACKOFF = 0.5  # seconds after a network fault, doubled each time
LONGEST_WAIT = 30.0  # a 429 asking for longer gives the delivery up (logged)
TAG = re.compile(r"(?:\A|\n)#c_(n?)(\d+)(?:_t(\d+))?(?:_u(\d+))?\s*\Z")
REASONS = {
    HandoffReason.ASKED: "asked for a person",
    HandoffReason.NO_ANSWER: "the documentation had no answer",
    HandoffReason.FAILURES: "several messages in a row went unanswered",
    HandoffReason.STAFF: "taken by staff",
}
RETURNED_BY = {"staff": "handed back by staff", "user": "the user wrote /bot", "idle": "idle"}
HINT = "Reply to this post to answer; reply /note … for staff only; reply /bot to hand it back."
USAGE = (
    "Reply to a conversation's post: your text goes to the user, /note … stays with the "
    "staff, /bot hands the conversation back."
)
ALREADY_BACK = "This conversation is already back with the bot."
NOT_DELIVERED = "Not delivered: Telegram refused to send it to the user."
STORE_DOWN = "Not recorded: the conversation store is unavailable; try again."

Windows = Callable[[int, bool], list[CallWindow]]  # a chat's shared send budgets


def tag_of(key: ConversationKey) -> str:
    """The hashtag naming a Telegram conversation in staff posts (ids are integers)."""
    channel = int(key.channel)
    tag = f"#c_{'n' if channel < 0 else ''}{abs(channel)}"
    if key.thread is not None:
        tag += f"_t{int(key.thread)}"
    if key.user is not None:
        tag += f"_u{int(key.user)}"
    return tag


def key_in(post: str) -> ConversationKey | None:
    """The conversation a staff post names on its last line; None when it names none."""
    match = TAG.search(post)
    if match is None:
        return None
    sign, channel, thread, user = match.groups()
    return ConversationKey("telegram", f"-{channel}" if sign else channel, thread, user)


def line_of(turn: Turn) -> str:
    """One turn as staff read it: "User: …", "Bot: …", "Staff (Sam): …", "Note (Sam): …"."""
    if turn.role is Role.USER:
        who = "User"
    elif turn.people is People.REPLY:
        who = "Staff"
    elif turn.people is People.NOTE:
        who = "Note"
    else:
        who = "Bot"
    named = f"{who} ({turn.name})" if turn.name and who != "Bot" else who
    return f"{named}: {turn.content}"


def fit_lines(lines: Sequence[str], room: int) -> list[str]:
    """The latest lines that fit in `room` characters joined by newlines, after a "…"
    for those left out; the latest alone is cut when even it does not fit."""
    budget = room - 2  # for the "…" line
    kept: list[str] = []
    for line in reversed(lines):
        budget -= len(line) + 1
        if budget < 0:
            break
        kept.append(line)
    if len(kept) == len(lines):
        return list(lines)
    if not kept:
        return [lines[-1][: room - 3] + "…"]
    return ["…", *reversed(kept)]


def opened_post(who: str | None, handoff: Handoff, recent: Sequence[Turn], tag: str) -> str:
    """The HTML of the post that opens a conversation for staff, within Telegram's limit."""
    head = f"Handed to people: {who or 'a user'} ({REASONS.get(handoff.reason, handoff.reason)})"
    room = MAX_CHARS - len(head) - len(HINT) - len(tag) - 3  # the newlines between parts
    context = fit_lines([line_of(turn) for turn in recent], room)
    quote = f"<blockquote expandable>{escape(chr(10).join(context))}</blockquote>\n"
    return f"<b>{escape(head)}</b>\n{quote if context else ''}{escape(HINT)}\n{tag}"


def tagged_posts(text: str, tag: str) -> list[str]:
    """The HTML of posts saying `text`, each cut to fit and ending with the tag."""
    return [
        f"{escape(piece.text)}\n{tag}" for piece in split_message(text, MAX_CHARS - len(tag) - 1)
    ]


@dataclass(frozen=True, slots=True)
class StaffMessage:
    """What a staff member wrote in the staff chat, translated out of Telegram's types.

    `word` is what to do: "reply" (to the user), "note" (staff only), "bot" (hand back),
    "usage" (explain how); `key` is the conversation of the post replied to, if any.
    """

    word: Literal["reply", "note", "bot", "usage"]
    key: ConversationKey | None
    text: str
    name: str | None
    message_id: int


def staff_message(message: Message, me: Bot) -> StaffMessage | None:
    """Read a message of the staff chat; None when it is not for the bot: staff talking
    among themselves, a reply to something else than a post, another bot or its command."""
    user, text = message.from_user, message.text or message.caption
    if user is None or user.is_bot or text is None:
        return None
    replied = message.reply_to_message
    by_me = replied is not None and replied.from_user is not None and replied.from_user.id == me.id
    key = key_in(replied.text or "") if replied is not None and by_me else None
    word, _, rest = text.partition(" ") if text.startswith("/") else ("", "", text)
    command, at, target = word[1:].partition("@")
    if at and target.lower() != me.username.lower():
        return None

    def said(what: Literal["reply", "note", "bot", "usage"]) -> StaffMessage:
        return StaffMessage(what, key, rest.strip(), user.first_name, message.message_id)

    if not word:  # plain text: an answer when it replies to a post
        return said("reply") if key is not None and rest.strip() else None
    if command not in ("bot", "note"):
        return said("usage") if key is not None else None
    if key is None or (command == "note" and not rest.strip()):
        return said("usage")
    return said("bot" if command == "bot" else "note")


def retry_seconds(retry_after: object) -> float:
    """A RetryAfter's wait in seconds (PTB gives an int or a timedelta)."""
    total = getattr(retry_after, "total_seconds", None)
    return float(total()) if callable(total) else float(retry_after)  # type: ignore[arg-type]


class TelegramStaffDesk:
    """The StaffDesk of Telegram: posts handed-off conversations to the staff chat.

    Args:
        bot: the application's bot (its HTTP pool and rate limiter).
        staff_chat: the staff group's id (TELEGRAM_STAFF_CHAT).
        windows: each chat's send budgets, shared with the replies sent there.
    """

    def __init__(self, bot: Bot, staff_chat: int, windows: Windows) -> None:
        self._bot = bot
        self.staff_chat = staff_chat
        self._windows = windows

    async def opened(self, key: ConversationKey, handoff: Handoff, recent: Sequence[Turn]) -> None:
        """Post the conversation, who it is and why, with its latest context."""
        who = await self._who(key, recent)
        await self.deliver(self.staff_chat, opened_post(who, handoff, recent, tag_of(key)))

    async def relayed(self, key: ConversationKey, turn: Turn) -> None:
        """Post what the user wrote while people answer."""
        for post in tagged_posts(line_of(turn), tag_of(key)):
            await self.deliver(self.staff_chat, post)

    async def returned(self, key: ConversationKey, by: str) -> None:
        """Post that the bot answers the conversation again."""
        line = f"Back with the bot: {RETURNED_BY.get(by, by)}."
        await self.deliver(self.staff_chat, tagged_posts(line, tag_of(key))[0])

    async def to_user(self, key: ConversationKey, *html: str) -> bool:
        """Send HTML messages to the conversation's chat (and topic); whether all went."""
        thread = int(key.thread) if key.thread is not None else None
        for part in html:
            if await self.deliver(int(key.channel), part, thread=thread) is None:
                return False
        return True

    async def answer(self, said: StaffMessage, text: str) -> None:
        """Answer a staff member in the staff chat, as a reply to what they wrote."""
        await self.deliver(self.staff_chat, escape(text), reply_to=said.message_id)

    async def deliver(
        self, chat_id: int, html: str, *, thread: int | None = None, reply_to: int | None = None
    ) -> Message | None:
        """Send one HTML message within the chat's budgets, tried again through Telegram's
        429s and network faults; None when it could not be sent (logged, never raised)."""
        reply = ReplyParameters(reply_to, allow_sending_without_reply=True) if reply_to else None
        for attempt in range(1, ATTEMPTS + 1):
            await self._paced(chat_id)
            try:
                return await self._bot.send_message(
                    chat_id, html, parse_mode=ParseMode.HTML, message_thread_id=thread,
                    reply_parameters=reply, disable_web_page_preview=True,
                )  # fmt: skip
            except RetryAfter as error:
                wait = retry_seconds(error.retry_after)
            except (BadRequest, Forbidden) as error:  # refused for good: blocked, no such chat
                log.warning("Telegram refused a staff delivery to %s: %s", chat_id, error)
                return None
            except NetworkError:  # a 5xx, a timeout, a lost connection: it may pass
                wait = FIRST_BACKOFF * 2 ** (attempt - 1)
            if attempt == ATTEMPTS or wait > LONGEST_WAIT:
                break
            await asyncio.sleep(wait)
        log.warning("gave up a staff delivery to %s after %d tries", chat_id, attempt)
        return None

    async def _paced(self, chat_id: int) -> None:
        windows = self._windows(chat_id, chat_id < 0)
        while True:  # the budgets are this process's: Telegram's 429s cover the rest
            now = time.monotonic()
            wait = max(window.wait(now, final=True) for window in windows)
            if wait <= 0:
                break
            await asyncio.sleep(wait)
        for window in windows:
            window.spend(now)

    async def _who(self, key: ConversationKey, recent: Sequence[Turn]) -> str | None:
        """Who the conversation is with: the chat's name (a person's, or a group's title),
        and in a group the latest author; None when Telegram says nothing."""
        author = next((t.name for t in reversed(recent) if t.role is Role.USER and t.name), None)
        try:
            chat = await self._bot.get_chat(int(key.channel))
        except TelegramError:
            return author
        name = chat.effective_name or ""
        if chat.username:
            name += f" (@{chat.username})"
        return f"{author} in {name}" if author and key.user is not None else name or author


class StaffRoom:
    """Answer users from the staff chat: replies reach them, notes stay, /bot hands back.

    Args:
        service: the conversation service (its handoffs decide who answers).
        desk: the staff desk that delivers to users and to the staff chat.
    """

    def __init__(self, service: ConversationService, desk: TelegramStaffDesk) -> None:
        self._service = service
        self._desk = desk

    async def handle(self, said: StaffMessage) -> None:
        """Act on what a staff member wrote; a conversation no longer handed off still
        gets the reply (staff may follow up), and keeps it as context."""
        key, handoffs = said.key, self._service.handoffs
        if key is None or said.word == "usage" or handoffs is None:
            await self._desk.answer(said, USAGE)
            return
        try:
            if said.word == "bot":
                if not await handoffs.hand_back(key, "staff"):
                    await self._desk.answer(said, ALREADY_BACK)
                    return
                await self._desk.to_user(key, to_html(italic(notice(NoticeKind.HANDED_BACK).text)))
            elif said.word == "note":
                await self._service.from_people(key, said.text, name=said.name, note=True)
            elif await self._desk.to_user(key, *signed(said)):
                await self._service.from_people(key, said.text, name=said.name)
            else:
                await self._desk.answer(said, NOT_DELIVERED)
        except StoreUnavailable:
            log.warning("staff message not recorded: store unavailable")
            await self._desk.answer(said, STORE_DOWN)


def signed(said: StaffMessage) -> list[str]:
    """The HTML messages a user is shown for a staff reply: the staff member's first name,
    then the reply, split to fit."""
    head = f"<b>{escape(said.name)}</b>: " if said.name else ""
    first, *rest = split_message(said.text, MAX_CHARS - len(said.name or "") - 2)
    return [head + escape(first.text), *(escape(piece.text) for piece in rest)]
