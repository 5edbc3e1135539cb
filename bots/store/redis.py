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

    async def clear(self, key: ConversationKey) -> None:
        try:
            await self._client.delete(self.redis_key(key))
        except RedisError as error:
            raise StoreUnavailable(str(error)) from error
