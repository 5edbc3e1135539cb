"""Parley as the agent bot of a Chatwoot help desk (`python -m bots chatwoot`).

Chatwoot POSTs the agent bot's webhooks to `/chatwoot`. Each one is checked (Chatwoot's
signature, or the URL's secret; only the accounts and inboxes configured), then queued in
a Redis stream and answered 200 at once: Chatwoot waits 5 s at most, and a bot that does
not answer has its conversations opened for people. The queued events are handled in
order per conversation, by whichever replica takes them:

* a customer's message in a conversation the bot owns (status `pending`) is answered
  through the conversation service; in one people own (`open`), it is stored as context;
* an agent's reply and a private note are stored as context, never answered;
* `conversation_opened` hands the conversation to people; a customer message on a
  `pending` conversation takes it back (Chatwoot tells a bot nothing when an agent sets
  `pending`, so the status each message carries is what counts).

Replies, status changes and team assignments go out through a second stream (the durable
outbox), retried with backoff while Chatwoot is down, and posted once each.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import socket
import sys
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bots.core.handoff import Handoffs
from bots.core.models import Author, ConversationKey, Handoff, HandoffReason, Incoming, Turn
from bots.core.service import ConversationService
from bots.delivery.reply import ChatReplies, ChatStyle
from bots.delivery.split import split_message
from bots.delivery.stream import Limits
from bots.ops import Metrics
from bots.platforms.chatwoot.api import TIMEOUT_S, ChatwootApi
from bots.platforms.chatwoot.events import PLATFORM, Event, Kind, Unreadable, read_event
from bots.platforms.errors import PlatformSetupError
from bots.platforms.listening import ReadLimits, Server, ServerConfig, listen
from bots.settings import ChatwootSettings
from bots.store.outbox import Delivery, Outbox, OutboxPolicy

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1_048_576
SIGNATURE_TOLERANCE_S = 300.0
SEEN_SECONDS = 86_400  # a webhook Chatwoot sends again within a day is handled once
PEOPLE = ("open", "snoozed")  # statuses in which people own the conversation


class ChatwootSetupError(PlatformSetupError):
    """The agent bot cannot start: its URL, token or webhook check is missing."""


def check_settings(settings: ChatwootSettings) -> None:
    missing = [
        name
        for name, value in (
            ("CHATWOOT_URL", settings.url),
            ("CHATWOOT_BOT_TOKEN", settings.bot_token),
            ("CHATWOOT_ACCOUNTS", settings.accounts),
        )
        if not value
    ]
    if missing:
        raise ChatwootSetupError(f"{', '.join(missing)} must be set for the Chatwoot agent bot")
    if settings.webhook_secret is None and settings.url_secret is None:
        raise ChatwootSetupError(
            "set CHATWOOT_WEBHOOK_SECRET (the agent bot's secret, Chatwoot 4.13+) or "
            "CHATWOOT_URL_SECRET (a secret the bot's URL carries) so forged webhooks are refused"
        )


def is_signed(secret: bytes, headers: dict[str, str], body: bytes, now: float) -> bool:
    """Check `X-Chatwoot-Signature`: sha256= HMAC-SHA256(secret, "<timestamp>.<body>")."""
    timestamp = headers.get("x-chatwoot-timestamp", "")
    given = headers.get("x-chatwoot-signature", "")
    try:
        fresh = abs(now - int(timestamp)) <= SIGNATURE_TOLERANCE_S
    except ValueError:
        return False
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return fresh and hmac.compare_digest(f"sha256={mac}", given)


class ChatwootDesk:
    """Chatwoot as the staff desk: handing off opens the conversation (and assigns the
    team); the bot taking it back sets it pending. People see the messages in Chatwoot."""

    def __init__(self, outbox: Outbox, team: int | None) -> None:
        self._outbox = outbox
        self._team = team

    async def opened(self, key: ConversationKey, handoff: Handoff, recent: Sequence[Turn]) -> None:
        if handoff.reason is HandoffReason.STAFF:
            return  # Chatwoot's people opened it themselves
        await self._change(key, "status", "open")
        if self._team is not None:
            await self._change(key, "team", self._team)

    async def relayed(self, key: ConversationKey, turn: Turn) -> None:
        pass  # Chatwoot shows the customer's messages itself

    async def returned(self, key: ConversationKey, by: str) -> None:
        if by != PLATFORM:  # idle, or /bot: Chatwoot should say the bot has it again
            await self._change(key, "status", "pending")

    async def _change(self, key: ConversationKey, kind: str, value: str | int) -> None:
        body = {"kind": kind, "account": int(key.channel), "conversation": int(key.thread or 0)}
        await self._outbox.put(str(key), {**body, "value": value})


class ChatwootBot:
    """Check and queue Chatwoot's webhooks, answer them, deliver what they lead to."""

    def __init__(
        self,
        service: ConversationService,
        api: ChatwootApi,
        settings: ChatwootSettings,
        redis: Redis,
        prefix: str,
    ) -> None:
        self._service = service
        self._api = api
        self._settings = settings
        self._redis = redis
        self._prefix = prefix
        # Posted whole, never edited: only the size counts.
        self._limits = Limits(settings.max_chars, edit_interval=0.0, burst=1, window=1.0)
        style = ChatStyle(PLATFORM, self._limits, notice=lambda text: text, typing_every=60.0)
        self._replies = ChatReplies(service, style)
        self.inbound: Outbox | None = None  # events to handle, set by `run_chatwoot`
        self.outbound: Outbox | None = None  # what goes back to Chatwoot

    # --------------------------------------------------------------- receiving webhooks

    async def receive(self, request: Request) -> JSONResponse:
        """Check a webhook and queue it; Chatwoot is answered at once."""
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return _error(413, "too_large", "The body is larger than a webhook can be.")
        if not self._is_authentic(request, body):
            return _error(401, "unauthorized", "The webhook's signature or secret is wrong.")
        try:
            event = read_event(body)
        except Unreadable as error:
            return _error(400, "malformed", str(error))
        if event is None:
            return JSONResponse({"handled": False})
        event = self._with_account(event)
        if event.account not in self._settings.accounts:
            log.warning("webhook for an account not configured: %s", event.account)
            return _error(403, "forbidden", "This account is not served by this bot.")
        inboxes = self._settings.inboxes
        if inboxes and event.inbox is not None and event.inbox not in inboxes:
            return _error(403, "forbidden", "This inbox is not served by this bot.")
        assert self.inbound is not None
        try:
            if await self._seen(request, event):
                return JSONResponse({"handled": False, "duplicate": True})
            await self.inbound.put(str(event.key), asdict(event) | {"kind": event.kind.value})
        except RedisError:
            log.warning("webhook not queued: Redis unavailable")
            # 500, not 503: the one answer (with 429) Chatwoot's webhook job retries.
            return _error(500, "store_unavailable", "The bot's store is unavailable; retry.")
        return JSONResponse({"handled": True})

    def _is_authentic(self, request: Request, body: bytes) -> bool:
        settings = self._settings
        if settings.url_secret is not None:
            given = request.query_params.get("secret", "")
            if not hmac.compare_digest(given, settings.url_secret.get_secret_value()):
                return False
        if settings.webhook_secret is not None:
            secret = settings.webhook_secret.get_secret_value().encode()
            return is_signed(secret, dict(request.headers), body, time.time())
        return True

    def _with_account(self, event: Event) -> Event:
        """A conversation event may not name its account: with one account, it is that one."""
        if event.account is None and len(self._settings.accounts) == 1:
            (only,) = self._settings.accounts
            return Event(**{**asdict(event), "account": only})
        return event

    async def _seen(self, request: Request, event: Event) -> bool:
        """Whether this webhook was queued before (Chatwoot sends a failed one again)."""
        delivery = request.headers.get("x-chatwoot-delivery")
        marks = [f"{event.kind.value}:{event.account}:{event.message_id}"]
        if event.message_id is None:  # status events: only Chatwoot's own delivery id
            marks = [f"delivery:{delivery}"] if delivery else []
        for mark in marks:
            name = f"{self._prefix}:chatwoot:seen:{mark}"
            if not await self._redis.set(name, "1", nx=True, ex=SEEN_SECONDS):
                return True
        return False

    # ----------------------------------------------------------------- handling events

    async def handle(self, delivery: Delivery) -> None:
        """Handle one queued webhook (the inbound stream's send)."""
        body = dict(delivery.body)
        event = Event(**{**body, "kind": Kind(body["kind"])})
        key, handoffs = event.key, self._service.handoffs
        if event.kind is Kind.CUSTOMER:
            await self._customer(event)
        elif event.kind in (Kind.AGENT, Kind.NOTE):
            note = event.kind is Kind.NOTE
            await self._service.from_people(key, event.text, name=event.author, note=note)
        elif event.kind is Kind.EDITED:
            await self._service.edit(self._incoming(event))
        elif handoffs is not None and event.kind is Kind.OPENED:
            await handoffs.hand_off(key, HandoffReason.STAFF)
        elif handoffs is not None and event.kind is Kind.RESOLVED:
            await handoffs.hand_back(key, PLATFORM)

    async def _customer(self, event: Event) -> None:
        """Answer a customer, unless people own the conversation (it is stored either way)."""
        await self._follow_status(event)
        account, conversation = event.account or 0, event.conversation
        typing = self._settings.typing
        if typing:
            await self._typing(account, conversation, on=True)
        try:
            text = await self._replies.text(self._incoming(event))
        finally:
            if typing:
                await self._typing(account, conversation, on=False)
        assert self.outbound is not None
        for number, piece in enumerate(split_message(text, self._limits.max_chars)):
            if piece.text.strip():
                body = {"kind": "message", "account": account, "conversation": conversation}
                delivery = f"{account}:{conversation}:{event.message_id}:{number}"
                await self.outbound.put(str(event.key), {**body, "value": piece.text}, delivery)

    async def _follow_status(self, event: Event) -> None:
        """Chatwoot's status is the truth: open means people answer, pending the bot."""
        handoffs: Handoffs | None = self._service.handoffs
        if handoffs is None:
            return
        if event.status in PEOPLE:
            await handoffs.hand_off(event.key, HandoffReason.STAFF)
        else:
            await handoffs.hand_back(event.key, PLATFORM)

    def _incoming(self, event: Event) -> Incoming:
        # A customer is never an admin: in_group makes /persona, /reset and /bot refuse them.
        author = Author(str(event.author_id), event.author or "customer")
        return Incoming(
            event.key,
            event.text,
            author=author,
            in_group=True,
            message_id=str(event.message_id),
            knowledge=self._settings.kb,
        )

    async def _typing(self, account: int, conversation: int, *, on: bool) -> None:
        try:
            await asyncio.wait_for(self._api.typing(account, conversation, on=on), 5.0)
        except Exception as error:  # "typing…" is a nicety: older Chatwoot refuses bots it
            log.debug("typing status not shown: %s", error)

    # ------------------------------------------------------------- delivering to Chatwoot

    async def deliver(self, delivery: Delivery) -> None:
        """Make one queued change in Chatwoot (the outbound stream's send)."""
        body: dict[str, Any] = delivery.body
        account, conversation, value = body["account"], body["conversation"], body["value"]
        if body["kind"] == "message":
            await self._api.post_message(account, conversation, value, echo_id=delivery.id)
        elif body["kind"] == "status":
            await self._api.set_status(account, conversation, value)
        elif body["kind"] == "team":
            await self._api.assign_team(account, conversation, value)


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def create_app(bot: ChatwootBot) -> Starlette:
    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/chatwoot", bot.receive, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )


async def run_chatwoot(
    service: ConversationService,
    settings: ChatwootSettings,
    redis: Redis,
    *,
    prefix: str,
    metrics: Metrics | None = None,
) -> None:
    """Serve Chatwoot's webhooks and deliver the answers until cancelled.

    On cancellation the server stops taking webhooks; events and deliveries in hand stay
    pending in Redis, and this consumer (`CHATWOOT_CONSUMER`, the host name by default)
    takes them up again when it restarts (another replica after `claim_after`).
    """
    check_settings(settings)
    assert settings.url is not None and settings.bot_token is not None
    sock = listen(settings.host, settings.port)
    consumer = settings.consumer or socket.gethostname()
    longest = settings.retry_max_seconds
    policy = OutboxPolicy(
        first_backoff=min(1.0, longest),
        max_backoff=longest,
        give_up_after=settings.retry_hours * 3600.0,
        claim_after=max(3 * longest, 2 * TIMEOUT_S),
    )
    async with AsyncExitStack() as stack:
        api = ChatwootApi.connect(settings.url, settings.bot_token.get_secret_value())
        stack.push_async_callback(api.aclose)
        bot = ChatwootBot(service, api, settings, redis, prefix)

        def outbox(name: str, send: Any) -> Outbox:
            count = metrics.outbox(PLATFORM, name) if metrics is not None else None
            stream = f"{prefix}:outbox:{{chatwoot-{name}}}"
            return Outbox(
                redis, stream=stream, consumer=consumer, send=send, policy=policy, count=count
            )

        bot.inbound, bot.outbound = outbox("in", bot.handle), outbox("out", bot.deliver)
        if service.handoffs is not None:
            service.handoffs.attach(PLATFORM, ChatwootDesk(bot.outbound, settings.handoff_team))
        config = ServerConfig(create_app(bot), ReadLimits())  # the HTTP channel's defaults
        server = Server(config)
        print(
            f"Chatwoot agent bot on http://{settings.host}:{sock.getsockname()[1]}/chatwoot",
            file=sys.stderr,
            flush=True,
        )
        tasks = [
            asyncio.create_task(server.serve(sockets=[sock])),
            asyncio.create_task(bot.inbound.run()),
            asyncio.create_task(bot.outbound.run()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for finished in done:
                finished.result()
        finally:
            server.should_exit = True
            for task in tasks[1:]:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
