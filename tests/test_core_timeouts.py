"""A model that takes too long, or refuses a prompt as too long: what the user is told,
and what is kept."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from bots.core.models import Chunk, ConversationKey, Incoming, Notice, NoticeKind, PromptMessage
from bots.core.ports import ModelTimedOut, PromptTooLong
from bots.core.service import ConversationService
from tests.fakes import MemoryStore, ScriptedModel, collect, text_of

KEY = ConversationKey("test", "slow")


async def test_a_model_that_takes_too_long_is_said_so_and_the_message_kept() -> None:
    store = MemoryStore()
    service = ConversationService(store, ScriptedModel(fail_with=ModelTimedOut("slow")))
    parts = await collect(service, Incoming(KEY, "hello?"))
    (said,) = [p for p in parts if isinstance(p, Notice)]
    assert said.kind is NoticeKind.MODEL_TIMED_OUT and "took too long" in said.text
    assert "cut off" not in said.text
    assert [t.content for t in store.turns[KEY]] == ["hello?"], "the message is kept"


class RefusesOnce(ScriptedModel):
    """Refuses the first prompt as too long, as a server does when a count fell short."""

    refused: int = 0

    async def stream(
        self, prompt: Sequence[PromptMessage], *, session: str, adapter: str | None = None
    ) -> AsyncIterator[Chunk]:
        if not self.refused:
            self.refused += 1
            raise PromptTooLong("This model's maximum context length is 2048 tokens")
        async for chunk in super().stream(prompt, session=session, adapter=adapter):
            yield chunk


async def test_a_prompt_refused_as_too_long_is_fitted_again_and_answered() -> None:
    store, model = MemoryStore(), RefusesOnce()
    service = ConversationService(store, model)
    parts = await collect(service, Incoming(KEY, "a long question"))
    assert not [p for p in parts if isinstance(p, Notice)], "no refusal shown"
    assert text_of(parts) == "echo 1: a long question" and model.refused == 1
    assert [t.content for t in store.turns[KEY]] == ["a long question", "echo 1: a long question"]
