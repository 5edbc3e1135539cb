"""Telegram under flood control: 100 streamed replies in 10 group chats, none lost.

The real python-telegram-bot application runs against the local fake Bot API
(tests/fake_telegram.py) enforcing Telegram's limits: one edit per second per chat and
20 messages (sends and edits) per minute per group, answering 429 with `retry_after`
beyond them. Each of 10 groups gets 10 messages at once; a stub model streams each reply
(60 tokens at 50 tokens/s). It prints how many final replies are missing or wrong (goal:
zero), the 429s received, and the calls made.

    python -m bench.telegram_flood
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from bench.common import PacedModel, machine
from bots.core.service import ConversationService
from bots.platforms.telegram import run_telegram
from bots.settings import TelegramSettings
from tests.fake_telegram import TOKEN, FakeTelegram, group_chat, person
from tests.fakes import MemoryStore

CHATS = 10
REPLIES_PER_CHAT = 10
TOKENS = 60


async def main() -> None:
    print(f"machine: {machine()}")
    model = PacedModel(echo=True)
    model.tokens = TOKENS
    async with FakeTelegram(edit_interval=1.0, group_per_minute=20) as fake:
        settings = TelegramSettings(
            token=TOKEN,  # type: ignore[arg-type]
            base_url=fake.base_url,
            trigger_prefix="!",
            poll_timeout=1,
        )
        bot = asyncio.create_task(run_telegram(ConversationService(MemoryStore(), model), settings))
        await fake.wait_for(lambda: bool(fake.calls_to("getUpdates")), 30)
        chats = [group_chat(-5000 - index) for index in range(CHATS)]
        started = time.monotonic()
        expected: dict[int, list[str]] = {}
        for chat in chats:
            for index in range(REPLIES_PER_CHAT):
                text = f"!question {index} in chat {chat['id']}"
                await fake.push({"chat": chat, "from": person(1, "Ada"), "text": text})
                # In groups the model sees the author's name before the text.
                shown = model.expected(f"Ada: {text.removeprefix('!')}").strip()
                expected.setdefault(chat["id"], []).append(shown)

        def all_final() -> bool:
            return all(fake.shown(chat_id) == texts for chat_id, texts in expected.items())

        with contextlib.suppress(TimeoutError):  # what is still missing then is reported
            await fake.wait_for(all_final, 420)
        elapsed = time.monotonic() - started
        lost = sum(
            1
            for chat_id, texts in expected.items()
            for index, text in enumerate(texts)
            if fake.shown(chat_id)[index : index + 1] != [text]
        )
        writes = [c for c in fake.calls if c.method in ("sendMessage", "editMessageText")]
        print("fake API limits: 1 edit/s per chat, 20 messages (sends + edits)/min per group")
        print(f"stub model: {TOKENS} tokens per reply at {model.tokens_per_second:g} tokens/s")
        print("| replies | chats | lost final messages | 429s received | sends + edits | minutes |")
        print("|---|---|---|---|---|---|")
        print(
            f"| {CHATS * REPLIES_PER_CHAT} | {CHATS} | {lost} | {fake.too_many()} "
            f"| {len(writes)} | {elapsed / 60:.1f} |"
        )
        bot.cancel()
        await asyncio.gather(bot, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main())
