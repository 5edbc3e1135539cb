"""Reasoning models think aloud in `<think>…</think>`: hide it from users, and from the record.

Streamed replies split the tags anywhere (`<th` + `ink>`), so the filter holds back any
text that could still become a tag, and shows it once it cannot.
"""

from __future__ import annotations

import re

OPEN, CLOSE = "<think>", "</think>"
_BLOCKS = re.compile(r"<think>.*?(?:</think>\s*|\Z)", re.DOTALL)


def hide_reasoning(text: str) -> str:
    """Drop `<think>…</think>` blocks, and an unfinished one, from a whole text."""
    return _BLOCKS.sub("", text)


def _partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (a tag still arriving)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ReasoningFilter:
    """Pass a streamed reply's text on without its reasoning, piece by piece."""

    def __init__(self) -> None:
        self._held = ""  # text that may still turn out to be (part of) a tag
        self._thinking = False
        self._after_block = False  # whitespace right after a block is dropped too

    def feed(self, piece: str) -> str:
        """Take the next piece of the reply; return what may be shown of it now."""
        text, shown = self._held + piece, list[str]()
        self._held = ""
        while text:
            if self._thinking:
                end = text.find(CLOSE)
                if end < 0:
                    self._held = text[len(text) - _partial_tag(text, CLOSE) :]
                    return "".join(shown)
                text, self._thinking, self._after_block = text[end + len(CLOSE) :], False, True
                continue
            if self._after_block:
                text = text.lstrip()
                if not text:
                    return "".join(shown)
                self._after_block = False
            start = text.find(OPEN)
            if start >= 0:
                shown.append(text[:start])
                text, self._thinking = text[start + len(OPEN) :], True
                continue
            keep = _partial_tag(text, OPEN)
            shown.append(text[: len(text) - keep])
            self._held = text[len(text) - keep :]
            text = ""
        return "".join(shown)

    def finish(self) -> str:
        """The text still held back once the reply has ended (an unfinished block: none)."""
        held, self._held = self._held, ""
        return "" if self._thinking else held
