"""Child processes Parley runs itself (Redis, the inference service)."""

from __future__ import annotations

import asyncio
import contextlib


async def stop_child(process: asyncio.subprocess.Process, grace_s: float) -> None:
    """Ask a child to stop (SIGTERM), and kill it if it is still running after `grace_s`."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), grace_s)
    except TimeoutError:
        process.kill()
        await process.wait()
