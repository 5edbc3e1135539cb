"""Configuration of the inference process, from the environment and `.env`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class InferenceSettings(BaseSettings):
    """What `python -m inference` reads; variables are named INFERENCE_FIELD."""

    model_config = SettingsConfigDict(
        env_prefix="INFERENCE_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    data_dir: Path = Field(default=Path("data"), validation_alias=AliasChoices("DATA_DIR"))
    model: str | None = Field(
        default=None, description="Model folder or name; unset serves the bundled default."
    )
    served_model_name: str = "parley"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    api_key: SecretStr | None = None
    device: Literal["auto", "cpu", "gpu"] = "auto"
    dtype: str = Field(default="auto", pattern=r"^(auto|float32|float16|bfloat16)$")
    max_model_len: int = Field(default=8192, ge=128)
    # Whole GiB: vLLM reads VLLM_CPU_KVCACHE_SPACE as an integer and fails on "1.5".
    kv_cache_gib: int = Field(default=2, ge=1, description="KV cache size on a CPU, in GiB.")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    enforce_eager: bool | None = Field(
        default=None, description="Skip graph compilation; unset: on for CPU, off for GPU."
    )
    max_num_seqs: int = Field(default=64, ge=1)
    lora_dir: Path | None = Field(
        default=None,
        description="Folder of LoRA adapters (one per subfolder) to serve beside the model.",
    )
    max_loras: int = Field(default=4, ge=1, description="Adapters in one batch at most.")
    block_size: int | None = Field(
        default=None,
        ge=1,
        description="KV cache block size in tokens; unset: 32 on a CPU, vLLM's default on a GPU.",
    )
    extra_args: str = Field(default="", description="More vLLM flags, shell-quoted.")
    embed_model: str | None = Field(
        default=None,
        description="The knowledge base's embedding model (folder or name); unset: the "
        "bundled all-MiniLM-L6-v2 (English). On a GPU name a multilingual one, e.g. bge-m3.",
    )
    embed_served_model_name: str = "parley-embed"
    embed_port: int = Field(default=8001, ge=1, le=65535)
    embed_kv_cache_gib: int = Field(default=1, ge=1, description="Its KV cache on a CPU, GiB.")
    embed_gpu_memory_utilization: float = Field(
        default=0.05, gt=0, lt=1, description="Its share of a GPU, beside the chat model's."
    )
    embed_extra_args: str = Field(default="", description="More vLLM flags for it.")

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL the chat model answers on."""
        return self._url(self.port)

    @property
    def embed_base_url(self) -> str:
        """The OpenAI-compatible base URL the embedding model answers on."""
        return self._url(self.embed_port)

    def _url(self, port: int) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{port}/v1"
