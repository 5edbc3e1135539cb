"""The knowledge base's test set: an invented router maker's help centre and its questions.

The documents (`kb_corpus/docs`: Markdown, HTML and text) and the questions
(`kb_corpus/questions.json`: each answerable one names the section that answers it) were
written for Parley's tests and benchmarks. `evaluate` scores a ranking function on them.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from bots.core.models import Hit

CORPUS = Path(__file__).resolve().parent / "kb_corpus"
DOCS = CORPUS / "docs"


@dataclass(frozen=True, slots=True)
class Question:
    text: str
    doc: str | None  # None: out of scope, nothing answers it
    anchor: str | None = None
    previous: str | None = None


def questions() -> tuple[list[Question], list[Question], list[Question]]:
    """The answerable questions, the follow-ups and the out-of-scope ones."""
    data = json.loads((CORPUS / "questions.json").read_text())
    answerable = [Question(q["question"], q["doc"], q["anchor"]) for q in data["answerable"]]
    follow_ups = [
        Question(q["question"], q["doc"], q["anchor"], q["previous"]) for q in data["follow_ups"]
    ]
    out_of_scope = [Question(text, None) for text in data["out_of_scope"]]
    return answerable, follow_ups, out_of_scope


def place(hit: Hit) -> tuple[str, str | None]:
    """The document and anchor a hit comes from (PDF pages count as the document)."""
    link = hit.passage.link or ""
    anchor = unquote(link.split("#", 1)[1]) if "#" in link else None
    return hit.passage.doc, anchor


def is_right(hit: Hit, question: Question) -> bool:
    """Whether a hit is the section that answers the question (any passage of it)."""
    doc, anchor = place(hit)
    return doc == question.doc and (question.anchor is None or anchor == question.anchor)


Ranker = Callable[[Question], Awaitable[Sequence[Hit]]]


@dataclass(frozen=True, slots=True)
class Scores:
    hit_at_1: float
    hit_at_5: float
    answered: float  # answerable questions with a hit above the threshold
    refused: float  # out-of-scope questions with none


async def evaluate(
    rank: Ranker, answerable: Sequence[Question], out_of_scope: Sequence[Question], threshold: float
) -> Scores:
    """Score a ranking: right section first, in the first five; and the threshold's effect."""
    first = five = answered = 0
    for question in answerable:
        hits = list(await rank(question))
        first += bool(hits) and is_right(hits[0], question)
        five += any(is_right(hit, question) for hit in _sections(hits)[:5])
        answered += bool(hits) and hits[0].score >= threshold
    refused = 0
    for question in out_of_scope:
        hits = list(await rank(question))
        refused += not hits or hits[0].score < threshold
    count = max(len(answerable), 1)
    return Scores(
        first / count, five / count, answered / count, refused / max(len(out_of_scope), 1)
    )


def _sections(hits: Sequence[Hit]) -> list[Hit]:
    """The hits with one per section: passages of a section already ranked are skipped."""
    seen: set[tuple[str, str | None]] = set()
    kept = []
    for hit in hits:
        if place(hit) not in seen:
            seen.add(place(hit))
            kept.append(hit)
    return kept
