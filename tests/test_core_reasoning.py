"""A reasoning model's `<think>` blocks: hidden as they stream, never stored."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st

from bots.core.models import ConversationKey, Incoming, PromptMessage, Role
from bots.core.reasoning import ReasoningFilter, hide_reasoning
from bots.core.service import ChatPolicy, ConversationService
from tests.fakes import MemoryStore, ScriptedModel, collect, text_of

KEY = ConversationKey("test", "think")
PIECES = ["<th", "ink>secret ", "plan</th", "ink>\n The answer", " is 4. <", "b>ok</b>"]


def through(pieces: Sequence[str]) -> list[str]:
    """What a filter lets out, piece by piece, then at the end."""
    reasoning = ReasoningFilter()
    return [*(reasoning.feed(piece) for piece in pieces), reasoning.finish()]


def test_a_tag_split_across_pieces_never_shows() -> None:
    shown = through(PIECES)
    assert "".join(shown) == "The answer is 4. <b>ok</b>"
    assert not any("<th" in text or "think" in text for text in shown)


@given(
    words=st.lists(st.sampled_from(["<think>", "</think>", "<", "th", "a", " ", "\n"])),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12),
)
def test_however_a_reply_is_cut_the_filter_shows_what_hiding_the_whole_would(
    words: list[str], cuts: list[int]
) -> None:
    text = "".join(words)
    bounds = sorted({min(cut, len(text)) for cut in cuts} | {0, len(text)})
    pieces = [text[start:end] for start, end in itertools.pairwise(bounds)]
    assert "".join(through(pieces)) == hide_reasoning(text)


class Thinking(ScriptedModel):
    def reply(self, prompt: Sequence[PromptMessage]) -> str:
        return "<think>the user wants 2+2</think> It is 4."


async def test_reasoning_is_neither_streamed_nor_stored_nor_sent_back() -> None:
    store, model = MemoryStore(), Thinking()
    service = ConversationService(store, model)
    parts = await collect(service, Incoming(KEY, "2+2?"))
    assert text_of(parts) == "It is 4." and not any("think" in str(p) for p in parts)
    assert store.turns[KEY][1].content == "It is 4."
    await collect(service, Incoming(KEY, "and 3+3?"))
    assert "wants" not in " ".join(m.content for m in model.prompts[-1])


async def test_an_operator_may_show_the_reasoning_but_it_is_still_not_stored() -> None:
    store = MemoryStore()
    service = ConversationService(store, Thinking(), policy=ChatPolicy(show_reasoning=True))
    parts = await collect(service, Incoming(KEY, "2+2?"))
    assert text_of(parts) == "<think>the user wants 2+2</think> It is 4."
    assert [(t.role, t.content) for t in store.turns[KEY]][1] == (Role.ASSISTANT, "It is 4.")
