"""Discord API calls per streamed reply, and how soon the final text follows the last token.

The real discord.py client runs against the local fake of Discord (tests/fake_discord.py);
a stub model streams tokens at 50 per second. For each reply it prints the calls made
(sends + edits), the most calls in any 5-second window (Discord allows about 5 edits per
5 s per message), and the time from the model's last token to the final text reaching
the fake Discord.

    python -m bench.discord_delivery
"""

from __future__ import annotations

import asyncio
import functools

from bench.common import PacedModel, machine
from bots.core.service import ConversationService
from bots.platforms.discord import DISCORD_LIMITS, run_discord
from bots.settings import DiscordSettings
from tests.fake_discord import OPEN_CHANNEL_ID, SNOWFLAKE, Call, FakeDiscord, user
from tests.fakes import MemoryStore

REPLY_TOKENS = (150, 150, 150, 150, 600)


def final_text(calls: list[Call], path: str) -> str:
    """The reply as Discord shows it: each message's last text, in posting order."""
    texts = {
        c.message_id: c.body["content"] for c in calls if c.path.startswith(path) and c.message_id
    }
    return "".join(texts.values())


def busiest_window(times: list[float], window: float) -> int:
    return max(sum(start <= t < start + window for t in times) for start in times)


async def main() -> None:
    print(f"machine: {machine()}")
    model = PacedModel()
    async with FakeDiscord() as fake:
        settings = DiscordSettings(
            token="bench-token",  # type: ignore[arg-type]
            api_base_url=fake.api_base,
            gateway_url=fake.gateway_url,
            open_channels=frozenset({OPEN_CHANNEL_ID}),
        )
        bot = asyncio.create_task(run_discord(ConversationService(MemoryStore(), model), settings))
        await asyncio.wait_for(fake.identified.wait(), 30)
        await fake.wait_for(lambda: bool(fake.calls_to("PUT", "/commands")), 30)
        print(f"stub model: {model.tokens_per_second} tokens/s; limits: {DISCORD_LIMITS}")
        print("| tokens | characters | messages | API calls | most in 5 s | last token to final |")
        print("|---|---|---|---|---|---|")
        for tokens in REPLY_TOKENS:
            model.tokens = tokens
            start = len(fake.calls)
            author = user(SNOWFLAKE + 1, "ada")
            await fake.dispatch(
                "MESSAGE_CREATE", fake.message(OPEN_CHANNEL_ID, "go", author=author)
            )
            path = f"/channels/{OPEN_CHANNEL_ID}/messages"
            expected = model.expected("go").strip()

            shown = functools.partial(final_text, path=path)
            wanted = expected.replace(" ", "")
            await fake.wait_for(
                lambda: shown(fake.calls[start:]).replace(" ", "") == wanted,  # noqa: B023
                tokens / model.tokens_per_second + 30,
            )
            calls = [
                c
                for c in fake.calls[start:]
                if c.path.startswith(path) and c.method in ("POST", "PATCH")
            ]
            lag = calls[-1].at - model.last_token_at
            messages = len({c.message_id for c in calls})
            print(
                f"| {tokens} | {len(expected)} | {messages} | {len(calls)} "
                f"| {busiest_window([c.at for c in calls], 5.0)} | {lag:.3f} s |"
            )
            await asyncio.sleep(5)  # a fresh 5-second window for the next reply
        bot.cancel()
        await asyncio.gather(bot, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main())
