"""Replies in flight: the idle signal, nested tracking, and what a shutdown does."""

from __future__ import annotations

import asyncio

from bots.delivery.inflight import RESTART_NOTICE, InFlight


async def test_idle_waits_for_every_reply_even_when_tracking_nests() -> None:
    in_flight, release = InFlight(), asyncio.Event()

    async def reply() -> None:
        with in_flight.track(), in_flight.track():
            await release.wait()
        await asyncio.sleep(0)

    task = asyncio.create_task(reply())
    await asyncio.sleep(0)  # one turn: it is tracked now
    idle = asyncio.create_task(in_flight.idle())
    await asyncio.sleep(0)
    assert len(in_flight) == 1 and not idle.done()
    release.set()
    await asyncio.wait_for(idle, 1)
    assert len(in_flight) == 0
    await task


async def test_a_drain_ends_late_replies_with_the_notice() -> None:
    in_flight, said = InFlight(), list[str]()

    async def say(text: str) -> None:
        said.append(text)

    never = asyncio.Event()
    task = asyncio.create_task(in_flight.deliver(never.wait(), say))
    await asyncio.sleep(0)
    stopping = asyncio.create_task(in_flight.stopping())
    await in_flight.drain(0.05)
    assert stopping.done() and in_flight.closing
    assert said == [RESTART_NOTICE] and task.cancelled()
    await in_flight.idle()
