"""`python -m bots kb`: add, list, remove and search the knowledge bases answers come from."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import re
import sys
from pathlib import Path

from bots.core.knowledge import RetrievalPolicy, Retriever
from bots.core.ports import KnowledgeUnavailable, StoreUnavailable
from bots.runtime import EngineStartError, open_embedder, open_redis
from bots.settings import BotSettings, KnowledgeSettings, SettingsError, load_settings
from bots.store.knowledge import NAME_PATTERN, ModelMismatch, RedisKnowledge


def retrieval_policy(settings: KnowledgeSettings) -> RetrievalPolicy:
    """How passages are chosen, from the KB_* settings."""
    return RetrievalPolicy(settings.top_k, settings.threshold, settings.rescore)


def kb_name(text: str) -> str:
    """Parse a knowledge base's name: lowercase letters, digits, - and _."""
    if not re.fullmatch(NAME_PATTERN, text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a knowledge base name: use lowercase letters, digits, - and _"
        )
    return text


async def add(settings: BotSettings, index: RedisKnowledge, args: argparse.Namespace) -> int:
    # Imported here: the document readers (PDF, HTML) are needed by ingest alone.
    from tqdm import tqdm

    from bots.knowledge.documents import DocumentError
    from bots.knowledge.ingest import Ingest, IngestOptions, Outcome

    kb = settings.kb
    options = IngestOptions(
        max_tokens=kb.passage_tokens,
        overlap_tokens=kb.overlap_tokens,
        base_url=args.base_url,
        max_bytes=int(kb.max_document_mb * 1024 * 1024),
    )
    async with open_embedder(kb, settings.data_dir) as embedder:
        ingest = Ingest(index, embedder, args.name, options)
        await ingest.prepare(embedder.model)
        with tqdm(desc=f"adding to {args.name}", unit="doc", file=sys.stderr, disable=None) as bar:

            def report(outcome: Outcome) -> None:
                bar.update()
                if outcome.status == "failed":
                    bar.write(f"failed: {outcome.error}", file=sys.stderr)

            try:
                outcomes = await ingest.add(args.paths, report)
            except DocumentError as error:  # a path that is missing or of no known kind
                print(f"parley: {error}", file=sys.stderr)
                return 2
    for outcome in outcomes:
        if outcome.status != "failed":
            kept = outcome.passages - outcome.embedded
            count = f"{outcome.passages} passage{'' if outcome.passages == 1 else 's'}"
            unchanged = f" ({kept} unchanged)" if outcome.status == "replaced" and kept else ""
            print(f"{outcome.status:<9} {outcome.doc_id}: {count}{unchanged}")
    failed = sum(outcome.status == "failed" for outcome in outcomes)
    if failed:
        print(f"parley: {failed} document(s) not added; see above", file=sys.stderr)
    return 1 if failed else 0


async def show(index: RedisKnowledge, args: argparse.Namespace) -> int:
    if args.name is None:
        for name in await index.names():
            info = await index.info(name)
            if info is not None:
                print(
                    f"{name}  {info.documents} documents  {info.passages} passages  "
                    f"{info.model} ({info.dimension} dims)  {info.memory_bytes / 1e6:.1f} MB"
                )
        return 0
    if await index.info(args.name) is None:
        print(f"parley: there is no knowledge base {args.name!r}", file=sys.stderr)
        return 1
    for record in await index.documents(args.name):
        added = datetime.datetime.fromtimestamp(record.added, datetime.UTC)
        print(
            f"{record.doc_id}  {len(record.ids)} passages  added {added:%Y-%m-%d %H:%M} UTC  "
            f"{record.title}"
        )
    return 0


async def remove(index: RedisKnowledge, args: argparse.Namespace) -> int:
    if args.doc is None:
        removed = await index.remove(args.name)
        what = f"knowledge base {args.name}"
    else:
        removed = await index.remove_document(args.name, args.doc)
        what = f"{args.doc} from {args.name}"
    print(f"removed {what}" if removed else f"parley: no {what}", file=sys.stderr)
    return 0 if removed else 1


async def search(settings: BotSettings, index: RedisKnowledge, args: argparse.Namespace) -> int:
    policy = retrieval_policy(settings.kb)
    async with open_embedder(settings.kb, settings.data_dir) as embedder:
        retriever = Retriever(embedder, index, policy)
        hits = await retriever.search(args.name, args.question)
    relevant = {hit.passage.id for hit in retriever.relevant(hits)}
    for rank, hit in enumerate(hits[: args.k], 1):
        mark = "*" if hit.passage.id in relevant else " "
        print(f"{rank:>2}. {hit.score:.3f}{mark} {' > '.join(hit.passage.titles)}")
        print(f"    {hit.passage.link or hit.passage.doc}")
        print(f"    {hit.passage.text[:200].replace(chr(10), ' ')}")
    if not relevant:
        print(f"(nothing passes the threshold {policy.threshold}: {settings.kb.no_answer})")
    return 0


async def run(settings: BotSettings, args: argparse.Namespace) -> int:
    async with open_redis(settings.redis, settings.data_dir) as redis:
        index = RedisKnowledge(redis, prefix=settings.redis.key_prefix)
        if args.action == "add":
            return await add(settings, index, args)
        if args.action == "list":
            return await show(index, args)
        if args.action == "remove":
            return await remove(index, args)
        return await search(settings, index, args)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bots kb", description="Knowledge bases: the documents answers come from."
    )
    actions = parser.add_subparsers(dest="action", required=True)
    adding = actions.add_parser(
        "add", help="add or replace documents (Markdown, HTML, text, PDF; folders recursively)"
    )
    adding.add_argument("name", type=kb_name, help="the knowledge base; made if new")
    adding.add_argument("paths", type=Path, nargs="+", help="files and folders")
    adding.add_argument(
        "--base-url", help="where the documents are published; links are this + their path"
    )
    listing = actions.add_parser("list", help="knowledge bases, or one's documents")
    listing.add_argument("name", type=kb_name, nargs="?")
    removing = actions.add_parser("remove", help="remove a knowledge base, or one document")
    removing.add_argument("name", type=kb_name)
    removing.add_argument("doc", nargs="?", help="a document's id, as `list NAME` shows it")
    searching = actions.add_parser("search", help="rank passages for a question, with scores")
    searching.add_argument("name", type=kb_name)
    searching.add_argument("question")
    searching.add_argument("-k", type=int, default=10, help="passages shown (default 10)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(BotSettings)
        return asyncio.run(run(settings, args))
    except (
        SettingsError,
        ModelMismatch,
        KnowledgeUnavailable,
        StoreUnavailable,
        EngineStartError,
    ) as error:
        print(f"parley: {error}", file=sys.stderr)
        return 2
