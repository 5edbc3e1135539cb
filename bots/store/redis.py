"""ContextStore on Redis: one capped, expiring list per conversation."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, unquote

from redis.asyncio import Redis

from bots.core.models import (
    ChannelOption,
    ConversationKey,
    ConversationState,
    Handoff,
    HandoffReason,
    People,
    Role,
    Turn,
    Usage,
)
from bots.core.ports import LineLost
from bots.store.errors import store_errors
from bots.store.line import FENCE, LEASE_S, RedisLine

log = logging.getLogger(__name__)

# Append turns (ARGV[6..], JSON objects) to the list KEYS[1], numbering each from the
# counter KEYS[3]. When ARGV[3] is set, first drop the user turn of that number and all
# after it (return 0 if it is gone). Trim to ARGV[1] turns, expire after ARGV[2] seconds;
# when ARGV[4] is set, store it as the context window's start in KEYS[2]. One script:
# no reader ever sees half of it. Refused (-1) unless ARGV[5] holds the line (KEYS[4..5]).
RECORD = (
    FENCE
    + """
if fenced(KEYS[4], KEYS[5], ARGV[5]) then return -1 end
local list, window, counter = KEYS[1], KEYS[2], KEYS[3]
local ttl = tonumber(ARGV[2])
if ARGV[3] ~= '' then
  local seq = tonumber(ARGV[3])
  local items = redis.call('LRANGE', list, 0, -1)
  local found = nil
  for index = #items, 1, -1 do
    local ok, turn = pcall(cjson.decode, items[index])
    if ok and type(turn) == 'table' and turn['seq'] == seq and turn['role'] == 'user' then
      found = index
      break
    end
  end
  if found == nil then return 0 end
  if found == 1 then redis.call('DEL', list) else redis.call('LTRIM', list, 0, found - 2) end
end
local count = #ARGV - 5
local last = redis.call('INCRBY', counter, count)
local numbered = {}
for i = 1, count do
  numbered[i] = '{"seq":' .. (last - count + i) .. ',' .. string.sub(ARGV[5 + i], 2)
end
redis.call('RPUSH', list, unpack(numbered))
redis.call('LTRIM', list, -tonumber(ARGV[1]), -1)
redis.call('EXPIRE', list, ttl)
redis.call('EXPIRE', counter, ttl)
if ARGV[4] ~= '' then
  redis.call('SET', window, ARGV[4], 'EX', ttl)
elseif redis.call('EXISTS', window) == 1 then
  redis.call('EXPIRE', window, ttl)
end
return 1
"""
)

# Find the turn whose "id" is ARGV[2]; ARGV[1] says to edit its content to ARGV[3] or to
# delete it, and with a user's message the answers to it. One script, so a concurrent
# append can never interleave with the change. Refused (-1) unless ARGV[4] holds the line.
CHANGE_TURN = (
    FENCE
    + """
if fenced(KEYS[2], KEYS[3], ARGV[4]) then return -1 end
local items = redis.call('LRANGE', KEYS[1], 0, -1)
for index, raw in ipairs(items) do
  local ok, turn = pcall(cjson.decode, raw)
  if ok and type(turn) == 'table' and turn['id'] == ARGV[2] then
    if ARGV[1] == 'delete' then
      redis.call('LSET', KEYS[1], index - 1, '__parley_deleted__')
      if turn['role'] == 'user' then
        for later = index + 1, #items do
          local read, answer = pcall(cjson.decode, items[later])
          if not read or type(answer) ~= 'table' or answer['role'] ~= 'assistant' then break end
          redis.call('LSET', KEYS[1], later - 1, '__parley_deleted__')
        end
      end
      redis.call('LREM', KEYS[1], 0, '__parley_deleted__')
    else
      turn['content'] = ARGV[3]
      redis.call('LSET', KEYS[1], index - 1, cjson.encode(turn))
    end
    return 1
  end
end
return 0
"""
)


# Forget the turns KEYS[1] and the window's start KEYS[2], unless ARGV[1] lost the line.
CLEAR = (
    FENCE
    + """
if fenced(KEYS[3], KEYS[4], ARGV[1]) then return -1 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""
)

# A conversation's handoff: the hash KEYS[1] (reason, since, last activity), the clock
# Redis's own, so replicas with drifting clocks agree on when one lapsed.
HAND_OFF = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'reason', ARGV[1], 'since', ARGV[2], 'last', t[1] + t[2] / 1e6)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

# Read a handoff (ARGV[1]: idle seconds after which it lapses, 0 never; ARGV[2] = '1': this
# is activity). A lapsed one is deleted in the same step, so one replica alone sees it end.
HANDOFF = """
local h = redis.call('HMGET', KEYS[1], 'reason', 'since', 'last')
if not h[1] then return false end
local t = redis.call('TIME')
local now = t[1] + t[2] / 1e6
local idle = tonumber(ARGV[1])
if idle > 0 and now - tonumber(h[3]) > idle then
  redis.call('DEL', KEYS[1])
  return {'lapsed', h[1], h[2]}
end
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[1], 'last', now)
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return {'on', h[1], h[2]}
"""

HAND_BACK = """
local h = redis.call('HMGET', KEYS[1], 'reason', 'since')
if not h[1] then return false end
redis.call('DEL', KEYS[1])
return h
"""


def conversation_slot(key: ConversationKey) -> str:
    """Encode a conversation key injectively: distinct keys never share a Redis key.

    Each part is percent-encoded, so no part can contain the separator (nor "=", which
    marks the user part of a group member's own conversation); the braces make the whole
    key a Redis Cluster hash tag, keeping a conversation's keys in one slot.
    """
    parts = [quote(key.platform, safe=""), quote(key.channel, safe="")]
    if key.thread is not None:
        parts.append(quote(key.thread, safe=""))
    if key.user is not None:
        parts.append("u=" + quote(key.user, safe=""))
    return "{" + ":".join(parts) + "}"


def parse_slot(slot: str) -> ConversationKey:
    """Read a conversation key back from its `conversation_slot`."""
    parts = slot.strip("{}").split(":")
    user = unquote(parts.pop()[2:]) if parts[-1].startswith("u=") else None
    platform, channel, *thread = (unquote(part) for part in parts)
    return ConversationKey(platform, channel, thread[0] if thread else None, user)


def encode_turn(turn: Turn) -> str:
    record: dict[str, Any] = {"role": turn.role.value, "content": turn.content, "at": turn.at}
    if turn.name is not None:
        record["name"] = turn.name
    if turn.usage is not None:
        record["usage"] = [turn.usage.prompt_tokens, turn.usage.completion_tokens]
    if turn.message_id is not None:
        record["id"] = turn.message_id
    if turn.knowledge is not None:
        record["kb"] = [turn.knowledge, list(turn.passages)]
    if turn.people is not None:
        record["people"] = turn.people.value
    return json.dumps(record, ensure_ascii=False)


def decode_turn(raw: bytes | str) -> Turn:
    record = json.loads(raw)
    usage = record.get("usage")
    knowledge, passages = record.get("kb") or (None, ())
    return Turn(
        role=Role(record["role"]),
        content=str(record["content"]),
        name=record.get("name"),
        at=float(record["at"]),
        usage=Usage(*usage) if usage else None,
        message_id=record.get("id"),
        seq=record.get("seq"),
        knowledge=knowledge,
        passages=tuple(passages),
        people=People(record["people"]) if record.get("people") else None,
    )


class RedisContextStore:
    """Keep each conversation as one Redis list, trimmed and expired with every append.

    Beside the list, a conversation has its turn counter, its context window's start and,
    while people answer it, its handoff (expiring with it); a channel has its options
    (persona, adapter, collect, kb; kept until cleared: they are its admins' settings).

    Its `line` orders each conversation's messages across replicas; a write made while
    this process holds a conversation's line carries the holder's ticket, and is refused
    (`LineLost`) if another replica has taken the line over since.

    Args:
        client: a redis-py asyncio client.
        prefix: namespace of every key this store writes.
        max_turns: turns kept per conversation; older ones are trimmed away.
        ttl_seconds: a conversation idle this long is forgotten.
        lease_seconds: a replica that stops renewing its place in a line loses it after this.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str,
        max_turns: int,
        ttl_seconds: int,
        lease_seconds: float = LEASE_S,
    ) -> None:
        self._client = client
        self.line = RedisLine(
            client,
            prefix=prefix,
            slot_of=conversation_slot,
            key_of=parse_slot,
            lease_seconds=lease_seconds,
        )
        self._prefix = prefix
        self._max_turns = max_turns
        self._ttl_seconds = ttl_seconds
        self._change_turn = client.register_script(CHANGE_TURN)
        self._clear = client.register_script(CLEAR)
        self._record = client.register_script(RECORD)
        self._hand_off = client.register_script(HAND_OFF)
        self._handoff = client.register_script(HANDOFF)
        self._hand_back = client.register_script(HAND_BACK)

    def redis_key(self, key: ConversationKey, kind: str = "ctx") -> str:
        """Name one of a conversation's keys; all of them share one cluster slot."""
        return f"{self._prefix}:{kind}:{conversation_slot(key)}"

    async def load(self, key: ConversationKey) -> list[Turn]:
        with store_errors():
            raw = await self._client.lrange(self.redis_key(key), 0, -1)
        turns = []
        for item in raw:
            try:
                turns.append(decode_turn(item))
            except (ValueError, KeyError, TypeError):
                log.warning("skipping an unreadable stored turn", extra={"conversation": str(key)})
        return turns

    async def append(
        self,
        key: ConversationKey,
        *turns: Turn,
        replacing: int | None = None,
        window_start: int | None = None,
    ) -> bool:
        if not turns:
            return True
        args = [
            self._max_turns,
            self._ttl_seconds,
            "" if replacing is None else replacing,
            "" if window_start is None else window_start,
            self.line.fence(key),
            *(encode_turn(turn) for turn in turns),
        ]
        keys = [self.redis_key(key), self.redis_key(key, "win"), self.redis_key(key, "seq")]
        with store_errors():
            done = await self._record(keys=[*keys, *self._fence_keys(key)], args=args)
        return _unfenced(key, done)

    async def state(self, key: ConversationKey) -> ConversationState:
        kinds = ("win", "persona", "adapter", "collect", "kb")
        names = [self.redis_key(key, kind) for kind in kinds]
        with store_errors():
            window, persona, adapter, collect, knowledge = await self._client.mget(names)
        return ConversationState(
            persona=_text(persona),
            window_start=int(window) if window is not None else None,
            adapter=_text(adapter),
            collect=None if collect is None else _text(collect) == "on",
            knowledge=_text(knowledge),
        )

    async def set_option(
        self, key: ConversationKey, option: ChannelOption, value: str | None
    ) -> None:
        name = self.redis_key(key, option)
        with store_errors():
            if value is None:
                await self._client.delete(name)
            else:
                await self._client.set(name, value.encode())

    async def conversations(self) -> AsyncIterator[ConversationKey]:
        marker, seen = f"{self._prefix}:ctx:", set()
        with store_errors():
            async for name in self._client.scan_iter(match=marker + "*", count=1000):
                if name not in seen:  # SCAN may return a key twice
                    seen.add(name)
                    yield parse_slot(_text(name)[len(marker) :])  # type: ignore[index]

    async def edit(self, key: ConversationKey, message_id: str, content: str) -> bool:
        return await self._change(key, "edit", message_id, content)

    async def remove(self, key: ConversationKey, message_id: str) -> bool:
        return await self._change(key, "delete", message_id, "")

    async def _change(
        self, key: ConversationKey, action: str, message_id: str, content: str
    ) -> bool:
        keys = [self.redis_key(key), *self._fence_keys(key)]
        args = [action, message_id, content, self.line.fence(key)]
        with store_errors():
            changed = await self._change_turn(keys=keys, args=args)
        return _unfenced(key, changed)

    async def clear(self, key: ConversationKey) -> None:
        keys = [self.redis_key(key), self.redis_key(key, "win"), *self._fence_keys(key)]
        with store_errors():
            cleared = await self._clear(keys=keys, args=[self.line.fence(key)])
        _unfenced(key, cleared)

    def _fence_keys(self, key: ConversationKey) -> list[str]:
        """The line's keys a fenced write checks: its tickets and their counter."""
        line, _, counter = self.line.keys(conversation_slot(key))
        return [line, counter]

    async def hand_off(self, key: ConversationKey, handoff: Handoff) -> bool:
        args = [handoff.reason.value, handoff.since, self._ttl_seconds]
        with store_errors():
            return bool(await self._hand_off(keys=[self.redis_key(key, "handoff")], args=args))

    async def handoff(
        self, key: ConversationKey, idle_seconds: float, *, touch: bool = False
    ) -> tuple[Handoff | None, Handoff | None]:
        args = [idle_seconds, "1" if touch else "0", self._ttl_seconds]
        with store_errors():
            found = await self._handoff(keys=[self.redis_key(key, "handoff")], args=args)
        if not found:
            return None, None
        state, *fields = found
        handoff = _handoff(fields)
        return (None, handoff) if _text(state) == "lapsed" else (handoff, None)

    async def hand_back(self, key: ConversationKey) -> Handoff | None:
        with store_errors():
            found = await self._hand_back(keys=[self.redis_key(key, "handoff")])
        return _handoff(found) if found else None


def _unfenced(key: ConversationKey, outcome: int) -> bool:
    """A writing script's outcome; `LineLost` when it refused a holder that lost the line."""
    if outcome == -1:
        raise LineLost(f"{key}: the line was taken over; this write is refused")
    return bool(outcome)


def _handoff(fields: list[bytes]) -> Handoff:
    reason, since = (field.decode() for field in fields)
    return Handoff(HandoffReason(reason), float(since))


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
