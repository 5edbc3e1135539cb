"""Embedder over an OpenAI-compatible embeddings API (vLLM's pooling runner, or any other)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import httpx2
import openai
from openai import AsyncOpenAI

from bots.core.ports import KnowledgeUnavailable

# Texts per request: large enough to batch, small enough to keep one request short.
BATCH = 64
# /tokenize requests in flight at once while counting a document's pieces.
COUNTS_AT_ONCE = 32


class OpenAIEmbedder:
    """Embed texts with the served embedding model; count its tokens with vLLM's `/tokenize`.

    Args:
        client: an `AsyncOpenAI` client of the embedding server.
        model: the served embedding model's name.
        max_tokens: longer texts are cut to this many tokens by the server.
    """

    def __init__(self, client: AsyncOpenAI, *, model: str, max_tokens: int = 256) -> None:
        self._client = client
        self.model = model
        self._max_tokens = max_tokens
        self.base_url = str(client.base_url).rstrip("/")
        self._root = self.base_url.removesuffix("/v1")
        self._counting = asyncio.Semaphore(COUNTS_AT_ONCE)

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        vectors: list[list[float]] = []
        for start in range(0, len(texts), BATCH):
            batch = list(texts[start : start + BATCH])
            try:
                response = await self._client.embeddings.create(
                    model=self.model,
                    input=batch,
                    encoding_format="float",
                    extra_body={"truncate_prompt_tokens": self._max_tokens},
                )
            except openai.OpenAIError as error:
                raise KnowledgeUnavailable(f"embedding server failed: {error}") from error
            ordered = sorted(response.data, key=lambda item: item.index)
            if len(ordered) != len(batch):
                raise KnowledgeUnavailable("embedding server returned a vector count that differs")
            vectors += [unit(item.embedding) for item in ordered]
        return vectors

    async def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return list(await asyncio.gather(*(self._count(text) for text in texts)))

    async def _count(self, text: str) -> int:
        body = {"model": self.model, "prompt": text, "add_special_tokens": False}
        async with self._counting:
            try:
                response = await self._client.post(
                    f"{self._root}/tokenize", cast_to=httpx2.Response, body=body
                )
                return int(response.json()["count"])
            except openai.OpenAIError as error:
                raise KnowledgeUnavailable(f"embedding server failed: {error}") from error
            except (KeyError, TypeError, ValueError) as error:
                raise KnowledgeUnavailable(f"embedding server's /tokenize: {error}") from error


def unit(vector: Sequence[float]) -> list[float]:
    """The vector scaled to length 1 (cosine similarity is then a dot product)."""
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]
