"""The real `python -m bots console` process on its embedded defaults."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from bots.store.embedded import responds
from tests.conftest import start_bots
from tests.fake_openai import FakeOpenAI, Reply


def console_env(base_url: str, data_dir: Path) -> dict[str, str]:
    env = {**os.environ, "LLM_BASE_URL": base_url, "DATA_DIR": str(data_dir)}
    env.pop("REDIS_URL", None)  # the embedded Redis
    return env


async def start_console(env: dict[str, str], cwd: Path) -> asyncio.subprocess.Process:
    return await start_bots("console", env=env, cwd=cwd, stdin=asyncio.subprocess.PIPE)


async def chat(env: dict[str, str], cwd: Path, *typed: str) -> str:
    process = await start_console(env, cwd)
    lines = "".join(line + "\n" for line in typed).encode()
    out, err = await asyncio.wait_for(process.communicate(lines), 60)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_history_survives_a_restart_on_the_embedded_redis(tmp_path: Path) -> None:
    env = console_env("", tmp_path / "data")
    async with FakeOpenAI([Reply("Noted.")]) as server:
        env["LLM_BASE_URL"] = server.base_url
        assert "parley> Noted." in await chat(env, tmp_path, "My name is Ada.")
        assert "parley> Noted." in await chat(env, tmp_path, "What is my name?")
    second = [m["content"] for m in server.completions()[1].body["messages"]]
    assert second == ["My name is Ada.", "Noted.", "What is my name?"]
    assert list((tmp_path / "data" / "redis").glob("appendonly*")), "persisted as an AOF"
    socket_url = f"unix://{tmp_path / 'data' / 'redis' / 'redis.sock'}"
    assert not await responds(socket_url), "the embedded Redis stopped with the console"


async def test_sigterm_ends_the_console_cleanly(tmp_path: Path) -> None:
    async with FakeOpenAI([Reply("hi")]) as server:
        process = await start_console(console_env(server.base_url, tmp_path / "data"), tmp_path)
        assert process.stdout is not None
        banner = await asyncio.wait_for(process.stdout.readline(), 30)
        assert banner.startswith(b"Parley console")
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    socket_url = f"unix://{tmp_path / 'data' / 'redis' / 'redis.sock'}"
    assert not await responds(socket_url), "the embedded Redis stopped with the console"


async def test_undecodable_input_is_answered_not_fatal(tmp_path: Path) -> None:
    async with FakeOpenAI([Reply("Got it.")]) as server:
        process = await start_console(console_env(server.base_url, tmp_path / "data"), tmp_path)
        out, err = await asyncio.wait_for(process.communicate(b"caf\xe9 \xff\xfe ok\n"), 60)
    assert process.returncode == 0, err.decode()
    assert "parley> Got it." in out.decode()
    assert server.completions()[0].body["messages"][-1]["content"] == "caf\ufffd \ufffd\ufffd ok"


async def test_limits_budget_and_persona_hold_in_the_real_process(tmp_path: Path) -> None:
    env = console_env("", tmp_path / "data")
    env.update({"LIMITS_USER_MESSAGES": "2", "LIMITS_DAILY_TOKENS": "1000"})
    async with FakeOpenAI([Reply("Arr.")]) as server:
        env["LLM_BASE_URL"] = server.base_url
        screen = await chat(
            env, tmp_path, "/persona set You are a pirate.", "one", "two", "three", "/usage"
        )
    assert screen.count("parley> Arr.") == 2
    assert "You're sending messages faster than I can answer; try again in" in screen
    assert len(server.completions()) == 2, "the limited message made no model call"
    assert server.completions()[0].body["messages"][0] == {
        "role": "system",
        "content": "You are a pirate.",
    }
    # the fake reports 10 prompt tokens and one per 4-character chunk: 11 per reply
    assert "You have used 22 of your 1,000 tokens today" in screen
