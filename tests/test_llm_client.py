"""The OpenAI-compatible model client against a local fake server over real HTTP."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from openai import AsyncOpenAI

from bots.core.context import bound_tokens
from bots.core.models import Chunk, PromptMessage, Role, Usage
from bots.core.ports import (
    AdapterUnknown,
    ModelInterrupted,
    ModelRejected,
    ModelTimedOut,
    ModelUnavailable,
)
from bots.llm.openai import SESSION_HEADER, OpenAIChatModel, ServerError, parse_event, timeouts
from tests.conftest import free_port
from tests.fake_openai import Behaviour, FakeOpenAI, Hang, Reply, Status

PROMPT = [PromptMessage(Role.SYSTEM, "sys"), PromptMessage(Role.USER, "hi")]


def model_for(base_url: str, *, read: float = 5.0, retry_deadline: float = 1.0) -> OpenAIChatModel:
    client = AsyncOpenAI(
        base_url=base_url,
        api_key="test-key",
        max_retries=0,
        timeout=timeouts(connect=1.0, read=read),
    )
    return OpenAIChatModel(client, model="parley", reply_tokens=64, retry_deadline=retry_deadline)


async def drain(chunks: AsyncIterator[Chunk]) -> tuple[list[str], Usage | None]:
    texts, usage = [], None
    async for chunk in chunks:
        if chunk.text:
            texts.append(chunk.text)
        usage = chunk.usage or usage
    return texts, usage


async def test_streams_deltas_usage_and_session_header() -> None:
    async with FakeOpenAI([Reply("The capital is Paris.", chunk_chars=5)]) as server:
        texts, usage = await drain(model_for(server.base_url).stream(PROMPT, session="discord/1"))
    assert "".join(texts) == "The capital is Paris." and len(texts) == 5
    assert usage == Usage(10, 5)
    (request,) = server.completions()
    assert request.headers[SESSION_HEADER.lower()] == "discord/1"
    assert request.headers["authorization"] == "Bearer test-key"
    assert request.body["stream"] is True and request.body["max_tokens"] == 64
    assert request.body["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
    ]


async def test_context_window_comes_from_the_server() -> None:
    async with FakeOpenAI(max_model_len=3072) as server:
        assert await model_for(server.base_url).context_window() == 3072


async def test_server_errors_are_retried_before_the_first_token() -> None:
    script: list[Behaviour] = [Status(503), Status(500), Reply("ok")]
    async with FakeOpenAI(script) as server:
        texts, _ = await drain(
            model_for(server.base_url, retry_deadline=3.0).stream(PROMPT, session="s")
        )
    assert "".join(texts) == "ok" and len(server.completions()) == 3


async def test_persistent_500_becomes_unavailable_within_the_deadline() -> None:
    async with FakeOpenAI([Status(500)]) as server:
        started = time.monotonic()
        with pytest.raises(ModelUnavailable):
            await drain(model_for(server.base_url, retry_deadline=1.0).stream(PROMPT, session="s"))
    assert time.monotonic() - started < 2.0 and len(server.completions()) >= 2


async def test_401_is_a_rejection_and_is_not_retried() -> None:
    async with FakeOpenAI([Status(401, "bad key")]) as server:
        with pytest.raises(ModelRejected):
            await drain(model_for(server.base_url).stream(PROMPT, session="s"))
    assert len(server.completions()) == 1


async def test_a_stream_dropped_midway_is_interrupted_and_not_retried() -> None:
    async with FakeOpenAI([Reply("a long answer that breaks", drop_after=3)]) as server:
        texts: list[str] = []
        with pytest.raises(ModelInterrupted):
            async for chunk in model_for(server.base_url).stream(PROMPT, session="s"):
                texts.append(chunk.text)
    assert "".join(texts) == "a long answe", "three 4-character chunks arrived"
    assert len(server.completions()) == 1


async def test_a_silent_server_times_out_as_unavailable() -> None:
    async with FakeOpenAI([Hang()]) as server:
        started = time.monotonic()
        with pytest.raises(ModelUnavailable):
            await drain(
                model_for(server.base_url, read=0.5, retry_deadline=0).stream(PROMPT, session="s")
            )
    assert time.monotonic() - started < 2.0


async def test_a_silent_server_is_a_timeout_not_a_broken_stream() -> None:
    async with FakeOpenAI([Hang()]) as server:
        with pytest.raises(ModelTimedOut):
            await drain(
                model_for(server.base_url, read=0.3, retry_deadline=0).stream(PROMPT, session="s")
            )


async def test_a_stream_that_stalls_midway_is_a_timeout_not_a_broken_stream() -> None:
    async with FakeOpenAI([Reply("slow words here", chunk_chars=5, delay=0.6)]) as server:
        texts: list[str] = []
        with pytest.raises(ModelTimedOut):
            async for chunk in model_for(server.base_url, read=0.3).stream(PROMPT, session="s"):
                texts.append(chunk.text)
    assert len(server.completions()) == 1, "a reply under way is not asked again"


async def test_nothing_listening_is_unavailable_within_five_seconds() -> None:
    started = time.monotonic()
    with pytest.raises(ModelUnavailable):
        await drain(
            model_for(f"http://127.0.0.1:{free_port()}/v1", retry_deadline=4.0).stream(
                PROMPT, session="s"
            )
        )
    assert time.monotonic() - started < 5.0


def test_sse_lines_parse_into_text_usage_or_nothing() -> None:
    delta = '{"choices": [{"index": 0, "delta": {"content": "Hi"}}]}'
    assert parse_event(f"data: {delta}") == [Chunk(text="Hi")]
    usage = '{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}'
    assert parse_event(f"data: {usage}") == [Chunk(usage=Usage(3, 1))]
    assert parse_event("data: [DONE]") == [] and parse_event(": keep-alive") == []
    with pytest.raises(ServerError, match="overloaded"):
        parse_event('data: {"error": {"message": "overloaded"}}')


async def test_tokens_are_counted_by_the_server_with_its_chat_template() -> None:
    async with FakeOpenAI() as server:
        count = await model_for(server.base_url).count_tokens(PROMPT)
    (request,) = [r for r in server.requests if r.path == "/tokenize"]
    assert request.body == {
        "model": "parley",
        "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}],
        "add_generation_prompt": True,
    }
    assert request.headers["authorization"] == "Bearer test-key"
    assert count == (1 + 4) + (1 + 4) + 3


async def test_without_tokenize_the_byte_bound_is_used_and_not_asked_again() -> None:
    async with FakeOpenAI(can_tokenize=False) as server:
        model = model_for(server.base_url)
        first = await model.count_tokens(PROMPT)
        second = await model.count_tokens(PROMPT)
    assert first == second == bound_tokens(PROMPT)
    assert len(server.requests) == 1, "asked once"


async def test_special_tokens_come_from_the_tokenizer_info_page_once() -> None:
    info = {
        "added_tokens_decoder": {"0": "<|endoftext|>", "1": "<|im_start|>", "2": "<|im_end|>"},
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
    }
    async with FakeOpenAI(tokenizer_info=info) as server:
        model = model_for(server.base_url)
        assert await model.special_tokens() == ["<|endoftext|>", "<|im_end|>", "<|im_start|>"]
        await model.special_tokens()
    assert [r.path for r in server.requests] == ["/tokenizer_info"]


async def test_a_server_without_tokenizer_info_has_no_listed_special_tokens() -> None:
    async with FakeOpenAI() as server:
        assert await model_for(server.base_url).special_tokens() == []


async def test_adapters_are_listed_and_asked_for_by_name() -> None:
    async with FakeOpenAI([Reply("Ahoy.")], adapters=["support-3f2a9c1b"]) as server:
        model = model_for(server.base_url)
        assert await model.adapters() == ["support-3f2a9c1b"]
        await drain(model.stream(PROMPT, session="s", adapter="support-3f2a9c1b"))
    assert server.completions()[0].body["model"] == "support-3f2a9c1b"


async def test_an_adapter_the_server_does_not_serve_is_reported_as_such() -> None:
    async with FakeOpenAI([Status(404, "The model `gone-1` does not exist.")]) as server:
        with pytest.raises(AdapterUnknown, match="gone-1"):
            await drain(model_for(server.base_url).stream(PROMPT, session="s", adapter="gone-1"))
