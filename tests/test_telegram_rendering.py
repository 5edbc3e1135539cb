"""What Telegram users see: notices in italics, the model's Markdown as Telegram's HTML."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bots.core.models import PromptMessage
from bots.core.service import ConversationService
from bots.delivery.inflight import InFlight
from bots.platforms.telegram import TELEGRAM_STYLE, run_telegram
from bots.platforms.telegram_markup import to_html
from bots.settings import TelegramSettings
from bots.store.redis import RedisContextStore
from tests.fake_telegram import TOKEN, FakeTelegram, html_error, person, private_chat, visible
from tests.fakes import ScriptedModel

ADA = person(1, "Ada")
ANSWER = (
    "# Plan\n\nThree *easy* steps:\n\n- read the [guide](https://example.com/guide_v2)\n"
    "- try **it**\n  - twice\n\nThat's _all_."
)


class Answering(ScriptedModel):
    """Answer every prompt with ANSWER, streamed word by word."""

    def reply(self, prompt: Sequence[PromptMessage]) -> str:
        return ANSWER


@dataclass
class Chat:
    fake: FakeTelegram
    in_flight: InFlight

    async def ask(self, text: str) -> list[str]:
        """Send Ada's message; once the reply is delivered, return what she sees."""
        await self.fake.push({"chat": private_chat(ADA), "from": ADA, "text": text})
        await self.fake.wait_for(lambda: bool(self.fake.sent[ADA["id"]]), 20)
        await asyncio.wait_for(self.in_flight.idle(), 20)
        return self.fake.shown(ADA["id"])


@pytest.fixture
async def chat(store: RedisContextStore) -> AsyncIterator[Chat]:
    """The real bot against the fake Bot API, every message answered with ANSWER."""
    in_flight = InFlight()
    async with FakeTelegram() as fake:
        settings = TelegramSettings(token=TOKEN, base_url=fake.base_url, poll_timeout=1)  # type: ignore[arg-type]
        service = ConversationService(store, Answering())
        running = asyncio.create_task(run_telegram(service, settings, in_flight))
        await fake.wait_for(lambda: bool(fake.calls_to("getUpdates")), 15)
        yield Chat(fake, in_flight)
        await fake.end_polls()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


@pytest.mark.parametrize("blank", ["   ", "\u200b"])
async def test_a_notice_is_shown_in_italics_without_underscores(chat: Chat, blank: str) -> None:
    assert await chat.ask(blank) == ["Send me some text and I'll answer."]
    (send,) = chat.fake.calls_to("sendMessage")
    assert send.params["parse_mode"] == "HTML"
    assert send.params["text"] == "<i>Send me some text and I'll answer.</i>"


def test_a_notice_shows_every_character_of_its_text() -> None:
    text = "Wait 3 s: *see* https://example.com/a_b_c?x=1&y=<2> or `/reset`_now_ # [1]"
    assert to_html(TELEGRAM_STYLE.notice(text)) == (
        "<i>Wait 3 s: *see* https://example.com/a_b_c?x=1&amp;y=&lt;2&gt; "
        "or `/reset`_now_ # [1]</i>"
    )


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00")))
def test_any_notice_text_is_shown_in_italics_as_written(text: str) -> None:
    rendered = to_html(TELEGRAM_STYLE.notice(text))
    assert html_error(rendered) is None
    assert set(re.findall(r"</?([\w-]+)", rendered)) <= {"i"}, rendered
    assert visible(rendered, "HTML").split() == text.split()


async def test_the_models_markdown_is_shown_formatted(chat: Chat) -> None:
    (shown,) = await chat.ask("how?")
    assert (
        shown == "Plan\n\nThree easy steps:\n\n• read the guide\n• try it\n  • twice\n\nThat's all."
    )
    assert not set("#*[]_") & set(shown)
    calls = chat.fake.calls_to("sendMessage") + chat.fake.calls_to("editMessageText")
    assert all(c.params["parse_mode"] == "HTML" and not html_error(c.params["text"]) for c in calls)
    assert calls[-1].params["text"] == (
        "<b>Plan</b>\n\nThree <i>easy</i> steps:\n\n"
        '• read the <a href="https://example.com/guide_v2">guide</a>\n'
        "• try <b>it</b>\n  • twice\n\nThat's <i>all</i>."
    )
