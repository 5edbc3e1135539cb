"""Fine-tuning data: read and check JSONL conversations, tokenize them, split them.

The data is JSONL in OpenAI chat format, one conversation a line (what `python -m bots
export` writes). Each conversation is rendered with the base model's own chat template and
only assistant tokens are labelled. This module imports no torch: the tokenizer is handed
in, and bad lines are reported by number (or, with `strict`, reject the file) before any
model is loaded.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # the label that cross-entropy skips

Messages = list[dict[str, str]]


class FinetuneError(ValueError):
    """Fine-tuning cannot go on: bad data, a missing folder or a mismatched checkpoint."""


@dataclass(frozen=True)
class DataOptions:
    """Where the conversations are and how to cut them into train and held-out parts."""

    path: Path
    max_length: int
    eval_share: float
    seed: int
    strict: bool


@dataclass(frozen=True)
class Problem:
    """One unusable line of the data file."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class Sample:
    """One tokenized conversation; labels are IGNORE_INDEX outside assistant turns."""

    line: int
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


@dataclass(frozen=True)
class Dataset:
    """The usable conversations of a file, split into train and held-out parts."""

    read: int
    train: tuple[Sample, ...]
    held_out: tuple[Sample, ...]


def conversation_problem(value: object) -> str | None:
    """Say what makes one parsed line unusable, or None when it is a good conversation."""
    if not isinstance(value, dict):
        return "not a JSON object"
    messages = value.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' is missing or empty"
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            return f"message {number} is not an object"
        role = message.get("role")
        if role not in ROLES:
            return f"role {role!r} is not system, user or assistant"
        if not isinstance(message.get("content"), str):
            return f"message {number}: content is not a string"
        if role == "system" and number > 1:
            return f"message {number}: a system turn must come first"
    if not any(message["role"] == "assistant" for message in messages):
        return "no assistant turn"
    return None


def read_conversations(path: Path) -> tuple[list[tuple[int, Messages]], list[Problem], int]:
    """Parse a JSONL file; return its good conversations by line, its problems, lines read."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise FinetuneError(f"cannot read {path}: {error}") from error
    conversations: list[tuple[int, Messages]] = []
    problems: list[Problem] = []
    read = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        read += 1
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(Problem(number, f"malformed JSON ({error.msg})"))
            continue
        problem = conversation_problem(value)
        if problem:
            problems.append(Problem(number, problem))
        else:
            messages = [{"role": m["role"], "content": m["content"]} for m in value["messages"]]
            conversations.append((number, messages))
    return conversations, problems, read


def chat_text(tokenizer: Any, messages: Messages, generation_prompt: bool = False) -> str:
    """Render messages with the model's chat template, as text."""
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    assert isinstance(text, str)
    return text


def assistant_spans(tokenizer: Any, messages: Messages, text: str) -> list[tuple[int, int]]:
    """Find the characters of `text` that each assistant turn's reply and end marker take."""
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = chat_text(tokenizer, messages[:index], generation_prompt=True)
        # The template may add a newline after the end marker: that is not the reply.
        through = chat_text(tokenizer, messages[: index + 1]).rstrip()
        if not (text.startswith(before) and text.startswith(through)):
            raise FinetuneError("the chat template does not render conversations prefix by prefix")
        spans.append((len(before), len(through)))
    return spans


def render(tokenizer: Any, line: int, messages: Messages) -> Sample:
    """Tokenize a conversation with the chat template, labelling assistant tokens only."""
    text = chat_text(tokenizer, messages)
    spans = assistant_spans(tokenizer, messages, text)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = tuple(int(token) for token in encoded["input_ids"])
    labels = tuple(
        token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
        for token, (begin, _) in zip(ids, encoded["offset_mapping"], strict=True)
    )
    return Sample(line, ids, labels)


def split(samples: Sequence[Sample], share: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out a seeded share of samples (at least one, never all); keep file order."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    count = min(len(samples) - 1, max(1, round(len(samples) * share)))
    held_out = set(order[:count])
    train = [sample for index, sample in enumerate(samples) if index not in held_out]
    return train, [samples[index] for index in sorted(held_out)]


def load_dataset(options: DataOptions, tokenizer: Any) -> Dataset:
    """Read, validate, render and split a data file, reporting problems on stderr.

    Args:
        options: the file, the longest sample allowed, the held-out share and its seed, and
            whether any problem rejects the whole file.
        tokenizer: the base model's tokenizer, whose chat template renders each conversation.

    Raises:
        FinetuneError: with `strict` and any problem, or when fewer than two samples are left.
    """
    conversations, problems, read = read_conversations(options.path)
    samples = []
    for line, messages in conversations:
        sample = render(tokenizer, line, messages)
        if len(sample.input_ids) > options.max_length:
            message = f"{len(sample.input_ids)} tokens, longer than --max-length"
            problems.append(Problem(line, f"{message} {options.max_length}"))
        else:
            samples.append(sample)
    problems.sort(key=lambda problem: problem.line)
    suffix = "" if options.strict else "; skipped"
    for problem in problems:
        print(f"{problem}{suffix}", file=sys.stderr)
    if options.strict and problems:
        raise FinetuneError(f"{options.path}: {len(problems)} bad lines; rejected (--strict)")
    print(f"kept {len(samples)} of {read} conversations", file=sys.stderr)
    if len(samples) < 2:
        raise FinetuneError(
            f"{options.path}: {len(samples)} usable conversations; "
            "at least 2 are needed, to train on one and hold out another"
        )
    train, held_out = split(samples, options.eval_share, options.seed)
    return Dataset(read, tuple(train), tuple(held_out))
