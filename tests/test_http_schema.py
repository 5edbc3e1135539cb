"""Property-based tests of the HTTP API against its own OpenAPI document (schemathesis)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx

from bots.core.handoff import HandoffPolicy
from tests.http_channel import http_channel
from tests.test_http_api import Answers

# Conversations are named by the client and always exist (empty until used), so DELETE
# resets one rather than removing a resource: the checks that expect a deleted resource
# to answer 404 afterwards do not apply.
NOT_APPLICABLE = "use_after_free,ensure_resource_availability"
REPLIES = "/v1/conversations/{conversation_id}/replies/{reply_id}"
# The people's routes answer 404 for a conversation not yet started: give them one that is.
PEOPLE = (
    "/v1/conversations/{conversation_id}/handoff",
    "/v1/conversations/{conversation_id}/agent-messages",
)


async def test_the_api_keeps_to_its_openapi_document(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    async with http_channel(
        redis_url, key_prefix, Answers(), key_messages=0, handoff=HandoffPolicy()
    ) as channel:
        key = await channel.key()
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as api:
            answer = await api.post(
                f"{channel.url}/v1/conversations/known/messages", json={"text": "hi"}
            )
        # A reply that exists, so reading replies is tested beyond its 404.
        reply_id = answer.headers["X-Reply-Id"]
        (tmp_path / "schemathesis.toml").write_text(
            "[[operations]]\n"
            f'include-path = "{REPLIES}"\n'
            f'parameters = {{ conversation_id = "known", reply_id = "{reply_id}" }}\n'
            + "".join(
                f'[[operations]]\ninclude-path = "{path}"\n'
                'parameters = { conversation_id = "known" }\n'
                for path in PEOPLE
            )
        )
        st = Path(sys.executable).with_name("st")
        process = await asyncio.create_subprocess_exec(
            *[str(st), "run", f"{channel.url}/openapi.json"],
            *["--header", f"Authorization: Bearer {key}"],
            *["--checks", "all", "--exclude-checks", NOT_APPLICABLE],
            *["--phases", "examples,coverage,fuzzing", "--max-examples", "40", "--seed", "7"],
            *["--workers", "2", "--generation-database", "none", "--no-color"],
            *["--report", "junit", "--report-dir", str(tmp_path)],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,
        )
        output, _ = await asyncio.wait_for(process.communicate(), 240)
    report = output.decode(errors="replace")
    assert process.returncode == 0, report
    assert "Tested: 9" in report and "Missing test data" not in report, report
