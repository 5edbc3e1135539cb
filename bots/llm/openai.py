"""ChatModel over an OpenAI-compatible server (vLLM's, or any other) with `AsyncOpenAI`."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Sequence

import httpx2
import openai
from openai import AsyncOpenAI

from bots.core.context import ByteRates
from bots.core.models import Chunk, PromptMessage, Usage
from bots.core.ports import (
    AdapterUnknown,
    ModelInterrupted,
    ModelRejected,
    ModelTimedOut,
    ModelUnavailable,
    PromptTooLong,
)

log = logging.getLogger(__name__)

DEFAULT_CONTEXT_TOKENS = 4096
FIRST_BACKOFF_S = 0.25
SESSION_HEADER = "X-Session-ID"

# Worth another try: the server is down, slow to accept, overloaded or restarting.
RETRYABLE = (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError)
# How servers refuse a prompt longer than the context: vLLM and OpenAI ("maximum context
# length"), llama.cpp ("exceeds the available context size"), TGI ("max_new_tokens").
TOO_LONG = re.compile(r"context|too long|max_new_tokens", re.IGNORECASE)


def timeouts(*, connect: float, read: float) -> openai.Timeout:
    """Build the client's timeouts: a short connect, a read long enough for a busy engine."""
    return openai.Timeout(read, connect=connect)


def _mapped(error: openai.OpenAIError) -> ModelUnavailable | ModelRejected:
    if isinstance(error, openai.APITimeoutError):
        return ModelTimedOut(f"model server took too long: {error}")
    if isinstance(error, RETRYABLE):
        return ModelUnavailable(f"model server unavailable: {error}")
    return ModelRejected(f"model server refused the request: {error}")


class OpenAIChatModel:
    """Stream chat completions, retrying only until the reply has started.

    Args:
        client: an `AsyncOpenAI` client; build it with `max_retries=0`, retries are ours.
        model: the served model name.
        reply_tokens: the most tokens one reply may have.
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        retry_deadline: seconds spent retrying a request that has not started.
        context_tokens: the model's context length; unset asks the server.
    """

    def __init__(
        self,
        client: AsyncOpenAI,
        *,
        model: str,
        reply_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        retry_deadline: float = 4.0,
        context_tokens: int | None = None,
    ) -> None:
        self._client = client
        self._model = model
        self._reply_tokens = reply_tokens
        self._temperature = temperature
        self._top_p = top_p
        self._retry_deadline = retry_deadline
        self._context_tokens = context_tokens
        self._root = str(client.base_url).rstrip("/").removesuffix("/v1")
        self._can_tokenize: bool | None = None  # None: not asked yet
        self._rates = ByteRates()  # bounds tokens where the server cannot count them
        self._special_tokens: list[str] | None = None

    async def context_window(self) -> int:
        """Return the context length: configured, or the served model's `max_model_len`."""
        if self._context_tokens is None:
            self._context_tokens = await self._served_context_length()
        return self._context_tokens

    async def _served_context_length(self) -> int:
        for card in await self._cards():
            if card.id == self._model:
                length = (card.model_extra or {}).get("max_model_len")
                if isinstance(length, int) and length > 0:
                    return length
        log.warning(
            "server gave no context length for %s; assuming %d", self._model, DEFAULT_CONTEXT_TOKENS
        )
        return DEFAULT_CONTEXT_TOKENS

    async def adapters(self) -> list[str]:
        """List the LoRA adapters served on this model (vLLM lists them with a `parent`)."""
        return sorted(
            card.id
            for card in await self._cards()
            if (card.model_extra or {}).get("parent") == self._model
        )

    async def _cards(self) -> list[openai.types.Model]:
        try:
            return list((await self._client.models.list()).data)
        except openai.OpenAIError as error:
            raise _mapped(error) from error

    async def count_tokens(self, prompt: Sequence[PromptMessage]) -> int:
        """Count with the server's own tokenizer and chat template (vLLM's `/tokenize`).

        A server without `/tokenize` gets the byte bound instead, tightened by the token
        counts its replies reported (`ByteRates`). Asking such a server for a count by a
        one-token completion was weighed and left out: it computes the whole prompt each
        time (a prompt over the context is refused without a figure, and Ollama cuts it
        silently), and a trim or a cut message needs several counts.
        """
        if self._can_tokenize is False:
            return self._rates.bound(prompt)
        body = {"model": self._model, "messages": _wire(prompt), "add_generation_prompt": True}
        try:
            response = await self._client.post(
                f"{self._root}/tokenize", cast_to=httpx2.Response, body=body
            )
        except openai.APIStatusError as error:
            if not _lacks_page(error):
                raise _mapped(error) from error
            return self._count_by_bytes(prompt, f"HTTP {error.status_code}")
        except openai.OpenAIError as error:
            raise _mapped(error) from error
        try:
            count = int(response.json()["count"])
        except (KeyError, TypeError, ValueError):
            return self._count_by_bytes(prompt, "an unreadable answer")
        self._can_tokenize = True
        return count

    def _count_by_bytes(self, prompt: Sequence[PromptMessage], why: str) -> int:
        log.warning("the model server's /tokenize gave %s; bounding tokens by bytes and usage", why)
        self._can_tokenize = False
        return self._rates.bound(prompt)

    async def special_tokens(self) -> list[str]:
        """Read the served tokenizer's added tokens (vLLM's `/tokenizer_info`), once.

        vLLM serves that page with `--enable-tokenizer-info-endpoint` (Parley's inference
        service turns it on); without it the core's generic template markers apply.
        """
        if self._special_tokens is None:
            try:
                response = await self._client.get(
                    f"{self._root}/tokenizer_info", cast_to=httpx2.Response
                )
                info = response.json()
            except openai.APIStatusError as error:
                if not _lacks_page(error):
                    raise _mapped(error) from error
                info = {}
            except ValueError:
                info = {}
            except openai.OpenAIError as error:
                raise _mapped(error) from error
            if not isinstance(info, dict):
                info = {}
            added = info.get("added_tokens_decoder") or {}
            named = [info.get(f"{kind}_token") for kind in ("bos", "eos", "pad", "unk")]
            tokens = [*added.values(), *named]
            self._special_tokens = sorted({t for t in tokens if isinstance(t, str)})
        return self._special_tokens

    async def stream(
        self, prompt: Sequence[PromptMessage], *, session: str, adapter: str | None = None
    ) -> AsyncIterator[Chunk]:
        response = await self._open(prompt, session, adapter)
        started = False
        try:
            async for line in response.aiter_lines():
                for chunk in parse_event(line):
                    started = started or bool(chunk.text)
                    if chunk.usage is not None and not self._can_tokenize:  # may need rates
                        self._rates.observe(prompt, chunk.usage.prompt_tokens)
                    yield chunk
        except httpx2.TimeoutException as error:
            raise ModelTimedOut(f"no part of the reply within the read timeout: {error}") from error
        except (httpx2.HTTPError, ServerError) as error:
            if started:
                raise ModelInterrupted(f"reply stream broke: {error}") from error
            raise ModelUnavailable(f"reply stream failed before it started: {error}") from error
        finally:
            await response.aclose()

    async def _open(
        self, prompt: Sequence[PromptMessage], session: str, adapter: str | None
    ) -> httpx2.Response:
        """Start the request, retrying until the server accepts it or the deadline passes.

        The request goes through the SDK's generic `post` (its auth, timeouts and error
        types) with a plain JSON body and an unparsed streaming response: the typed
        `chat.completions.create` validates every history message and builds a pydantic
        object per streamed event, which made it ~4x the rest of the bot tier's cost per
        message (bench/bot_overhead.py).
        """
        body = {
            "model": adapter or self._model,
            "messages": _wire(prompt),
            "max_tokens": self._reply_tokens,
            "temperature": self._temperature,
            "top_p": self._top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._retry_deadline
        backoff = FIRST_BACKOFF_S
        while True:
            try:
                return await self._client.post(
                    "/chat/completions",
                    cast_to=httpx2.Response,
                    body=body,
                    options={"headers": {SESSION_HEADER: session}},
                    stream=True,
                )
            except RETRYABLE as error:
                if loop.time() + backoff > deadline:
                    raise _mapped(error) from error
                log.info("model server not ready (%s); retrying in %.2fs", error, backoff)
                await asyncio.sleep(backoff)
                backoff *= 2
            except openai.NotFoundError as error:
                if adapter is not None:
                    raise AdapterUnknown(f"the server does not serve {adapter}: {error}") from error
                raise _mapped(error) from error
            except openai.BadRequestError as error:
                if TOO_LONG.search(str(error)) is None:
                    raise _mapped(error) from error
                log.warning("the server refused a prompt as too long; counting by bytes from now")
                self._rates.distrust()
                raise PromptTooLong(f"the prompt is longer than the context: {error}") from error
            except openai.OpenAIError as error:
                raise _mapped(error) from error


def _lacks_page(error: openai.APIStatusError) -> bool:
    """Tell a server without the page (404, 405, 400, 422) from one that is failing."""
    return error.status_code in (400, 404, 405, 422)


def _wire(prompt: Sequence[PromptMessage]) -> list[dict[str, str]]:
    return [{"role": m.role.value, "content": m.content} for m in prompt]


class ServerError(Exception):
    """The server reported an error inside the event stream."""


def parse_event(line: str) -> list[Chunk]:
    """Read one SSE line of a streamed chat completion into chunks.

    Parsing the JSON directly, instead of building the SDK's pydantic models for every
    event, keeps the client's cost per streamed event to one `json.loads`.
    """
    if not line.startswith("data:"):
        return []
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return []
    event = json.loads(data)
    if "error" in event:
        raise ServerError(str(event["error"]))
    chunks = [
        Chunk(text=content)
        for choice in event.get("choices") or ()
        if (content := (choice.get("delta") or {}).get("content"))
    ]
    if usage := event.get("usage"):
        chunks.append(Chunk(usage=Usage(usage["prompt_tokens"], usage["completion_tokens"])))
    return chunks
