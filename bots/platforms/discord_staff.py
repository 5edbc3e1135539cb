"""Discord's staff channel: a thread per conversation handed to people, where they answer.

Discord itself holds which thread is which conversation: a thread's name ends with its
conversation's code (`dm/<channel>`, or `<guild>/<channel>[/<thread>][/user=<id>]`). So
every replica and shard, and a bot just restarted, finds a conversation's thread among
the staff server's active threads, and a thread's conversation in its name, with no
state of its own; the staff server's threads are read over REST, which any shard may use.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Literal, TypeGuard

import discord

from bots.core.handoff import NOT_HANDED_OFF
from bots.core.models import ConversationKey, Handoff, HandoffReason, NoticeKind, People, Role, Turn
from bots.core.notices import notice
from bots.core.service import ConversationService
from bots.delivery.reply import ChatStyle
from bots.delivery.split import split_message
from bots.platforms.errors import PlatformSetupError

log = logging.getLogger(__name__)

THREAD_NAME_CHARS = 100  # Discord's limit on a thread's name
ARCHIVE_MINUTES: Literal[10080] = 10080  # a week: the longest Discord keeps a quiet thread active
# Nothing the staff channel shows may ping anyone; the bot's own NO_PINGS, again here
# because bots.platforms.discord imports this module.
NO_PINGS = discord.AllowedMentions.none()
CODE = re.compile(r"(?<!\S)((?:dm/\d+|\d+/\d+)(?:/\d+)?(?:/user=\d+)?)$")
REASONS = {
    HandoffReason.ASKED: "the user asked for a person",
    HandoffReason.NO_ANSWER: "the documentation had no answer",
    HandoffReason.FAILURES: "several messages in a row went unanswered",
    HandoffReason.STAFF: "staff took it",
}
BACK = {
    "staff": "handed back by staff",
    "user": "the user took it back with /bot",
    "idle": "nobody wrote for a while",
}
HOW_TO_ANSWER = "Write here to answer the user; `/note …` stays among staff; `/bot` hands it back."
UNKNOWN_THREAD = (
    "I can't tell which conversation this thread is: its name must end with the code it "
    "opened with."
)
BOT_HAS_IT = "The bot has this conversation again; the user can write /human to reach you."
NOT_DELIVERED = "That did not reach the user (Discord refused it); it was not stored."
TEXT_ONLY = "Only text reaches the user."
HANDED_BACK = "Handed back to the bot."
NOTE = re.compile(r"^[/!]note(?:\s+|$)", re.IGNORECASE)
BOT = re.compile(r"^[/!]bot\s*$", re.IGNORECASE)


def code_of(key: ConversationKey) -> str:
    """The conversation's code, as a thread's name ends with it."""
    return str(key).removeprefix(f"{key.platform}/")


def conversation_in(name: str) -> ConversationKey | None:
    """The conversation whose code ends a thread's name; None when it ends with none."""
    found = CODE.search(name)
    if found is None:
        return None
    first, second, *rest = found.group(1).split("/")
    user = rest.pop().removeprefix("user=") if rest and rest[-1].startswith("user=") else None
    return ConversationKey("discord", f"{first}/{second}", rest[0] if rest else None, user)


def channel_of(key: ConversationKey) -> int:
    """The Discord channel (or thread) a conversation is held in."""
    return int(key.thread or key.channel.rsplit("/", 1)[1])


def thread_name(key: ConversationKey, recent: Sequence[Turn]) -> str:
    """Who the conversation is with, then its code, within Discord's 100 characters."""
    code = code_of(key)
    named = (t.name for t in reversed(recent) if t.role is Role.USER and t.name)
    who = next(named, "DM" if key.channel.startswith("dm/") else "channel")
    return f"{who[: THREAD_NAME_CHARS - len(code) - 3]} · {code}"


def said(turn: Turn) -> str:
    """One turn as staff read it: who said it, then the words, pinging nobody."""
    if turn.role is Role.USER:
        who = turn.name or "user"
    elif turn.people is People.NOTE:
        who = f"note by {turn.name}" if turn.name else "note"
    elif turn.people is People.REPLY:
        who = turn.name or "staff"
    else:
        who = "bot"
    text = discord.utils.escape_mentions(turn.content)
    return f"**{discord.utils.escape_markdown(who)}:** {text}"


def opening(key: ConversationKey, handoff: Handoff, recent: Sequence[Turn], limit: int) -> str:
    """The post a thread opens with: the conversation, why, and as much recent context as
    fits in `limit` characters (the newest kept)."""
    why = REASONS.get(handoff.reason, handoff.reason.value)
    head = f"A conversation needs a person: {why}. `{code_of(key)}`\n{HOW_TO_ANSWER}"
    lines = ["> " + said(t).replace("\n", "\n> ") for t in recent]
    while lines and len("\n".join([head, "**Recent:**", *lines])) > limit:
        if len(lines) == 1:  # the newest alone is too long: its end goes
            room = limit - len(head) - len("\n**Recent:**\n…") - 1
            lines[0] = lines[0][: max(room, 0)] + "…"
            break
        lines.pop(0)
    return "\n".join([head, "**Recent:**", *lines] if lines else [head])[:limit]


class DiscordStaffDesk:
    """The StaffDesk of Discord, and the staff side of its threads.

    Args:
        client: the bot's client, logged in (its REST calls reach any channel).
        service: stores what staff write and hands conversations back.
        channel_id: the staff text channel (DISCORD_STAFF_CHANNEL).
        role_id: the role pinged once when a thread opens (DISCORD_STAFF_ROLE), or None.
        style: Discord's limits and notice markup.
    """

    def __init__(
        self,
        client: discord.Client,
        service: ConversationService,
        channel_id: int,
        role_id: int | None,
        style: ChatStyle,
    ) -> None:
        self._client = client
        self._service = service
        self.channel_id = channel_id
        self._role_id = role_id
        self._style = style
        self._channel: discord.TextChannel | None = None

    async def start(self) -> None:
        """Find the staff channel and take Discord's handoffs; refuse a wrong channel."""
        handoffs = self._service.handoffs
        if handoffs is None:
            raise StaffChannelError("DISCORD_STAFF_CHANNEL is set, but handoffs are off")
        try:
            channel = await self._client.fetch_channel(self.channel_id)
        except discord.HTTPException as error:
            raise StaffChannelError(
                f"DISCORD_STAFF_CHANNEL {self.channel_id} cannot be read: {error.text}"
            ) from error
        if not isinstance(channel, discord.TextChannel):
            raise StaffChannelError(f"DISCORD_STAFF_CHANNEL {self.channel_id} is no text channel")
        self._channel = channel
        handoffs.attach(self._style.platform, self)

    # The StaffDesk: the core tells the staff channel.

    async def opened(self, key: ConversationKey, handoff: Handoff, recent: Sequence[Turn]) -> None:
        post = opening(key, handoff, recent, self._style.limits.max_chars - 30)
        if self._role_id is None:
            mentions = NO_PINGS
        else:  # the staff role, once, and only it
            post = f"<@&{self._role_id}> {post}"
            role = discord.Object(self._role_id)
            mentions = discord.AllowedMentions(
                everyone=False, users=False, replied_user=False, roles=[role]
            )
        thread = await self._thread_of(key)
        if thread is not None:  # the thread of an earlier handoff, still open
            await thread.send(post, allowed_mentions=mentions)
            return
        await self._new_thread(key, post, mentions, recent)

    async def relayed(self, key: ConversationKey, turn: Turn) -> None:
        thread = await self._thread_of(key)
        if thread is None:  # deleted, or renamed: open another, without the ping
            text = f"This conversation is still with people (its thread was gone). `{code_of(key)}`"
            thread = await self._new_thread(key, text, NO_PINGS, [turn])
        await self._post(thread, said(turn))

    async def returned(self, key: ConversationKey, by: str) -> None:
        thread = await self._thread_of(key)
        if thread is None:
            return
        await thread.send(f"Back with the bot: {BACK.get(by, by)}.", allowed_mentions=NO_PINGS)
        # Archived, the channel's active threads are the conversations waiting for people;
        # a message there opens the thread again.
        await thread.edit(archived=True)

    # The staff side: what staff write in a thread.

    def holds(self, channel: object) -> TypeGuard[discord.Thread]:
        """Whether a channel is a thread of the staff channel."""
        return isinstance(channel, discord.Thread) and channel.parent_id == self.channel_id

    async def on_message(self, message: discord.Message, text: str) -> None:
        """Act on a staff member's message in a thread (`text`: as people read it)."""
        thread = message.channel
        assert isinstance(thread, discord.Thread)
        if BOT.match(text):
            answer = await self.hand_back(thread)
        else:
            answer = await self._from_staff(thread, message.author.display_name, text)
        if answer is not None:
            await thread.send(answer, allowed_mentions=NO_PINGS)

    async def hand_back(self, thread: discord.Thread) -> str | None:
        """Give the thread's conversation back to the bot and tell the user; None: done."""
        key = conversation_in(thread.name)
        handoffs = self._service.handoffs
        if key is None or handoffs is None:
            return UNKNOWN_THREAD
        if not await handoffs.hand_back(key, "staff"):
            return NOT_HANDED_OFF
        await self._to_user(key, self._style.notice(notice(NoticeKind.HANDED_BACK).text))
        return None

    async def _from_staff(self, thread: discord.Thread, name: str, text: str) -> str | None:
        """A note is stored; a reply is sent to the user, then stored, while people answer."""
        key = conversation_in(thread.name)
        handoffs = self._service.handoffs
        if key is None or handoffs is None:
            return UNKNOWN_THREAD
        if NOTE.match(text):
            if note := NOTE.sub("", text, count=1).strip():
                await self._service.from_people(key, note, name=name, note=True)
            return None
        if not text:
            return TEXT_ONLY
        if await handoffs.current(key) is None:
            return BOT_HAS_IT
        try:
            await self._to_user(key, f"**{discord.utils.escape_markdown(name)}:** {text}")
        except discord.HTTPException as error:  # e.g. the user closed their DMs
            log.warning(
                "staff reply not delivered: HTTP %s", error.status, extra={"conversation": str(key)}
            )
            return NOT_DELIVERED
        await self._service.from_people(key, text, name=name)
        return None

    async def _to_user(self, key: ConversationKey, text: str) -> None:
        await self._post(self._client.get_partial_messageable(channel_of(key)), text)

    async def _post(self, channel: discord.abc.Messageable, text: str) -> None:
        for piece in split_message(text, self._style.limits.max_chars):
            await channel.send(piece.text, allowed_mentions=NO_PINGS)

    async def _new_thread(
        self,
        key: ConversationKey,
        text: str,
        mentions: discord.AllowedMentions,
        recent: Sequence[Turn],
    ) -> discord.Thread:
        """Post `text` in the staff channel and start the conversation's thread from it."""
        starter = await self._staff_channel().send(text, allowed_mentions=mentions)
        name = thread_name(key, recent)
        return await starter.create_thread(name=name, auto_archive_duration=ARCHIVE_MINUTES)

    def _staff_channel(self) -> discord.TextChannel:
        if self._channel is None:
            raise RuntimeError("the staff desk was not started")
        return self._channel

    async def _thread_of(self, key: ConversationKey) -> discord.Thread | None:
        """The conversation's active thread in the staff channel (the newest, if several)."""
        channel = self._staff_channel()
        threads = await channel.guild.active_threads()
        mine = [t for t in threads if t.parent_id == channel.id and conversation_in(t.name) == key]
        return max(mine, key=lambda t: t.id, default=None)


class StaffChannelError(PlatformSetupError):
    """DISCORD_STAFF_CHANNEL names no channel the bot can use; the message says why."""
