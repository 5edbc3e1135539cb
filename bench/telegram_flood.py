"""Telegram under flood control: 100 streamed replies in 10 group chats, none lost.

The real python-telegram-bot application runs against the local fake Bot API
(tests/fake_telegram.py) enforcing Telegram's limits: one edit per second per chat and
20 messages (sends and edits) per minute per group, answering 429 with `retry_after`
beyond them. Each of 10 groups gets 10 messages at once; a stub model streams each reply
(60 tokens at 50 tokens/s) and the conversations are kept in an embedded Redis. It prints
how many final replies are missing or wrong and how many exchanges Redis lacks (goal:
zero for both), the 429s received, the 502s injected, and the calls made.

`--fail-share 0.05` answers that share of sends and edits, drawn at random (`--seed`),
with a 502 Bad Gateway, which Parley retries.

    python -m bench.telegram_flood [--fail-share 0.05] [--seed 0]
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

from bench.common import PacedModel, failure_options, lost_turns, machine, redis_store
from bots.core.service import ConversationService
from bots.platforms.telegram import run_telegram
from bots.settings import TelegramSettings
from tests.fake_telegram import TOKEN, WRITES, FakeTelegram, group_chat, person, visible

CHATS = 10
REPLIES_PER_CHAT = 10
TOKENS = 60


async def main(fail_share: float, seed: int) -> None:
    print(f"machine: {machine()}")
    model = PacedModel(echo=True)
    model.tokens = TOKENS
    async with (
        redis_store() as store,
        FakeTelegram(
            edit_interval=1.0,
            group_per_minute=20,
            fail_share=fail_share,
            fail_random=random.Random(seed),
        ) as fake,
    ):
        settings = TelegramSettings(
            token=TOKEN,  # type: ignore[arg-type]
            base_url=fake.base_url,
            trigger_prefix="!",
            poll_timeout=1,
        )
        bot = asyncio.create_task(run_telegram(ConversationService(store, model), settings))
        await fake.wait_for(lambda: bool(fake.calls_to("getUpdates")), 30)
        chats = [group_chat(-5000 - index) for index in range(CHATS)]
        started = time.monotonic()
        expected: dict[int, list[str]] = {}
        exchanges: list[tuple[str, str]] = []
        for chat in chats:
            for index in range(REPLIES_PER_CHAT):
                text = f"!question {index} in chat {chat['id']}"
                await fake.push({"chat": chat, "from": person(1, "Ada"), "text": text})
                # In groups the model sees the author's name before the text.
                answer = model.expected(f"Ada: {text.removeprefix('!')}")
                expected.setdefault(chat["id"], []).append(answer.strip())
                exchanges.append((text.removeprefix("!"), answer))

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
        writes = [c for c in fake.calls if c.method in WRITES]
        failed = [c for c in writes if c.status == 502]
        print("fake API limits: 1 edit/s per chat, 20 messages (sends + edits)/min per group")
        print(f"stub model: {TOKENS} tokens per reply at {model.tokens_per_second:g} tokens/s")
        print(f"injected: 502 on a share {fail_share:g} of sends + edits, seed {seed}")
        print(
            "| replies | chats | lost final messages | lost turns | 429s received "
            "| 502s injected | sends + edits | minutes |"
        )
        print("|---|---|---|---|---|---|---|---|")
        print(
            f"| {CHATS * REPLIES_PER_CHAT} | {CHATS} | {lost} "
            f"| {await lost_turns(store, exchanges)} | {fake.too_many()} | {len(failed)} "
            f"| {len(writes)} | {elapsed / 60:.1f} |"
        )
        for method in WRITES:
            print(f"502s on {method}: {sum(1 for c in failed if c.method == method)}")
        on_final = [
            c
            for c in failed
            if visible(c.params["text"], c.params.get("parse_mode")).strip()
            in fake.shown(c.params["chat_id"])
        ]
        print(f"502s on a call carrying a message's final text: {len(on_final)}")
        bot.cancel()
        await asyncio.gather(bot, return_exceptions=True)


if __name__ == "__main__":
    options = failure_options(__doc__)
    asyncio.run(main(options.fail_share, options.seed))
