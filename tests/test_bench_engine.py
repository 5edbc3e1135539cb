"""The engine benchmark's client: every server asked for the same work, and told apart
when it does less. Against the local fake of an OpenAI-compatible server."""

from __future__ import annotations

import argparse

import pytest

from bench.engine_batching import (
    QUESTIONS,
    SERVER_HEADER,
    Row,
    Target,
    chats_at,
    level,
    run,
    server_cells,
)
from tests.fake_openai import FakeOpenAI, Reply

TOKENS = 6


async def test_every_chat_asks_for_the_same_number_of_new_tokens() -> None:
    async with FakeOpenAI([Reply("x" * TOKENS, chunk_chars=1)]) as fake:
        result = await level(Target(fake.base_url), 8, TOKENS)
    bodies = [request.body for request in fake.completions()]
    assert len(bodies) == chats_at(8) == 16
    assert {(b["max_tokens"], b["min_tokens"], b["ignore_eos"]) for b in bodies} == {
        (TOKENS, TOKENS, True)
    }
    assert all(b["stream"] and b["temperature"] == 0 for b in bodies)
    assert result.tokens == 16 * TOKENS and result.short(TOKENS) == 0
    assert all(a.first_token_s > 0 and a.text == "x" * TOKENS for a in result.answers)
    assert result.rate > 0 and result.ttft(0.99) >= result.ttft(0.5) > 0


async def test_a_server_that_stops_early_is_counted_short() -> None:
    async with FakeOpenAI([Reply("x" * (TOKENS - 2), chunk_chars=1)]) as fake:
        result = await level(Target(fake.base_url), 1, TOKENS)
    assert result.short(TOKENS) == chats_at(1) and result.tokens == chats_at(1) * (TOKENS - 2)


async def test_without_usage_an_answer_cut_at_its_length_counts_every_token() -> None:
    # Two characters a chunk, as a server merges a character's bytes split over tokens.
    cut = Reply("x" * TOKENS, chunk_chars=2, finish_reason="length", usage=False)
    stopped = Reply("x" * TOKENS, chunk_chars=2, usage=False)
    async with FakeOpenAI([cut]) as fake:
        assert (await level(Target(fake.base_url), 1, TOKENS)).short(TOKENS) == 0
    async with FakeOpenAI([stopped]) as fake:
        result = await level(Target(fake.base_url), 1, TOKENS)
    assert result.short(TOKENS) == chats_at(1) and result.tokens == chats_at(1) * TOKENS // 2


async def test_answers_are_compared_word_for_word_with_the_reference() -> None:
    async def row(text: str) -> Row:
        async with FakeOpenAI([Reply(text)]) as fake:
            return Row(text, [await level(Target(fake.base_url), 1, 1)])

    def agreement(row: Row, reference: Row | None) -> str:
        return server_cells(row, reference)[SERVER_HEADER.index("answers as float32's")]

    reference, same, other = await row("Paris."), await row("Paris."), await row("L'Étoile")
    assert agreement(same, reference) == f"{len(QUESTIONS)}/{len(QUESTIONS)}"
    assert agreement(other, reference) == f"0/{len(QUESTIONS)}"
    assert agreement(other, None) == "-"


async def test_any_openai_compatible_url_is_measured(capsys: pytest.CaptureFixture[str]) -> None:
    async with FakeOpenAI([Reply("x" * TOKENS, chunk_chars=1)], model="someone-else") as fake:
        args = argparse.Namespace(
            url=fake.base_url + "/", model=None, api_key="sk-k", chats="1,2", tokens=TOKENS
        )
        await run(args)
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| someone-else")]
    assert [row.split(" | ")[1] for row in rows] == ["1", "2"]
    assert "warning" not in printed
    assert {r.headers.get("authorization") for r in fake.completions()} == {"Bearer sk-k"}
    assert {r.body["model"] for r in fake.completions()} == {"someone-else"}
