"""The OpenAI-compatible model client against a local fake server over real HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from openai import AsyncOpenAI

from bots.core.context import ContextFitter, Fitted, bound_tokens
from bots.core.models import Chunk, PromptMessage, Role, Turn, Usage
from bots.core.ports import (
    AdapterUnknown,
    ModelInterrupted,
    ModelRejected,
    ModelTimedOut,
    ModelUnavailable,
    PromptTooLong,
)
from bots.llm.openai import SESSION_HEADER, OpenAIChatModel, ServerError, parse_event, timeouts
from tests.conftest import free_port
from tests.fake_openai import Behaviour, FakeOpenAI, Hang, Reply, Status, count_words

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


@dataclass
class CountingServer(FakeOpenAI):
    """A server without `/tokenize` whose replies report the prompt tokens it really read.

    It counts like a served tokenizer: `per_char` tokens for each character outside ASCII
    (1 for a model that knows Chinese, 3 for the worst a byte-level BPE can do), one per
    ASCII word, 4 per message and 3 for the reply's start; like vLLM, it refuses a prompt
    that leaves no room for `max_tokens`.
    """

    can_tokenize: bool = False
    per_char: int = 1

    async def __aenter__(self) -> CountingServer:
        await super().__aenter__()
        return self

    def served_tokens(self, messages: Sequence[dict[str, str]]) -> int:
        return 3 + sum(
            4
            + count_words(m["content"])
            + self.per_char * sum(not c.isascii() for c in m["content"])
            for m in messages
        )

    def _asked_tokens(self) -> int:
        return self.served_tokens(self.requests[-1].body["messages"])

    async def _stream(self, writer: asyncio.StreamWriter, reply: Reply) -> bool:
        tokens, room = self._asked_tokens(), self.requests[-1].body["max_tokens"]
        if tokens + room > self.max_model_len:
            message = (
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, you requested {tokens + room} tokens."
            )
            await self._send_json(writer, 400, {"error": {"message": message, "code": 400}})
            return True
        return await super()._stream(writer, reply)

    def _event(self, payload: dict[str, Any]) -> bytes:
        if "usage" in payload:
            payload = {
                **payload,
                "usage": {**payload["usage"], "prompt_tokens": self._asked_tokens()},
            }
        return super()._event(payload)


def chinese(chars: int) -> str:
    return ("这是一条关于上下文窗口的很长的消息。" * (chars // 18 + 1))[:chars]


def served(server: CountingServer, prompt: Sequence[PromptMessage]) -> int:
    return server.served_tokens([{"role": m.role.value, "content": m.content} for m in prompt])


async def measure(model: OpenAIChatModel) -> None:
    """Answer one Chinese message, whose usage report the client measures rates by."""
    await drain(model.stream([PROMPT[0], PromptMessage(Role.USER, chinese(400))], session="s"))


async def by_bytes(prompt: Sequence[PromptMessage]) -> int:
    return bound_tokens(prompt)


async def fit_long_message(model: OpenAIChatModel, text: str) -> tuple[Fitted, Fitted, int]:
    """Fit one long message by the model's count and by the bare byte bound, and the budget."""
    budget = await model.context_window() - 64
    new = Turn(Role.USER, text, seq=3)
    fitted = [
        await ContextFitter(count, target=0.5).fit("sys", [], new, window_start=None, budget=budget)
        for count in (model.count_tokens, by_bytes)
    ]
    return fitted[0], fitted[1], budget


async def test_without_tokenize_chinese_is_read_by_the_rate_the_server_reported() -> None:
    """With 1 token a character, 923 characters fit: the byte bound read 295, the rate 572."""
    async with CountingServer([Reply("好的")], max_model_len=1000) as server:
        model = model_for(server.base_url)
        await measure(model)
        fitted, strict, budget = await fit_long_message(model, chinese(5000))
        texts, _ = await drain(model.stream(fitted.messages, session="s"))
    fits = budget - served(server, [PROMPT[0], PromptMessage(Role.USER, " [...]")])
    assert texts, "the server took the prompt"
    assert served(server, fitted.messages) <= budget
    assert fitted.shortened and strict.shortened
    assert strict.read < fits / 3 < fits / 2 < fitted.read <= fits


async def test_a_model_that_needs_three_tokens_a_character_is_never_sent_too_much() -> None:
    texts = [chinese(300), chinese(5000), "mixed words " * 300 + chinese(2000), "x " * 3000]
    async with CountingServer([Reply("ok")], max_model_len=1000, per_char=3) as server:
        model = model_for(server.base_url)
        for text in texts:
            fitted, strict, budget = await fit_long_message(model, text)
            await drain(model.stream(fitted.messages, session="s"))  # a refusal would raise
            assert served(server, fitted.messages) <= budget
            assert fitted.read >= strict.read


async def test_a_prompt_refused_as_too_long_sends_the_count_back_to_the_byte_bound() -> None:
    async with CountingServer([Reply("好的")], max_model_len=1000) as server:
        model = model_for(server.base_url)
        await measure(model)
        server.per_char = 3  # rarer characters than any the rate was measured on
        fitted, _, budget = await fit_long_message(model, chinese(5000))
        with pytest.raises(PromptTooLong, match="maximum context length"):
            await drain(model.stream(fitted.messages, session="s"))
        assert await model.count_tokens(fitted.messages) == bound_tokens(fitted.messages)
        again, _, _ = await fit_long_message(model, chinese(5000))  # fitted once more
        texts, _ = await drain(model.stream(again.messages, session="s"))
    assert texts and served(server, again.messages) <= budget
    assert isinstance(PromptTooLong("x"), ModelRejected), "the service's notices still apply"


async def test_another_bad_request_is_a_rejection_and_keeps_the_measured_rate() -> None:
    async with CountingServer([Reply("好的"), Status(400, "unknown field")]) as server:
        model = model_for(server.base_url)
        await measure(model)
        prompt = [PROMPT[0], PromptMessage(Role.USER, chinese(400))]
        with pytest.raises(ModelRejected) as refused:
            await drain(model.stream(prompt, session="s"))
        assert not isinstance(refused.value, PromptTooLong)
        assert await model.count_tokens(prompt) < 0.6 * bound_tokens(prompt)
