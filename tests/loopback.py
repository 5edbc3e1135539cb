"""Serving the local fakes of platform APIs on 127.0.0.1."""

from __future__ import annotations

from aiohttp import web


async def serve(app: web.Application, port: int = 0) -> tuple[web.AppRunner, int]:
    """Serve an aiohttp app on 127.0.0.1 (port 0: any free one); return its runner and port."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, runner.addresses[0][1]
