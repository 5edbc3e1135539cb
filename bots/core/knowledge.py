"""Answers grounded in the operator's documents: retrieval, and how passages reach the model.

A message in a conversation with a knowledge base attached is embedded (with the user's
previous message, so that "and on Android?" finds what the question before it asked
about), the closest passages are taken from the index, re-scored by the words they share
with the question, and those above a relevance threshold travel with the message.

Passages travel with the *user turn* that asked, never in the system prompt: the prompt
keeps its start from turn to turn, so vLLM's prefix cache serves all of it but the new
message. The stored turn keeps the user's own words and the ids of its passages; each
prompt renders them again from the index, the same way every time (see `ground`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from bots.core.models import Hit, Passage, Role, Source, Turn
from bots.core.ports import Embedder, KnowledgeIndex

# Candidates the dense search returns for re-scoring, per passage answered with.
CANDIDATES_PER_ANSWER = 5
# How far the share of the question's words a passage holds moves its score.
LEXICAL_WEIGHT = 0.25
# The message read with the one before it finds follow-ups ("and on my phone?"); its
# matches count this much less than the message's own, so a conversation that moves to
# another topic is not held back by its last question (`python -m bench.kb_retrieval`:
# first hit after another topic 62% with none, 87% with 0.2; follow-ups kept).
FOLLOW_UP_DISCOUNT = 0.2
EXCERPTS_HEADER = (
    "Excerpts from the documentation (answer from them; if they do not answer the "
    "question, say you don't know):"
)
_WORD = re.compile(r"\w+")
# Words too common to say what a question is about.
_STOP_WORDS = frozenset(
    re.findall(
        r"\w+",
        "a an and are as at be by can do does for from how i if in is it me my of on or "
        "that the this to was what when where which who why will with you your",
    )
)


@dataclass(frozen=True, slots=True)
class RetrievalPolicy:
    """How passages are chosen (the KB_* settings).

    Args:
        top_k: passages an answer is given at most.
        threshold: the least relevance a passage needs to be given.
        rescore: re-score the dense search's candidates by the words they share.
    """

    top_k: int = 4
    threshold: float = 0.5
    rescore: bool = True


class Retriever:
    """Find the passages of a knowledge base that answer a message."""

    def __init__(
        self, embedder: Embedder, index: KnowledgeIndex, policy: RetrievalPolicy = RetrievalPolicy()
    ) -> None:
        self._embedder = embedder
        self._index = index
        self._policy = policy

    @property
    def index(self) -> KnowledgeIndex:
        return self._index

    async def search(self, name: str, question: str, previous: str | None = None) -> list[Hit]:
        """Rank the passages for `question` (and the user's `previous` message), best first.

        Every candidate is returned with its score; `relevant` keeps those to answer with.
        """
        queries = [question] if not previous else [question, f"{previous}\n{question}"]
        vectors = await self._embedder.embed(queries)
        count = self._policy.top_k * (CANDIDATES_PER_ANSWER if self._policy.rescore else 1)
        hits = await self._index.search(name, vectors, count, (0.0, FOLLOW_UP_DISCOUNT))
        if self._policy.rescore:
            hits = rescored(hits, question)  # the new message's words alone, as above
        return hits

    def relevant(self, hits: Sequence[Hit]) -> list[Hit]:
        """The best hits above the threshold, at most `top_k`."""
        policy = self._policy
        return [hit for hit in hits if hit.score >= policy.threshold][: policy.top_k]

    async def retrieve(self, name: str, question: str, previous: str | None = None) -> list[Hit]:
        """The passages to answer `question` with: the relevant ones of `search`."""
        return self.relevant(await self.search(name, question, previous))


def words(text: str) -> list[str]:
    """The words of a text that say what it is about, lower case."""
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP_WORDS]


def rescored(hits: Sequence[Hit], question: str) -> list[Hit]:
    """Move each candidate's score by the share of the question's words it holds.

    The words are weighted by how rare they are among the candidates (inverse document
    frequency), so a word every candidate has moves none of them.
    """
    asked = set(words(question))
    if not asked or not hits:
        return list(hits)
    held = [set(words(" ".join((*hit.passage.titles, hit.passage.text)))) for hit in hits]
    frequency = Counter(word for passage in held for word in passage & asked)
    weight = {word: math.log(1 + len(hits) / (1 + frequency[word])) for word in asked}
    total = sum(weight.values())
    scored = [
        Hit(hit.passage, hit.score + LEXICAL_WEIGHT * sum(weight[w] for w in terms & asked) / total)
        for hit, terms in zip(hits, held, strict=True)
    ]
    return sorted(scored, key=lambda hit: hit.score, reverse=True)


def excerpt(number: int, passage: Passage) -> str:
    """One passage as the model reads it: its number, its title path, its text."""
    return f"[{number}] {' > '.join(passage.titles)}\n{passage.text}"


def ground(turns: Sequence[Turn], passages: Mapping[str, Passage], start: int = 0) -> list[Turn]:
    """The turns as the model reads them: each user turn's words, then its passages' text.

    Only the turns from number `start` on (the context window) are grounded, and a passage
    already given with an earlier turn of the window is not given again: a follow-up that
    finds the same section costs no context twice. Turn `i` then reads the same for as
    long as the window starts at `start`, which keeps the prompt's start, and so vLLM's
    prefix cache, from turn to turn. The question comes before its passages, so a prompt
    cut to fit keeps it whole. A passage no longer in the index (its document was removed
    or changed) is left out.
    """
    given: set[str] = set()
    grounded = []
    for turn in turns:
        if turn.role is not Role.USER or not turn.passages or (turn.seq or start) < start:
            grounded.append(turn)
            continue
        new = [passages[pid] for pid in turn.passages if pid in passages and pid not in given]
        given.update(p.id for p in new)
        if not new:
            grounded.append(turn)
            continue
        excerpts = "\n\n".join(excerpt(n, p) for n, p in enumerate(new, 1))
        content = f"{turn.content}\n\n{EXCERPTS_HEADER}\n\n{excerpts}"
        grounded.append(replace(turn, content=content))
    return grounded


def sources_of(passages: Sequence[Passage]) -> tuple[Source, ...]:
    """The sources to show under an answer: each passage's place, once each, in order."""
    sources: dict[tuple[str, str | None], Source] = {}
    for passage in passages:
        source = Source(" > ".join(passage.titles), passage.link)
        sources.setdefault((source.title, source.link), source)
    return tuple(sources.values())


def is_web_link(link: str | None) -> bool:
    """Whether a source's link is a web address, which platforms can show as a link."""
    return link is not None and link.startswith(("https://", "http://"))


def plain_sources(sources: Sequence[Source]) -> str:
    """Sources as plain lines: "Sources:", then each title and its link."""
    lines = [f"- {s.title}" + (f": {s.link}" if s.link else "") for s in sources]
    return "\n".join(["Sources:", *lines])
