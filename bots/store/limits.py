"""Limiter on Redis: sliding-window rate limits and daily token budgets that replicas share."""

from __future__ import annotations

import datetime
import os
from urllib.parse import quote

from redis.asyncio import Redis

from bots.core.models import ADMITTED, Admission, ConversationKey, TokenUsage
from bots.store.errors import store_errors
from bots.store.redis import conversation_slot

DAY_S = 86_400
TOKENS_KEPT_S = 2 * DAY_S  # a day's count outlives the day, for /usage near midnight

# Admit one message if the sorted set KEYS[1] holds fewer than ARGV[1] entries younger
# than ARGV[2] ms, and (when KEYS[2] is given) the day's token count there is below
# ARGV[4]. On admission, record the message as member ARGV[3]. Return {1, 0, ''} or
# {0, ms to wait, reason}. The clock is Redis's own, so replicas agree on it; one script,
# so two replicas can never both take the last place.
ADMIT = """
redis.replicate_commands()
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local limit, window, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
if KEYS[2] and budget > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= budget then
  return {0, 86400000 - now % 86400000, 'budget'}
end
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  if redis.call('ZCARD', KEYS[1]) >= limit then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {0, tonumber(oldest[2]) + window - now, ARGV[5]}
  end
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
end
return {1, 0, ''}
"""


def _tag(user: str) -> str:
    """A user's keys share one cluster slot: their percent-encoded id as the hash tag."""
    return "{" + quote(user, safe="") + "}"


class RedisLimiter:
    """Per-user and per-conversation message limits, and a daily token budget per user.

    Each check is one script on one key slot (the user's, then the conversation's), so
    the limits hold across bot replicas and Redis Cluster. A message the conversation
    refuses gives its user's place back.

    Args:
        client: a redis-py asyncio client.
        prefix: namespace of every key this limiter writes.
        user_messages: messages a user may send per `user_window` seconds (0: no limit).
        conversation_messages: messages a conversation takes per `conversation_window`.
        daily_tokens: tokens (prompt + reply) a user may use per UTC day (0: no budget).
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str,
        user_messages: int,
        user_window: float,
        conversation_messages: int,
        conversation_window: float,
        daily_tokens: int,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._user = (user_messages, round(user_window * 1000))
        self._conversation = (conversation_messages, round(conversation_window * 1000))
        self._daily_tokens = daily_tokens
        self._admit = client.register_script(ADMIT)

    def _user_key(self, user: str) -> str:
        return f"{self._prefix}:limit:user:{_tag(user)}"

    def tokens_key(self, user: str, day: datetime.date | None = None) -> str:
        day = day or datetime.datetime.now(datetime.UTC).date()
        return f"{self._prefix}:tokens:{_tag(user)}:{day:%Y%m%d}"

    async def admit(self, user: str | None, conversation: ConversationKey) -> Admission:
        member = os.urandom(8).hex()  # this message's entry in the windows
        with store_errors():
            if user is not None:
                keys = [self._user_key(user), self.tokens_key(user)]
                if refused := await self._check(keys, self._user, member, "user"):
                    return refused
            keys = [f"{self._prefix}:limit:conv:{conversation_slot(conversation)}"]
            if not self._conversation[0]:  # no conversation limit: no second round trip
                return ADMITTED
            if refused := await self._check(keys, self._conversation, member, "conversation"):
                if user is not None:  # give the user's place back
                    await self._client.zrem(self._user_key(user), member)
                return refused
        return ADMITTED

    async def admit_quota(self, name: str, messages: int, window: float) -> Admission:
        """Count one request against a named quota of `messages` per `window` seconds.

        Integrations' API keys use this, with the same script (and so the same clock and
        cluster-slot rules) as the users' and conversations' limits.
        """
        if messages <= 0:
            return ADMITTED
        keys = [f"{self._prefix}:limit:quota:{_tag(name)}"]
        with store_errors():
            refused = await self._check(
                keys, (messages, round(window * 1000)), os.urandom(8).hex(), "quota"
            )
        return refused or ADMITTED

    async def _check(
        self, keys: list[str], limit: tuple[int, int], member: str, reason: str
    ) -> Admission | None:
        messages, window_ms = limit
        admitted, wait_ms, which = await self._admit(
            keys=keys, args=[messages, window_ms, member, self._daily_tokens, reason]
        )
        if admitted:
            return None
        return Admission(
            False, int(wait_ms) / 1000, which.decode() if isinstance(which, bytes) else which
        )

    async def charge(self, user: str, tokens: int) -> None:
        key = self.tokens_key(user)
        with store_errors():
            async with self._client.pipeline(transaction=True) as transaction:
                transaction.incrby(key, tokens)
                transaction.expire(key, TOKENS_KEPT_S)
                await transaction.execute()

    async def usage(self, user: str) -> TokenUsage:
        now = datetime.datetime.now(datetime.UTC)
        with store_errors():
            used = await self._client.get(self.tokens_key(user, now.date()))
        midnight = datetime.datetime.combine(now.date(), datetime.time(), datetime.UTC)
        resets_in = DAY_S - (now - midnight).total_seconds()
        return TokenUsage(int(used or 0), self._daily_tokens or None, resets_in)
