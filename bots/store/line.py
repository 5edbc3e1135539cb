"""Each conversation's line across processes: tickets in Redis, leases, and a fencing token.

A message takes a ticket when it arrives (`INCR`, so arrival order is the ticket order
whichever replica took it) and waits until its ticket heads the conversation's line: a
sorted set of tickets, each with a lease deadline on Redis's clock. A living process renews
its tickets' leases; a ticket whose lease ran out (its process died) is dropped when it
reaches the head, so a dead replica frees the conversation within `lease_seconds`.

The ticket is also the holder's fencing token: the store's writes name it, and its script
refuses a write from a holder that is no longer at the head (`LineLost`), so a replica
that stalled past its lease cannot write over the one that took its place.

Leaving publishes the conversation's slot, so the next holder, in any process, starts at
once; the lease renewal doubles as a poll in case a message was missed. A stop (/reset)
is published the same way and ends the reply under way wherever it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Coroutine
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bots.core.models import ConversationKey
from bots.core.ports import StoreUnavailable
from bots.store.errors import stop_if_cancelled, store_errors

log = logging.getLogger(__name__)

LEASE_S = 10.0
RENEW_SHARE = 0.25  # leases are renewed (and waiters look again) this often, of the lease
LISTEN_S = 1.0  # the listener looks whether it should stop this often
COUNTER_TTL_S = 7 * 86_400  # tickets keep rising this long after a conversation's last one

# Shared by the scripts: KEYS[1] the line (a sorted set of tickets, scored by number),
# KEYS[2] the leases (ticket -> deadline in ms on Redis's clock). `head` drops tickets
# whose lease ran out from the front and returns the first living one.
_HEAD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function head()
  while true do
    local first = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
    if not first then return nil end
    local deadline = tonumber(redis.call('HGET', KEYS[2], first) or '0')
    if deadline >= now then return first end
    redis.call('ZREM', KEYS[1], first)
    redis.call('HDEL', KEYS[2], first)
  end
end
local function lease(ticket)
  redis.call('HSET', KEYS[2], ticket, now + tonumber(ARGV[2]))
  redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
  redis.call('PEXPIRE', KEYS[2], 2 * tonumber(ARGV[2]))
end
"""

# Take a ticket (KEYS[3] counts them; ARGV[1] names this process, ARGV[2] the lease in ms,
# ARGV[3] the counter's expiry): {ticket, 1 if it heads the line}.
JOIN = (
    _HEAD
    + """
local number = redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[3])
local ticket = number .. '/' .. ARGV[1]
redis.call('ZADD', KEYS[1], number, ticket)
lease(ticket)
return {ticket, head() == ticket and 1 or 0}
"""
)

# Renew ticket ARGV[1]'s lease: 1 if it heads the line, 0 if it waits, -1 if it is gone.
RENEW = (
    _HEAD
    + """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return -1 end
lease(ARGV[1])
return head() == ARGV[1] and 1 or 0
"""
)

# Leave: drop ticket ARGV[1]; if others wait, publish the slot ARGV[3] on channel ARGV[2].
LEAVE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[1], KEYS[2])
else
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return 1
"""

# The check the store's writing scripts start with. KEYS[n], KEYS[n+1]: the line and the
# ticket counter; `fence`: the writer's ticket, '' for a write outside the line. A write
# passes from the head of the line, or when Redis has lost the line (its counter is behind
# the ticket: a restart without the data), where no one else can have taken over.
FENCE = """
local function fenced(line, counter, fence)
  if fence == '' then return false end
  if redis.call('ZRANGE', line, 0, 0)[1] == fence then return false end
  local number = tonumber(string.match(fence, '^(%d+)/'))
  return tonumber(redis.call('GET', counter) or '0') >= number
end
"""


class RedisPlace:
    """A ticket in one conversation's line, taken on arrival (see `RedisLine.join`)."""

    def __init__(self, line: RedisLine, key: ConversationKey, slot: str) -> None:
        self._line = line
        self.key = key
        self.slot = slot
        self.ticket: str | None = None
        self._taking: asyncio.Task[tuple[str, bool]] | None = None
        self._woken: asyncio.Future[None] | None = None  # resolved when the line moves
        self._renewing: asyncio.Task[None] | None = None
        self._left = False

    async def wait(self) -> None:
        """Return once this ticket heads the line; a lost ticket is taken again."""
        assert self._taking is not None and self._woken is not None
        ticket, heads = await self._taking
        self.ticket = ticket
        line = self._line
        while not heads:
            stop_if_cancelled()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken, line.renew_every)
            self._woken = line.woken(self.slot)  # before looking: a move meanwhile counts
            heads = await line.renew(self)
        if self._left:
            return
        line.holding(self)
        self._renewing = asyncio.create_task(self._renew(), name=f"lease-{self.slot}")

    async def _renew(self) -> None:
        while True:
            stop_if_cancelled()
            await asyncio.sleep(self._line.renew_every)
            try:
                if not await self._line.renew(self, again=False):
                    log.warning("line lost", extra={"conversation": str(self.key)})
                    return
            except StoreUnavailable:
                continue  # the lease may still hold; the next renewal tells

    def leave(self) -> None:
        if self._left:
            return
        self._left = True
        if self._renewing is not None:
            self._renewing.cancel()
        self._line.leaving(self)

    def __del__(self) -> None:
        with contextlib.suppress(RuntimeError):  # no loop left: the lease lapses by itself
            self.leave()


class RedisLine:
    """The `Line` of every replica sharing one Redis.

    Args:
        client: the shared Redis.
        prefix: namespace of the line's keys and channels.
        slot_of: names a conversation's keys (the store's `conversation_slot`).
        key_of: reads a conversation back from its slot (the store's `parse_slot`).
        lease_seconds: a holder that stops renewing loses its place after this long.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str,
        slot_of: Callable[[ConversationKey], str],
        key_of: Callable[[str], ConversationKey],
        lease_seconds: float = LEASE_S,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._slot_of = slot_of
        self._key_of = key_of
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self.renew_every = lease_seconds * RENEW_SHARE
        self._me = secrets.token_hex(6)  # tickets name their process
        self._join = client.register_script(JOIN)
        self._renew = client.register_script(RENEW)
        self._leave = client.register_script(LEAVE)
        self._freed = f"{prefix}:line:freed"
        self._stops = f"{prefix}:line:stop"
        self._taking: dict[str, asyncio.Task[tuple[str, bool]]] = {}  # last ticket asked
        self._places: dict[str, int] = {}  # places taken here, per slot
        self._held: dict[str, RedisPlace] = {}  # the place each slot is served by here
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        self._stop: Callable[[ConversationKey], None] = lambda _: None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listening: asyncio.Task[None] | None = None
        self._closing = False

    def keys(self, slot: str) -> list[str]:
        """The line's keys for a conversation: its tickets, their leases, their counter."""
        return [f"{self._prefix}:{kind}:{slot}" for kind in ("line", "lease", "ticket")]

    def __len__(self) -> int:
        return len(self._places)

    async def __aenter__(self) -> RedisLine:
        """Listen for freed lines and stops from every replica."""
        self._listening = asyncio.create_task(self._listen(), name="line-listener")
        return self

    async def __aexit__(self, *_: object) -> None:
        self._closing = True
        if self._listening is not None:
            # redis-py's pub/sub can miss a cancellation (under uvloop): the flag ends it
            self._listening.cancel()
            await asyncio.wait({self._listening}, timeout=2 * LISTEN_S)
        if self._tasks:  # the last leaves, so the next holders start without waiting
            await asyncio.wait(self._tasks, timeout=2.0)

    def join(self, key: ConversationKey) -> RedisPlace:
        """Take a ticket now: asked after the one before from this process, so the call
        order here is the ticket order."""
        slot = self._slot_of(key)
        place = RedisPlace(self, key, slot)
        place._woken = self.woken(slot)  # before the ticket: a move meanwhile counts
        place._taking = asyncio.create_task(self._take(slot, self._taking.get(slot)))
        self._taking[slot] = place._taking
        self._places[slot] = self._places.get(slot, 0) + 1
        place._taking.add_done_callback(lambda task: self._took(slot, task))
        return place

    def fence(self, key: ConversationKey) -> str:
        """The ticket serving `key` in this process ('' when none): the store's writes
        carry it, so a holder whose lease lapsed cannot write."""
        place = self._held.get(self._slot_of(key))
        return (place.ticket or "") if place is not None else ""

    def stop(self, key: ConversationKey) -> None:
        self._stop(key)
        self._spawn(self._publish, self._stops, self._slot_of(key))

    def on_stop(self, stop: Callable[[ConversationKey], None]) -> None:
        self._stop = stop

    async def _take(self, slot: str, before: asyncio.Task[Any] | None) -> tuple[str, bool]:
        if before is not None:
            await asyncio.wait({before})
        with store_errors():
            ticket, heads = await self._join(
                keys=self.keys(slot), args=[self._me, self._lease_ms, COUNTER_TTL_S]
            )
        return ticket.decode() if isinstance(ticket, bytes) else ticket, bool(heads)

    def _took(self, slot: str, task: asyncio.Task[Any]) -> None:
        if self._taking.get(slot) is task:
            del self._taking[slot]

    async def renew(self, place: RedisPlace, *, again: bool = True) -> bool:
        """Renew the place's lease; whether it heads the line. A ticket lost while waiting
        (Redis lost it) is taken `again`, at the end of the line."""
        assert place.ticket is not None
        with store_errors():
            state = await self._renew(
                keys=self.keys(place.slot), args=[place.ticket, self._lease_ms]
            )
        if state == -1 and again:
            place._taking = asyncio.create_task(self._take(place.slot, None))
            place.ticket, heads = await place._taking
            return heads
        return bool(state == 1)

    def woken(self, slot: str) -> asyncio.Future[None]:
        """A future resolved when `slot`'s line moves."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(slot, []).append(future)
        return future

    def _wake(self, slot: str) -> None:
        for future in self._waiting.pop(slot, []):
            if not future.done():
                future.set_result(None)

    def holding(self, place: RedisPlace) -> None:
        self._held[place.slot] = place

    def leaving(self, place: RedisPlace) -> None:
        slot = place.slot
        if self._held.get(slot) is place:
            del self._held[slot]
        count = self._places.get(slot, 1) - 1
        if count:
            self._places[slot] = count
        else:
            self._places.pop(slot, None)
        if place.ticket is not None:
            self._spawn(self._drop, slot, place.ticket)
        elif place._taking is not None:  # left before its ticket came: drop it once it does
            place._taking.add_done_callback(lambda task: self._dropped(slot, task))

    def _dropped(self, slot: str, task: asyncio.Task[tuple[str, bool]]) -> None:
        if not task.cancelled() and task.exception() is None:
            self._spawn(self._drop, slot, task.result()[0])

    async def _drop(self, slot: str, ticket: str) -> None:
        try:
            await self._leave(keys=self.keys(slot), args=[ticket, self._freed, slot])
        except RedisError as error:  # the lease lapses by itself
            log.warning("line not left (%s); its lease will lapse", error)
        self._wake(slot)

    async def _publish(self, channel: str, slot: str) -> None:
        try:
            await self._client.publish(channel, slot)
        except RedisError as error:
            log.warning("stop not published: %s", error)

    def _spawn(self, work: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        task = asyncio.get_running_loop().create_task(work(*args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _listen(self) -> None:
        while not self._closing:
            stop_if_cancelled()
            try:
                async with self._client.pubsub() as pubsub:
                    await pubsub.subscribe(self._freed, self._stops)
                    while not self._closing:
                        stop_if_cancelled()
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=LISTEN_S
                        )
                        if message is not None and message.get("type") == "message":
                            self._heard(_text(message["channel"]), _text(message["data"]))
            except RedisError as error:
                log.warning("line listener reconnecting: %s", error)
                await asyncio.sleep(1.0)  # meanwhile, waiters look again as they renew

    def _heard(self, channel: str, slot: str) -> None:
        if channel == self._freed:
            self._wake(slot)
        elif slot in self._held:
            self._stop(self._key_of(slot))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
