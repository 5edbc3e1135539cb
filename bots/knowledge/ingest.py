"""Add documents to a knowledge base: read, split, embed what is new, publish atomically."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from bots.core.models import Passage
from bots.core.ports import Embedder, KnowledgeUnavailable, StoreUnavailable
from bots.knowledge.documents import (
    MAX_DOCUMENT_BYTES,
    Document,
    DocumentError,
    Draft,
    find_documents,
    read_document,
    split,
)
from bots.store.knowledge import DocumentRecord, RedisKnowledge

EMBED_BATCH = 32  # passages per embedding request while ingesting


@dataclass(frozen=True, slots=True)
class IngestOptions:
    """How documents are split and linked.

    Args:
        max_tokens: tokens per passage at most (embedding model's tokens, titles included).
        overlap_tokens: tokens a passage repeats from the one before it.
        base_url: documents are published under this URL (their path appended);
            unset: links are the files' paths.
        max_bytes: larger files are refused.
    """

    max_tokens: int = 200
    overlap_tokens: int = 32
    base_url: str | None = None
    max_bytes: int = MAX_DOCUMENT_BYTES

    def fingerprint(self) -> str:
        """What changes a document's passages besides its bytes."""
        return json.dumps([self.max_tokens, self.overlap_tokens, self.base_url])


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one document."""

    doc_id: str
    path: Path
    status: str  # "added", "replaced", "unchanged" or "failed"
    passages: int = 0
    embedded: int = 0  # passages embedded now; the others kept their vectors
    error: str = ""
    servers_failed: bool = False  # the embedding server or Redis failed, not the document


Progress = Callable[[Outcome], None]


def link_of(doc_id: str, path: Path, anchor: str | None, base_url: str | None) -> str:
    """Where a reader finds a passage: the published URL, or the file, with its anchor."""
    where = f"{base_url.rstrip('/')}/{quote(doc_id)}" if base_url else str(path)
    return f"{where}#{anchor}" if anchor else where


def passage_id(doc_id: str, draft: Draft) -> str:
    """A passage's element name: its document, and its text's hash (unchanged text, same id)."""
    doc = hashlib.sha256(doc_id.encode()).hexdigest()[:8]
    return f"{doc}:{hashlib.sha256(draft.embedded_text.encode()).hexdigest()[:16]}"


class Ingest:
    """Add documents to one knowledge base, each replaced whole or not at all."""

    def __init__(
        self, index: RedisKnowledge, embedder: Embedder, name: str, options: IngestOptions
    ) -> None:
        self._index = index
        self._embedder = embedder
        self._name = name
        self._options = options

    async def prepare(self, model: str) -> None:
        """Make sure the embedding server answers and the base takes its vectors."""
        probe = await self._embedder.embed(["dimension"])
        await self._index.create(self._name, model, len(probe[0]))

    async def add(self, paths: Sequence[Path], progress: Progress | None = None) -> list[Outcome]:
        """Add every document under `paths`; stop at the first failure of the servers.

        A document that cannot be read is reported and skipped; the others go on.
        """
        outcomes = []
        for doc_id, path in find_documents(paths):
            outcome = await self.add_one(doc_id, path)
            outcomes.append(outcome)
            if progress is not None:
                progress(outcome)
            if outcome.servers_failed:
                break  # the next ones would fail the same way
        return outcomes

    async def add_one(self, doc_id: str, path: Path) -> Outcome:
        """Add or replace one document; on failure its previous version stays served."""
        try:  # parsing a large PDF takes a while: not on the event loop
            document, sha = await asyncio.to_thread(self._read, doc_id, path)
        except DocumentError as error:
            return Outcome(doc_id, path, "failed", error=str(error))
        staged: list[str] = []
        try:
            old = await self._index.document(self._name, doc_id)
            if old is not None and old.sha256 == sha:
                return Outcome(doc_id, path, "unchanged", passages=len(old.ids))
            passages = await self._passages(document)
            have = await self._index.staged(self._name, [p.id for p in passages])
            new = [p for p in passages if p.id not in have]
            for start in range(0, len(new), EMBED_BATCH):
                batch = new[start : start + EMBED_BATCH]
                vectors = await self._embedder.embed([_embedded(p) for p in batch])
                staged += [p.id for p in batch]
                pairs = [(p.id, vector) for p, vector in zip(batch, vectors, strict=True)]
                await self._index.stage(self._name, pairs)
            record = DocumentRecord(
                doc_id, str(path), document.title, sha, tuple(p.id for p in passages), time.time()
            )
            await self._index.publish(self._name, record, passages)
        except (KnowledgeUnavailable, StoreUnavailable) as error:
            await self._discard(staged)
            message = f"{path}: {error}; its previous version (if any) is still served"
            return Outcome(doc_id, path, "failed", error=message, servers_failed=True)
        status = "added" if old is None else "replaced"
        return Outcome(doc_id, path, status, passages=len(passages), embedded=len(new))

    def _read(self, doc_id: str, path: Path) -> tuple[Document, str]:
        """The document, and the hash of its bytes and of the options that split it."""
        document = read_document(doc_id, path, max_bytes=self._options.max_bytes)
        digest = hashlib.sha256(path.read_bytes() + self._options.fingerprint().encode())
        return document, digest.hexdigest()

    async def _passages(self, document: Document) -> list[Passage]:
        options = self._options
        drafts = await split(
            document,
            self._embedder.count_tokens,
            max_tokens=options.max_tokens,
            overlap_tokens=options.overlap_tokens,
        )
        passages: dict[str, Passage] = {}
        for draft in drafts:
            pid = passage_id(document.doc_id, draft)
            link = link_of(document.doc_id, document.path, draft.anchor, options.base_url)
            passages.setdefault(pid, Passage(pid, document.doc_id, draft.titles, link, draft.text))
        return list(passages.values())

    async def _discard(self, staged: list[str]) -> None:
        # Left behind, staged passages stay invisible; the next ingest of the document reuses them.
        with contextlib.suppress(StoreUnavailable):
            await self._index.discard(self._name, staged)


def _embedded(passage: Passage) -> str:
    return Draft(passage.titles, None, passage.text).embedded_text
