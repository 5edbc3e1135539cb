"""What Parley does to text users send, before it is stored or shown to the model.

Defined outcomes for awkward input:
- lone surrogates (undecodable bytes) become U+FFFD, so every text encodes as UTF-8;
- control characters other than tab and newline are removed;
- zero-width and right-to-left characters in a message are kept as written (Persian
  needs the zero-width non-joiner, emoji sequences the joiner, Arabic and Hebrew their
  direction marks), but a message made only of them and spaces counts as empty;
- display names lose every invisible formatting character (bidi overrides could make
  "Mallory" read as another author in a group prompt) and are capped in length;
- a message longer than the configured maximum is cut there, with a notice;
- text that spells a special token of the model's chat template (`<|im_start|>`,
  `<|eot_id|>`, `[INST]`...) reaches the model as plain text: a word joiner (U+2060) is
  put after its first character, so the tokenizer cannot read it as the real token and
  no one can write a fake system turn. Stored history keeps the text as written.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

MAX_NAME_CHARS = 64
WORD_JOINER = "\u2060"

# Special-token spellings of the common chat templates, for servers that do not list
# their tokenizer's: ChatML and Llama 3 (`<|...|>`), DeepSeek (fullwidth bars), Llama 2
# and Mistral (`[INST]`, `<<SYS>>`, `<s>`), Gemma (`<start_of_turn>`).
TEMPLATE_MARKERS = (
    r"<\|[^\s<>|]{1,40}\|>",
    r"<\uff5c[^\s<>\uff5c]{1,40}\uff5c>",
    r"\[/?INST\]",
    r"<</?SYS>>",
    r"</?s>",
    r"<(?:start|end)_of_turn>",
)

_LONE_SURROGATES = re.compile("[\ud800-\udfff]")
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f]")


def sanitize(text: str) -> str:
    """Make a text safe to store and send: no lone surrogates, no control characters."""
    return _CONTROLS.sub("", _LONE_SURROGATES.sub("\ufffd", text))


def is_blank(text: str) -> bool:
    """Tell whether a text shows nothing: only spaces and invisible format characters."""
    return all(char.isspace() or unicodedata.category(char) == "Cf" for char in text)


def clean_name(name: str) -> str:
    """Make a display name plain: visible characters only, at most MAX_NAME_CHARS."""
    visible = "".join(c for c in sanitize(name) if unicodedata.category(c) not in ("Cf", "Cc"))
    return " ".join(visible.split())[:MAX_NAME_CHARS]


def special_token_pattern(tokens: Iterable[str] = ()) -> re.Pattern[str]:
    """Match the template markers above and a tokenizer's own special tokens.

    Only tokens that look like markup count (three or more characters, no spaces, some
    of `<>[]|`): some tokenizers list plain words or whitespace as added tokens.
    """
    markup = sorted(
        (t for t in set(tokens) if len(t) >= 3 and not any(c.isspace() for c in t)
         and any(c in "<>[]|" for c in t)),
        key=len,
        reverse=True,
    )  # fmt: skip
    return re.compile("|".join([*map(re.escape, markup), *TEMPLATE_MARKERS]))


def neutralize(text: str, markers: re.Pattern[str]) -> str:
    """Break every special-token spelling in `text` with a word joiner after its first character."""
    return markers.sub(lambda match: match[0][0] + WORD_JOINER + match[0][1:], text)
