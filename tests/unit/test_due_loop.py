"""worker.loops.DueLoop on the loop the worker runs on (uvloop, tests/conftest.py)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import uvloop

from worker.loops import DueLoop


class _AlwaysDue(DueLoop):
    """Nothing to claim, yet the next item is always overdue: every sleep is for a past time."""

    name = "always_due"

    def __init__(self) -> None:
        super().__init__(idle_s=60.0)
        self.ticks = 0

    async def tick(self) -> bool:
        self.ticks += 1
        return False

    async def next_due(self) -> datetime | None:
        return datetime.now(UTC) - timedelta(seconds=1)


async def test_a_hint_while_the_loop_sleeps_until_a_past_time_is_taken() -> None:
    # A start job hints the follower (wake_in) at any moment; under uvloop the alarm of a
    # sleep until a time already past is a plain Handle without when(), which crashed the job.
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    due = _AlwaysDue()
    due.start_loop()
    try:
        for _ in range(200):
            await asyncio.sleep(0)
            due.wake_in(5.0)
        assert due.ticks > 10
    finally:
        assert await due.stop_loop(grace_s=5.0)
