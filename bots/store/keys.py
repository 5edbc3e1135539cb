"""API keys of the integrations using the HTTP channel, kept in Redis as hashes only.

A key is 32 random bytes; Redis holds its SHA-256 (a fast hash is enough for a random
secret of that size) beside the integration it belongs to. Conversations are scoped to
the integration, so a new key for the same integration (rotation) keeps them.

Every request looks its key up (one HGET): a revoked key is refused by every replica
from the moment `revoke` returns, with nothing cached to outlive it.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import asdict

from redis.asyncio import Redis

from bots.core.models import Integration
from bots.store.errors import store_errors

KEY_PREFIX = "pk_"
INTEGRATION_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class RedisApiKeys:
    """The integrations' keys in one Redis hash: field = the key's SHA-256, value = JSON."""

    def __init__(self, client: Redis, *, prefix: str) -> None:
        self._client = client
        self._hash = f"{prefix}:http:keys"

    async def create(
        self,
        name: str,
        *,
        messages: int | None = None,
        window: float | None = None,
        knowledge: str | None = None,
    ) -> tuple[str, Integration]:
        """Make a key for an integration; the key itself is returned once and never stored."""
        if not INTEGRATION_NAME.match(name):
            raise ValueError(
                "an integration name is 1-64 lowercase letters, digits, '-' or '_', "
                "starting with a letter or digit"
            )
        key = new_key()
        digest = hash_key(key)
        integration = Integration(name, digest[:12], time.time(), messages, window, knowledge)
        with store_errors():
            await self._client.hset(self._hash, digest, json.dumps(asdict(integration)))
        return key, integration

    async def find(self, key: str) -> Integration | None:
        """The integration a key belongs to, or None for an unknown or revoked key."""
        if not key.startswith(KEY_PREFIX) or len(key) > 128:
            return None
        with store_errors():
            raw = await self._client.hget(self._hash, hash_key(key))
        return None if raw is None else Integration(**json.loads(raw))

    async def list(self) -> list[Integration]:
        with store_errors():
            raw = await self._client.hvals(self._hash)
        found = [Integration(**json.loads(value)) for value in raw]
        return sorted(found, key=lambda integration: (integration.name, integration.created))

    async def revoke(self, which: str) -> int:
        """Revoke the keys with this key id, or every key of the integration of this name."""
        with store_errors():
            entries = await self._client.hgetall(self._hash)
        found = {digest: Integration(**json.loads(raw)) for digest, raw in entries.items()}
        doomed = [
            d for d, integration in found.items() if which in (integration.name, integration.key_id)
        ]
        if doomed:
            with store_errors():
                await self._client.hdel(self._hash, *doomed)
        return len(doomed)
