"""A local fake of Discord: the REST API and the gateway, on loopback, for discord.py.

discord.py runs unchanged against it: it logs in over REST, fetches the gateway URL,
connects a real websocket (zlib-stream compressed, as Discord sends), identifies,
receives READY and GUILD_CREATE, and then whatever events a test dispatches. Every REST
call is recorded; `script_429` makes chosen calls answer 429 with a `retry_after`,
`fail_next` and `fail_share` make chosen or random ones fail with a 5xx.
Threads started from a message (`POST /channels/{id}/messages/{id}/threads`) are kept in
`threads`, announced with THREAD_CREATE, listed by `GET /guilds/{id}/threads/active`,
and archived (THREAD_UPDATE) by `PATCH /channels/{id}`, as Discord does.
Interactions behave as Discord's do: the callback (4: answered, 5: deferred) must come
within `INTERACTION_WINDOW` seconds of the interaction, or it is an "Unknown interaction"
(404); a deferred one is answered by a followup, `POST /webhooks/{application}/{token}`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from tests.loopback import serve

# Snowflake-sized ids: discord.py's mention parsing expects 15 to 20 digits.
SNOWFLAKE = 10**17
BOT_ID = SNOWFLAKE + 900
APP_ID = SNOWFLAKE + 901
GUILD_ID = SNOWFLAKE + 100
CHANNEL_ID = SNOWFLAKE + 200
OPEN_CHANNEL_ID = SNOWFLAKE + 201
THREAD_ID = SNOWFLAKE + 202
STAFF_CHANNEL_ID = SNOWFLAKE + 203
DM_CHANNEL_ID = SNOWFLAKE + 300
ROLE_MEMBER = SNOWFLAKE + 400
ROLE_MUTED = SNOWFLAKE + 401
ROLE_STAFF = SNOWFLAKE + 402
TIMESTAMP = "2026-11-22T10:00:00.000000+00:00"
INTERACTION_WINDOW = 3.0  # seconds Discord gives an application to answer an interaction
UNKNOWN_INTERACTION = {"message": "Unknown interaction", "code": 10062}


def user(user_id: int, name: str, *, bot: bool = False) -> dict[str, Any]:
    return {
        "id": str(user_id),
        "username": name,
        "discriminator": "0",
        "avatar": None,
        "global_name": name,
        "bot": bot,
    }


BOT_USER = user(BOT_ID, "parley", bot=True)


def text_channel(channel_id: int, name: str) -> dict[str, Any]:
    return {
        "id": str(channel_id),
        "type": 0,
        "name": name,
        "position": 0,
        "guild_id": str(GUILD_ID),
        "permission_overwrites": [],
        "nsfw": False,
    }


CHANNELS = {
    CHANNEL_ID: text_channel(CHANNEL_ID, "general"),
    OPEN_CHANNEL_ID: text_channel(OPEN_CHANNEL_ID, "ask-parley"),
    STAFF_CHANNEL_ID: text_channel(STAFF_CHANNEL_ID, "staff"),
}


def thread(thread_id: int, name: str, parent_id: int, archive_minutes: int = 60) -> dict[str, Any]:
    """A public thread (type 11) as Discord describes one."""
    return {
        "id": str(thread_id),
        "type": 11,
        "name": name,
        "parent_id": str(parent_id),
        "guild_id": str(GUILD_ID),
        "owner_id": str(BOT_ID),
        "message_count": 0,
        "member_count": 1,
        "rate_limit_per_user": 0,
        "flags": 0,
        "thread_metadata": {
            "archived": False,
            "auto_archive_duration": archive_minutes,
            "archive_timestamp": TIMESTAMP,
            "locked": False,
        },
    }


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """Answer JSON with the bare content type discord.py checks for (no charset)."""
    body = json.dumps(payload).encode()
    return web.Response(body=body, status=status, headers=headers, content_type="application/json")


@dataclass
class Call:
    method: str
    path: str
    body: Any
    message_id: str | None = None  # the message a POST created or a PATCH edited
    at: float = field(default_factory=time.monotonic)
    status: int = 200  # what the fake answered


def _answers(call: Call) -> bool:
    if call.path.startswith("/webhooks/"):  # the followup of a deferred interaction
        return True
    return call.path.endswith("/callback") and call.body["type"] == 4


def _writes_message(method: str, path: str) -> bool:
    """Whether a call posts (POST) or edits (PATCH) a message of a channel."""
    parts = path.strip("/").split("/")
    return parts[0] == "channels" and parts[2:3] == ["messages"] and method in ("POST", "PATCH")


@dataclass
class FakeDiscord:
    reject_intents: bool = False
    calls: list[Call] = field(default_factory=list)
    script_429: dict[str, list[float]] = field(default_factory=dict)
    forbidden: set[str] = field(default_factory=set)  # "METHOD /path" answered 403
    # Statuses the next calls matching "METHOD /path" get instead (503: unavailable; discord.py
    # itself retries 500, 502, 504 and 524 a few times, and raises on the others).
    fail_next: dict[str, list[int]] = field(default_factory=dict)
    # The share of channel message posts and edits answered 503 at random, from `fail_random`.
    fail_share: float = 0.0
    fail_random: random.Random = field(default_factory=lambda: random.Random(0))
    identified: asyncio.Event = field(default_factory=asyncio.Event)
    shard: list[int] | None = None  # [id, count] the client identified with
    intents: int = 0
    port: int = 0
    interactions: dict[str, float] = field(default_factory=dict)  # id -> when it was sent
    threads: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {str(THREAD_ID): thread(THREAD_ID, "a thread", CHANNEL_ID)}
    )
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(SNOWFLAKE + 10_000))
    _seq: itertools.count[int] = field(default_factory=lambda: itertools.count(2))
    _socket: web.WebSocketResponse | None = None
    _compressor: Any = None
    _runner: web.AppRunner | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    async def __aenter__(self) -> FakeDiscord:
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", "/api/v10/{path:.*}", self._rest)
        self._runner, self.port = await serve(app)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._socket is not None:
            await self._socket.close()
        assert self._runner is not None
        await self._runner.cleanup()

    # REST

    def calls_to(self, method: str, fragment: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and fragment in c.path]

    async def wait_for(self, predicate: Any, within: float = 10.0) -> None:
        """Wait until `predicate()` holds after some REST call."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), within)

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["path"]
        body = await request.json() if request.can_read_body else None
        call = Call(request.method, path, body)
        self.calls.append(call)
        async with self._changed:
            self._changed.notify_all()
        if f"{request.method} {path}" in self.forbidden:
            refusal = {"message": "Missing Permissions", "code": 50013}
            return self._refuse(call, refusal, status=403)
        key = f"{request.method} {path.rsplit('/', 1)[0] if request.method == 'PATCH' else path}"
        status = next((s.pop(0) for p, s in self.fail_next.items() if p in key and s), None)
        if status is None and _writes_message(request.method, path):
            status = 503 if self.fail_random.random() < self.fail_share else None
        if status is not None:
            failure = {"message": "Service Unavailable", "code": 0}
            return self._refuse(call, failure, status=status)
        for pattern, delays in self.script_429.items():
            if pattern in key and delays:
                retry = delays.pop(0)
                payload = {
                    "message": "You are being rate limited.",
                    "retry_after": retry,
                    "global": False,
                }
                return self._refuse(call, payload, status=429, headers={"Via": "1.1 google"})
        parts = path.strip("/").split("/")
        if parts[0] == "interactions" and parts[-1] == "callback" and self._expired(parts[1]):
            return self._refuse(call, UNKNOWN_INTERACTION, status=404)
        if (changed := await self._change_threads(request.method, parts, body)) is not None:
            return _json(changed)
        return self._answer(call, request.method, path, body)

    async def _change_threads(
        self, method: str, parts: list[str], body: Any
    ) -> dict[str, Any] | None:
        """Start a thread from a message, or archive one; None for any other call."""
        if method == "POST" and parts[0] == "channels" and parts[2:3] == ["messages"]:
            if parts[4:] != ["threads"]:
                return None
            # A thread started from a message has the message's id.
            started = thread(int(parts[3]), body["name"], int(parts[1]))
            started["thread_metadata"]["auto_archive_duration"] = body["auto_archive_duration"]
            self.threads[parts[3]] = started
            await self.dispatch("THREAD_CREATE", {**started, "newly_created": True})
            return started
        if method == "PATCH" and parts[0] == "channels" and len(parts) == 2:
            if parts[1] not in self.threads:
                return None
            changed = self.threads[parts[1]]
            if "name" in body:
                changed["name"] = body["name"]
            for field_name in ("archived", "locked"):
                if field_name in body:
                    changed["thread_metadata"][field_name] = body[field_name]
            await self.dispatch("THREAD_UPDATE", changed)
            return changed
        return None

    def active_threads(self) -> list[dict[str, Any]]:
        return [t for t in self.threads.values() if not t["thread_metadata"]["archived"]]

    def _refuse(
        self,
        call: Call,
        payload: dict[str, Any],
        *,
        status: int,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        call.status = status
        return _json(payload, status=status, headers=headers)

    def _expired(self, interaction_id: str) -> bool:
        sent = self.interactions.get(interaction_id)
        return sent is not None and time.monotonic() - sent > INTERACTION_WINDOW

    def answers(self) -> list[Call]:
        """The accepted answers to interactions, in order: callbacks of type 4, followups."""
        return [c for c in self.calls if c.method == "POST" and c.status == 200 and _answers(c)]

    def _answer(self, call: Call, method: str, path: str, body: Any) -> web.StreamResponse:
        parts = path.strip("/").split("/")
        if path == "/users/@me":
            return _json(BOT_USER)
        if path == "/oauth2/applications/@me":
            return _json(
                {
                    "id": str(APP_ID),
                    "name": "parley",
                    "icon": None,
                    "description": "",
                    "bot_public": True,
                    "bot_require_code_grant": False,
                    "owner": user(1, "owner"),
                    "verify_key": "0" * 64,
                    "flags": 0,
                    "summary": "",
                }
            )
        if path == "/gateway/bot":
            limit = {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}
            url = f"ws://127.0.0.1:{self.port}/gateway"
            return _json({"url": url, "shards": 1, "session_start_limit": limit})
        if parts[0] == "applications" and method == "PUT":
            return _json(
                [
                    {
                        "id": str(next(self._ids)),
                        "application_id": str(APP_ID),
                        "type": 1,
                        "version": "1",
                        "name": c["name"],
                        "description": c.get("description", ""),
                        **c,
                    }
                    for c in body
                ]
            )
        if parts[0] == "channels" and parts[-1] == "messages" and method == "POST":
            created = self.message(int(parts[1]), body["content"], author=BOT_USER)
            call.message_id = created["id"]
            return _json(created)
        if parts[0] == "channels" and len(parts) == 4 and method == "PATCH":
            call.message_id = parts[3]
            return _json(
                self.message(
                    int(parts[1]), body["content"], author=BOT_USER, message_id=int(parts[3])
                )
            )
        if parts[0] == "interactions" and parts[-1] == "callback":
            flags = (body.get("data") or {}).get("flags", 0)
            callback = {"id": parts[1], "type": 2, "response_message_ephemeral": bool(flags & 64)}
            return _json({"interaction": callback})
        if parts[0] == "webhooks" and len(parts) == 3 and method == "POST":
            created = self.message(CHANNEL_ID, body["content"], author=BOT_USER)
            call.message_id = created["id"]
            return _json({**created, "flags": body.get("flags", 0), "webhook_id": parts[1]})
        if parts[0] == "guilds" and parts[2:] == ["threads", "active"]:
            return _json({"threads": self.active_threads(), "members": []})
        if parts[0] == "channels" and len(parts) == 2 and method == "GET":
            found = self.threads.get(parts[1]) or CHANNELS.get(int(parts[1]))
            unknown = {"message": "Unknown Channel", "code": 10003}
            return _json(found) if found else self._refuse(call, unknown, status=404)
        if parts[0] == "users" and parts[-1] == "channels":
            return _json({"id": str(DM_CHANNEL_ID), "type": 1, "recipients": [body]})
        return web.Response(status=204)

    def message(
        self,
        channel_id: int,
        content: str,
        *,
        author: dict[str, Any],
        message_id: int | None = None,
        guild: bool = True,
        roles: list[int] | None = None,
        mentions: list[dict[str, Any]] | None = None,
        reply_to: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": str(message_id or next(self._ids)),
            "channel_id": str(channel_id),
            "author": author,
            "content": content,
            "timestamp": TIMESTAMP,
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": mentions or [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "pinned": False,
            "type": 19 if reply_to else 0,
        }
        if guild and channel_id != DM_CHANNEL_ID:
            payload["guild_id"] = str(GUILD_ID)
            payload["member"] = {
                "roles": [str(r) for r in roles or []],
                "joined_at": TIMESTAMP,
                "deaf": False,
                "mute": False,
                "flags": 0,
            }
        if reply_to:
            payload["referenced_message"] = reply_to
            payload["message_reference"] = {
                "message_id": reply_to["id"],
                "channel_id": str(channel_id),
            }
        return payload

    # Gateway

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self._socket, self._compressor = socket, zlib.compressobj()
        await self._send({"op": 10, "d": {"heartbeat_interval": 45_000}})
        async for frame in socket:
            if frame.type != WSMsgType.TEXT:
                continue
            message = json.loads(frame.data)
            if message["op"] == 1:
                await self._send({"op": 11})
            elif message["op"] == 2:
                self.intents = message["d"]["intents"]
                self.shard = message["d"].get("shard")
                if self.reject_intents:
                    await socket.close(code=4014, message=b"Disallowed intent(s).")
                    break
                await self._ready()
        return socket

    async def _send(self, payload: dict[str, Any]) -> None:
        assert self._socket is not None
        data = self._compressor.compress(json.dumps(payload).encode())
        await self._socket.send_bytes(data + self._compressor.flush(zlib.Z_SYNC_FLUSH))

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        if event == "INTERACTION_CREATE":  # its 3 s to be answered start now
            self.interactions[data["id"]] = time.monotonic()
        await self._send({"op": 0, "t": event, "s": next(self._seq), "d": data})

    async def _ready(self) -> None:
        ready = {
            "v": 10,
            "user": BOT_USER,
            "guilds": [{"id": str(GUILD_ID), "unavailable": True}],
            "session_id": "fake-session",
            "resume_gateway_url": f"ws://127.0.0.1:{self.port}/gateway",
            "application": {"id": str(APP_ID), "flags": 0},
            "private_channels": [],
        }
        await self._send({"op": 0, "t": "READY", "s": 1, "d": ready})
        await self.dispatch("GUILD_CREATE", self._guild())
        self.identified.set()

    def _guild(self) -> dict[str, Any]:
        def role(role_id: int, name: str) -> dict[str, Any]:
            return {
                "id": str(role_id),
                "name": name,
                "permissions": "0",
                "position": 1,
                "color": 0,
                "hoist": False,
                "managed": False,
                "mentionable": True,
            }

        return {
            "id": str(GUILD_ID),
            "name": "Test guild",
            "owner_id": "1",
            "unavailable": False,
            "member_count": 3,
            "members": [],
            "voice_states": [],
            "presences": [],
            "channels": list(CHANNELS.values()),
            "threads": self.active_threads(),
            "emojis": [],
            "stickers": [],
            "features": [],
            "roles": [
                role(GUILD_ID, "@everyone"),
                role(ROLE_MEMBER, "member"),
                role(ROLE_MUTED, "muted"),
                role(ROLE_STAFF, "staff"),
            ],
            "large": False,
            "mfa_level": 0,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "system_channel_flags": 0,
            "premium_tier": 0,
            "nsfw_level": 0,
            "preferred_locale": "en-US",
        }
