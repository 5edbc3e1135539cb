"""llama.cpp's OpenAI-compatible server (llama-cpp-python), set up for the engine benchmark.

It lives in a virtual environment of its own, `.venv-llama`, built on first use (a few
minutes: pip compiles llama.cpp for this CPU) and reused after. Parley itself never
installs it: `make test` and `make run` do not need it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

from bench.common import ROOT

VERSION = "0.3.36"
VENV = ROOT / ".venv-llama"
STAMP = VENV / f".llama-cpp-python-{VERSION}"


def llama_python() -> Path:
    """Return the interpreter of the llama.cpp environment, building it once."""
    python = VENV / "bin" / "python"
    if STAMP.exists():
        return python
    print(f"setting up llama-cpp-python {VERSION} in {VENV} (once; it compiles llama.cpp)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    # All cores for the compiler; GGML_NATIVE (llama.cpp's default) builds for this CPU.
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    if platform.machine() in ("x86_64", "AMD64"):
        # Without AMX: its kernels crash on the bundled Q4_1 model (SIGSEGV in
        # ggml_backend_amx_mul_mat; llama.cpp issues 20824 and 16315).
        flags = "-mno-amx-tile\\ -mno-amx-int8\\ -mno-amx-bf16"
        env["CMAKE_ARGS"] = f"-DCMAKE_C_FLAGS={flags} -DCMAKE_CXX_FLAGS={flags}"
    # Built here, not taken from pip's cache, which may hold a build with other flags.
    install = [str(python), "-m", "pip", "install", "--quiet", "--no-cache-dir"]
    subprocess.run([*install, f"llama-cpp-python[server]=={VERSION}"], check=True, env=env)
    STAMP.touch()
    return python


def server_argv(gguf: Path, port: int, context: int, threads: int) -> list[str]:
    """The command that serves `gguf` on loopback, the way its documentation starts it.

    Its defaults are changed where they would skew the comparison: threads (it uses half
    the cores for decoding by default), and `interrupt_requests`, which by default ends a
    streaming answer as soon as another request arrives.
    """
    return [
        str(llama_python()), "-m", "llama_cpp.server",
        "--model", str(gguf),
        "--model_alias", "parley",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", str(context),
        "--n_threads", str(threads),
        "--n_threads_batch", str(threads),
        "--interrupt_requests", "False",
    ]  # fmt: skip
