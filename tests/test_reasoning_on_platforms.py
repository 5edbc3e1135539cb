"""A reasoning model's tags, split across streamed pieces, never flash on a platform."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from bots.core.models import Chunk, ConversationKey, PromptMessage
from bots.core.service import ConversationService
from bots.delivery.inflight import InFlight
from bots.platforms.telegram import run_telegram
from bots.settings import TelegramSettings
from bots.store.redis import RedisContextStore
from tests.fake_telegram import TOKEN, FakeTelegram, person, private_chat
from tests.fakes import ScriptedModel

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
    in_flight = InFlight()
    async with FakeTelegram() as fake:
        settings = TelegramSettings(token=TOKEN, poll_timeout=1, base_url=fake.base_url)  # type: ignore[arg-type]
        service = ConversationService(store, SplitTags())
        running = asyncio.create_task(run_telegram(service, settings, in_flight))
        await fake.wait_for(lambda: bool(fake.calls_to("getUpdates")), 15)
        await fake.push({"chat": private_chat(ADA), "from": ADA, "text": "2+2?"})
        await fake.wait_for(lambda: bool(fake.sent[ADA["id"]]), 15)
        await asyncio.wait_for(in_flight.idle(), 30)
        await fake.end_polls()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    writes = [
        c.params["text"] for c in fake.calls if c.method in ("sendMessage", "editMessageText")
    ]
    assert writes and not any("th" in w.replace("the answer", "") for w in writes), writes
    assert fake.shown(ADA["id"]) == ["Four is the answer."]
    (_, answer) = await store.load(ConversationKey("telegram", str(ADA["id"])))
    assert answer.content == "Four is the answer.", "only the answer is stored"
