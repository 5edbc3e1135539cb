"""Composition root: `python -m bots [run|console|discord|telegram|http|chatwoot|export|keys|kb]`.

`run` starts every platform bot whose token is set (and the HTTP channel when
HTTP_ENABLED is true), or the console chat when none is.
With no LLM_BASE_URL it first starts the local inference service; with no REDIS_URL it
runs an embedded Redis; with a knowledge base and no KB_EMBED_BASE_URL it starts the
local embedding model too. Every client is opened with `async with` and closed on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import getpass
import io
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from openai import AsyncOpenAI
from redis.asyncio import Redis

from bots import export, kb, keys
from bots.core.handoff import HandoffPolicy, Handoffs
from bots.core.knowledge import Retriever
from bots.core.models import Author, ConversationKey
from bots.core.service import ChatPolicy, ConversationService
from bots.llm.openai import OpenAIChatModel, timeouts
from bots.ops import JsonFormatter, Metrics, Probe, Redact, ops_server, secrets_of
from bots.platforms.console import ConsoleChat, read_stdin_line
from bots.platforms.errors import PlatformSetupError
from bots.runtime import (
    EngineStartError,
    context_store,
    event_loop,
    is_healthy,
    local_inference,
    open_embedder,
    open_redis,
    tune_gc,
)
from bots.settings import BotSettings, SettingsError, load_settings
from bots.store.embedded import EmbeddedRedisError
from bots.store.knowledge import RedisKnowledge
from bots.store.limits import RedisLimiter
from inference.settings import InferenceSettings

log = logging.getLogger("bots")

Runner = Callable[[BotSettings], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Backend:
    """What the platforms share: the conversation service and the Redis behind it."""

    service: ConversationService
    redis: Redis
    limiter: RedisLimiter
    model_url: str  # the model server's OpenAI base URL
    metrics: Metrics
    embed_url: str | None = None  # the embedding server's, when knowledge bases are on

    def probes(self) -> dict[str, Probe]:
        """What /readyz checks: Redis answers PING, the model servers their /health."""

        async def redis() -> bool:
            return bool(await self.redis.ping())

        async def model() -> bool:
            return await is_healthy(self.model_url)

        async def embeddings() -> bool:
            return self.embed_url is not None and await is_healthy(self.embed_url)

        probes: dict[str, Probe] = {"redis": redis, "model": model}
        if self.embed_url is not None:
            probes["embeddings"] = embeddings
        return probes


@asynccontextmanager
async def open_backend(settings: BotSettings) -> AsyncIterator[Backend]:
    """Open Redis and the model server (local ones where none is configured) and wire the core."""
    async with AsyncExitStack() as stack:
        llm = settings.llm
        base_url, api_key, model_name = llm.base_url, llm.api_key.get_secret_value(), llm.model
        if base_url is None:
            engine = load_settings(InferenceSettings)
            base_url, model_name = engine.base_url, engine.served_model_name
            if engine.api_key is not None:
                api_key = engine.api_key.get_secret_value()
            print(
                "Starting the local model (the first start takes a few minutes)...", file=sys.stderr
            )
            await stack.enter_async_context(
                local_inference(base_url, settings.data_dir / "logs" / "inference.log")
            )
        redis = await stack.enter_async_context(open_redis(settings.redis, settings.data_dir))
        index = RedisKnowledge(redis, prefix=settings.redis.key_prefix)
        retriever, embed_url = None, None
        if settings.kb.default or settings.kb.embed_base_url or await index.names():
            embedder = await stack.enter_async_context(
                open_embedder(settings.kb, settings.data_dir)
            )
            retriever = Retriever(embedder, index, kb.retrieval_policy(settings.kb))
            embed_url = embedder.base_url
        client = await stack.enter_async_context(
            AsyncOpenAI(
                base_url=base_url,
                api_key=api_key or "none",
                timeout=timeouts(connect=llm.connect_timeout, read=llm.read_timeout),
                max_retries=0,
            )
        )
        store = context_store(redis, settings.redis)
        line = await stack.enter_async_context(store.line)
        model = OpenAIChatModel(
            client,
            model=model_name,
            reply_tokens=llm.reply_tokens,
            temperature=llm.temperature,
            top_p=llm.top_p,
            retry_deadline=llm.retry_deadline,
            context_tokens=llm.context_tokens,
        )
        limits = settings.limits
        limiter = RedisLimiter(
            redis,
            prefix=settings.redis.key_prefix,
            user_messages=limits.user_messages,
            user_window=limits.user_window,
            conversation_messages=limits.conversation_messages,
            conversation_window=limits.conversation_window,
            daily_tokens=limits.daily_tokens,
        )
        metrics = Metrics()
        service = ConversationService(
            store,
            model,
            limiter=limiter,
            policy=chat_policy(settings),
            observer=metrics,
            knowledge=retriever,
            handoffs=Handoffs(store, store, handoff_policy(settings), metrics),
            line=line,
        )
        yield Backend(service, redis, limiter, base_url, metrics, embed_url)


def chat_policy(settings: BotSettings) -> ChatPolicy:
    chat = settings.chat
    return ChatPolicy(
        system_prompt=chat.system_prompt,
        reply_tokens=settings.llm.reply_tokens,
        trim_target=chat.trim_target,
        max_message_chars=chat.max_message_chars,
        max_persona_chars=chat.max_persona_chars,
        per_user_in_groups=chat.group_conversation == "user",
        max_in_flight=settings.limits.max_in_flight,
        collect_default=chat.collect_default,
        show_reasoning=chat.show_reasoning,
        knowledge_default=settings.kb.default,
        free_answers=settings.kb.free_answers,
        no_answer=settings.kb.no_answer,
    )


def handoff_policy(settings: BotSettings) -> HandoffPolicy:
    handoff = settings.handoff
    return HandoffPolicy(
        phrases=handoff.phrases,
        idle_seconds=handoff.idle_seconds,
        after_failures=handoff.after_failures,
        on_no_answer=handoff.on_no_answer,
    )


async def run_console(settings: BotSettings) -> None:
    # Undecodable bytes typed or piped in become U+FFFD instead of stopping the chat.
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="replace")
    async with open_backend(settings) as backend:
        user = getpass.getuser()
        chat = ConsoleChat(
            backend.service,
            ConversationKey("console", settings.console.conversation),
            author=Author(user, user),
            read_line=lambda: read_stdin_line("you> " if sys.stdin.isatty() else ""),
            out=sys.stdout,
        )
        await chat.run()


async def until_stopped(runner: Runner, settings: BotSettings) -> None:
    """Run until done, Ctrl-C or SIGTERM; either signal unwinds every `async with`."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await runner(settings)
    except asyncio.CancelledError:
        log.info("stopped by SIGTERM")


PLATFORMS = ("discord", "telegram", "http", "chatwoot")
MISSING_TOKEN = {
    "discord": "DISCORD_TOKEN is not set: create a bot in the Discord developer portal",
    "telegram": "TELEGRAM_TOKEN is not set: get one from @BotFather",
    "chatwoot": "CHATWOOT_URL and CHATWOOT_BOT_TOKEN are not set: create an agent bot in "
    "Chatwoot (see the README)",
}


def configured_platforms(settings: BotSettings) -> list[str]:
    """The platforms whose tokens are set, and the HTTP channel when enabled."""
    configured = {
        "discord": settings.discord.token is not None,
        "telegram": settings.telegram.token is not None,
        "http": settings.http.enabled,
        "chatwoot": settings.chatwoot.url is not None and settings.chatwoot.bot_token is not None,
    }
    return [name for name in PLATFORMS if configured[name]]


def bot(platform: str, backend: Backend, settings: BotSettings) -> Coroutine[Any, Any, None]:
    """One platform's bot, to run; only its own libraries are imported (memory per process)."""
    if platform == "discord":
        from bots.platforms.discord import run_discord

        return run_discord(backend.service, settings.discord)
    if platform == "telegram":
        from bots.platforms.telegram import run_telegram

        return run_telegram(backend.service, settings.telegram)
    if platform == "chatwoot":
        from bots.platforms.chatwoot import run_chatwoot

        return run_chatwoot(
            backend.service,
            settings.chatwoot,
            backend.redis,
            prefix=settings.redis.key_prefix,
            metrics=backend.metrics,
        )
    from bots.platforms.http import run_http
    from bots.store.keys import RedisApiKeys

    keys = RedisApiKeys(backend.redis, prefix=settings.redis.key_prefix)
    return run_http(
        backend.service,
        settings.http,
        keys,
        backend.limiter.admit_quota,
        redis=backend.redis,
        prefix=settings.redis.key_prefix,
        metrics=backend.metrics,
    )


async def run_bots(settings: BotSettings, platforms: list[str]) -> None:
    """Run these platform bots side by side, sharing one conversation service."""
    for name in platforms:
        if name in MISSING_TOKEN and name not in configured_platforms(settings):
            raise SettingsError(MISSING_TOKEN[name])
    async with (
        open_backend(settings) as backend,
        ops_server(settings.ops.host, settings.ops.port, backend.probes(), backend.metrics),
    ):
        bots = [asyncio.create_task(bot(name, backend, settings)) for name in platforms]
        tune_gc()  # after the imports
        try:
            done, _ = await asyncio.wait(bots, return_when=asyncio.FIRST_EXCEPTION)
            for finished in done:
                finished.result()  # the first bot that failed stops them all, with its error
        finally:
            for running in bots:
                running.cancel()
            await asyncio.gather(*bots, return_exceptions=True)


async def run_configured(settings: BotSettings) -> None:
    """Run the bots whose tokens are set; with none, the console chat."""
    if platforms := configured_platforms(settings):
        await run_bots(settings, platforms)
    else:
        await run_console(settings)


def configure_logging(settings: BotSettings, *, to_file: bool) -> None:
    """Log to stderr, or to a file when the terminal belongs to the console chat."""
    log_file = settings.data_dir / "logs" / "bots.log"
    if to_file:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    handler: logging.Handler = (
        logging.FileHandler(log_file, encoding="utf-8") if to_file else logging.StreamHandler()
    )
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(Redact(secrets_of(settings)))  # whichever library writes the line
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        return export.main(argv[1:])
    if argv[:1] == ["keys"]:
        return keys.main(argv[1:])
    if argv[:1] == ["kb"]:
        return kb.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bots", description=__doc__)
    parser.add_argument(
        "command", nargs="?", default="run",
        choices=["run", "console", *PLATFORMS, "export", "keys", "kb"],
        help="run (default): the bots whose tokens are set, else the console; "
        "http: the HTTP API and web chat; chatwoot: the agent bot of a Chatwoot help desk; "
        "export: opted-in conversations as JSONL "
        "(see export --help); keys: the HTTP channel's API keys (see keys --help); "
        "kb: knowledge bases, the documents answers come from (see kb --help)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        settings = load_settings(BotSettings)
    except SettingsError as error:
        print(f"parley: {error}", file=sys.stderr)
        return 2
    runners: dict[str, Runner] = {
        "run": run_configured,
        "console": run_console,
        "discord": functools.partial(run_bots, platforms=["discord"]),
        "telegram": functools.partial(run_bots, platforms=["telegram"]),
        "http": functools.partial(run_bots, platforms=["http"]),
        "chatwoot": functools.partial(run_bots, platforms=["chatwoot"]),
    }
    is_console = args.command == "console" or (
        args.command == "run" and not configured_platforms(settings)
    )
    configure_logging(settings, to_file=is_console)
    try:
        with asyncio.Runner(loop_factory=event_loop) as runner:
            runner.run(until_stopped(runners[args.command], settings))
    except (
        SettingsError,
        EngineStartError,
        EmbeddedRedisError,
        PlatformSetupError,
    ) as error:
        print(f"parley: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
