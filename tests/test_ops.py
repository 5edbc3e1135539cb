"""What operators see: metrics, health and readiness endpoints, JSON logs without secrets."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import httpx

from bots.core.models import Author, ConversationKey, Incoming
from bots.core.ports import ModelUnavailable
from bots.core.service import ConversationService
from bots.ops import Metrics, Probe, ops_server
from tests.conftest import free_port, start_bots
from tests.fake_openai import FakeOpenAI, Reply
from tests.fake_telegram import TOKEN, FakeTelegram, person, private_chat
from tests.fakes import MemoryLimiter, MemoryStore, ScriptedModel, collect

ADA = person(4242, "Ada")


async def test_metrics_count_what_the_service_does() -> None:
    platform, model, metrics = "test", ScriptedModel(), Metrics()
    service = ConversationService(
        MemoryStore(), model, limiter=MemoryLimiter(limit=2), observer=metrics
    )

    def message(text: str, user: str = "ada") -> Incoming:
        return Incoming(ConversationKey(platform, "c1"), text, author=Author(user, user))

    await collect(service, message("one"))
    await collect(service, message("/help"))
    await collect(service, message("two"))
    await collect(service, message("three"))  # over the limit of 2
    model.fail_with = ModelUnavailable("down")
    await collect(service, message("four", user="bob"))

    assert metrics.sample("parley_messages_received_total", platform=platform) == 5
    assert metrics.sample("parley_messages_answered_total", platform=platform) == 3
    assert (
        metrics.sample("parley_rate_limited_total", platform=platform, reason="rate_limited") == 1
    )
    assert metrics.sample("parley_errors_total", platform=platform, kind="model_unavailable") == 1
    assert metrics.sample("parley_time_to_first_token_seconds_count", platform=platform) == 2
    assert metrics.sample("parley_reply_seconds_count", platform=platform) == 5
    assert metrics.sample("parley_replies_in_flight", platform=platform) == 0


async def test_the_ops_endpoints_answer_health_readiness_and_metrics() -> None:
    port, model_up = free_port(), False

    async def up() -> bool:
        return True

    async def model() -> bool:
        return model_up

    async def broken() -> bool:
        raise ConnectionError("refused")

    probes: dict[str, Probe] = {"redis": up, "model": model, "other": up}
    exported = Metrics()
    exported.received("console")
    async with ops_server("127.0.0.1", port, probes, exported), httpx.AsyncClient() as client:
        url = f"http://127.0.0.1:{port}"
        assert (await client.get(f"{url}/healthz")).json() == {"status": "ok"}
        ready = await client.get(f"{url}/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"ready": False, "redis": True, "model": False, "other": True}
        model_up = True
        assert (await client.get(f"{url}/readyz")).status_code == 200
        probes["other"] = broken
        assert (await client.get(f"{url}/readyz")).json()["other"] is False
        metrics = await client.get(f"{url}/metrics")
        assert metrics.status_code == 200 and "parley_messages_received_total" in metrics.text
        assert 'parley_messages_received_total{platform="console"} 1.0' in metrics.text
        assert (await client.get(f"{url}/nothing")).status_code == 404
        assert (await client.post(f"{url}/healthz")).status_code == 405


async def test_a_bot_process_logs_json_with_conversations_and_no_secrets(tmp_path: Path) -> None:
    """Real-looking secrets in every setting, DEBUG logs from every library: none leaks."""
    secrets = {
        "TELEGRAM_TOKEN": TOKEN,
        "LLM_API_KEY": "sk-proj-Q29uZ3JhdHMsIHlvdSBmb3VuZCBpdA-8f3a",
        "DISCORD_TOKEN": "MTAxODk4NzY1NDMyMTA5ODc2NTQ.GhJkLm.abcdefghijklmnopqrstuvwxyz012345",
        "HTTP_WEBHOOK_SECRET": "whsec_5b2f8e0c1d7a4c9e9f3b6a1d2e4c8f7a",
        "TELEGRAM_WEBHOOK_SECRET": "tg-webhook-secret-7d1e0c2b",
    }
    text = "my card number is 4111 1111 1111 1111"
    ops = free_port()
    async with FakeTelegram() as fake, FakeOpenAI([Reply("Noted, thanks.")]) as model:
        env = {
            **os.environ,
            **secrets,
            "TELEGRAM_BASE_URL": fake.base_url,
            "LLM_BASE_URL": model.base_url,
            "DATA_DIR": str(tmp_path / "data"),
            "LOG_LEVEL": "DEBUG",
            "LOG_FORMAT": "json",
            "OPS_PORT": str(ops),
        }
        env.pop("REDIS_URL", None)
        process = await start_bots("telegram", env=env, cwd=tmp_path)
        try:
            await fake.wait_for(lambda: bool(fake.calls_to("getUpdates")), 30)
            await fake.push({"chat": private_chat(ADA), "from": ADA, "text": text})
            await fake.wait_for(lambda: fake.shown(ADA["id"]) == ["Noted, thanks."], 15)
            async with httpx.AsyncClient() as client:
                ready = await client.get(f"http://127.0.0.1:{ops}/readyz")
                metrics = (await client.get(f"http://127.0.0.1:{ops}/metrics")).text
        finally:
            process.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()[-2000:]
    assert ready.json() == {"ready": True, "redis": True, "model": True}
    assert 'parley_messages_answered_total{platform="telegram"} 1.0' in metrics

    lines = err.decode().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    assert any(e["level"] == "DEBUG" for e in entries), "debug logging was on"
    handled = [e for e in entries if e.get("conversation") == f"telegram/{ADA['id']}"]
    assert handled and handled[-1]["message"].startswith("message answered")
    everything = (out + err).decode()
    assert "***" in everything, "the token in Telegram's URLs was masked"
    for name, secret in secrets.items():
        assert secret not in everything, f"{name} leaked"
    assert TOKEN.split(":")[1] not in everything
    ours = [e for e in entries if e["logger"].startswith("bots")]
    assert not [e for e in ours if text in json.dumps(e)], "Parley never logs message text"
