"""Handing a conversation to people, and taking it back.

A conversation is handed off by its user (/human, or a phrase such as "talk to a human"),
by the bot (the knowledge base had nothing for the question, or several messages in a
row went unanswered), or by staff. While it is, the bot stays quiet and every message is
still stored, in order, so the context is whole when the bot answers again. The state is
kept by a `HandoffStore` (Redis, beside the conversation), so every replica agrees; the
`StaffDesk` of the platform is where people see the conversation and answer it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Literal

from bots.core.models import ConversationKey, Handoff, HandoffReason, Role, Turn
from bots.core.ports import ContextStore, HandoffStore, NoObserver, Observer, StaffDesk

log = logging.getLogger(__name__)

DEFAULT_PHRASES = (
    "talk to a human",
    "speak to a human",
    "talk to a person",
    "speak to a person",
    "talk to someone",
    "speak to someone",
    "real person",
    "human agent",
    "live agent",
    "customer service representative",
)
NO_DESK = "No people answer in this chat; I'm all there is here."
ALREADY = "A person already has this conversation; they'll answer here."
NOT_HANDED_OFF = "I'm already answering here."
OFFER = "Write /human to talk to a person."
RECENT_TURNS = 10  # the context a staff desk is shown when a conversation opens
NoAnswer = Literal["offer", "hand_off", "never"]


@dataclass(frozen=True, slots=True)
class HandoffPolicy:
    """When conversations go to people (the HANDOFF_* settings).

    Args:
        phrases: a message holding one of these (any case) asks for a person.
        idle_seconds: a handed-off conversation with no message for this long comes back
            to the bot (0: only staff hand it back).
        after_failures: this many of the user's messages in a row unanswered (the model
            failed, or the knowledge base had nothing) hand the conversation off; 0: never.
        on_no_answer: when the knowledge base has nothing: offer a person ("offer"),
            hand off at once ("hand_off"), or neither ("never").
    """

    phrases: tuple[str, ...] = DEFAULT_PHRASES
    idle_seconds: float = 3600.0
    after_failures: int = 3
    on_no_answer: NoAnswer = "offer"


class Handoffs:
    """Hand conversations to people and back, telling the platform's staff desk.

    Args:
        state: where handoffs are kept (shared by every replica).
        turns: the conversations' turns, for the context shown to staff.
        policy: when conversations go to people.
        observer: counts handoffs and returns.
    """

    def __init__(
        self,
        state: HandoffStore,
        turns: ContextStore,
        policy: HandoffPolicy = HandoffPolicy(),
        observer: Observer | None = None,
    ) -> None:
        self._state = state
        self._turns = turns
        self.policy = policy
        self._observer: Observer = observer or NoObserver()
        self._desks: dict[str, StaffDesk] = {}
        words = sorted((p.strip() for p in policy.phrases if p.strip()), key=len, reverse=True)
        spelled = "|".join(r"\s+".join(map(re.escape, phrase.split())) for phrase in words)
        self._phrases = re.compile(rf"(?<!\w)(?:{spelled})(?!\w)", re.IGNORECASE) if words else None

    def attach(self, platform: str, desk: StaffDesk) -> None:
        """Let people answer this platform's conversations at `desk`."""
        self._desks[platform] = desk

    def offered(self, platform: str) -> bool:
        """Whether people answer this platform's conversations (a desk is attached)."""
        return platform in self._desks

    def asks_for_people(self, text: str) -> bool:
        """Whether a message asks for a person in words ("can I talk to a human?")."""
        return self._phrases is not None and self._phrases.search(text) is not None

    async def current(self, key: ConversationKey, *, touch: bool = False) -> Handoff | None:
        """The conversation's handoff; one idle too long ends here, counted as a return."""
        handoff, lapsed = await self._state.handoff(key, self.policy.idle_seconds, touch=touch)
        if lapsed is not None:
            await self._returned(key, "idle")
        return handoff

    async def hand_off(self, key: ConversationKey, reason: HandoffReason) -> bool:
        """Hand the conversation to people; False when it already was or none answer here."""
        desk = self._desks.get(key.platform)
        if desk is None:
            return False
        handoff = Handoff(reason)
        if not await self._state.hand_off(key, handoff):
            return False
        self._observer.handed_off(key.platform, reason)
        log.info("handed to people (%s)", reason.value, extra={"conversation": str(key)})
        recent = (await self._turns.load(key))[-RECENT_TURNS:]
        await _told(desk.opened(key, handoff, recent), key)
        return True

    async def hand_back(self, key: ConversationKey, by: str) -> bool:
        """End the conversation's handoff; False when it had none."""
        if await self._state.hand_back(key) is None:
            return False
        await self._returned(key, by)
        return True

    async def relay(self, key: ConversationKey, turn: Turn) -> None:
        """Tell the desk what the user wrote while people answer."""
        if (desk := self._desks.get(key.platform)) is not None:
            await _told(desk.relayed(key, turn), key)

    def failed_in_a_row(self, history: Sequence[Turn], no_answer: str) -> bool:
        """Whether the user's latest messages went unanswered `after_failures` times."""
        wanted = self.policy.after_failures
        return wanted > 0 and unanswered(history, no_answer) >= wanted

    async def _returned(self, key: ConversationKey, by: str) -> None:
        self._observer.handed_back(key.platform, by)
        log.info("back with the bot (by %s)", by, extra={"conversation": str(key)})
        if (desk := self._desks.get(key.platform)) is not None:
            await _told(desk.returned(key, by), key)


def unanswered(history: Sequence[Turn], no_answer: str) -> int:
    """How many of the user's latest messages in a row got no answer from the model.

    A user turn with no assistant turn after it is one (its reply failed), and so is one
    answered `no_answer` (the knowledge base had nothing); a turn people took ends the run.
    """
    count = 0
    for turn in reversed(history):
        if turn.people is not None or (turn.role is Role.ASSISTANT and turn.content != no_answer):
            break
        count += turn.role is Role.USER
    return count


async def _told(call: Awaitable[None], key: ConversationKey) -> None:
    """Await a desk's call; a desk that fails is logged, never the user's problem."""
    try:
        await call
    except Exception:  # a staff chat or help desk down must not lose the user's message
        log.exception("the staff desk failed", extra={"conversation": str(key)})
