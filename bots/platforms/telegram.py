"""The Telegram bot: python-telegram-bot updates in, streamed and paced HTML replies out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace

from telegram import Bot, BotCommand, Message, MessageEntity, ReplyParameters, Update
from telegram.constants import ChatAction, ChatMemberStatus, ChatType, ParseMode
from telegram.error import BadRequest, InvalidToken, NetworkError, RetryAfter, TelegramError
from telegram.ext import Application, CommandHandler, ContextTypes, MessageHandler, filters

from bots.core.commands import COMMANDS, HELP_TEXT
from bots.core.models import Author, ConversationKey, Incoming
from bots.core.service import ConversationService
from bots.delivery.inflight import InFlight
from bots.delivery.reply import ChatReplies, ChatStyle
from bots.delivery.stream import CallWindow, Limits, PlatformFailed, RateLimited
from bots.platforms.errors import PlatformSetupError
from bots.platforms.telegram_markup import italic, sources_markup, to_html
from bots.platforms.telegram_staff import (
    StaffRoom,
    TelegramStaffDesk,
    retry_seconds,
    staff_message,
)
from bots.settings import TelegramSettings

log = logging.getLogger(__name__)

# 4096 characters a message. Telegram asks for about one message a second per chat and
# at most 20 a minute in a group; replies edit at most every 1.5 s.
TELEGRAM_LIMITS = Limits(max_chars=4096, edit_interval=1.5, burst=5, window=5.0)
PER_CHAT_SECONDS = 1.05
GROUP_PER_MINUTE = 20
GROUP_RESERVE = 6  # of those 20, kept for final texts: streaming edits stop earlier
KNOWN_CHATS = 10_000
# Notices in italics; "typing…" lasts 5 s, so it is renewed every 4.
TELEGRAM_STYLE = ChatStyle(
    "telegram", TELEGRAM_LIMITS, notice=italic, typing_every=4.0, sources=sources_markup
)
# The command menu: /start, which Telegram clients send first, then the core's commands.
MENU = [
    BotCommand("start", "Start talking to Parley"),
    *(BotCommand(spec.name, spec.summary) for spec in COMMANDS),
]
HOW_TO_ASK = "In groups, mention me or reply to me."
MENTIONS: list[str | None] = [MessageEntity.MENTION, MessageEntity.TEXT_MENTION]
GROUP_ADMINS = (ChatMemberStatus.ADMINISTRATOR, ChatMemberStatus.OWNER)
START_TEXT = "Hi! Send me a message and I'll answer. /help lists what I understand."
ONLY_TEXT = (
    "I can only read text: send your question as a message, or as a photo's or file's caption."
)


def is_group(message: Message) -> bool:
    return message.chat.type in (ChatType.GROUP, ChatType.SUPERGROUP)


def words_of(message: Message) -> str | None:
    """What a message says: its text, or a photo's or file's caption; None for bare media."""
    return message.text if message.text is not None else message.caption


def entities_of(message: Message, types: list[str | None]) -> dict[MessageEntity, str]:
    """The entities of these types in the message's words, each with the text it covers."""
    if message.text is not None:
        return message.parse_entities(types)
    return message.parse_caption_entities(types)


def is_me(entity: MessageEntity, covered: str, me: Bot) -> bool:
    """Whether a mention names the bot: @its_username (any case), or its user."""
    if entity.type == MessageEntity.TEXT_MENTION:
        return entity.user is not None and entity.user.id == me.id
    return covered[1:].lower() == me.username.lower()


def without(text: str, entities: Iterable[MessageEntity]) -> str:
    """The text with these entities cut out; their offsets count UTF-16 code units."""
    units = text.encode("utf-16-le")
    for entity in sorted(entities, key=lambda e: e.offset, reverse=True):
        units = units[: 2 * entity.offset] + units[2 * (entity.offset + entity.length) :]
    return units.decode("utf-16-le")


def conversation_of(message: Message) -> ConversationKey:
    """Key a conversation: the chat, and in forums the topic."""
    topic = message.message_thread_id if message.is_topic_message else None
    return ConversationKey("telegram", str(message.chat.id), str(topic) if topic else None)


class ChatSink:
    """Send and edit a reply's messages as HTML; fall back to plain text if Telegram objects.

    Outside private chats the first message replies to the asker's (plainly, if it was
    deleted meanwhile), so each asker sees which answer is theirs; continuations do not.
    """

    def __init__(self, message: Message) -> None:
        self._message = message
        self._thread = message.message_thread_id if message.is_topic_message else None
        self._reply_to: ReplyParameters | None = (
            None
            if message.chat.type == ChatType.PRIVATE
            else ReplyParameters(message.message_id, allow_sending_without_reply=True)
        )

    async def send(self, text: str) -> Message:
        chat = self._message.get_bot()
        try:
            sent = await self._plain_if_refused(
                lambda mode, body: chat.send_message(
                    self._message.chat.id, body, parse_mode=mode,
                    message_thread_id=self._thread, disable_web_page_preview=True,
                    reply_parameters=self._reply_to,
                ),
                text,
            )  # fmt: skip
        except RetryAfter as error:  # the send is tried again, still as the reply
            raise RateLimited(retry_seconds(error.retry_after)) from error
        except BadRequest:  # refused for good (PTB counts it a NetworkError)
            raise
        except NetworkError as error:  # a 5xx, a timeout, a lost connection: it may pass
            raise PlatformFailed(str(error)) from error
        self._reply_to = None
        return sent

    async def edit(self, message: Message, text: str) -> None:
        try:
            await self._plain_if_refused(
                lambda mode, body: message.edit_text(
                    body, parse_mode=mode, disable_web_page_preview=True
                ),
                text,
            )
        except RetryAfter as error:
            raise RateLimited(retry_seconds(error.retry_after)) from error
        except BadRequest as error:
            if "not modified" not in error.message.lower():
                raise
        except NetworkError as error:
            raise PlatformFailed(str(error)) from error

    @staticmethod
    async def _plain_if_refused(call: object, text: str) -> Message:
        try:
            return await call(ParseMode.HTML, to_html(text))  # type: ignore[operator, no-any-return]
        except BadRequest as error:
            if "can't parse entities" not in error.message.lower():
                raise
            log.warning("Telegram refused the HTML of a reply; sending it as plain text")
            return await call(None, text)  # type: ignore[operator, no-any-return]


def typing_in(message: Message) -> Callable[[], Awaitable[None]]:
    """Show "typing…" in the message's chat (and topic) once; a refusal only means none."""

    async def show() -> None:
        with contextlib.suppress(TelegramError):
            await message.get_bot().send_chat_action(
                message.chat.id, ChatAction.TYPING, message_thread_id=message.message_thread_id
            )

    return show


class TelegramChat:
    """Translate Telegram updates into the core's types, and replies back into messages."""

    def __init__(
        self,
        service: ConversationService,
        settings: TelegramSettings,
        in_flight: InFlight | None = None,
    ) -> None:
        self._service = service
        self._settings = settings
        self._windows: OrderedDict[int, list[CallWindow]] = OrderedDict()
        self._replies = ChatReplies(service, TELEGRAM_STYLE, in_flight=in_flight)
        self.in_flight = self._replies.in_flight
        self._staff: StaffRoom | None = None

    def open_staff_desk(self, bot: Bot) -> None:
        """Let staff answer handed-off conversations in TELEGRAM_STAFF_CHAT, through `bot`."""
        handoffs, staff_chat = self._service.handoffs, self._settings.staff_chat
        if handoffs is None or staff_chat is None:
            return
        desk = TelegramStaffDesk(bot, staff_chat, self.windows_for)
        handoffs.attach("telegram", desk)
        self._staff = StaffRoom(self._service, desk)

    def windows_for(self, chat_id: int, group: bool) -> list[CallWindow]:
        """The per-chat budgets every reply in that chat shares (most recent chats kept)."""
        windows = self._windows.pop(chat_id, None) or [CallWindow(1, PER_CHAT_SECONDS)]
        if group and len(windows) == 1:
            windows.append(CallWindow(GROUP_PER_MINUTE, 60.0, reserve=GROUP_RESERVE))
        self._windows[chat_id] = windows
        while len(self._windows) > KNOWN_CHATS:
            self._windows.popitem(last=False)
        return windows

    def is_admitted(self, message: Message) -> bool:
        s, user = self._settings, message.from_user
        if s.allowed_users and (user is None or user.id not in s.allowed_users):
            return False
        return not s.allowed_chats or message.chat.id in s.allowed_chats

    def addressed_text(self, message: Message, me: Bot) -> str | None:
        """The words meant for the bot, or None when the message is not for it.

        A command is for the bot unless it names another (/cmd@other). In groups, so is
        a message that mentions the bot (the mention is cut out), replies to it, or
        starts with the trigger prefix.
        """
        text = words_of(message) or ""
        commands = entities_of(message, [MessageEntity.BOT_COMMAND])
        if command := next((word for e, word in commands.items() if e.offset == 0), None):
            _, at, target = command.partition("@")
            return text if not at or target.lower() == me.username.lower() else None
        if not is_group(message):
            return text
        mentions = [
            e for e, covered in entities_of(message, MENTIONS).items() if is_me(e, covered, me)
        ]
        if mentions:
            return without(text, mentions).strip()
        replied = message.reply_to_message
        if replied and replied.from_user and replied.from_user.id == me.id:
            return text
        prefix = self._settings.trigger_prefix
        if prefix and text.startswith(prefix):
            return text[len(prefix) :].strip()
        return None

    async def on_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Answer a new message meant for the bot; say what it reads if it has no words."""
        message = update.effective_message
        if message is None or not self.is_admitted(message):
            return
        incoming = self.incoming_of(message, context.bot)
        if incoming is None:
            return
        with self.in_flight.track():  # from here on, a reply is under way
            if words_of(message) is None:  # a sticker, voice note, location...: no model call
                await message.reply_text(ONLY_TEXT)
                return
            # "@bot /reset" is a command too; only commands ask who is an admin.
            if incoming.text.startswith("/"):
                incoming = replace(incoming, is_admin=await self.is_admin(message))
            await self._answer(message, incoming)

    async def on_staff(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Act on a staff member's reply to a post: answer, note, or /bot; edits are not."""
        message = update.message
        if message is None or self._staff is None:
            return
        if (said := staff_message(message, context.bot)) is not None:
            with self.in_flight.track():  # a staff answer under way finishes on shutdown
                await self._staff.handle(said)

    async def on_edit(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Update the stored turn of an edited message; an edit is never answered."""
        message = update.effective_message
        if message is None or not self.is_admitted(message):
            return
        if (edited := self.incoming_of(message, context.bot)) is not None:
            await self._service.edit(edited)

    async def is_admin(self, message: Message) -> bool:
        """An admin may change what a group shares: TELEGRAM_ADMINS, or the group's own."""
        user = message.from_user
        if user is None:
            return False
        if not is_group(message) or user.id in self._settings.admins:
            return True
        try:
            member = await message.get_bot().get_chat_member(message.chat.id, user.id)
        except TelegramError:
            return False
        return member.status in GROUP_ADMINS

    def incoming_of(self, message: Message, me: Bot) -> Incoming | None:
        """Translate a message, new or edited, into the core's type; None if not for the bot."""
        text = self.addressed_text(message, me)
        if text is None:
            return None
        user = message.from_user
        return Incoming(
            conversation_of(message),
            text,
            author=Author(str(user.id), user.full_name) if user else None,
            in_group=is_group(message),
            message_id=str(message.message_id),
        )

    async def _answer(self, message: Message, incoming: Incoming) -> None:
        # Replies in a chat appear in the order asked, across its topics too.
        await self._replies.answer(
            incoming,
            ChatSink(message),
            typing=typing_in(message),
            say=message.reply_text,
            order=message.chat.id,
            shared=self.windows_for(message.chat.id, is_group(message)),
        )

    async def on_start(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if update.effective_message and self.is_admitted(update.effective_message):
            await update.effective_message.reply_text(START_TEXT)

    async def on_help(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if update.effective_message and self.is_admitted(update.effective_message):
            await update.effective_message.reply_text(f"{HOW_TO_ASK}\n{HELP_TEXT}")

    async def on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        log.warning("error while handling a Telegram update: %r", context.error)


def build_application(chat: TelegramChat, settings: TelegramSettings) -> Application:  # type: ignore[type-arg]
    """Build the PTB application: one handler per concern, updates concurrent across chats."""
    if settings.token is None:
        raise TelegramSetupError("TELEGRAM_TOKEN is not set: get one from @BotFather")
    builder = Application.builder().token(settings.token.get_secret_value())
    if settings.base_url:
        builder = builder.base_url(settings.base_url)
    application = builder.concurrent_updates(True).build()
    # New messages are answered; edits only update the stored turn. A channel's posts
    # are its messages only when configured: a bot added to a channel stays silent.
    new: filters.BaseFilter = filters.UpdateType.MESSAGE
    edited: filters.BaseFilter = filters.UpdateType.EDITED_MESSAGE
    if settings.answer_channel_posts:
        new |= filters.UpdateType.CHANNEL_POST
        edited |= filters.UpdateType.EDITED_CHANNEL_POST
    if settings.staff_chat is not None:  # first: the staff chat is never chatted with
        application.add_handler(MessageHandler(filters.Chat(settings.staff_chat), chat.on_staff))
    application.add_handler(CommandHandler("start", chat.on_start, filters=new))
    application.add_handler(CommandHandler("help", chat.on_help, filters=new))
    worded = filters.TEXT | filters.CAPTION  # not service messages, nor live locations' edits
    application.add_handler(MessageHandler(new & (worded | filters.ATTACHMENT), chat.on_message))
    application.add_handler(MessageHandler(edited & worded, chat.on_edit))
    application.add_error_handler(chat.on_error)
    return application


async def run_telegram(
    service: ConversationService, settings: TelegramSettings, in_flight: InFlight | None = None
) -> None:
    """Run the bot, by long polling or as a webhook, until the task is cancelled.

    Then it stops taking updates, gives replies in progress TELEGRAM_SHUTDOWN_SECONDS to
    finish, and ends the rest with a notice. `in_flight` tracks the replies being
    delivered (tests wait for it to be idle).
    """
    chat = TelegramChat(service, settings, in_flight)
    application = build_application(chat, settings)
    try:
        async with application:
            chat.open_staff_desk(application.bot)
            await application.bot.set_my_commands(MENU)
            await application.start()
            assert application.updater is not None
            if settings.webhook_url:
                secret = settings.webhook_secret
                await application.updater.start_webhook(
                    listen=settings.webhook_listen,
                    port=settings.webhook_port,
                    url_path="telegram",
                    webhook_url=settings.webhook_url,
                    secret_token=secret.get_secret_value() if secret else None,
                )
            else:
                await application.updater.start_polling(
                    poll_interval=0.0, timeout=settings.poll_timeout
                )
            try:
                await asyncio.Event().wait()
            finally:
                await application.updater.stop()
                await chat.in_flight.drain(settings.shutdown_seconds)
                await application.stop()
    except InvalidToken as error:
        raise TelegramSetupError("Telegram rejected TELEGRAM_TOKEN: check the token") from error


class TelegramSetupError(PlatformSetupError):
    """Telegram refused the bot's configuration; the message says what to change."""
