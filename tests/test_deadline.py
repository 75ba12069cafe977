"""Attempt deadlines on one shared timer: asyncio.timeout's semantics, one loop callback."""

from __future__ import annotations

import asyncio

import pytest

from bulwark.deadline import Deadlines


async def test_a_deadline_ends_the_block_with_timeout_error() -> None:
    deadlines = Deadlines(tick=0.01)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError), deadlines.after(0.05):
        await asyncio.sleep(5)
    assert loop.time() - started < 1.0
    assert len(deadlines) == 0
    # The task's cancel count is back where it was: later awaits are not cancelled.
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0.02)


async def test_a_block_that_finishes_in_time_is_untouched() -> None:
    deadlines = Deadlines(tick=0.01)
    with deadlines.after(1.0) as d:
        await asyncio.sleep(0.02)
        d.reschedule(asyncio.get_running_loop().time() + 1.0)
    assert len(deadlines) == 0
    await asyncio.sleep(0.05)  # the sweeper stops with nothing left: no stray cancel


async def test_reschedule_moves_the_deadline_later_and_earlier() -> None:
    deadlines = Deadlines(tick=0.01)
    loop = asyncio.get_running_loop()
    with deadlines.at(loop.time() + 0.05) as d:
        d.reschedule(loop.time() + 10)
        await asyncio.sleep(0.15)  # past the first deadline: moved, so not fired
    with pytest.raises(TimeoutError), deadlines.at(loop.time() + 10) as d:
        d.reschedule(loop.time() + 0.03)
        await asyncio.sleep(5)


async def test_a_cancellation_from_elsewhere_passes_through() -> None:
    """Shutdown or a client gone: CancelledError, never mistaken for the deadline."""
    deadlines = Deadlines(tick=0.01)
    entered = asyncio.Event()

    async def attempt() -> None:
        with deadlines.after(10):
            entered.set()
            await asyncio.sleep(5)

    task = asyncio.create_task(attempt())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(deadlines) == 0


async def test_many_deadlines_fire_independently() -> None:
    deadlines = Deadlines(tick=0.01)

    async def attempt(seconds: float) -> str:
        try:
            with deadlines.after(seconds):
                await asyncio.sleep(0.2)
        except TimeoutError:
            return "timeout"
        return "done"

    results = await asyncio.gather(attempt(0.03), attempt(5), attempt(0.05), attempt(5))
    assert list(results) == ["timeout", "done", "timeout", "done"]
