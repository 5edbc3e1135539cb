"""Retrieval quality on the help-centre test set: Parley's retrieval beside the usual ones.

The documents of `tests/kb_corpus` are ingested into Redis 8 through vLLM serving the
bundled embedding model (all-MiniLM-L6-v2), then every question of the set is ranked four
ways in the same run:

- Parley: passages (split by the documents' structure), dense search, then the
  candidates re-scored by the words they share with the question;
- the same passages, dense search alone;
- whole sections, one vector each (the model reads a section's first 256 tokens);
- BM25 over the same passages (bm25s), no vectors at all.

For each it prints hit@1 (the first result is the section that answers), hit@5 (one of
the first five sections is), and at the relevance threshold the share of answerable
questions answered and of out-of-scope ones refused; then the follow-ups, searched with
and without the question before them, and a sweep of thresholds.

    python -m bench.kb_retrieval [--embed-url http://127.0.0.1:8001/v1]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from collections.abc import Sequence

import bm25s

from bench.common import help_centre, machine
from bots.core.knowledge import RetrievalPolicy, Retriever, words
from bots.core.models import Hit, Passage
from bots.knowledge.documents import Draft, find_documents, read_document
from bots.knowledge.ingest import link_of
from bots.llm.embeddings import OpenAIEmbedder
from bots.store.knowledge import DocumentRecord, RedisKnowledge
from tests.knowledge_set import DOCS, Question, Ranker, evaluate, questions

THRESHOLDS = (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
CANDIDATES = 20


async def whole_sections(index: RedisKnowledge, embedder: OpenAIEmbedder) -> None:
    """Ingest every section as one vector, however long (what many tools do)."""
    await index.create("sections", embedder.model, len((await embedder.embed(["x"]))[0]))
    for doc_id, path in find_documents([DOCS]):
        document = read_document(doc_id, path)
        passages = [
            Passage(
                f"{doc_id}:{n}", doc_id, s.titles, link_of(doc_id, path, s.anchor, None), s.text
            )
            for n, s in enumerate(document.sections)
        ]
        texts = [Draft(p.titles, None, p.text).embedded_text for p in passages]
        vectors = await embedder.embed(texts)
        await index.stage("sections", [(p.id, v) for p, v in zip(passages, vectors, strict=True)])
        ids = tuple(p.id for p in passages)
        await index.publish("sections", DocumentRecord(doc_id, "", "", "", ids, 0), passages)


def bm25(passages: Sequence[Passage]) -> Ranker:
    """BM25 over the passages (bm25s), with the words Parley's re-scoring reads."""
    index = bm25s.BM25()
    index.index([words(" ".join((*p.titles, p.text))) for p in passages], show_progress=False)

    async def rank(question: Question) -> Sequence[Hit]:
        asked = words(f"{question.previous or ''} {question.text}")
        if not asked:
            return []
        found, scores = index.retrieve(
            [asked], k=min(CANDIDATES, len(passages)), show_progress=False
        )
        return [
            Hit(passages[int(i)], float(score))
            for i, score in zip(found[0], scores[0], strict=True)
        ]

    return rank


def dense(retriever: Retriever, name: str) -> Ranker:
    async def rank(question: Question) -> Sequence[Hit]:
        return await retriever.search(name, question.text, question.previous)

    return rank


def cached(rank: Ranker) -> Ranker:
    """Rank each question once, however many thresholds read the ranking."""
    seen: dict[tuple[str, str | None], Sequence[Hit]] = {}

    async def once(question: Question) -> Sequence[Hit]:
        key = (question.text, question.previous)
        if key not in seen:
            seen[key] = await rank(question)
        return seen[key]

    return once


def after_another(answerable: Sequence[Question]) -> list[Question]:
    """The questions, each asked right after the one before it in the set (another topic,
    mostly): a conversation that moves on must not be held back by its last question."""
    return [
        dataclasses.replace(q, previous=answerable[n - 1].text) for n, q in enumerate(answerable)
    ]


def alone(rank: Ranker) -> Ranker:
    """The same ranking, asked without the question before."""

    async def without(question: Question) -> Sequence[Hit]:
        return await rank(dataclasses.replace(question, previous=None))

    return without


async def measure(embed_url: str | None) -> None:
    answerable, follow_ups, out_of_scope = questions()
    threshold = RetrievalPolicy().threshold
    async with help_centre(embed_url) as centre:
        index, embedder, outcomes = centre.index, centre.embedder, centre.outcomes
        await whole_sections(index, embedder)
        ids = [pid for record in await index.documents("help") for pid in record.ids]
        passages = list((await index.passages("help", ids)).values())
        policy = RetrievalPolicy()
        plain = RetrievalPolicy(policy.top_k, policy.threshold, rescore=False)
        arms: dict[str, tuple[Ranker, bool]] = {
            "Parley: passages, re-scored by shared words": (
                cached(dense(Retriever(embedder, index, policy), "help")),
                True,
            ),
            "passages, dense only": (
                cached(dense(Retriever(embedder, index, plain), "help")),
                True,
            ),
            "whole sections, dense": (
                cached(dense(Retriever(embedder, index, plain), "sections")),
                True,
            ),
            "BM25 over passages (bm25s)": (cached(bm25(passages)), False),
        }
        rows = []
        for name, (rank, scored) in arms.items():
            scores = await evaluate(rank, answerable, out_of_scope, threshold)
            moved_on = await evaluate(rank, after_another(answerable), [], threshold)
            follow = await evaluate(rank, follow_ups, [], threshold)
            lone = await evaluate(alone(rank), follow_ups, [], threshold)
            sweep = [await evaluate(rank, answerable, out_of_scope, t) for t in THRESHOLDS]
            rows.append((name, scored, scores, moved_on, follow, lone, sweep))
    print(f"machine: {machine()}")
    print(
        f"{centre.passages} passages from {len(outcomes)} documents; "
        f"{len(answerable)} answerable questions, {len(follow_ups)} follow-ups, "
        f"{len(out_of_scope)} out of scope; threshold {threshold} (cosine)"
    )
    print(
        f"{'ranking':44} | hit@1 | hit@5 | answered | refused | after another topic "
        "hit@1 | follow-ups hit@5 (alone)"
    )
    for name, scored, scores, moved_on, follow, lone, _ in rows:
        answered = f"{scores.answered:8.0%}" if scored else "       -"
        refused = f"{scores.refused:7.0%}" if scored else "      -"
        print(
            f"{name:44} | {scores.hit_at_1:5.0%} | {scores.hit_at_5:5.0%} | {answered} | "
            f"{refused} | {moved_on.hit_at_1:19.0%} | {follow.hit_at_5:.0%} ({lone.hit_at_5:.0%}),"
            f" {follow.answered:.0%} answered"
        )
    print("threshold sweep (answered / refused):")
    for name, scored, *_, sweep in rows:
        if scored:
            cells = "  ".join(
                f"{t}: {s.answered:.0%}/{s.refused:.0%}"
                for t, s in zip(THRESHOLDS, sweep, strict=True)
            )
            print(f"  {name:44} {cells}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embed-url", help="a running embedding server instead of starting one")
    asyncio.run(measure(parser.parse_args().embed_url))
