"""A reasoning model's tags, split across streamed pieces, never flash on a platform."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from bots.core.models import Chunk, ConversationKey, PromptMessage
from bots.core.service import ConversationService
from bots.store.redis import RedisContextStore
from tests.fake_telegram import person
from tests.fakes import ScriptedModel
from tests.telegram_run import running_telegram

ADA = person(1, "Ada")
PIECES = ["<th", "ink>let me think ", "about it</th", "ink>", "Four", " is the answer."]


class SplitTags(ScriptedModel):
    """Streams its reply in pieces that cut the tags, a pause after each."""

    async def stream(
        self, prompt: Sequence[PromptMessage], *, session: str, adapter: str | None = None
    ) -> AsyncIterator[Chunk]:
        self.prompts.append(list(prompt))
        for piece in PIECES:
            await asyncio.sleep(0.4)  # long enough for an edit to show each state
            yield Chunk(text=piece)


async def test_telegram_never_shows_a_piece_of_the_reasoning(store: RedisContextStore) -> None:
    async with running_telegram(ConversationService(store, SplitTags())) as chat:
        await chat.say(ADA, "2+2?")
        await chat.settle(ADA["id"])
    fake = chat.fake
    writes = [
        c.params["text"] for c in fake.calls if c.method in ("sendMessage", "editMessageText")
    ]
    assert writes and not any("th" in w.replace("the answer", "") for w in writes), writes
    assert fake.shown(ADA["id"]) == ["Four is the answer."]
    (_, answer) = await store.load(ConversationKey("telegram", str(ADA["id"])))
    assert answer.content == "Four is the answer.", "only the answer is stored"
