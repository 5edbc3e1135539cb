"""A local fake of the Telegram Bot API, over real HTTP on loopback, for python-telegram-bot.

It keeps each chat's messages, queues updates for `getUpdates` (long polling: new and
edited messages, channel posts, with mention entities as Telegram finds them), answers
`sendMessage`, `editMessageText`, `sendChatAction`, `getChat` (chats seen in updates),
`setMyCommands`, `setWebhook` and friends the way Telegram does, including its errors: 429
with `retry_after` when a chat's limits are exceeded, 400 "can't parse entities" for
malformed HTML, and 400 "message is not modified" for an edit that changes nothing; and,
when asked, 502 for the next calls of a method (`fail_next`) or for a share of sends and
edits (`fail_share`).
"""

from __future__ import annotations

import asyncio
import contextlib
import html.parser
import itertools
import json
import math
import random
import re
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, ClassVar

from aiohttp import web

from tests.loopback import serve

TOKEN = "123456:TEST-token-for-the-fake-api"
BOT = {"id": 777, "is_bot": True, "first_name": "Parley", "username": "parley_bot"}
NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup "
    "are exactly the same as a current content and reply markup of the message"
)
WRITES = ("sendMessage", "editMessageText")  # what `fail_share` applies to
NUMERIC = {"chat_id", "message_id", "offset", "timeout", "limit", "message_thread_id"}


def person(user_id: int, name: str) -> dict[str, Any]:
    return {"id": user_id, "is_bot": False, "first_name": name, "username": name.lower()}


def private_chat(user: dict[str, Any]) -> dict[str, Any]:
    return {"id": user["id"], "type": "private", "first_name": user["first_name"]}


def group_chat(chat_id: int, *, forum: bool = False) -> dict[str, Any]:
    return {"id": chat_id, "type": "supergroup", "title": f"group {chat_id}", "is_forum": forum}


def channel(chat_id: int) -> dict[str, Any]:
    return {"id": chat_id, "type": "channel", "title": f"channel {chat_id}"}


def _file(file_id: str, **fields: Any) -> dict[str, Any]:
    return {"file_id": file_id, "file_unique_id": f"u-{file_id}", **fields}


# What a message carries besides (or instead of) text, as the Bot API shapes it.
MEDIA: dict[str, dict[str, Any]] = {
    "photo": {"photo": [_file("p-small", width=90, height=60), _file("p", width=1280, height=853)]},
    "sticker": {
        "sticker": _file(
            "s",
            type="regular",
            width=512,
            height=512,
            is_animated=False,
            is_video=False,
            emoji="👍",
        )
    },
    "voice": {"voice": _file("v", duration=3, mime_type="audio/ogg")},
    "document": {"document": _file("d", file_name="notes.pdf", mime_type="application/pdf")},
    "location": {"location": {"latitude": 48.8584, "longitude": 2.2945}},
}
# A username mention as Telegram finds one: not inside a word or an address.
MENTION = re.compile(r"(?<![\w@.])@[A-Za-z0-9_]{5,32}(?!\w)")


def utf16(text: str) -> int:
    """The length of a text in UTF-16 code units, which entity offsets count."""
    return len(text.encode("utf-16-le")) // 2


def mentions(text: str) -> list[dict[str, Any]]:
    """The `mention` entities Telegram adds to a text."""
    return [
        {"type": "mention", "offset": utf16(text[: m.start()]), "length": utf16(m.group())}
        for m in MENTION.finditer(text)
    ]


class _TagChecker(html.parser.HTMLParser):
    """Accept only Telegram's tags, attributes and nesting, like Telegram's own parser."""

    ALLOWED: ClassVar[set[str]] = {
        "b",
        "strong",
        "i",
        "em",
        "u",
        "s",
        "code",
        "pre",
        "a",
        "blockquote",
        "tg-spoiler",
    }
    LINK_SCHEMES: ClassVar[tuple[str, ...]] = ("http://", "https://", "mailto:", "tg://")
    ATOMIC: ClassVar[set[str]] = {"a", "code", "pre"}  # these can't contain one another

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.error: str | None = None
        self.text: list[str] = []

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.error = self.error or self._problem(tag, dict(attrs))
        self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            self.error = self.error or f'unexpected end tag "{tag}"'

    def _problem(self, tag: str, attrs: dict[str, str | None]) -> str | None:
        parent = self.stack[-1] if self.stack else None
        if tag not in self.ALLOWED:
            return f'unsupported start tag "{tag}"'
        # The attributes each tag may have: a link's URL, a code block's language.
        href = (attrs.pop("href", None) or "") if tag == "a" else "http://"
        language = (attrs.pop("class", None) or "language-") if parent == "pre" else "language-"
        if tag == "blockquote":
            attrs.pop("expandable", None)
        if not href.lower().startswith(self.LINK_SCHEMES):
            return f'wrong URL "{href}" in tag "a"'
        if not language.startswith("language-"):
            return f'wrong class "{language}" in tag "code"'
        if attrs:
            return f'unsupported attribute "{next(iter(attrs))}" in tag "{tag}"'
        if parent == "pre" and tag == "code":
            return None  # a code block's language
        if parent in ("code", "pre"):
            return f'tag "{tag}" inside "{parent}": pre and code can\'t contain entities'
        if tag == "blockquote" and "blockquote" in self.stack:
            return "blockquote entities can't be nested"
        if tag in self.ATOMIC and self.ATOMIC & set(self.stack):
            return f'tag "{tag}" inside "{self.stack[-1]}": these can\'t contain each other'
        return None


# What may follow "<" or "&" in Telegram HTML: a whole tag, or one of its entities.
_TAG = re.compile(r"</?[a-zA-Z][\w-]*(?:\s+[\w-]+(?:=\"[^\"<>]*\")?)*\s*>")
_ENTITY = re.compile(r"&(?:lt|gt|amp|quot|#[0-9]+|#x[0-9a-fA-F]+);")


def html_error(text: str) -> str | None:
    if "<" not in text and "&" not in text:
        return None
    for bare in re.finditer("[<&]", text):
        if not (_TAG if bare[0] == "<" else _ENTITY).match(text, bare.start()):
            return f'unescaped "{bare[0]}" at byte offset {len(text[: bare.start()].encode())}'
    checker = _TagChecker()
    checker.feed(text)
    checker.close()
    if checker.error:
        return checker.error
    if checker.stack:
        return f'can\'t find end tag corresponding to start tag "{checker.stack[-1]}"'
    return None


def visible(text: str, parse_mode: str | None) -> str:
    if parse_mode != "HTML":
        return text
    parser = _TagChecker()
    parser.feed(text)
    parser.close()
    return "".join(parser.text)


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    at: float
    status: int = 200


@dataclass
class FakeTelegram:
    """The Bot API. `edit_interval` and `group_per_minute` turn on Telegram's limits."""

    edit_interval: float = 0.0  # seconds between edits in one chat
    group_per_minute: int = 0  # sends + edits per group chat per minute
    reject_html: int = 0  # answer the next N HTML messages with "can't parse entities"
    # The statuses the next calls of a method get instead of an answer (502: a bad gateway).
    fail_next: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    # The share of sends and edits answered 502 at random, drawn from `fail_random`.
    fail_share: float = 0.0
    fail_random: random.Random = field(default_factory=lambda: random.Random(0))
    port: int = 0
    calls: list[Call] = field(default_factory=list)
    messages: dict[int, dict[int, str]] = field(default_factory=lambda: defaultdict(dict))
    commands: list[dict[str, Any]] = field(default_factory=list)
    sent: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))  # bot's ids
    webhook: dict[str, Any] = field(default_factory=dict)
    group_owners: set[int] = field(default_factory=set)  # getChatMember says "creator"
    chats: dict[int, dict[str, Any]] = field(default_factory=dict)  # seen in updates: getChat
    _polls_ended: bool = False
    _updates: list[dict[str, Any]] = field(default_factory=list)
    _update_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _message_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))
    _last_edit: dict[int, float] = field(default_factory=dict)
    _recent: dict[int, deque[float]] = field(default_factory=lambda: defaultdict(deque))
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    async def __aenter__(self) -> FakeTelegram:
        app = web.Application()
        app.router.add_post("/bot{token}/{method}", self._method)
        self._runner, self.port = await serve(app, self.port)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    def calls_to(self, method: str, chat_id: int | None = None) -> list[Call]:
        return [
            c for c in self.calls
            if c.method == method and (chat_id is None or c.params.get("chat_id") == chat_id)
        ]  # fmt: skip

    def shown(self, chat_id: int) -> list[str]:
        """The bot's messages in a chat as they read now, oldest first."""
        return [self.messages[chat_id][message_id] for message_id in self.sent[chat_id]]

    def too_many(self) -> int:
        return sum(1 for c in self.calls if c.status == 429)

    async def wait_for(self, predicate: Any, within: float = 10.0) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), within)

    async def push(self, message: dict[str, Any], kind: str = "message") -> dict[str, Any]:
        """Queue an update for getUpdates; return its message with ids and mentions filled in.

        `kind` is the update's field: message, edited_message, channel_post...
        """
        message = {"message_id": next(self._message_ids), "date": int(time.time()), **message}
        for body, entities in (("text", "entities"), ("caption", "caption_entities")):
            if body in message and entities not in message:
                message[entities] = mentions(message[body])
        text = message.get("text", message.get("caption", ""))
        self.messages[message["chat"]["id"]][message["message_id"]] = text
        self.chats[message["chat"]["id"]] = message["chat"]
        async with self._changed:
            self._updates.append({"update_id": next(self._update_ids), kind: message})
            self._changed.notify_all()
        return message

    async def edit(self, message: dict[str, Any], **changes: Any) -> dict[str, Any]:
        """Queue the `edited_message` update of a message pushed earlier."""
        kept = {k: v for k, v in message.items() if k not in ("entities", "caption_entities")}
        edited = {**kept, "edit_date": int(time.time()), **changes}  # entities: found anew
        return await self.push(edited, "edited_message")

    def bot_message(self, chat: dict[str, Any], text: str) -> dict[str, Any]:
        """A message the bot sent earlier, for users to reply to."""
        message_id = next(self._message_ids)
        self.messages[chat["id"]][message_id] = text
        return {
            "message_id": message_id,
            "date": int(time.time()),
            "chat": chat,
            "from": BOT,
            "text": text,
        }

    async def _method(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != TOKEN:
            return self._error(404, "Not Found")
        form = await request.post()
        params = {key: self._decode(key, str(value)) for key, value in form.items()}
        if not form and request.can_read_body:
            params = await request.json()
        method = request.match_info["method"]
        call = Call(method, params, time.monotonic())
        self.calls.append(call)
        async with self._changed:
            self._changed.notify_all()
        status = self.fail_next[method].pop(0) if self.fail_next[method] else None
        if status is None and method in WRITES and self.fail_random.random() < self.fail_share:
            status = HTTPStatus.BAD_GATEWAY
        if status is not None:
            response = self._error(status, HTTPStatus(status).phrase)
        else:
            response = await self._answer(method, params)
        call.status = response.status
        async with self._changed:
            self._changed.notify_all()
        return response

    @staticmethod
    def _decode(key: str, value: str) -> Any:
        if key in NUMERIC:
            return int(value)
        if value[:1] in "[{":
            return json.loads(value)
        return {"true": True, "false": False}.get(value, value)

    @staticmethod
    def _ok(result: Any) -> web.Response:
        return web.json_response({"ok": True, "result": result})

    @staticmethod
    def _error(code: int, description: str, retry_after: int | None = None) -> web.Response:
        body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
        if retry_after is not None:
            body["parameters"] = {"retry_after": retry_after}
        return web.json_response(body, status=code)

    def _limited(self, method: str, chat_id: int) -> web.Response | None:
        now = time.monotonic()
        if method == "editMessageText" and self.edit_interval:
            wait = self._last_edit.get(chat_id, -math.inf) + self.edit_interval - now
            if wait > 0:
                return self._error(
                    429, f"Too Many Requests: retry after {math.ceil(wait)}", math.ceil(wait)
                )
        if chat_id < 0 and self.group_per_minute:
            recent = self._recent[chat_id]
            while recent and recent[0] <= now - 60:
                recent.popleft()
            if len(recent) >= self.group_per_minute:
                wait = math.ceil(recent[0] + 60 - now)
                return self._error(429, f"Too Many Requests: retry after {wait}", wait)
            recent.append(now)
        if method == "editMessageText":
            self._last_edit[chat_id] = now
        return None

    async def _answer(self, method: str, params: dict[str, Any]) -> web.Response:
        if method == "getMe":
            return self._ok(BOT)
        if method in ("deleteWebhook", "sendChatAction", "close", "logOut"):
            return self._ok(True)
        if method == "setWebhook":
            self.webhook = params
            return self._ok(True)
        if method == "setMyCommands":
            self.commands = params["commands"]
            return self._ok(True)
        if method == "getChatMember":
            user_id = int(params["user_id"])
            if user_id in self.group_owners:
                return self._ok(
                    {"status": "creator", "user": person(user_id, "owner"), "is_anonymous": False}
                )
            return self._ok({"status": "member", "user": person(user_id, "member")})
        if method == "getChat":
            if (chat := self.chats.get(params["chat_id"])) is None:
                return self._error(400, "Bad Request: chat not found")
            return self._ok({**chat, "accent_color_id": 0, "max_reaction_count": 11})
        if method == "getUpdates":
            return self._ok(await self._poll(params.get("offset", 0), params.get("timeout", 0)))
        if method in ("sendMessage", "editMessageText"):
            return self._write(method, params)
        return self._error(404, f"Not Found: method {method} is not faked")

    async def end_polls(self) -> None:
        """Answer long polls at once from now on, so a bot being stopped need not wait."""
        async with self._changed:
            self._polls_ended = True
            self._changed.notify_all()

    async def _poll(self, offset: int, wait: int) -> list[dict[str, Any]]:
        self._updates = [u for u in self._updates if u["update_id"] >= offset]
        if not self._updates and wait and not self._polls_ended:
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: bool(self._updates) or self._polls_ended),
                        wait,
                    )
        return list(self._updates)

    def _write(self, method: str, params: dict[str, Any]) -> web.Response:
        chat_id, text = params["chat_id"], params["text"]
        parse_mode = params.get("parse_mode")
        if parse_mode == "HTML" and (self.reject_html > 0 or html_error(text)):
            self.reject_html = max(0, self.reject_html - 1)
            problem = html_error(text) or 'unsupported start tag "x" at byte offset 0'
            return self._error(400, f"Bad Request: can't parse entities: {problem}")
        shown = visible(text, parse_mode).strip()  # Telegram trims messages
        if len(shown) > 4096:
            return self._error(400, "Bad Request: message is too long")
        if (
            method == "editMessageText"
            and self.messages[chat_id].get(params["message_id"]) == shown
        ):
            return self._error(400, NOT_MODIFIED)
        if limited := self._limited(method, chat_id):
            return limited
        message_id = params.get("message_id") or next(self._message_ids)
        if method == "sendMessage":
            self.sent[chat_id].append(message_id)
        self.messages[chat_id][message_id] = shown
        chat = {"id": chat_id, "type": "private" if chat_id > 0 else "supergroup"}
        return self._ok(
            {
                "message_id": message_id,
                "date": int(time.time()),
                "chat": chat,
                "from": BOT,
                "text": shown,
            }
        )
