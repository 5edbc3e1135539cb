"""ContextStore on Redis: one capped, expiring list per conversation."""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import quote

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bots.core.models import ConversationKey, Role, Turn, Usage
from bots.core.ports import StoreUnavailable

log = logging.getLogger(__name__)

# Find the turn whose "id" is ARGV[2]; ARGV[1] says to edit its content to ARGV[3] or to
# delete it. One script, so a concurrent append can never interleave with the change.
CHANGE_TURN = """
for index, raw in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  local ok, turn = pcall(cjson.decode, raw)
  if ok and type(turn) == 'table' and turn['id'] == ARGV[2] then
    if ARGV[1] == 'delete' then
      redis.call('LSET', KEYS[1], index - 1, '__parley_deleted__')
      redis.call('LREM', KEYS[1], 1, '__parley_deleted__')
    else
      turn['content'] = ARGV[3]
      redis.call('LSET', KEYS[1], index - 1, cjson.encode(turn))
    end
    return 1
  end
end
return 0
"""


def conversation_slot(key: ConversationKey) -> str:
    """Encode a conversation key injectively: distinct keys never share a Redis key.

    Each part is percent-encoded, so no part can contain the separator; the braces make
    the whole key a Redis Cluster hash tag, keeping a conversation's keys in one slot.
    """
    parts = [key.platform, key.channel] + ([key.thread] if key.thread is not None else [])
    return "{" + ":".join(quote(part, safe="") for part in parts) + "}"


def encode_turn(turn: Turn) -> str:
    record: dict[str, Any] = {"role": turn.role.value, "content": turn.content, "at": turn.at}
    if turn.name is not None:
        record["name"] = turn.name
    if turn.usage is not None:
        record["usage"] = [turn.usage.prompt_tokens, turn.usage.completion_tokens]
    if turn.message_id is not None:
        record["id"] = turn.message_id
    return json.dumps(record, ensure_ascii=False)


def decode_turn(raw: bytes | str) -> Turn:
    record = json.loads(raw)
    usage = record.get("usage")
    return Turn(
        role=Role(record["role"]),
        content=str(record["content"]),
        name=record.get("name"),
        at=float(record["at"]),
        usage=Usage(*usage) if usage else None,
        message_id=record.get("id"),
    )


class RedisContextStore:
    """Keep each conversation as one Redis list, trimmed and expired with every append.

    Args:
        client: a redis-py asyncio client.
        prefix: namespace of every key this store writes.
        max_turns: turns kept per conversation; older ones are trimmed away.
        ttl_seconds: a conversation idle this long is forgotten.
    """

    def __init__(self, client: Redis, *, prefix: str, max_turns: int, ttl_seconds: int) -> None:
        self._client = client
        self._prefix = prefix
        self._max_turns = max_turns
        self._ttl_seconds = ttl_seconds
        self._change_turn = client.register_script(CHANGE_TURN)

    def redis_key(self, key: ConversationKey) -> str:
        return f"{self._prefix}:ctx:{conversation_slot(key)}"

    async def load(self, key: ConversationKey) -> list[Turn]:
        try:
            raw = await self._client.lrange(self.redis_key(key), 0, -1)
        except RedisError as error:
            raise StoreUnavailable(str(error)) from error
        turns = []
        for item in raw:
            try:
                turns.append(decode_turn(item))
            except (ValueError, KeyError, TypeError):
                log.warning("skipping an unreadable stored turn", extra={"conversation": str(key)})
        return turns

    async def append(self, key: ConversationKey, *turns: Turn) -> None:
        if not turns:
            return
        name = self.redis_key(key)
        try:
            async with self._client.pipeline(transaction=True) as transaction:
                transaction.rpush(name, *(encode_turn(turn) for turn in turns))
                transaction.ltrim(name, -self._max_turns, -1)
                transaction.expire(name, self._ttl_seconds)
                await transaction.execute()
        except RedisError as error:
            raise StoreUnavailable(str(error)) from error

    async def edit(self, key: ConversationKey, message_id: str, content: str) -> bool:
        return await self._change(key, "edit", message_id, content)

    async def remove(self, key: ConversationKey, message_id: str) -> bool:
        return await self._change(key, "delete", message_id, "")

    async def _change(
        self, key: ConversationKey, action: str, message_id: str, content: str
    ) -> bool:
        try:
            changed = await self._change_turn(
                keys=[self.redis_key(key)], args=[action, message_id, content]
            )
        except RedisError as error:
            raise StoreUnavailable(str(error)) from error
        return bool(changed)

    async def clear(self, key: ConversationKey) -> None:
        try:
            await self._client.delete(self.redis_key(key))
        except RedisError as error:
            raise StoreUnavailable(str(error)) from error
