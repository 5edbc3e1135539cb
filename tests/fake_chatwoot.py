"""A local fake of the parts of Chatwoot an agent bot uses, over real HTTP on loopback.

It plays both sides of an agent bot's life in Chatwoot (paths name files in chatwoot/chatwoot):

* The webhooks Chatwoot POSTs to the bot's `outgoing_url` (`bot_url` here), as
  `app/listeners/agent_bot_listener.rb` sends them for an inbox whose agent bot is active:
  `message_created` and `message_updated` for every incoming, outgoing and template message
  (`webhook_sendable?` in `app/models/concerns/message_filter_helpers.rb`: private notes are
  sent too, with `"private": true`, and so are the bot's own replies, whatever the
  conversation's status), `conversation_opened` and `conversation_resolved` when the status
  becomes open or resolved (`notify_status_change` in `app/models/conversation.rb`; a change to
  pending or snoozed sends the bot nothing: `conversation_status_changed` goes to account
  webhooks only). Payloads are `Message#webhook_data` / `Conversation#webhook_data`
  (`app/models/message.rb`, `app/models/concerns/push_data_helper.rb`,
  `app/presenters/conversations/event_data_presenter.rb`) merged with `"event"`, serialized the
  way Rails' `to_json` does (compact, `<>&` escaped as \\u003c \\u003e \\u0026, times as
  ISO 8601 with milliseconds). The POST is `lib/webhooks/trigger.rb`'s: `Content-Type` and
  `Accept: application/json`, `X-Chatwoot-Delivery: <uuid>` (one per delivery, kept across
  retries) and, since Chatwoot 4.13 (PR #13892, agent bots got a `secret`),
  `X-Chatwoot-Timestamp: <unix seconds>` and
  `X-Chatwoot-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<raw body>")>`, signed
  afresh on each attempt (`secret=None` gives the unsigned deliveries of older Chatwoot).
  An answer other than 2xx, a refused connection or no answer within `webhook_timeout` (5 s,
  `WEBHOOK_TIMEOUT`) fails the attempt; 429 and 500 are retried, 3 attempts in all, 3 s apart
  (`app/jobs/agent_bots/webhook_job.rb`), and when a `message_created`/`message_updated`
  delivery finally fails on a pending conversation, Chatwoot opens it for humans with an
  activity message (`Webhooks::Trigger#handle_error`), which in turn sends `conversation_opened`.
  The fake delivers one conversation's events in order, one at a time; the control methods
  return once their own events are delivered.

* The Application API routes a bot calls back with, authenticated by the `api_access_token`
  header (`app/controllers/concerns/access_token_auth_helper.rb`; Rails reads it from
  `HTTP_API_ACCESS_TOKEN`, so `api-access-token` works too), all answered as the controllers
  and jbuilder views answer them: `POST /api/v1/accounts/{account_id}/conversations/{id}/messages`
  (`.../conversations/messages_controller.rb`, `app/builders/messages/message_builder.rb`,
  `app/views/api/v1/models/_message.json.jbuilder`), `.../toggle_status`
  (`.../conversations_controller.rb`, `toggle_status.json.jbuilder`; a bot moving a pending
  conversation to open is a "bot handoff"), `.../toggle_typing_status` (open to bots since
  Chatwoot 4.12, PR #13705; `bot_can_type=False` for older ones) and `.../assignments`
  (`.../conversations/assignments_controller.rb`). `{id}` is the conversation's `display_id`,
  numbered per account, as in the webhooks' `conversation.id`. Errors as
  `app/controllers/concerns/request_exception_handler.rb` renders them: no token 401
  `{"errors": ["You need to sign in or sign up before continuing."]}` (devise_token_auth), an
  unknown token 401 `{"error": "Invalid Access Token"}`, an account the bot has no inbox in 401
  `{"error": "You are not authorized to access this account"}`, an unknown account or
  conversation 404 `{"error": "Resource could not be found"}`, a message the builder refuses 422
  `{"error": "..."}`, an invalid status 500 (Rails' enum raises, nothing rescues it).
  Chatwoot has no idempotency for posted messages: `echo_id` is an `attr_accessor` that is only
  echoed back (in the response and over ActionCable), never stored or checked, so the same POST
  twice makes two messages; `posted` keeps every one. Chatwoot does not require `content` either
  (a POST without it makes an empty message); `require_content=True` refuses one with 422.

Left out: attachments, CSML and Dialogflow bots, `webwidget_triggered`, labels and the other
endpoints (404 here), ActionCable, human agents' tokens, conversations assigned to a bot rather
than connected through the inbox, the activity messages' exact wording, Sidekiq's concurrency
(Chatwoot itself does not promise in-order delivery) and the webhook job's SSRF checks.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web

from tests.loopback import serve

TOKEN = "bot-access-token-for-the-fake-chatwoot"
SECRET = "bot-webhook-secret-for-the-fake-chatwoot"
MESSAGE_TYPES = {"incoming": 0, "outgoing": 1, "activity": 2, "template": 3}
CONTENT_TYPES = {
    "text",
    "input_text",
    "input_textarea",
    "input_email",
    "input_select",
    "cards",
    "form",
    "article",
    "incoming_email",
    "input_csat",
    "integrations",
}
STATUSES = ("open", "resolved", "pending", "snoozed")
TYPING = {"on", "off", "recording"}
RETRYABLE = {429, 500}  # Webhooks::Trigger::RETRYABLE_AGENT_BOT_STATUSES
NOT_FOUND = {"error": "Resource could not be found"}
BOT_FAILED = "Conversation was marked open by system due to an error with the agent bot."
ACTIVITY = {
    "open": "Conversation was reopened by {name}",
    "resolved": "Conversation was marked resolved by {name}",
    "pending": "Conversation was marked as pending by {name}",
    "snoozed": "Conversation was snoozed by {name}",
}
TRUE = {True, "1", "t", "T", "true", "TRUE", "True", "on", "ON"}  # True == 1


def rails_json(payload: Any) -> bytes:
    """A payload as Rails' `to_json` writes it: compact, HTML characters escaped."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escaped)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").encode()


def rails_time(at: float) -> str:
    """A time as Rails writes one in JSON: ISO 8601, milliseconds, UTC."""
    moment = datetime.fromtimestamp(at, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """`X-Chatwoot-Signature`: sha256= and the hex HMAC-SHA256 of "<timestamp>.<body>"."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={digest.hexdigest()}"


def webhook_headers(body: bytes, secret: str | None, delivery_id: str) -> dict[str, str]:
    """The headers of one webhook attempt, as `Webhooks::Trigger#request_headers` makes them."""
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": "Ruby",
        "X-Chatwoot-Delivery": delivery_id,
    }
    if secret:
        timestamp = str(int(time.time()))
        headers["X-Chatwoot-Timestamp"] = timestamp
        headers["X-Chatwoot-Signature"] = signature(secret, timestamp, body)
    return headers


@dataclass
class Account:
    id: int
    name: str

    def webhook_data(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name}


@dataclass
class Inbox:
    id: int
    account: Account
    name: str
    channel_type: str
    bot: bool  # the agent bot is connected to it and active

    def webhook_data(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name}


@dataclass
class Contact:
    id: int
    account: Account
    name: str
    email: str | None
    phone_number: str | None
    identifier: str | None

    def push_event_data(self) -> dict[str, Any]:
        return {
            "additional_attributes": {},
            "custom_attributes": {},
            "email": self.email,
            "id": self.id,
            "identifier": self.identifier,
            "name": self.name,
            "phone_number": self.phone_number,
            "thumbnail": "",
            "blocked": False,
            "type": "contact",
        }

    def webhook_data(self) -> dict[str, Any]:
        return {
            "account": self.account.webhook_data(),
            "additional_attributes": {},
            "avatar": "",
            "custom_attributes": {},
            "email": self.email,
            "id": self.id,
            "identifier": self.identifier,
            "name": self.name,
            "phone_number": self.phone_number,
            "thumbnail": "",
            "blocked": False,
            "type": "contact",
        }


@dataclass
class Agent:
    """A human agent: a Chatwoot `User` of the account."""

    id: int
    account: Account
    name: str
    email: str

    def push_event_data(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "available_name": self.name,
            "avatar_url": "",
            "type": "user",
            "availability_status": "online",
            "thumbnail": "",
        }

    def webhook_data(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "email": self.email, "type": "user"}

    def api_data(self) -> dict[str, Any]:  # app/views/api/v1/models/_agent.json.jbuilder
        return {
            "id": self.id,
            "account_id": self.account.id,
            "availability_status": "online",
            "auto_offline": True,
            "confirmed": True,
            "email": self.email,
            "available_name": self.name,
            "name": self.name,
            "role": "agent",
            "thumbnail": "",
            "custom_role_id": None,
        }


@dataclass
class Team:
    id: int
    account: Account
    name: str

    def data(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "description": None,
            "allow_auto_assign": True,
            "account_id": self.account.id,
            "is_member": False,
        }


@dataclass
class Bot:
    """The agent bot: its API token, its webhook secret and its outgoing URL."""

    id: int
    name: str
    token: str
    secret: str | None
    url: str | None = None

    def push_event_data(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "avatar_url": "", "type": "agent_bot"}

    def webhook_data(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "type": "agent_bot"}


Sender = Contact | Agent | Bot | None


@dataclass
class Conversation:
    id: int  # Chatwoot's database id, which neither the API nor the webhooks show
    display_id: int  # the `id` of the API's paths and of the webhooks
    inbox: Inbox
    contact: Contact
    status: str
    created_at: float
    contact_inbox_id: int
    source_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    pubsub_token: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    assignee: Agent | None = None
    team: Team | None = None
    snoozed_until: str | None = None
    first_reply_created_at: float | None = None
    last_activity_at: float = 0.0
    updated_at: float = 0.0

    @property
    def account(self) -> Account:
        return self.inbox.account


@dataclass
class Message:
    id: int
    conversation: Conversation
    content: str | None
    message_type: str  # incoming, outgoing, activity, template
    private: bool
    sender: Sender
    created_at: float
    content_type: str = "text"
    content_attributes: dict[str, Any] = field(default_factory=dict)
    echo_id: Any = None
    via_api: bool = False  # posted by the bot through the API
    source_id: str | None = None

    @property
    def by(self) -> str:
        """Who wrote it: contact, agent (a human user), bot, or system (activity messages)."""
        if isinstance(self.sender, Contact):
            return "contact"
        if isinstance(self.sender, Agent):
            return "agent"
        if isinstance(self.sender, Bot):
            return "bot"
        return "system"

    @property
    def sender_type(self) -> str | None:
        return {"contact": "Contact", "agent": "User", "bot": "AgentBot"}.get(self.by)


@dataclass
class Attempt:
    headers: dict[str, str]
    at: float
    status: int | None = None  # None: no HTTP answer (refused, timed out)
    error: str | None = None


@dataclass
class Delivery:
    """One webhook event to the bot, with each attempt Chatwoot made at it."""

    event: str
    payload: dict[str, Any]
    body: bytes
    conversation: Conversation | None
    delivery_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    attempts: list[Attempt] = field(default_factory=list)
    done: bool = False

    @property
    def status(self) -> int | None:
        """The HTTP status of the last attempt (None: none answered, or none made yet)."""
        return self.attempts[-1].status if self.attempts else None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass
class ApiCall:
    method: str
    path: str
    headers: dict[str, str]
    params: dict[str, Any]
    at: float
    status: int = 0


@dataclass
class Typing:
    conversation: Conversation
    status: str
    is_private: Any
    at: float


@dataclass
class Assignment:
    conversation: Conversation
    params: dict[str, Any]  # what the bot sent: assignee_id, assignee_type or team_id
    assignee: Agent | None
    team: Team | None
    at: float


def _bool(value: Any) -> bool:
    return value in TRUE


def _header(name: str) -> str:
    """A header's name as Rack keys it (HTTP_API_ACCESS_TOKEN for api-access-token too)."""
    return name.lower().replace("-", "_")


def _id(value: Any) -> int | None:
    return int(value) if str(value).isdigit() else None


@dataclass
class FakeChatwoot:
    """Chatwoot with one agent bot. Set `bot_url` (now or later) to have webhooks sent."""

    bot_url: str | None = None
    token: str = TOKEN
    secret: str | None = SECRET  # None: unsigned webhooks, as before Chatwoot 4.13
    bot_name: str = "Parley"
    webhook_timeout: float = 5.0
    attempts: int = 3  # per delivery, when the bot answers 429 or 500
    retry_wait: float = 3.0
    bot_can_type: bool = True  # toggle_typing_status open to bots (Chatwoot >= 4.12)
    require_content: bool = False  # refuse a message without content (Chatwoot does not)
    keep_pending_on_bot_failure: bool = False  # the account setting of that name
    port: int = 0
    calls: list[ApiCall] = field(default_factory=list)
    posted: list[Message] = field(default_factory=list)  # every message the bot POSTed
    deliveries: list[Delivery] = field(default_factory=list)
    typings: list[Typing] = field(default_factory=list)
    assignments: list[Assignment] = field(default_factory=list)
    refused: int = 0  # API calls answered with an injected fault
    _down: int | None = None
    _fail_next: list[tuple[int, int | None]] = field(default_factory=list)
    _accounts: dict[int, Account] = field(default_factory=dict)
    _inboxes: dict[int, Inbox] = field(default_factory=dict)
    _agents: dict[int, Agent] = field(default_factory=dict)
    _teams: dict[int, Team] = field(default_factory=dict)
    _conversations: list[Conversation] = field(default_factory=list)
    _messages: list[Message] = field(default_factory=list)
    _ids: dict[str, itertools.count[int]] = field(default_factory=dict)
    _tails: dict[int, asyncio.Task[Delivery]] = field(default_factory=dict)
    _tasks: set[asyncio.Task[Delivery]] = field(default_factory=set)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _runner: web.AppRunner | None = None
    _site: web.BaseSite | None = None
    _session: aiohttp.ClientSession | None = None

    def __post_init__(self) -> None:
        self.bot = Bot(id=1, name=self.bot_name, token=self.token, secret=self.secret)

    @property
    def base_url(self) -> str:
        """The Chatwoot URL a bot is configured with (its API is under /api/v1)."""
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> FakeChatwoot:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner, self.port = await serve(app, self.port)
        self._site = next(iter(self._runner.sites), None)
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        assert self._runner is not None
        await self._runner.cleanup()

    # --- the help desk, as tests arrange it ----------------------------------------------

    def _next(self, kind: str, start: int = 1) -> int:
        return next(self._ids.setdefault(kind, itertools.count(start)))

    def add_account(self, name: str = "Acme") -> Account:
        account = Account(self._next("account"), name)
        self._accounts[account.id] = account
        return account

    def add_inbox(
        self,
        account: Account,
        name: str = "Website",
        channel_type: str = "Channel::WebWidget",
        *,
        bot: bool = True,
    ) -> Inbox:
        """An inbox; `bot`: the agent bot is connected to it (an active AgentBotInbox)."""
        inbox = Inbox(self._next("inbox"), account, name, channel_type, bot)
        self._inboxes[inbox.id] = inbox
        return inbox

    def add_agent(self, account: Account, name: str = "Alex", email: str | None = None) -> Agent:
        agent = Agent(self._next("user"), account, name, email or f"{name.lower()}@example.com")
        self._agents[agent.id] = agent
        return agent

    def add_team(self, account: Account, name: str = "support") -> Team:
        team = Team(self._next("team"), account, name)
        self._teams[team.id] = team
        return team

    def add_conversation(
        self,
        inbox: Inbox,
        contact_name: str = "Casey",
        *,
        status: str | None = None,
        email: str | None = None,
        phone_number: str | None = None,
        identifier: str | None = None,
    ) -> Conversation:
        """A contact's new conversation. Chatwoot starts it pending when the inbox has an
        active bot, open otherwise (`determine_conversation_status`); `status` overrides."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"'{status}' is not a valid status")
        contact = Contact(
            self._next("contact"), inbox.account, contact_name, email, phone_number, identifier
        )
        now = time.time()
        conversation = Conversation(
            id=self._next("conversation"),
            display_id=self._next(f"display/{inbox.account.id}"),
            inbox=inbox,
            contact=contact,
            status=status or ("pending" if inbox.bot else "open"),
            created_at=now,
            contact_inbox_id=self._next("contact_inbox"),
            last_activity_at=now,
            updated_at=now,
        )
        self._conversations.append(conversation)
        return conversation

    async def customer_says(
        self,
        conversation: Conversation,
        text: str | None,
        *,
        content_type: str = "text",
        content_attributes: dict[str, Any] | None = None,
    ) -> Message:
        """An incoming message from the contact; returns once its webhooks are delivered.

        As Chatwoot does, it reopens a snoozed conversation, and a resolved one too: as
        pending when the inbox has the bot (which the bot is not told), else as open."""
        events: list[asyncio.Task[Delivery]] = []
        if conversation.status == "snoozed":
            events += self._set_status(conversation, "open", by=None)
        elif conversation.status == "resolved":
            events += self._set_status(
                conversation, "pending" if conversation.inbox.bot else "open", by=None
            )
        message = self._add_message(
            conversation,
            text,
            "incoming",
            conversation.contact,
            content_type=content_type,
            content_attributes=content_attributes,
        )
        events += self._message_event(message, "message_created")
        await self._settle(events)
        return message

    async def agent_says(
        self, conversation: Conversation, text: str, *, agent: Agent | None = None
    ) -> Message:
        """A human agent's reply to the contact (outgoing, sender a User)."""
        return await self._agent_message(conversation, text, agent, private=False)

    async def agent_note(
        self, conversation: Conversation, text: str, *, agent: Agent | None = None
    ) -> Message:
        """A human agent's private note (outgoing, private): bots get these too."""
        return await self._agent_message(conversation, text, agent, private=True)

    async def edit(self, message: Message, **changes: Any) -> Message:
        """Change a message (content, content_attributes...): `message_updated`."""
        for name, value in changes.items():
            setattr(message, name, value)
        await self._settle(self._message_event(message, "message_updated"))
        return message

    async def set_status(
        self,
        conversation: Conversation,
        status: str,
        *,
        by_agent: bool = True,
        agent: Agent | None = None,
    ) -> None:
        """Change a conversation's status as an agent (or the system: `by_agent=False`)
        does; returns once the bot is told (open and resolved only)."""
        if status not in STATUSES:
            raise ValueError(f"'{status}' is not a valid status")
        user = (agent or self._some_agent(conversation)) if by_agent else None
        if by_agent and status == "open":
            conversation.assignee = user  # handle_human_open
        await self._settle(self._set_status(conversation, status, by=user))

    async def settled(self, within: float = 30.0) -> None:
        """Wait until every webhook queued so far has been delivered (or given up on)."""
        pending = [task for task in self._tasks if not task.done()]
        if pending:
            await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), within)

    def messages(self, conversation: Conversation) -> list[Message]:
        """All of a conversation's messages in order, activity messages included."""
        return [m for m in self._messages if m.conversation is conversation]

    def bot_replies(self, conversation: Conversation) -> list[Message]:
        """The messages the bot posted in a conversation through the API (notes included)."""
        return [m for m in self.posted if m.conversation is conversation]

    def status_of(self, conversation: Conversation) -> str:
        return conversation.status

    def typing(self, conversation: Conversation) -> list[str]:
        """The typing statuses the bot set in a conversation, in order."""
        return [t.status for t in self.typings if t.conversation is conversation]

    def deliveries_for(
        self, conversation: Conversation | None = None, event: str | None = None
    ) -> list[Delivery]:
        return [
            d for d in self.deliveries
            if (conversation is None or d.conversation is conversation)
            and (event is None or d.event == event)
        ]  # fmt: skip

    # --- faults -----------------------------------------------------------------------------

    def down(self, status: int = 503) -> None:
        """Answer every API call with `status` (the proxy in front of a stopped Chatwoot)."""
        self._down = status

    def up(self) -> None:
        self._down = None

    def fail_next(self, n: int = 1, status: int = 500, retry_after: int | None = None) -> None:
        """Answer the next `n` API calls with `status` (429s carry `Retry-After`)."""
        if status == 429 and retry_after is None:
            retry_after = 1
        self._fail_next += [(status, retry_after)] * n

    async def disconnect(self) -> None:
        """Stop listening and drop open connections: API calls find the connection refused
        until `reconnect` (as when Chatwoot's host goes away; a call in flight is cut off)."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        if self._runner is not None and self._runner.server is not None:
            for connection in self._runner.server.connections:
                connection.force_close()
        for _ in range(3):  # let clients on this loop see their connections closed
            await asyncio.sleep(0)

    async def reconnect(self) -> None:
        assert self._runner is not None
        if self._site is None:
            self._site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            await self._site.start()

    async def wait_for(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), within)

    async def send_raw(
        self,
        payload: Mapping[str, Any] | bytes,
        headers: Mapping[str, str | None] | None = None,
        *,
        sign: bool = True,
        secret: str | None = None,
    ) -> int:
        """POST any body to the bot as a webhook; return the bot's HTTP status.

        A mapping is serialized as Chatwoot would; the body is signed with `secret` or the
        bot's (`sign=False`: not signed) and `headers` then override Chatwoot's (None drops one),
        so tests can forge signatures, stale timestamps, unknown accounts and inboxes."""
        assert self._session is not None and self.bot_url is not None, "no bot_url"
        body = payload if isinstance(payload, bytes) else rails_json(dict(payload))
        key = (secret or self.bot.secret) if sign else None
        sent: dict[str, str] = webhook_headers(body, key, str(uuid.uuid4()))
        for name, value in (headers or {}).items():
            sent = {k: v for k, v in sent.items() if k.lower() != name.lower()}
            if value is not None:
                sent[name] = value
        timeout = aiohttp.ClientTimeout(total=self.webhook_timeout)
        async with self._session.post(
            self.bot_url, data=body, headers=sent, timeout=timeout
        ) as response:
            await response.read()
            return response.status

    # --- webhooks to the bot --------------------------------------------------------------------

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _settle(self, tasks: list[asyncio.Task[Delivery]]) -> None:
        if tasks:
            await asyncio.gather(*tasks)
        await self._notify()

    def _some_agent(self, conversation: Conversation) -> Agent:
        for agent in self._agents.values():
            if agent.account is conversation.account:
                return agent
        return self.add_agent(conversation.account)

    def _add_message(
        self,
        conversation: Conversation,
        content: str | None,
        message_type: str,
        sender: Sender,
        *,
        private: bool = False,
        content_type: str = "text",
        content_attributes: dict[str, Any] | None = None,
        echo_id: Any = None,
        via_api: bool = False,
    ) -> Message:
        now = time.time()
        message = Message(
            id=self._next("message"),
            conversation=conversation,
            content=content,
            message_type=message_type,
            private=private,
            sender=sender,
            created_at=now,
            content_type=content_type,
            content_attributes=dict(content_attributes or {}),
            echo_id=echo_id,
            via_api=via_api,
        )
        self._messages.append(message)
        if message_type != "activity":
            conversation.last_activity_at = now
        if (
            message_type == "outgoing"
            and not private
            and isinstance(sender, Agent)
            and conversation.first_reply_created_at is None
        ):
            conversation.first_reply_created_at = now
        conversation.updated_at = now
        return message

    async def _agent_message(
        self, conversation: Conversation, text: str, agent: Agent | None, *, private: bool
    ) -> Message:
        sender = agent or self._some_agent(conversation)
        message = self._add_message(conversation, text, "outgoing", sender, private=private)
        await self._settle(self._message_event(message, "message_created"))
        return message

    def _set_status(
        self,
        conversation: Conversation,
        status: str,
        *,
        by: Agent | Bot | None,
        activity: str | None = None,
    ) -> list[asyncio.Task[Delivery]]:
        """Save a status; queue what Chatwoot sends the bot for the change (if it changed)."""
        if status == conversation.status:
            return []
        conversation.status = status
        if status != "snoozed":
            conversation.snoozed_until = None
        conversation.updated_at = time.time()
        name = by.name if by is not None else "system"
        activity = activity or ACTIVITY[status].format(name=name)
        self._add_message(conversation, activity, "activity", None)
        if status not in ("open", "resolved"):
            return []  # conversation_status_changed: account webhooks only
        event = {"open": "conversation_opened", "resolved": "conversation_resolved"}[status]
        return self._conversation_event(conversation, event)

    def _conversation_event(
        self, conversation: Conversation, event: str
    ) -> list[asyncio.Task[Delivery]]:
        payload = {**self._conversation_data(conversation), "event": event}
        return self._queue(conversation, event, payload)

    def _message_event(self, message: Message, event: str) -> list[asyncio.Task[Delivery]]:
        if message.message_type not in ("incoming", "outgoing", "template"):
            return []  # webhook_sendable?
        payload = {**self._message_data(message), "event": event}
        return self._queue(message.conversation, event, payload)

    def _queue(
        self, conversation: Conversation, event: str, payload: dict[str, Any]
    ) -> list[asyncio.Task[Delivery]]:
        if not conversation.inbox.bot or not self.bot_url:
            return []  # no active agent bot on the inbox, or no outgoing_url
        delivery = Delivery(event, payload, rails_json(payload), conversation)
        self.deliveries.append(delivery)
        previous = self._tails.get(conversation.id)
        task = asyncio.create_task(self._deliver_after(previous, delivery))
        self._tails[conversation.id] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return [task]

    async def _deliver_after(
        self, previous: asyncio.Task[Delivery] | None, delivery: Delivery
    ) -> Delivery:
        if previous is not None:
            await asyncio.wait([previous])
        try:
            await self._deliver(delivery)
        finally:
            delivery.done = True
            await self._notify()
        return delivery

    async def _deliver(self, delivery: Delivery) -> None:
        assert self._session is not None
        for number in range(1, self.attempts + 1):
            url = self.bot_url
            headers = webhook_headers(delivery.body, self.bot.secret, delivery.delivery_id)
            attempt = Attempt(headers, time.time())
            delivery.attempts.append(attempt)
            if not url:
                attempt.error = "no outgoing_url"
                break
            try:
                timeout = aiohttp.ClientTimeout(total=self.webhook_timeout)
                async with self._session.post(
                    url, data=delivery.body, headers=attempt.headers, timeout=timeout
                ) as response:
                    await response.read()
                    attempt.status = response.status
            except TimeoutError:
                attempt.error = f"no answer within {self.webhook_timeout} s"
            except aiohttp.ClientError as error:
                attempt.error = f"{type(error).__name__}: {error}"
            await self._notify()
            if delivery.ok:
                return
            if attempt.status not in RETRYABLE or number == self.attempts:
                break
            await asyncio.sleep(self.retry_wait)
        self._after_failure(delivery)

    def _after_failure(self, delivery: Delivery) -> None:
        """Webhooks::Trigger#handle_error: a pending conversation goes to the humans."""
        conversation = delivery.conversation
        if delivery.event not in ("message_created", "message_updated") or conversation is None:
            return
        if conversation.status != "pending" or self.keep_pending_on_bot_failure:
            return
        self._set_status(conversation, "open", by=None, activity=BOT_FAILED)  # queued next

    # --- payloads ---------------------------------------------------------------------------

    def _message_push_data(self, message: Message) -> dict[str, Any]:
        conversation = message.conversation
        data: dict[str, Any] = {
            "id": message.id,
            "content": message.content,
            "account_id": conversation.account.id,
            "inbox_id": conversation.inbox.id,
            "conversation_id": conversation.display_id,
            "message_type": MESSAGE_TYPES[message.message_type],
            "created_at": int(message.created_at),
            "updated_at": rails_time(message.created_at),
            "private": message.private,
            "status": "sent",
            "source_id": message.source_id,
            "content_type": message.content_type,
            "content_attributes": message.content_attributes,
            "sender_type": message.sender_type,
            "sender_id": message.sender.id if message.sender is not None else None,
            "external_source_ids": {},
            "additional_attributes": {},
            "processed_message_content": message.content,
            "sentiment": {},
            "conversation": {
                "assignee_id": conversation.assignee.id if conversation.assignee else None,
                "unread_count": self._unread(conversation),
                "last_activity_at": int(conversation.last_activity_at),
                "contact_inbox": {"source_id": conversation.source_id},
            },
        }
        if message.sender is not None:
            data["sender"] = message.sender.push_event_data()
        return data

    def _unread(self, conversation: Conversation) -> int:
        incoming = [m for m in self.messages(conversation) if m.message_type == "incoming"]
        return len(incoming[-10:])

    def _conversation_data(self, conversation: Conversation) -> dict[str, Any]:
        """Conversations::EventDataPresenter#push_data, the conversation's webhook_data."""
        chat = [
            m for m in self.messages(conversation)
            if m.message_type != "activity" and not m.private
        ]  # fmt: skip
        inbox, created = conversation.inbox, rails_time(conversation.created_at)
        return {
            "additional_attributes": {},
            "can_reply": True,
            "channel": inbox.channel_type,
            "contact_inbox": {
                "id": conversation.contact_inbox_id,
                "contact_id": conversation.contact.id,
                "inbox_id": inbox.id,
                "source_id": conversation.source_id,
                "created_at": created,
                "updated_at": created,
                "hmac_verified": False,
                "pubsub_token": conversation.pubsub_token,
            },
            "id": conversation.display_id,
            "inbox_id": inbox.id,
            "messages": [self._message_push_data(chat[-1])] if chat else [],
            "labels": [],
            "meta": {
                "sender": conversation.contact.push_event_data(),
                "assignee": conversation.assignee.push_event_data()
                if conversation.assignee
                else None,
                "assignee_type": "User" if conversation.assignee else None,
                "team": {"id": conversation.team.id, "name": conversation.team.name}
                if conversation.team
                else None,
                "hmac_verified": False,
            },
            "status": conversation.status,
            "custom_attributes": {},
            "snoozed_until": conversation.snoozed_until,
            "unread_count": self._unread(conversation),
            "first_reply_created_at": rails_time(conversation.first_reply_created_at)
            if conversation.first_reply_created_at
            else None,
            "priority": None,
            "waiting_since": int(conversation.created_at),
            "agent_last_seen_at": 0,
            "contact_last_seen_at": 0,
            "last_activity_at": int(conversation.last_activity_at),
            "timestamp": int(conversation.last_activity_at),
            "created_at": int(conversation.created_at),
            "updated_at": conversation.updated_at,
        }

    def _message_data(self, message: Message) -> dict[str, Any]:
        """Message#webhook_data."""
        conversation = message.conversation
        return {
            "account": conversation.account.webhook_data(),
            "additional_attributes": {},
            "content_attributes": message.content_attributes,
            "content_type": message.content_type,
            "content": message.content,
            "conversation": self._conversation_data(conversation),
            "created_at": rails_time(message.created_at),
            "id": message.id,
            "inbox": conversation.inbox.webhook_data(),
            "message_type": message.message_type,
            "private": message.private,
            "sender": message.sender.webhook_data() if message.sender is not None else None,
            "source_id": message.source_id,
        }

    def _message_api_data(self, message: Message) -> dict[str, Any]:
        """app/views/api/v1/models/_message.json.jbuilder, what POST .../messages returns."""
        data: dict[str, Any] = {
            "id": message.id,
            "content": message.content,
            "inbox_id": message.conversation.inbox.id,
        }
        if message.echo_id:
            data["echo_id"] = message.echo_id
        data |= {
            "conversation_id": message.conversation.display_id,
            "message_type": MESSAGE_TYPES[message.message_type],
            "content_type": message.content_type,
            "status": "sent",
            "content_attributes": message.content_attributes,
            "created_at": int(message.created_at),
            "private": message.private,
            "source_id": message.source_id,
        }
        if message.sender is not None:
            data["sender"] = message.sender.push_event_data()
        return data

    # --- the Application API ------------------------------------------------------------------

    ROUTES: tuple[str, ...] = ("messages", "toggle_status", "toggle_typing_status", "assignments")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        call = ApiCall(request.method, request.path, dict(request.headers), {}, time.time())
        self.calls.append(call)
        response = await self._answer(request, call)
        call.status = response.status
        await self._notify()
        return response

    async def _answer(self, request: web.Request, call: ApiCall) -> web.StreamResponse:
        if self._down is not None or self._fail_next:
            status, retry_after = (self._down, None) if self._down else self._fail_next.pop(0)
            assert status is not None
            self.refused += 1
            return self._fault(status, retry_after)
        parts = request.path.strip("/").split("/")
        if (
            request.method != "POST"
            or len(parts) != 7
            or parts[:3] != ["api", "v1", "accounts"]
            or parts[4] != "conversations"
            or parts[6] not in self.ROUTES
        ):
            return web.Response(status=404, text="Not Found")  # no such route
        token = next(
            (v for k, v in request.headers.items() if _header(k) == "api_access_token"), None
        )
        if not token:
            return web.json_response(
                {"errors": ["You need to sign in or sign up before continuing."]}, status=401
            )
        if token != self.bot.token:
            return web.json_response({"error": "Invalid Access Token"}, status=401)
        action = parts[6]
        if action == "toggle_typing_status" and not self.bot_can_type:
            return web.json_response(
                {"error": "Access to this endpoint is not authorized for bots"}, status=401
            )
        account = self._accounts.get(int(parts[3])) if parts[3].isdigit() else None
        if account is None:
            return web.json_response(NOT_FOUND, status=404)
        if not any(i.bot for i in self._inboxes.values() if i.account is account):
            return web.json_response(
                {"error": "You are not authorized to access this account"}, status=401
            )
        conversation = next(
            (
                c for c in self._conversations
                if c.account is account and str(c.display_id) == parts[5]
            ),
            None,
        )  # fmt: skip
        if conversation is None:
            return web.json_response(NOT_FOUND, status=404)
        try:
            call.params = await self._params(request)
        except ValueError:
            return web.json_response({"status": 400, "error": "Bad Request"}, status=400)
        handler = {
            "messages": self._create_message,
            "toggle_status": self._toggle_status,
            "toggle_typing_status": self._toggle_typing,
            "assignments": self._assign,
        }[action]
        return await handler(conversation, call.params)

    @staticmethod
    def _fault(status: int, retry_after: int | None) -> web.Response:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        if status == 429:  # rack-attack's throttled response
            return web.Response(status=429, text="Retry later\n", headers=headers)
        if status in (502, 503, 504):  # the reverse proxy in front of Chatwoot
            reason = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
            text = f"{status} {reason[status]}\n"
            return web.Response(status=status, text=text, headers=headers)
        return web.json_response(
            {"status": status, "error": "Internal Server Error"}, status=status, headers=headers
        )

    @staticmethod
    async def _params(request: web.Request) -> dict[str, Any]:
        """Rails' params: a JSON body when the request says JSON, else form fields."""
        if not request.can_read_body:
            return dict(request.query)
        if request.content_type == "application/json":
            body = await request.read()
            try:
                parsed = json.loads(body) if body.strip() else {}
            except json.JSONDecodeError as error:
                raise ValueError(str(error)) from error
            if not isinstance(parsed, dict):
                return {"_json": parsed}
            return {**request.query, **parsed}
        form = await request.post()
        return {**request.query, **{k: str(v) for k, v in form.items()}}

    async def _create_message(
        self, conversation: Conversation, params: dict[str, Any]
    ) -> web.Response:
        def refuse(error: str) -> web.Response:
            return web.json_response({"error": error}, status=422)

        message_type = params.get("message_type") or "outgoing"
        content_type = params.get("content_type") or "text"
        content = params.get("content")
        if message_type == "incoming" and conversation.inbox.channel_type != "Channel::Api":
            return refuse("Incoming messages are only allowed in Api inboxes")
        if message_type not in MESSAGE_TYPES:
            return refuse(f"'{message_type}' is not a valid message_type")
        if content_type not in CONTENT_TYPES:
            return refuse(f"'{content_type}' is not a valid content_type")
        if content is not None and not isinstance(content, str):
            content = json.dumps(content) if isinstance(content, dict | list) else str(content)
        if content is not None and len(content) > 150_000:
            return refuse("Validation failed: Content is too long (maximum is 150000 characters)")
        if self.require_content and not content:
            return refuse("Validation failed: Content can't be blank")
        attributes = params.get("content_attributes")
        sender: Sender = conversation.contact if message_type == "incoming" else self.bot
        message = self._add_message(
            conversation,
            content,
            message_type,
            sender,
            private=_bool(params.get("private")),
            content_type=content_type,
            content_attributes=attributes if isinstance(attributes, dict) else None,
            echo_id=params.get("echo_id"),
            via_api=True,
        )
        self.posted.append(message)
        self._message_event(message, "message_created")  # the bot hears its own replies too
        return web.json_response(self._message_api_data(message))

    async def _toggle_status(
        self, conversation: Conversation, params: dict[str, Any]
    ) -> web.Response:
        status = params.get("status")
        success: bool | None = True
        if conversation.status == "pending" and status == "open":
            success = None  # bot_handoff!: @status is never set
            self._set_status(conversation, "open", by=self.bot)
        elif status:
            if status not in STATUSES:
                return web.json_response(
                    {"status": 500, "error": "Internal Server Error"}, status=500
                )  # ArgumentError: 'x' is not a valid status
            if status == "snoozed" and params.get("snoozed_until"):
                conversation.snoozed_until = str(params["snoozed_until"])
            self._set_status(conversation, status, by=self.bot)
        else:  # Conversation#toggle_status
            toggled = "resolved" if conversation.status == "open" else "open"
            self._set_status(conversation, toggled, by=self.bot)
        return web.json_response(
            {
                "meta": {},
                "payload": {
                    "success": success,
                    "conversation_id": conversation.display_id,
                    "current_status": conversation.status,
                    "snoozed_until": conversation.snoozed_until,
                },
            }
        )

    async def _toggle_typing(
        self, conversation: Conversation, params: dict[str, Any]
    ) -> web.Response:
        status = params.get("typing_status")
        if status in TYPING:  # anything else: still 200, nothing happens
            self.typings.append(
                Typing(conversation, str(status), params.get("is_private"), time.time())
            )
        return web.Response(status=200)

    async def _assign(self, conversation: Conversation, params: dict[str, Any]) -> web.Response:
        record = Assignment(conversation, dict(params), None, None, time.time())
        if "assignee_id" in params or params.get("assignee_type") == "AgentBot":
            agent = self._agents.get(_id(params.get("assignee_id")) or 0)
            if agent is not None and agent.account is not conversation.account:
                agent = None
            conversation.assignee = record.assignee = agent
            self.assignments.append(record)
            return web.json_response(agent.api_data() if agent else None)
        if "team_id" in params:
            team = self._teams.get(_id(params.get("team_id")) or 0)
            if team is not None and team.account is not conversation.account:
                team = None
            conversation.team = record.team = team
            self.assignments.append(record)
            return web.json_response(team.data() if team else None)
        return web.json_response(None)
