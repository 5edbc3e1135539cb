"""Configuration: variable names, validation messages, secrets kept secret."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from bots.settings import BotSettings, SettingsError, env_names, load_settings
from inference.serve import cpu_flags, discover_adapters, embedding_launch, engine_launch
from inference.settings import InferenceSettings
from tests.conftest import ROOT


@pytest.fixture(autouse=True)
def no_parley_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Start each test from defaults, whatever this machine's environment or `.env` says."""
    for name in env_names(BotSettings) + env_names(InferenceSettings):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def test_sections_read_section_underscore_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:hunter2@127.0.0.1:6379/0")
    monkeypatch.setenv("LLM_BASE_URL", "http://inference:8000/v1")
    monkeypatch.setenv("REDIS_CONTEXT_TTL_SECONDS", "3600")
    settings = BotSettings(_env_file=None)  # type: ignore[call-arg]
    assert settings.llm.base_url == "http://inference:8000/v1"
    assert settings.redis.context_ttl_seconds == 3600
    assert settings.redis.url is not None
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())


def test_a_bad_value_names_its_variable_and_hides_the_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_CONTEXT_TTL_SECONDS", "forever-secret")
    monkeypatch.setenv("LLM_TEMPERATURE", "9")
    with pytest.raises(SettingsError) as caught:
        load_settings(BotSettings)
    message = str(caught.value)
    assert "REDIS_CONTEXT_TTL_SECONDS" in message and "LLM_TEMPERATURE" in message
    assert "forever-secret" not in message


def test_inference_variables_are_prefixed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERENCE_PORT", "70000")
    with pytest.raises(SettingsError, match="INFERENCE_PORT"):
        load_settings(InferenceSettings)


AVX2 = frozenset({"avx", "avx2", "fma"})
AMX = AVX2 | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


def test_the_api_key_never_reaches_the_command_line() -> None:
    settings = InferenceSettings(api_key="sk-very-secret", _env_file=None)  # type: ignore[arg-type, call-arg]
    launch = engine_launch(settings, "/models/m", "cpu", AVX2)
    assert not any("sk-very-secret" in arg for arg in launch.argv)
    assert launch.env["VLLM_API_KEY"] == "sk-very-secret"
    assert launch.argv[launch.argv.index("--dtype") :][:2] == ["--dtype", "float32"]
    assert "--enforce-eager" in launch.argv and launch.env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert launch.argv[launch.argv.index("--block-size") + 1] == "32"
    assert "--enable-prefix-caching" in launch.argv
    assert "--enable-tokenizer-info-endpoint" in launch.argv


def test_the_chat_model_runs_in_bfloat16_only_where_the_cpu_computes_it(tmp_path: Path) -> None:
    def dtype(flags: frozenset[str], setting: str = "auto") -> str:
        chosen = InferenceSettings(_env_file=None, dtype=setting)  # type: ignore[call-arg]
        argv = engine_launch(chosen, "m", "cpu", flags).argv
        return argv[argv.index("--dtype") + 1]

    assert dtype(AMX) == "bfloat16" and dtype(AVX2) == "float32"
    assert dtype(AMX, "float32") == "float32" and dtype(AVX2, "bfloat16") == "bfloat16"
    embed = embedding_launch(InferenceSettings(_env_file=None), "e", "cpu").argv  # type: ignore[call-arg]
    assert embed[embed.index("--dtype") + 1] == "float32", "stored vectors keep their dtype"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_vllm_tuning_variables_in_the_environment_win_over_parleys_choice() -> None:
    settings = InferenceSettings(api_key="sk-k", _env_file=None)  # type: ignore[arg-type, call-arg]
    launch = engine_launch(settings, "/models/m", "cpu")
    assert launch.environment({})["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    operator = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "VLLM_API_KEY": "stale", "PATH": "/bin"}
    env = launch.environment(operator)
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1" and env["PATH"] == "/bin"
    assert env["VLLM_API_KEY"] == "sk-k", "the settings' key, not a stray variable"


def test_a_kv_cache_of_part_of_a_gib_is_refused_before_vllm_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INFERENCE_KV_CACHE_GIB", "1.5")
    with pytest.raises(SettingsError, match="INFERENCE_KV_CACHE_GIB"):
        load_settings(InferenceSettings)


def test_gpu_launch_compiles_and_keeps_the_model_dtype() -> None:
    launch = engine_launch(InferenceSettings(_env_file=None), "m", "gpu")  # type: ignore[call-arg]
    assert "--enforce-eager" not in launch.argv and "VLLM_CPU_KVCACHE_SPACE" not in launch.env
    assert "--block-size" not in launch.argv
    assert launch.argv[launch.argv.index("--dtype") + 1] == "auto"


def test_start_up_with_a_bad_value_exits_non_zero_without_a_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "LLM_REPLY_TOKENS": "lots", "LLM_API_KEY": "sk-should-not-print"}
    result = subprocess.run(
        [sys.executable, "-m", "bots", "console"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert "LLM_REPLY_TOKENS" in result.stderr and "Traceback" not in result.stderr
    assert "sk-should-not-print" not in result.stderr + result.stdout


def test_env_example_documents_exactly_the_variables_read() -> None:
    documented = {
        line.lstrip("# ").split("=", 1)[0]
        for line in (ROOT / ".env.example").read_text().splitlines()
        if re.match(r"^#? ?[A-Z][A-Z0-9_]+=", line)
    }
    read = set(env_names(BotSettings)) | set(env_names(InferenceSettings))
    assert documented == read


def test_env_example_values_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    for line in (ROOT / ".env.example").read_text().splitlines():
        if re.match(r"^[A-Z][A-Z0-9_]+=", line):
            name, value = line.split("=", 1)
            monkeypatch.setenv(name, value)
    load_settings(BotSettings)
    load_settings(InferenceSettings)


def test_adapters_are_served_under_names_that_change_with_their_weights(tmp_path: Path) -> None:
    def adapter(name: str, weights: bytes, rank: int) -> None:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        (folder / "adapter_config.json").write_text(json.dumps({"r": rank}))
        (folder / "adapter_model.safetensors").write_bytes(weights)

    adapter("support", b"first weights", 8)
    adapter("sales", b"other weights", 12)
    (tmp_path / "not-an-adapter").mkdir()
    settings = InferenceSettings(lora_dir=tmp_path, _env_file=None)  # type: ignore[call-arg]
    argv = engine_launch(settings, "m", "cpu", AVX2).argv
    first = [a.name for a in discover_adapters(tmp_path)]
    assert [name.rsplit("-", 1)[0] for name in first] == ["sales", "support"]
    modules = argv[argv.index("--lora-modules") + 1 : argv.index("--max-lora-rank")]
    assert modules == [f"{name}={tmp_path / name.rsplit('-', 1)[0]}" for name in first]
    assert argv[argv.index("--max-lora-rank") + 1] == "16", "12 rounds up to a rank vLLM takes"
    assert "--enable-lora" in argv and argv[argv.index("--max-loras") + 1] == "2"
    adapter("support", b"retrained weights", 8)
    second = [a.name for a in discover_adapters(tmp_path)]
    assert second[0] == first[0] and second[1] != first[1], "new weights, new name"


def test_the_embedding_model_gets_its_own_pooling_server() -> None:
    settings = InferenceSettings(_env_file=None, api_key=SecretStr("k"), embed_port=8111)  # type: ignore[call-arg]
    cpu = embedding_launch(settings, "/models/minilm", "cpu")
    argv = cpu.argv
    assert argv[argv.index("--runner") + 1] == "pooling"
    assert argv[argv.index("--port") + 1] == "8111"
    assert argv[argv.index("--served-model-name") + 1] == "parley-embed"
    assert argv[argv.index("--dtype") + 1] == "float32" and "--enforce-eager" in argv
    assert "--enable-prefix-caching" not in argv and "k" not in argv
    assert cpu.env["VLLM_CPU_KVCACHE_SPACE"] == "1" and cpu.env["VLLM_API_KEY"] == "k"
    gpu = embedding_launch(settings, "BAAI/bge-m3", "gpu").argv
    assert gpu[gpu.index("--gpu-memory-utilization") + 1] == "0.05"
