"""The parts of Chatwoot's Application API the agent bot calls, with the bot's token.

Paths and answers follow Chatwoot's controllers (`api/v1/accounts/conversations/*`):
`{conversation}` is the conversation's display id, as webhooks give it. Answers that a
later attempt may change (no connection, a timeout, 429, 5xx) raise `Retry`; the others
that are not 2xx raise `Reject`.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from bots.store.outbox import Reject, Retry

log = logging.getLogger(__name__)

TIMEOUT_S = 30.0  # long: a post that timed out may have been made, and is then made again


class ChatwootApi:
    """Post messages and change conversations in one Chatwoot, as its agent bot."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    @classmethod
    def connect(cls, base_url: str, token: str) -> ChatwootApi:
        """A client for `base_url` (Chatwoot's address) sending the bot's access token."""
        client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"api_access_token": token},
            timeout=TIMEOUT_S,
        )
        return cls(client)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def post_message(
        self, account: int, conversation: int, content: str, *, echo_id: str
    ) -> dict[str, Any]:
        """Post an outgoing message that the customer sees."""
        body = {
            "content": content,
            "message_type": "outgoing",
            "private": False,
            "echo_id": echo_id,
        }
        return await self._call(account, conversation, "messages", body)

    async def set_status(self, account: int, conversation: int, status: str) -> None:
        """Set the conversation's status: "open" hands it to people, "pending" to the bot."""
        await self._call(account, conversation, "toggle_status", {"status": status})

    async def assign_team(self, account: int, conversation: int, team: int) -> None:
        await self._call(account, conversation, "assignments", {"team_id": team})

    async def typing(self, account: int, conversation: int, *, on: bool) -> None:
        """Show or hide "typing…" in the conversation (Chatwoot 4.12 and later let bots)."""
        body = {"typing_status": "on" if on else "off"}
        await self._call(account, conversation, "toggle_typing_status", body)

    async def _call(
        self, account: int, conversation: int, action: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        path = f"/api/v1/accounts/{account}/conversations/{conversation}/{action}"
        try:
            answer = await self._client.post(path, json=body)
        except httpx.HTTPError as error:  # no connection, a timeout, a broken answer
            raise Retry(f"{action}: {type(error).__name__}") from error
        status = answer.status_code
        if status == 429 or status >= 500:
            raise Retry(f"{action}: {status}", after=_retry_after(answer))
        if status >= 300:
            raise Reject(f"{action}: {status} {answer.text[:200]}")
        try:
            data = answer.json()
        except ValueError:
            return {}  # toggle_typing_status answers with an empty body
        return data if isinstance(data, dict) else {}


def _retry_after(answer: httpx.Response) -> float | None:
    try:
        return float(answer.headers["Retry-After"])
    except (KeyError, ValueError):
        return None
