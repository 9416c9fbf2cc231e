"""The follower: one loop per worker that checks due runs in batches, not one queue job per check.

Each running turn has `next_check_at` in Postgres. The loop claims due turns with
FOR UPDATE SKIP LOCKED (several workers share the load), checks them concurrently over the
client's connection pool, and sleeps until the next one is due or it is woken: by a NOTIFY on
channel `turn_checks` (push mode: the API reports Parallel's webhook there, service.domain.push),
or by this worker's own jobs.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

import asyncpg
import structlog

from service.db import turns as db
from service.domain import runs
from service.resources import Resources
from worker.loops import NotifiedLoop

log = structlog.get_logger(__name__)


class Follower(NotifiedLoop):
    name = "follower"

    def __init__(self, resources: Resources) -> None:
        super().__init__(resources.settings.follower_idle_s, resources.settings.database_url,
                         db.TURN_CHECKS_CHANNEL, db.CHECKS_DUE_PAYLOAD)
        self._res = resources

    async def stop(self, grace_s: float = 20.0) -> None:
        """Let the checks in hand finish (up to grace_s), then stop."""
        await self.stop_loop(grace_s)
        await self.stop_listening()

    async def tick(self) -> bool:
        settings = self._res.settings
        due = await db.claim_due(self._res.pool, settings.follower_batch, settings.check_lease_s)
        if not due:
            return False
        later: list[tuple[str, float]] = []
        await asyncio.gather(*(self._check(row, later) for row in due))
        # One UPDATE for the tick's still-running turns (a turn left out, its worker gone,
        # becomes due again when its claim's lease ends).
        await db.reschedule_many(self._res.pool, later)
        # Only a full batch may have left more due now: after a short one the loop reads the
        # next due time instead of claiming again (one statement less per webhook's wake-up); a
        # turn made due meanwhile woke the loop, so its sleep ends at once.
        return len(due) >= settings.follower_batch

    async def next_due(self) -> datetime | None:
        return await db.next_due(self._res.pool)

    async def _check(self, row: asyncpg.Record, later: list[tuple[str, float]]) -> None:
        res = self._res
        # Each check runs in its own task (gather), so these ids stay on its log lines only.
        structlog.contextvars.bind_contextvars(
            turn_id=row["id"], run_id=row["run_id"], conversation_id=row["conversation_id"]
        )
        try:
            # Its own deadline: the tick waits for all its checks, so one stuck on a lock or a
            # slow answer must not hold the others' next round.
            async with asyncio.timeout(res.settings.follower_check_timeout_s):
                await runs.check_turn(res.pool, res.parallel, res.queue, res.settings, row, later,
                                      reported_status=row["reported_status"])
        except TimeoutError:
            log.warning("check_timed_out", turn_id=row["id"],
                        timeout_s=res.settings.follower_check_timeout_s)
        except Exception:
            # The claim's lease makes the turn due again later.
            log.exception("check_failed", turn_id=row["id"])
