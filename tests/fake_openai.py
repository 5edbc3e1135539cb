"""A local fake of an OpenAI-compatible server, speaking real HTTP/1.1 and SSE on loopback.

Each request is answered by the next `Behaviour` in the script (the last one repeats),
so tests can stage outages, errors and broken streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any


def count_words(text: str) -> int:
    """The fake's tokenizer: one token per word."""
    return len(text.split())


@dataclass(frozen=True)
class Reply:
    """Stream `text` as SSE chunks of `chunk_chars` characters, `delay` seconds apart."""

    text: str
    chunk_chars: int = 4
    delay: float = 0.0
    drop_after: int | None = None  # close the connection after this many chunks
    finish_reason: str = "stop"
    usage: bool = True  # False: no usage event, as llama-cpp-python streams


@dataclass(frozen=True)
class Status:
    """Answer with an HTTP error status and an OpenAI-style error body."""

    code: int
    message: str = "error"


@dataclass(frozen=True)
class Hang:
    """Accept the request and never answer."""


Behaviour = Reply | Status | Hang


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass
class FakeOpenAI:
    script: list[Behaviour] = field(default_factory=lambda: [Reply("Hello there!")])
    max_model_len: int = 2048
    model: str = "parley"
    requests: list[Recorded] = field(default_factory=list)
    tokenizer_info: dict[str, Any] | None = None  # None: no /tokenizer_info page (404)
    can_tokenize: bool = True  # False: no /tokenize page (404), like non-vLLM servers
    adapters: list[str] = field(default_factory=list)  # LoRA adapters listed on /v1/models
    port: int = 0
    _server: asyncio.Server | None = None
    _served: int = 0
    _recorded: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> FakeOpenAI:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def completions(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    async def asked(self, count: int = 1) -> None:
        """Wait until `count` chat completions have been asked for."""
        while len(self.completions()) < count:
            self._recorded.clear()
            await self._recorded.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._serve_one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        request_line = await reader.readline()
        if not request_line:
            return False
        method, path, _ = request_line.decode().split(" ", 2)
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        raw = await reader.readexactly(int(headers.get("content-length", "0")))
        body = json.loads(raw) if raw else None
        self.requests.append(Recorded(method, path, headers, body))
        self._recorded.set()
        if path == "/health":  # vLLM's
            await self._send_json(writer, 200, {})
            return True
        if path.endswith("/models"):
            card = {"id": self.model, "object": "model", "max_model_len": self.max_model_len}
            loras = [{"id": a, "object": "model", "parent": self.model} for a in self.adapters]
            await self._send_json(writer, 200, {"object": "list", "data": [card, *loras]})
            return True
        if path == "/tokenize" and not self.can_tokenize:
            await self._send_json(writer, 404, {"detail": "Not Found"})
            return True
        if path == "/tokenize":
            messages: list[dict[str, str]] = (body or {})["messages"]
            count = sum(count_words(m["content"]) + 4 for m in messages) + 3
            await self._send_json(
                writer, 200, {"count": count, "max_model_len": self.max_model_len}
            )
            return True
        if path == "/tokenizer_info":
            info = self.tokenizer_info
            await self._send_json(writer, 200 if info else 404, info or {"detail": "Not Found"})
            return True
        behaviour = self.script[min(self._served, len(self.script) - 1)]
        self._served += 1
        if isinstance(behaviour, Reply):
            return await self._stream(writer, behaviour)
        if isinstance(behaviour, Status):
            error = {"error": {"message": behaviour.message, "code": behaviour.code}}
            await self._send_json(writer, behaviour.code, error)
            return True
        await asyncio.Event().wait()  # Hang: never answer
        return False

    async def _send_json(self, writer: asyncio.StreamWriter, code: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        head = (
            f"HTTP/1.1 {code} {REASONS.get(code, 'Status')}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
        )
        writer.write(head.encode() + data)
        await writer.drain()

    async def _stream(self, writer: asyncio.StreamWriter, reply: Reply) -> bool:
        """Send the reply's events; with no delay, in one write, like an instant model."""
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        pieces = [
            reply.text[i : i + reply.chunk_chars]
            for i in range(0, len(reply.text), reply.chunk_chars)
        ]
        pending: list[bytes] = []
        for index, piece in enumerate(pieces):
            if reply.drop_after is not None and index == reply.drop_after:
                writer.write(b"".join(pending))
                await writer.drain()
                writer.transport.abort()
                return False
            delta = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
            pending.append(self._event({"choices": [delta]}))
            if reply.delay:
                await asyncio.sleep(reply.delay)
                writer.write(b"".join(pending))
                await writer.drain()
                pending.clear()
        usage = {"prompt_tokens": 10, "completion_tokens": len(pieces)}
        finish = {"index": 0, "delta": {}, "finish_reason": reply.finish_reason}
        pending += [
            self._event({"choices": [finish]}),
            *([self._event({"choices": [], "usage": usage})] if reply.usage else []),
            self._chunk(b"data: [DONE]\n\n"),
            self._chunk(b""),
        ]
        writer.write(b"".join(pending))
        await writer.drain()
        return True

    def _event(self, payload: dict[str, Any]) -> bytes:
        event = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": self.model}
        return self._chunk(f"data: {json.dumps({**event, **payload})}\n\n".encode())

    @staticmethod
    def _chunk(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def serve_forever(port: int, text: str, chunk_chars: int) -> None:
    """Serve `text` to every request until killed (the benchmarks' stub model server)."""
    async with FakeOpenAI([Reply(text, chunk_chars=chunk_chars)], port=port):
        print("ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Serve a fixed reply, OpenAI-style, on loopback.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--text", default="The quick brown fox jumps over the lazy dog. " * 4)
    parser.add_argument("--chunk-chars", type=int, default=9)
    options = parser.parse_args()
    asyncio.run(serve_forever(options.port, options.text, options.chunk_chars))
