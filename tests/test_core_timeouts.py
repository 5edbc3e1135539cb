"""A model that takes too long: what the user is told, and what is kept."""

from __future__ import annotations

from bots.core.models import ConversationKey, Incoming, Notice, NoticeKind
from bots.core.ports import ModelTimedOut
from bots.core.service import ConversationService
from tests.fakes import MemoryStore, ScriptedModel, collect

KEY = ConversationKey("test", "slow")


async def test_a_model_that_takes_too_long_is_said_so_and_the_message_kept() -> None:
    store = MemoryStore()
    service = ConversationService(store, ScriptedModel(fail_with=ModelTimedOut("slow")))
    parts = await collect(service, Incoming(KEY, "hello?"))
    (said,) = [p for p in parts if isinstance(p, Notice)]
    assert said.kind is NoticeKind.MODEL_TIMED_OUT and "took too long" in said.text
    assert "cut off" not in said.text
    assert [t.content for t in store.turns[KEY]] == ["hello?"], "the message is kept"
