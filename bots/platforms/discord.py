"""The Discord bot: discord.py events in, streamed and paced replies out, never a ping."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket
from discord.http import Route

from bots.core.commands import COMMANDS, HELP_TEXT, Option
from bots.core.knowledge import is_web_link
from bots.core.models import Author, ConversationKey, Incoming, Source
from bots.core.ports import Observer
from bots.core.service import ConversationService
from bots.delivery.inflight import InFlight
from bots.delivery.reply import ChatReplies, ChatStyle
from bots.delivery.stream import Limits, PlatformFailed, RateLimited
from bots.platforms.discord_staff import HANDED_BACK, DiscordStaffDesk
from bots.platforms.errors import PlatformSetupError
from bots.settings import DiscordSettings

log = logging.getLogger(__name__)

# 2000 characters a message; Discord allows about 5 edits per 5 s per message.
DISCORD_LIMITS = Limits(max_chars=2000, edit_interval=1.25, burst=5, window=5.0)
# Notices in Discord's small grey subtext; "typing…" lasts 10 s, discord.py renews it every 5.


def discord_sources(sources: Sequence[Source]) -> str:
    """An answer's sources as Discord subtext: masked links, their previews suppressed."""
    items = [
        f"[{title}](<{quote(s.link, safe=URL_SAFE)}>)" if is_web_link(s.link) and s.link else title
        for s in sources
        for title in [discord.utils.escape_markdown(" ".join(s.title.split())).translate(NO_LINK)]
    ]
    return "-# Sources: " + " · ".join(items)


# A masked link's text may not hold brackets; its address is %-escaped past these.
NO_LINK = str.maketrans("[]", "()")
URL_SAFE = ":/?#@!$&'*+,;=%~-._"
DISCORD_STYLE = ChatStyle(
    "discord", DISCORD_LIMITS, notice="-# {}".format, typing_every=5.0, sources=discord_sources
)
HOW_TO_ASK = "Mention me, reply to me, or DM me."
# Model output must never notify anyone: no @everyone, @here, role, user or reply pings.
NO_PINGS = discord.AllowedMentions.none()
# discord.py's HTTP client waits out a 429 itself; it only logs it, with these words.
WAITED_OUT_429 = ("We are being rate limited.", "Retrying in")
INTENT_HELP = (
    "Discord refused the MESSAGE CONTENT intent. Turn it on in the developer portal: "
    "https://discord.com/developers/applications -> your app -> Bot -> Privileged Gateway "
    "Intents -> Message Content Intent."
)


def intents() -> discord.Intents:
    """Ask only for what Parley reads: guilds, messages in guilds and DMs, and their text."""
    wanted = discord.Intents.none()
    wanted.guilds = True
    wanted.guild_messages = True
    wanted.dm_messages = True
    wanted.message_content = True
    return wanted


@dataclass(frozen=True)
class AccessPolicy:
    """Who may talk to the bot: allow lists (empty allows all) and deny lists (win)."""

    settings: DiscordSettings

    def admits(self, *, guild: int | None, channel: int, user: int, roles: frozenset[int]) -> bool:
        s = self.settings
        if user in s.deny_users or roles & s.deny_roles:
            return False
        if s.allow_users and user not in s.allow_users:
            return False
        if guild is None:
            return s.allow_dms
        if guild in s.deny_guilds or channel in s.deny_channels:
            return False
        if s.allow_guilds and guild not in s.allow_guilds:
            return False
        if s.allow_channels and channel not in s.allow_channels:
            return False
        return not s.allow_roles or bool(roles & s.allow_roles)


def conversation_of(channel: object, guild_id: int | None, channel_id: int) -> ConversationKey:
    """Key a conversation: guild + channel, a thread on its own, a DM by its channel."""
    if guild_id is None:
        return ConversationKey("discord", f"dm/{channel_id}")
    if isinstance(channel, discord.Thread):
        return ConversationKey("discord", f"{guild_id}/{channel.parent_id}", str(channel.id))
    return ConversationKey("discord", f"{guild_id}/{channel_id}")


class ChannelSink:
    """Send and edit one reply's messages in a channel, the first as a reply, without pings."""

    def __init__(
        self, channel: discord.abc.Messageable, reply_to: discord.Message | None = None
    ) -> None:
        self._channel = channel
        # A reply to a message deleted meanwhile is posted as a plain message.
        self._reply_to: discord.MessageReference | None = (
            reply_to.to_reference(fail_if_not_exists=False) if reply_to else None
        )

    async def send(self, text: str) -> discord.Message:
        with delivery_errors():  # a send tried again is still the reply
            if self._reply_to is None:
                return await self._channel.send(text, allowed_mentions=NO_PINGS)
            sent = await self._channel.send(
                text, allowed_mentions=NO_PINGS, reference=self._reply_to
            )
        self._reply_to = None
        return sent

    async def edit(self, message: discord.Message, text: str) -> None:
        with delivery_errors():
            await message.edit(content=text, allowed_mentions=NO_PINGS)


@contextlib.contextmanager
def delivery_errors() -> Iterator[None]:
    """Say what a failed call means for the delivery: wait out a 429, retry what may pass
    (a 5xx once discord.py's own retries are spent, a lost connection, a timeout)."""
    try:
        yield
    except discord.RateLimited as limited:
        raise RateLimited(limited.retry_after) from limited
    except (discord.DiscordServerError, aiohttp.ClientError, TimeoutError) as error:
        raise PlatformFailed(str(error)) from error


def typing_in(channel: discord.abc.Messageable) -> Callable[[], Awaitable[None]]:
    """Show "typing…" in a channel once; a refusal only means no indicator."""

    async def show() -> None:
        with contextlib.suppress(discord.HTTPException):
            await channel.typing()

    return show


class DiscordChat:
    """Translate Discord messages into the core's types, and replies back into messages."""

    def __init__(
        self,
        service: ConversationService,
        settings: DiscordSettings,
        in_flight: InFlight | None = None,
    ) -> None:
        self._service = service
        self._settings = settings
        self._policy = AccessPolicy(settings)
        self._replies = ChatReplies(service, DISCORD_STYLE, in_flight=in_flight)
        self.in_flight = self._replies.in_flight
        self.staff: DiscordStaffDesk | None = None  # set where DISCORD_STAFF_CHANNEL is

    def is_addressed(self, message: discord.Message, me: discord.ClientUser) -> bool:
        """Answer DMs, mentions, replies to the bot, and every message in open channels."""
        if message.guild is None:
            return True
        if message.channel.id in self._settings.open_channels or me.id in message.raw_mentions:
            return True
        replied = message.reference.resolved if message.reference else None
        return isinstance(replied, discord.Message) and replied.author.id == me.id

    def is_admitted(self, message: discord.Message) -> bool:
        roles = frozenset(role.id for role in getattr(message.author, "roles", ()))
        return self._policy.admits(
            guild=message.guild.id if message.guild else None,
            channel=getattr(message.channel, "parent_id", None) or message.channel.id,
            user=message.author.id,
            roles=roles,
        )

    def key_of(self, message: discord.Message) -> ConversationKey:
        guild = message.guild.id if message.guild else None
        return conversation_of(message.channel, guild, message.channel.id)

    def text_of(self, message: discord.Message, me: discord.ClientUser) -> str:
        """The message as people read it, without the mention that addressed the bot."""
        text = re.sub(rf"<@!?{me.id}>", "", message.content)
        for member in message.mentions:
            text = re.sub(rf"<@!?{member.id}>", f"@{member.display_name}", text)
        for role in message.role_mentions:
            text = text.replace(f"<@&{role.id}>", f"@{role.name}")
        return text.strip()

    def is_admin(self, user: discord.abc.User, permissions: discord.Permissions | None) -> bool:
        """An admin may change what a channel shares: DISCORD_ADMINS, or Manage Channels."""
        return user.id in self._settings.admins or bool(permissions and permissions.manage_channels)

    async def on_message(self, message: discord.Message, me: discord.ClientUser) -> None:
        if message.author.bot:
            return
        if self.staff is not None and self.staff.holds(message.channel):
            with self.in_flight.track():  # a staff answer under way finishes on shutdown
                await self.staff.on_message(message, self.text_of(message, me))
            return
        if not self.is_addressed(message, me):
            return
        if not self.is_admitted(message):
            log.info("denied", extra={"conversation": str(self.key_of(message))})
            return
        member = message.author if isinstance(message.author, discord.Member) else None
        permissions = message.channel.permissions_for(member) if member else None
        is_admin = self.is_admin(message.author, permissions)
        incoming = self.incoming_of(message, me, is_admin=is_admin)
        await self._deliver(incoming, message.channel, reply_to=message)

    async def _deliver(
        self,
        incoming: Incoming,
        channel: discord.abc.Messageable,
        *,
        reply_to: discord.Message | None = None,
    ) -> None:
        try:
            await self._replies.answer(
                incoming,
                ChannelSink(channel, reply_to),
                typing=typing_in(channel),
                say=channel.send,
            )
        except discord.HTTPException as error:  # e.g. no permission to post in the channel
            log.warning(
                "reply not delivered: HTTP %s %s",
                error.status,
                error.text,
                extra={"conversation": str(incoming.key)},
            )

    def command_incoming(self, interaction: discord.Interaction, text: str) -> Incoming:
        """Read a slash command as the core's command text, from the interaction's user."""
        guild, user = interaction.guild_id, interaction.user
        return Incoming(
            conversation_of(interaction.channel, guild, interaction.channel_id or 0),
            text,
            author=Author(str(user.id), user.display_name),
            in_group=guild is not None,
            is_admin=self.is_admin(user, interaction.permissions),
            scope=server_of(guild),
        )

    async def command(self, interaction: discord.Interaction, text: str) -> None:
        """Answer a slash command privately (only its user sees the answer).

        Discord drops an interaction not acknowledged within 3 s, and an answer may take
        longer (a /reset ending a reply, a slow store): acknowledge now, answer after.
        """
        await interaction.response.defer(ephemeral=True, thinking=True)
        if self.staff is not None and text == "/bot" and self.staff.holds(interaction.channel):
            answer = await self.staff.hand_back(interaction.channel) or HANDED_BACK
        else:
            answer = await self._replies.text(self.command_incoming(interaction, text))
        await interaction.followup.send(
            answer[: DISCORD_LIMITS.max_chars], ephemeral=True, allowed_mentions=NO_PINGS
        )

    async def retry(self, interaction: discord.Interaction, text: str) -> None:
        """Answer the user's last message again, in the channel for everyone to see."""
        await interaction.response.send_message(
            "Answering your last message again.", ephemeral=True, allowed_mentions=NO_PINGS
        )
        channel = interaction.channel
        if isinstance(channel, discord.abc.Messageable):
            await self._deliver(self.command_incoming(interaction, text), channel)

    async def help(self, interaction: discord.Interaction, text: str) -> None:
        """Say how to address the bot, and the commands."""
        await interaction.response.send_message(
            f"{HOW_TO_ASK}\n{HELP_TEXT}", ephemeral=True, allowed_mentions=NO_PINGS
        )

    def incoming_of(
        self, message: discord.Message, me: discord.ClientUser, *, is_admin: bool = False
    ) -> Incoming:
        """Translate a message, new or edited, into the core's type."""
        return Incoming(
            self.key_of(message),
            self.text_of(message, me),
            author=Author(str(message.author.id), message.author.display_name),
            in_group=message.guild is not None,
            message_id=str(message.id),
            is_admin=is_admin,
            scope=server_of(message.guild.id if message.guild else None),
        )

    async def on_edit(self, message: discord.Message, me: discord.ClientUser) -> None:
        await self._service.edit(self.incoming_of(message, me))

    async def on_delete(
        self, payload: discord.RawMessageDeleteEvent, channel: object, me: discord.ClientUser
    ) -> None:
        """Forget a deleted message; its author (for per-member conversations) if cached."""
        if payload.cached_message is not None:
            deleted = self.incoming_of(payload.cached_message, me)
        else:
            key = conversation_of(channel, payload.guild_id, payload.channel_id)
            deleted = Incoming(key, "", message_id=str(payload.message_id))
        await self._service.forget(deleted)


def server_of(guild_id: int | None) -> ConversationKey | None:
    """The key a Discord server's own options are kept under (/kb server)."""
    return ConversationKey("discord", f"server/{guild_id}") if guild_id is not None else None


SlashCommand = app_commands.Command[Any, ..., None] | app_commands.Group
SlashRun = Callable[[discord.Interaction, str], Awaitable[None]]


def slash_commands(chat: DiscordChat) -> list[SlashCommand]:
    """Discord's slash commands, made from the core's command table."""
    made: list[SlashCommand] = []
    for spec in COMMANDS:
        if spec.subcommands:
            group = app_commands.Group(name=spec.name, description=spec.summary)
            for action in spec.actions:
                if action.word:
                    text = f"/{spec.name} {action.word}"
                    group.add_command(
                        _slash(action.word, action.summary, action.option, text, chat.command)
                    )
            made.append(group)
            continue
        run = chat.retry if spec.asks_model else chat.help if spec.name == "help" else chat.command
        made.append(_slash(spec.name, spec.summary, spec.option, f"/{spec.name}", run))
    return made


def _slash(
    name: str, summary: str, option: Option | None, text: str, run: SlashRun
) -> app_commands.Command[Any, ..., None]:
    """One slash command that runs `text`, with the option's value after it."""

    async def callback(interaction: discord.Interaction, **values: str | None) -> None:
        value = values.get(option.name) if option else None
        await run(interaction, f"{text} {value}" if value else text)

    parameters = [
        inspect.Parameter(
            "interaction", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=discord.Interaction
        )
    ]
    if option is not None:  # discord.py reads the options from the callback's signature
        kind: Any = Literal.__getitem__(option.choices) if option.choices else str
        parameters.append(
            inspect.Parameter(
                option.name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                annotation=kind if option.required else kind | None,
                default=inspect.Parameter.empty if option.required else None,
            )
        )
        callback = app_commands.describe(**{option.name: option.summary})(callback)
    callback.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return app_commands.Command(name=name, description=summary, callback=callback)


class ParleyDiscord(discord.Client):
    """discord.py's client with Parley's handlers; subclassed only to wire them in."""

    def __init__(self, chat: DiscordChat, shard: tuple[int, int] | None = None) -> None:
        shard_id, shard_count = shard if shard else (None, None)
        super().__init__(
            intents=intents(),
            allowed_mentions=NO_PINGS,
            shard_id=shard_id,
            shard_count=shard_count,
        )
        self.chat = chat
        self.tree = app_commands.CommandTree(self)

    async def setup_hook(self) -> None:
        if self.chat.staff is not None:  # logged in now: the staff channel can be read
            await self.chat.staff.start()
        for command in slash_commands(self.chat):
            self.tree.add_command(command)
        await self.tree.sync()

    async def on_ready(self) -> None:
        log.info("connected to Discord as %s", self.user)

    async def on_message(self, message: discord.Message) -> None:
        assert self.user is not None
        await self.chat.on_message(message, self.user)

    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        if not payload.message.author.bot:
            assert self.user is not None
            await self.chat.on_edit(payload.message, self.user)

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        assert self.user is not None
        await self.chat.on_delete(payload, self.get_channel(payload.channel_id), self.user)


class RateLimitCounter(logging.Filter):
    """Report each 429 that discord.py waits out to the Observer: it has no event for them,
    only a warning on its `discord.http` logger, where this filter sits.

    It counts only the records of the client it was installed for (the context `run_discord`
    runs in), and passes on only those at the level the logs were asked for.
    """

    def __init__(self, observer: Observer, shown: int) -> None:
        super().__init__()
        self._observer = observer
        self._shown = shown

    def filter(self, record: logging.LogRecord) -> bool:
        start, then = WAITED_OUT_429
        message = record.msg if isinstance(record.msg, str) else ""
        if _counting.get() is self and message.startswith(start) and then in message:
            # One raised instead (too long to wait) reaches the sink as RateLimited, and the
            # delivery reports it, so it is not counted here.
            self._observer.platform_limited(DISCORD_STYLE.platform)
        return record.levelno >= self._shown


_counting: contextvars.ContextVar[RateLimitCounter | None] = contextvars.ContextVar(
    "discord_429_counter", default=None
)


@contextlib.contextmanager
def counting_rate_limits(observer: Observer) -> Iterator[None]:
    """Report the 429s discord.py waits out in this context to `observer`, whatever the
    log level (its warnings are made, counted, then shown only if asked for)."""
    logger = logging.getLogger("discord.http")
    level, shown = logger.level, logger.getEffectiveLevel()
    counter = RateLimitCounter(observer, shown)
    logger.setLevel(min(shown, logging.WARNING))
    logger.addFilter(counter)
    token = _counting.set(counter)
    try:
        yield
    finally:
        _counting.reset(token)
        logger.removeFilter(counter)
        logger.setLevel(level)


def use_endpoints(settings: DiscordSettings) -> None:
    """Point discord.py at other REST and gateway URLs (proxies, or a test server)."""
    if settings.api_base_url:
        Route.BASE = settings.api_base_url.rstrip("/")
    if settings.gateway_url:
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.gateway_url)


def shard_of(settings: DiscordSettings, hostname: str | None = None) -> tuple[int, int] | None:
    """This process's shard and the shard count, from DISCORD_SHARD_IDS/COUNT; None: unsharded.

    "ordinal" takes the number that ends the host name, as a StatefulSet names its pods
    (parley-discord-2 runs shard 2). One process runs one shard; replicas scale out.
    """
    if settings.shard_count is None and settings.shard_ids is None:
        return None
    if settings.shard_count is None or settings.shard_ids is None:
        raise DiscordSetupError("set both DISCORD_SHARD_COUNT and DISCORD_SHARD_IDS, or neither")
    if settings.shard_ids == "ordinal":
        host = hostname if hostname is not None else os.environ.get("HOSTNAME", "")
        found = re.search(r"(\d+)$", host)
        if found is None:
            raise DiscordSetupError(
                f"DISCORD_SHARD_IDS=ordinal, but the host name {host!r} does not end in a number"
            )
        ids = [int(found.group(1))]
    else:
        ids = [int(part) for part in settings.shard_ids.split(",")]
    if len(ids) != 1:
        raise DiscordSetupError(
            "DISCORD_SHARD_IDS names one shard per process; run a replica for each"
        )
    if not 0 <= ids[0] < settings.shard_count:
        raise DiscordSetupError(
            f"shard {ids[0]} is outside DISCORD_SHARD_COUNT={settings.shard_count}"
        )
    return ids[0], settings.shard_count


async def run_discord(
    service: ConversationService, settings: DiscordSettings, in_flight: InFlight | None = None
) -> None:
    """Run the bot until the connection ends or the task is cancelled.

    Then it takes no more messages, gives replies in progress DISCORD_SHUTDOWN_SECONDS to
    finish, ends the rest with a notice, and closes its connections. `in_flight` tracks
    the replies being delivered (tests wait for it to be idle).
    """
    if settings.token is None:
        raise ValueError("DISCORD_TOKEN is not set")
    use_endpoints(settings)
    chat = DiscordChat(service, settings, in_flight)
    client = ParleyDiscord(chat, shard_of(settings))
    if settings.staff_channel is not None:
        chat.staff = DiscordStaffDesk(
            client, service, settings.staff_channel, settings.staff_role, DISCORD_STYLE
        )
    with counting_rate_limits(service.observer):
        async with client:  # on the way out, after the replies: close the connections
            connection = asyncio.create_task(client.start(settings.token.get_secret_value()))
            try:
                # Shielded: while the replies in progress finish, the gateway is still
                # read, so a message arriving then is told to come back, not lost unread.
                await asyncio.shield(connection)
            except discord.PrivilegedIntentsRequired as error:
                raise DiscordSetupError(INTENT_HELP) from error
            except discord.LoginFailure as error:
                rejected = "Discord rejected DISCORD_TOKEN: check the bot token"
                raise DiscordSetupError(rejected) from error
            finally:
                await chat.in_flight.drain(settings.shutdown_seconds)
                connection.cancel()
                await asyncio.gather(connection, return_exceptions=True)


class DiscordSetupError(PlatformSetupError):
    """Discord refused the bot's configuration; the message says what to change."""
