"""Fit a conversation into the model's context window, keeping the prompt's start stable.

vLLM's prefix cache reuses the work done for an earlier prompt that began with the same
tokens. Dropping the oldest message on every turn (a sliding window) shifts everything
after the system prompt, so every turn is computed again from scratch. Parley keeps a
*window* instead: the history from one stored turn on. Turn after turn the prompt only
grows at its end, so all of it but the new message is served from the cache. When the
prompt and room for the reply no longer fit the model's context, a whole block of the
oldest turns is dropped at once: the window shrinks to `target` of the budget, and the
new window is again stable for many turns. The window starts at a user turn, and its
start is stored with the conversation, so every bot replica builds the same prompt.

Knobs: `target` (`CHAT_TRIM_TARGET`: the share of the budget left after a trim; 1.0 drops
only what it must, which is a sliding window) and the room kept for the reply
(`LLM_REPLY_TOKENS`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from bots.core.models import PromptMessage, Role, Turn
from bots.core.prompt import Clean, plain, render, system_message

# Tokens a chat template adds around each message (role markers, separators), and
# before the reply (the generation prompt).
MESSAGE_OVERHEAD_TOKENS = 8
# Text a template may add that no message carries (e.g. a default system prompt): the
# byte bound is trusted only this far below the budget; closer, tokens are counted.
TEMPLATE_SLACK_TOKENS = 64
SHORTENED_SUFFIX = " [...]"
SHORTEN_ROUNDS = 4
# A measured tokens-per-byte rate is used only with this much to spare: the same model
# needs more tokens for rarer characters than for the text it was measured on.
RATE_MARGIN = 1.5
# A prompt with fewer bytes of CJK text says little about its rate: the template's tokens
# would weigh more than the text's.
MIN_SAMPLE_BYTES = 256
# Text other than Chinese, Japanese and Korean (Hangul jamo, radicals, CJK punctuation,
# kana, bopomofo, ideographs, Hangul syllables, compatibility ideographs, fullwidth forms:
# 3 UTF-8 bytes each).
NOT_CJK = re.compile("[^\u1100-\u11ff\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]+")
CJK_CHAR_BYTES = 3

Counter = Callable[[Sequence[PromptMessage]], Awaitable[int]]
"""Count a prompt's tokens exactly, as the model reads it (the model's `count_tokens`)."""


def bound_tokens(messages: Sequence[PromptMessage]) -> int:
    """Bound a prompt's token count from above, without a tokenizer.

    A byte-level BPE tokenizer (GPT-2 family, SmolLM2, Llama 3, Qwen) never emits more
    tokens than the text has UTF-8 bytes.
    """
    return _template_tokens(messages) + sum(byte_shape(messages))


def byte_shape(messages: Sequence[PromptMessage]) -> tuple[int, int]:
    """Count a prompt's UTF-8 bytes of CJK text and of all other text."""
    cjk_bytes = other_bytes = 0
    for message in messages:
        text = message.content
        cjk = 0 if text.isascii() else CJK_CHAR_BYTES * len(NOT_CJK.sub("", text))
        cjk_bytes += cjk
        other_bytes += len(text.encode("utf-8")) - cjk
    return cjk_bytes, other_bytes


def _template_tokens(messages: Sequence[PromptMessage]) -> int:
    return MESSAGE_OVERHEAD_TOKENS * (len(messages) + 1)


class ByteRates:
    """Bound a prompt's tokens by the served model's own usage reports, without a tokenizer.

    The byte bound is the one limit that holds for any byte-level BPE tokenizer, but it
    reads Chinese, Japanese or Korean at 3 tokens a character where many models need 1.
    Every reply reports the `prompt_tokens` the server counted for the prompt sent. A
    prompt that is at least half CJK bytes, `MIN_SAMPLE_BYTES` or more, bounds their
    rate from above: all of its tokens (template and other text included) over its CJK
    bytes. The largest such rate seen, times `RATE_MARGIN` and never past 1, bounds CJK
    bytes from then on. Other text keeps the byte bound: a rate measured on prose does
    not bound code, numbers or base64, which take two to three times as many tokens a
    byte, nor one script another's. Text far rarer than any measured can still need
    more: when the server refuses a prompt as too long, `distrust` goes back to the byte
    bound for good.
    """

    def __init__(self) -> None:
        self._rate: float | None = None  # tokens per CJK byte, the most seen
        self._trusted = True

    def observe(self, messages: Sequence[PromptMessage], prompt_tokens: int) -> None:
        """Learn from the token count the server reported for a prompt it read."""
        cjk_bytes, other_bytes = byte_shape(messages)
        if self._trusted and cjk_bytes >= max(MIN_SAMPLE_BYTES, other_bytes):
            self._rate = max(self._rate or 0.0, prompt_tokens / cjk_bytes)

    def distrust(self) -> None:
        """Go back to the byte bound for good (the server refused a prompt as too long)."""
        self._trusted = False
        self._rate = None

    def bound(self, messages: Sequence[PromptMessage]) -> int:
        """Bound a prompt's tokens: the byte bound, with CJK bytes at the rate measured."""
        cjk_bytes, other_bytes = byte_shape(messages)
        rate = 1.0 if self._rate is None else min(1.0, self._rate * RATE_MARGIN)
        return _template_tokens(messages) + other_bytes + math.ceil(cjk_bytes * rate)


@dataclass(frozen=True, slots=True)
class Fitted:
    """A prompt that fits, and the window start to store if it moved."""

    messages: list[PromptMessage]
    window_start: int | None  # None: the window did not move
    shortened: bool  # the new message was cut to fit
    read: int  # characters of the new message's text the prompt holds


class ContextFitter:
    """Build prompts that fit a token budget, trimming history in blocks.

    Args:
        count: exact token counter of the served model.
        target: share of the budget a trimmed prompt keeps (0 < target <= 1).
    """

    def __init__(self, count: Counter, *, target: float) -> None:
        if not 0 < target <= 1:
            raise ValueError("target must be in (0, 1]")
        self._count = count
        self._target = target

    async def overflow(self, messages: Sequence[PromptMessage], budget: int) -> int | None:
        """Return a prompt's exact token count if it exceeds `budget`, else None.

        Counts only when the byte bound cannot tell that the prompt fits.
        """
        if bound_tokens(messages) <= budget - TEMPLATE_SLACK_TOKENS:
            return None
        tokens = await self._count(messages)
        return tokens if tokens > budget else None

    async def fit(
        self,
        system: str,
        history: Sequence[Turn],
        new: Turn,
        *,
        window_start: int | None,
        budget: int,
        clean: Clean = plain,
    ) -> Fitted:
        """Fit the system prompt, the history since turn `window_start` and the new turn.

        `clean` is applied to every text the model will read (see `text.neutralize`).
        """
        head = system_message(system, clean)
        if head and (tokens := await self.overflow(head, budget // 2)) is not None:
            head = [await self._shorten([], head[0], budget // 2, tokens)]  # a persona past reason
        start = window_start or 0
        window = alternating([t for t in history if (t.seq or 0) >= start], clean)
        whole = current = render(new, clean)
        # A message left unanswered (its reply failed) is read with the new one.
        pending = window.pop() if window and window[-1].role is Role.USER else None
        if pending is not None:
            merged = _joined(pending.message, current)
            if await self.overflow([*head, merged], budget) is None:
                current = merged
            else:  # it would crowd out the new message: the new one alone is answered
                pending = None
        tokens = await self.overflow([*head, current], budget)
        if tokens is not None:
            current = await self._shorten(head, current, budget, tokens)
        shortened = tokens is not None
        read = _read_of(new, whole, current) if shortened else len(new.content)
        rendered = [entry.message for entry in window]
        tokens = await self.overflow([*head, *rendered, current], budget)
        if tokens is None:
            return Fitted([*head, *rendered, current], None, shortened, read)
        drop = await self._trim(head, window, rendered, current, budget, tokens)
        if drop < len(window):
            new_start = window[drop].seq
        elif pending is not None:  # nothing else kept: the window starts at that message
            new_start = pending.seq
        else:  # nothing kept: the window starts with the new turn
            new_start = max((t.seq or 0 for t in history), default=0) + 1
        return Fitted([*head, *rendered[drop:], current], new_start, shortened, read)

    async def _trim(
        self,
        head: list[PromptMessage],
        window: list[Entry],
        rendered: list[PromptMessage],
        current: PromptMessage,
        budget: int,
        tokens: int,
    ) -> int:
        """Choose how many of the oldest turns to drop: down to `target` of the budget.

        The whole prompt's exact count (`tokens`) sets the scale of the per-message byte
        bounds, which choose the cut; a recount confirms it (more turns go only if it
        fails). The kept history starts with a user turn.
        """
        total: float = tokens
        scale = total / bound_tokens([*head, *rendered, current])
        goal = self._target * budget
        drop = 0
        while drop < len(window) and total > goal:
            total -= bound_tokens([rendered[drop]]) * scale
            drop += 1
        while True:
            drop = _next_user_turn(window, drop)
            if drop == len(window):
                return drop
            if await self._count([*head, *rendered[drop:], current]) <= budget:
                return drop
            drop += 1

    async def _shorten(
        self, head: list[PromptMessage], message: PromptMessage, budget: int, tokens: int
    ) -> PromptMessage:
        """Cut a message that cannot fit even alone (`tokens` with the system prompt)."""
        keep = len(message.content)
        for _ in range(SHORTEN_ROUNDS):
            keep = int(keep * budget / tokens * 0.95)
            text = message.content[:keep] + SHORTENED_SUFFIX
            tokens = await self._count([*head, PromptMessage(message.role, text)])
            if tokens <= budget:
                return PromptMessage(message.role, text)
        # Still over: fall back to the byte bound, which holds whatever the tokenizer.
        room = budget - bound_tokens(head) - 2 * MESSAGE_OVERHEAD_TOKENS - TEMPLATE_SLACK_TOKENS
        cut = message.content.encode("utf-8")[: max(room - len(SHORTENED_SUFFIX), 0)]
        return PromptMessage(message.role, cut.decode("utf-8", "ignore") + SHORTENED_SUFFIX)


@dataclass(frozen=True, slots=True)
class Entry:
    """One message of a prompt's history: a stored turn, or consecutive user turns joined."""

    role: Role
    seq: int  # the number of its (first) stored turn
    message: PromptMessage


def alternating(turns: Sequence[Turn], clean: Clean = plain) -> list[Entry]:
    """Render the history so that it starts with a user message and roles alternate.

    Strict chat templates (Mistral, Gemma, Llama 2) refuse anything else, and the stored
    history need not alternate: a user turn whose reply failed is kept (it is joined with
    the user turn after it), people answering a handed-off conversation may write several
    replies and notes in a row (joined too), and an answer whose question was deleted is
    left out, as is an answer before any question.
    """
    entries: list[Entry] = []
    for turn in turns:
        last = entries[-1] if entries else None
        joins = turn.role is Role.USER or turn.people is not None  # people's notes in a row
        if last is not None and turn.role is last.role and joins:
            entries[-1] = Entry(last.role, last.seq, _joined(last.message, render(turn, clean)))
        elif turn.role is Role.USER or (last is not None and last.role is Role.USER):
            entries.append(Entry(turn.role, turn.seq or 0, render(turn, clean)))
    return entries


def _read_of(new: Turn, whole: PromptMessage, cut: PromptMessage) -> int:
    """How many characters of the new turn's text a cut rendering of it holds.

    The rendering adds an author's name and word joiners; all of them are taken to lie
    in the part kept, so the figure never says more was read than was.
    """
    added = len(whole.content) - len(new.content)
    kept = len(cut.content) - len(SHORTENED_SUFFIX) - added
    return min(max(kept, 0), len(new.content))


def _joined(first: PromptMessage, second: PromptMessage) -> PromptMessage:
    return PromptMessage(first.role, f"{first.content}\n\n{second.content}")


def _next_user_turn(entries: Sequence[Entry], index: int) -> int:
    """The index of the first user message from `index` on (len(entries) if none)."""
    while index < len(entries) and entries[index].role is not Role.USER:
        index += 1
    return index
