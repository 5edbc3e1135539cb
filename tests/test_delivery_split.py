"""Splitting replies into platform-sized messages: examples and properties."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from bots.delivery.split import open_fence_after, split_message

DISCORD = 2000


def test_short_text_is_one_message() -> None:
    assert [p.text for p in split_message("hello", DISCORD)] == ["hello"]


def test_paragraph_boundaries_are_preferred() -> None:
    text = "a" * 1200 + "\n\n" + "b" * 1200 + "\nc" * 10
    first, second = split_message(text, DISCORD)
    assert first.text == "a" * 1200 + "\n\n" and second.text.startswith("b")


def test_a_code_block_across_the_boundary_is_closed_and_reopened() -> None:
    code = "\n".join(f"    value_{i} = compute({i})" for i in range(150))
    text = "Here you go:\n```python\n" + code + "\n```\nDone."
    pieces = split_message(text, DISCORD)
    assert len(pieces) >= 3
    for piece in pieces:
        assert len(piece.text) <= DISCORD
        assert open_fence_after(piece.text) is None, "every message's fences balance"
    assert pieces[1].text.startswith("```python\n")
    assert "".join(p.body for p in pieces) == text


def test_a_word_longer_than_the_limit_is_cut_hard() -> None:
    pieces = split_message("x" * 4500, DISCORD)
    assert [len(p.text) for p in pieces] == [1996, 1996, 508]


def test_a_hard_cut_never_splits_a_grapheme() -> None:
    family = "👩\u200d👩\u200d👧"
    text = "e\u0301" * 1500 + family * 300
    pieces = split_message(text, DISCORD)
    for left, right in itertools.pairwise(pieces):
        assert right.body[0] not in "\u0301\u200d" and left.body[-1] != "\u200d"


fence = st.sampled_from(["```", "```python", "```js", "~~~"])
word = st.text(alphabet=st.sampled_from("ab cd.!?\n\t\u0301\u200d👩🎉é"), min_size=0, max_size=60)
chunk = st.one_of(word, fence.map(lambda f: f"\n{f}\n"), st.just("\n\n"), st.just("x" * 300))
texts = st.lists(chunk, max_size=60).map("".join)


@settings(max_examples=300, deadline=None)
@given(texts, st.sampled_from([64, 200, 2000, 4096]))
def test_every_piece_fits_and_bodies_rebuild_the_text(text: str, limit: int) -> None:
    pieces = split_message(text, limit)
    assert all(len(p.text) <= limit for p in pieces)
    assert "".join(p.body for p in pieces) == text
    assert all(p.body for p in pieces), "no empty messages"


@settings(max_examples=300, deadline=None)
@given(texts, st.sampled_from([64, 200, 2000]))
def test_code_blocks_balance_within_each_message(text: str, limit: int) -> None:
    pieces = split_message(text, limit)
    carried = None
    for piece in pieces:
        if piece.prefix:
            assert piece.prefix == f"{carried}\n", "reopened with the same language tag"
        carried = open_fence_after(piece.body, carried)
        if piece.suffix:
            assert open_fence_after(piece.text) is None
    assert carried == open_fence_after(text), "only the model's own unclosed block stays open"
