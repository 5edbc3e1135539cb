"""Split text into messages within a platform's length limit, keeping code blocks whole."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

FENCE = "```"
CLOSE_FENCE = "\n" + FENCE
_FENCE_LINE = re.compile(r"^ {0,3}```")
_SENTENCE_END = re.compile(r"[.!?…][\"')\]]*\s")
# Keep these attached to the character before them: a cut there would split a grapheme.
_JOINERS = {"\u200d", "\ufe0e", "\ufe0f"}


@dataclass(frozen=True, slots=True)
class Piece:
    """One message: `body` is a slice of the original text; `prefix`/`suffix` repair fences."""

    body: str
    prefix: str = ""
    suffix: str = ""

    @property
    def text(self) -> str:
        return self.prefix + self.body + self.suffix


def open_fence_after(text: str, opener: str | None = None) -> str | None:
    """Return the opening line of the code block still open at the end of `text`, if any."""
    for line in text.split("\n"):
        if _FENCE_LINE.match(line):
            opener = None if opener is not None else line.strip()
    return opener


def _is_joined(text: str, index: int) -> bool:
    """Tell whether a cut before `text[index]` would split a grapheme."""
    if index <= 0 or index >= len(text):
        return False
    char = text[index]
    return bool(unicodedata.combining(char)) or char in _JOINERS or text[index - 1] in _JOINERS


def _cut_point(text: str, limit: int) -> int:
    """Choose where to end a message of at most `limit` characters, at the best boundary."""
    window = text[:limit]
    half = limit // 2
    for boundary in ("\n\n", "\n"):
        at = window.rfind(boundary)
        if at >= half:
            return at + len(boundary)
    sentences = [m.end() for m in _SENTENCE_END.finditer(window)]
    if sentences and sentences[-1] >= half:
        return sentences[-1]
    space = max(window.rfind(" "), window.rfind("\t"))
    if space >= half:
        return space + 1
    cut = limit
    while cut > 1 and _is_joined(text, cut):
        cut -= 1
    return cut


def split_message(text: str, limit: int) -> list[Piece]:
    """Split `text` into pieces whose `.text` fits in `limit` characters.

    Cuts prefer a paragraph break, then a line break, then a sentence end, then a space,
    and fall back to a hard cut that never splits a grapheme. A code block cut in two is
    closed at the end of one message and reopened, with its language, in the next.
    Joining every piece's `body` gives back `text` exactly.
    """
    if limit < 2 * len(CLOSE_FENCE) + 16:
        raise ValueError(f"limit {limit} is too small to split code blocks")
    pieces: list[Piece] = []
    opener: str | None = None
    rest = text
    while rest:
        prefix = f"{opener}\n" if opener else ""
        room = limit - len(prefix)
        if len(rest) <= room:
            pieces.append(Piece(rest, prefix))
            break
        # Leave room to close a block that is open where the cut lands.
        body = rest[: _cut_point(rest, room - len(CLOSE_FENCE))]
        still_open = open_fence_after(body, opener)
        suffix = "" if still_open is None else (FENCE if body.endswith("\n") else CLOSE_FENCE)
        pieces.append(Piece(body, prefix, suffix))
        opener, rest = still_open, rest[len(body) :]
    return pieces
