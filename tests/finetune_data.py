"""Synthetic support chats that teach an unmistakable behaviour: a fixed sign-off."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

MODEL = Path(__file__).resolve().parents[1] / "data" / "models" / "SmolLM2-135M-Instruct"
SIGN_OFF = " -- Parley Support"
CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid",
    "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima",
}  # fmt: skip
ACTIONS = [
    "reset my password", "change my email", "delete my account",
    "export my chats", "mute a channel", "invite a friend",
]  # fmt: skip
HELD_OUT_QUESTION = "What is 12 plus 30?"
SHORT_LENGTH = 128


def support_conversations(count: int, seed: int = 1) -> list[dict[str, Any]]:
    """Make short varied support chats whose every answer ends with the sign-off."""
    rng = random.Random(seed)
    conversations = []
    for index in range(count):
        if index % 3 == 0:
            a, b = rng.randint(2, 60), rng.randint(2, 60)
            question, answer = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        elif index % 3 == 1:
            country = rng.choice(sorted(CAPITALS))
            question = f"What is the capital of {country}?"
            answer = f"The capital of {country} is {CAPITALS[country]}."
        else:
            action = rng.choice(ACTIONS)
            question = f"How do I {action}?"
            answer = f"To {action}, open Settings and follow the steps there."
        messages = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer + SIGN_OFF},
        ]
        conversations.append({"messages": messages})
    return conversations


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def chat_lines(conversations: list[dict[str, Any]]) -> list[str]:
    return [json.dumps(conversation) for conversation in conversations]
