"""The HTTP servers' read limits over raw sockets: slow clients are cut off at their
deadline, oversized heads and unreadable requests get JSON errors, and no malformed
body gets anything but a JSON 400."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import httpx
import pytest

from bots.core.models import PromptMessage
from bots.platforms.listening import ReadLimits
from bots.settings import HttpSettings
from tests.fakes import ScriptedModel
from tests.http_channel import Channel, http_channel

CLOSE_WITHIN = 10.0  # generous: the deadlines under test are 1 s
LIMITS: dict[str, Any] = {"header_timeout": 1.0, "body_timeout": 1.0, "max_header_bytes": 16_384}
MESSAGES = "/v1/conversations/c/messages"


class Answers(ScriptedModel):
    def reply(self, prompt: Sequence[PromptMessage]) -> str:
        return f"You said: {prompt[-1].content}"


@pytest.fixture
async def channel(redis_url: str, key_prefix: str) -> AsyncIterator[Channel]:
    async with http_channel(redis_url, key_prefix, Answers(), **LIMITS) as channel:
        yield channel


@asynccontextmanager
async def connection(
    channel: Channel,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", httpx.URL(channel.url).port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before it closed the connection (a reset counts as closed)."""
    try:
        return await asyncio.wait_for(reader.read(), CLOSE_WITHIN)
    except ConnectionResetError:
        return b""


def head(key: str, *lines: str) -> bytes:
    fields = [f"POST {MESSAGES} HTTP/1.1", "Host: test", f"Authorization: Bearer {key}", *lines]
    return "".join(f"{line}\r\n" for line in fields).encode() + b"\r\n"


def parse(raw: bytes) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of one HTTP/1.1 response with a Content-Length."""
    status_line, _, rest = raw.partition(b"\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in headers.lower(), raw[:300]
    return int(status_line.split()[1]), json.loads(body)


async def history(channel: Channel, key: str) -> list[object]:
    async with httpx.AsyncClient(base_url=channel.url, timeout=10) as api:
        answer = await api.get(MESSAGES, headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200, answer.text
        return list(answer.json()["messages"])


def test_the_chatwoot_server_and_the_http_channel_share_the_defaults() -> None:
    http = HttpSettings()
    assert ReadLimits() == ReadLimits(http.header_timeout, http.body_timeout, http.max_header_bytes)


async def test_a_client_that_stops_in_its_headers_is_disconnected(channel: Channel) -> None:
    async with connection(channel) as (reader, writer):
        writer.write(head(await channel.key())[:60])
        started = time.monotonic()
        assert await until_closed(reader) == b""
        assert time.monotonic() - started >= 0.9, "held until the header timeout, not sooner"


async def test_a_client_that_trickles_its_headers_is_cut_at_the_deadline(
    channel: Channel,
) -> None:
    """The deadline is for the whole head: a byte now and then does not extend it."""
    async with connection(channel) as (reader, writer):

        async def trickle() -> None:
            with suppress(OSError):
                for byte in head(await channel.key()):
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.1)

        dripping = asyncio.create_task(trickle())
        try:
            assert await until_closed(reader) == b""
            assert not dripping.done(), "the head was not yet whole when it was cut"
        finally:
            dripping.cancel()


async def test_a_connection_that_sends_nothing_is_closed(channel: Channel) -> None:
    async with connection(channel) as (reader, _):
        assert await until_closed(reader) == b""


async def test_a_body_that_stops_is_disconnected_and_nothing_is_stored(channel: Channel) -> None:
    key = await channel.key()
    async with connection(channel) as (reader, writer):
        writer.write(head(key, "Content-Type: application/json", "Content-Length: 100"))
        writer.write(b'{"text": "never fin')
        started = time.monotonic()
        assert await until_closed(reader) == b""
        assert time.monotonic() - started >= 0.9, "held until the body timeout, not sooner"
    assert await history(channel, key) == []


async def test_a_request_sent_within_its_deadlines_is_answered(channel: Channel) -> None:
    key = await channel.key()
    body = b'{"text": "hi", "stream": false}'
    async with connection(channel) as (reader, writer):
        fields = ("Content-Type: application/json", f"Content-Length: {len(body)}")
        request = head(key, *fields, "Connection: close")
        writer.write(request[:40])
        await asyncio.sleep(0.5)
        writer.write(request[40:])
        await asyncio.sleep(0.5)
        writer.write(body)
        status, answer = parse(await until_closed(reader))
    assert status == 200, answer
    assert answer["text"] == "You said: hi"


async def test_a_keep_alive_connection_serves_a_second_request(channel: Channel) -> None:
    async with httpx.AsyncClient(base_url=channel.url, timeout=10) as api:
        for _ in range(2):
            assert (await api.get("/healthz")).status_code == 200
            await asyncio.sleep(0.3)


@pytest.mark.parametrize("size", [200_000, 20_000])
async def test_an_oversized_head_is_refused_in_json(channel: Channel, size: int) -> None:
    async with connection(channel) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * size + b"\r\n\r\n")
        with suppress(ConnectionResetError):
            await writer.drain()
        status, answer = parse(await until_closed(reader))  # a timeout would close unanswered
    assert status == 431
    assert answer["error"]["code"] == "headers_too_large"


async def test_a_head_under_the_limit_is_served(channel: Channel) -> None:
    async with httpx.AsyncClient(base_url=channel.url, timeout=10) as api:
        answer = await api.get("/healthz", headers={"X-Big": "a" * 12_000})
        assert answer.status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        b'{"text": "caf\xe9"}',  # Latin-1, not UTF-8
        b'{"text": "\xff\xfe\xfd"}',
        b"[" * 20_000 + b"]" * 20_000,
        b'{"a": ' * 5_000 + b"1" + b"}" * 5_000,
        b'{"text": "hi", "n": ' + b"7" * 5_000 + b"}",
        b"9" * 5_000,
        b"not json at all",
        b'{"text": "hi"',
    ],
    ids=[
        "latin-1",
        "bad-utf8",
        "deep-array",
        "deep-object",
        "long-int",
        "bare-long-int",
        "text",
        "cut",
    ],
)
async def test_every_malformed_body_is_a_json_400(channel: Channel, body: bytes) -> None:
    key = await channel.key()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=channel.url, timeout=10) as api:
        answer = await api.post(MESSAGES, content=body, headers=headers)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "malformed_json"
    assert answer.json()["error"]["message"].startswith("The body is not valid JSON")
    assert await history(channel, key) == []


@pytest.mark.parametrize(
    ("framing", "status", "code"),
    [
        (("Content-Length: abc",), 400, "malformed_request"),
        (("Content-Length: -1",), 400, "malformed_request"),
        (("Content-Length: 1e3",), 400, "malformed_request"),
        (("Content-Length: 5", "Content-Length: 6"), 400, "malformed_request"),
        (("Transfer-Encoding: gzip",), 501, "not_implemented"),
    ],
    ids=["letters", "negative", "exponent", "conflicting", "unknown-coding"],
)
async def test_a_bad_content_length_gets_a_prompt_json_error(
    channel: Channel, framing: tuple[str, ...], status: int, code: str
) -> None:
    async with connection(channel) as (reader, writer):
        writer.write(head(await channel.key(), "Content-Type: application/json", *framing))
        writer.write(b'{"text": "hi"}')
        got, answer = parse(await until_closed(reader))  # a timeout would close unanswered
    assert (got, answer["error"]["code"]) == (status, code), answer


async def test_a_bad_chunk_mid_body_gets_a_json_400(channel: Channel) -> None:
    key = await channel.key()
    async with connection(channel) as (reader, writer):
        writer.write(head(key, "Content-Type: application/json", "Transfer-Encoding: chunked"))
        writer.write(b'5\r\n{"tex\r\nzz\r\n')
        status, answer = parse(await until_closed(reader))
    assert status == 400
    assert answer["error"]["code"] == "malformed_request"
    assert await history(channel, key) == []
