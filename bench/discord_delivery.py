"""Discord API calls per streamed reply, and how soon the final text follows the last token.

The real discord.py client runs against the local fake of Discord (tests/fake_discord.py);
a stub model streams tokens at 50 per second, and the conversation is kept in an embedded
Redis. For each reply it prints the calls made (sends + edits, failed ones included), the
503s injected, the most calls in any 5-second window (Discord allows about 5 edits per 5 s
per message), and the time from the model's last token to the final text reaching the
fake Discord; then the replies whose final text never came and the exchanges Redis lacks
(goal: zero for both).

`--fail-share 0.05` answers that share of message posts and edits, drawn at random
(`--seed`), with a 503 Service Unavailable. discord.py raises on a 503 at once (it retries
500, 502, 504 and 524 itself), so what is measured is Parley's own retry.

    python -m bench.discord_delivery [--fail-share 0.05] [--seed 0]
"""

from __future__ import annotations

import asyncio
import functools
import random

from bench.common import PacedModel, failure_options, lost_turns, machine, redis_store
from bots.core.service import ConversationService
from bots.platforms.discord import DISCORD_LIMITS, run_discord
from bots.settings import DiscordSettings
from tests.fake_discord import OPEN_CHANNEL_ID, SNOWFLAKE, Call, FakeDiscord, user

REPLY_TOKENS = (150, 150, 150, 150, 600)


def final_text(calls: list[Call], path: str) -> str:
    """The reply as Discord shows it: each message's last text, in posting order."""
    texts = {
        c.message_id: c.body["content"] for c in calls if c.path.startswith(path) and c.message_id
    }
    return "".join(texts.values())


def busiest_window(times: list[float], window: float) -> int:
    return max(sum(start <= t < start + window for t in times) for start in times)


async def main(fail_share: float, seed: int) -> None:
    print(f"machine: {machine()}")
    model = PacedModel()
    async with (
        redis_store() as store,
        FakeDiscord(fail_share=fail_share, fail_random=random.Random(seed)) as fake,
    ):
        settings = DiscordSettings(
            token="bench-token",  # type: ignore[arg-type]
            api_base_url=fake.api_base,
            gateway_url=fake.gateway_url,
            open_channels=frozenset({OPEN_CHANNEL_ID}),
        )
        bot = asyncio.create_task(run_discord(ConversationService(store, model), settings))
        await asyncio.wait_for(fake.identified.wait(), 30)
        await fake.wait_for(lambda: bool(fake.calls_to("PUT", "/commands")), 30)
        print(f"stub model: {model.tokens_per_second} tokens/s; limits: {DISCORD_LIMITS}")
        print(f"injected: 503 on a share {fail_share:g} of message posts + edits, seed {seed}")
        print(
            "| tokens | characters | messages | API calls | 503s injected | most in 5 s "
            "| last token to final |"
        )
        print("|---|---|---|---|---|---|---|")
        exchanges: list[tuple[str, str]] = []
        missing: list[str] = []  # the replies whose final text never came
        on_final = 0  # failed calls that carried a message's final text
        for tokens in REPLY_TOKENS:
            model.tokens = tokens
            start = len(fake.calls)
            author = user(SNOWFLAKE + 1, "ada")
            await fake.dispatch(
                "MESSAGE_CREATE", fake.message(OPEN_CHANNEL_ID, "go", author=author)
            )
            path = f"/channels/{OPEN_CHANNEL_ID}/messages"
            expected = model.expected("go").strip()
            exchanges.append(("go", model.expected("go")))

            shown = functools.partial(final_text, path=path)
            wanted = expected.replace(" ", "")
            try:
                await fake.wait_for(
                    lambda: shown(fake.calls[start:]).replace(" ", "") == wanted,  # noqa: B023
                    tokens / model.tokens_per_second + 30,
                )
            except TimeoutError:  # reported below, with what was shown
                text = shown(fake.calls[start:])
                missing.append(f"{tokens} tokens: {len(text)} of {len(expected)} characters shown")
            calls = [
                c
                for c in fake.calls[start:]
                if c.path.startswith(path) and c.method in ("POST", "PATCH")
            ]
            answered = [c for c in calls if c.status == 200]
            finals = {c.message_id: c.body["content"] for c in answered}.values()
            on_final += sum(1 for c in calls if c.status == 503 and c.body["content"] in finals)
            lag = answered[-1].at - model.last_token_at
            messages = len({c.message_id for c in answered})
            print(
                f"| {tokens} | {len(expected)} | {messages} | {len(calls)} "
                f"| {sum(1 for c in calls if c.status == 503)} "
                f"| {busiest_window([c.at for c in calls], 5.0)} | {lag:.3f} s |"
            )
            await asyncio.sleep(5)  # a fresh 5-second window for the next reply
        failed = [c for c in fake.calls if c.status == 503]
        for method in ("POST", "PATCH"):
            print(f"503s on {method}: {sum(1 for c in failed if c.method == method)}")
        print(f"503s on a call carrying a message's final text: {on_final}")
        print(f"lost final messages: {len(missing)}", *(f"; {m}" for m in missing), sep="")
        print(f"lost turns: {await lost_turns(store, exchanges)}")
        bot.cancel()
        await asyncio.gather(bot, return_exceptions=True)


if __name__ == "__main__":
    options = failure_options(__doc__)
    asyncio.run(main(options.fail_share, options.seed))
