"""The follower: one loop per worker that checks due runs in batches, not one queue job per check.

Each running turn has `next_check_at` in Postgres. The loop claims due turns with
FOR UPDATE SKIP LOCKED (several workers share the load), checks them concurrently over the
client's connection pool, and sleeps until the next one is due or it is woken (push mode).
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import structlog

from service.db import turns as db
from service.db.pool import DB_UNAVAILABLE
from service.domain import runs
from service.resources import Resources

log = structlog.get_logger(__name__)

class Follower:
    def __init__(self, resources: Resources) -> None:
        self._res = resources
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="follower")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self, grace_s: float = 20.0) -> None:
        """Let the checks in hand finish (up to grace_s), then stop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), grace_s)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task

    async def _run(self) -> None:
        settings = self._res.settings
        failures = 0
        while not self._stopping:
            try:
                due = await db.claim_due(self._res.pool, settings.follower_batch, settings.check_lease_s)
                if due:
                    later: list[tuple[str, float]] = []
                    await asyncio.gather(*(self._check(row, later) for row in due))
                    # One UPDATE for the tick's still-running turns (a turn left out, its
                    # worker gone, becomes due again when its claim's lease ends).
                    await db.reschedule_many(self._res.pool, later)
                    failures = 0
                    continue
                await self._sleep(await self._until_next_due())
                failures = 0
            except DB_UNAVAILABLE as exc:
                failures += 1
                delay = min(30.0, 0.5 * 2**failures)
                log.warning("follower_db_unavailable", error=repr(exc), retry_in=delay)
                await self._sleep(delay)
            except Exception:
                log.exception("follower_error")
                await self._sleep(settings.follower_idle_s)

    async def _until_next_due(self) -> float:
        idle = self._res.settings.follower_idle_s
        next_at = await db.next_due(self._res.pool)
        if next_at is None:
            return idle
        return max(0.0, min(idle, (next_at - datetime.now(UTC)).total_seconds()))

    async def _sleep(self, seconds: float) -> None:
        if self._stopping:
            return
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)

    async def _check(self, row: object, later: list[tuple[str, float]]) -> None:
        res = self._res
        # Each check runs in its own task (gather), so these ids stay on its log lines only.
        structlog.contextvars.bind_contextvars(
            turn_id=row["id"], run_id=row["run_id"], conversation_id=row["conversation_id"]  # type: ignore[index]
        )
        try:
            await runs.check_turn(res.pool, res.parallel, res.queue, res.settings, row, later)  # type: ignore[arg-type]
        except Exception:
            # The claim's lease makes the turn due again later.
            log.exception("check_failed", turn_id=row["id"])  # type: ignore[index]
