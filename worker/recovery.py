"""Jobs deferred because Postgres was away run again as soon as it answers, not when their
backoff (up to 60 s) runs out.

A job that meets a Postgres outage is retried later with a growing delay, which keeps a long
outage cheap; this worker remembers which of its jobs were deferred for that reason, and when
one of its loops sees Postgres answer again it moves those jobs to the front of the queue (their
score in arq's sorted set becomes now). Jobs deferred for other reasons (Parallel's 429, the
creation limit) keep their delay.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from arq import Retry
from arq.connections import ArqRedis
from arq.utils import timestamp_ms

from service.db.pool import DB_UNAVAILABLE
from service.queue import wake_channel

log = structlog.get_logger(__name__)

Job = Callable[..., Coroutine[Any, Any, Any]]  # what arq's func() takes


class DbDeferredJobs:
    def __init__(self) -> None:
        self._ids: set[str] = set()

    def track(self, job: Job) -> Job:
        """The job, remembering its id whenever it is retried because Postgres was away."""

        @functools.wraps(job)
        async def tracked(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            try:
                result = await job(ctx, *args, **kwargs)
            except Retry as exc:
                if isinstance(exc.__cause__, DB_UNAVAILABLE):
                    self._ids.add(ctx["job_id"])
                raise
            self._ids.discard(ctx["job_id"])
            return result

        return tracked

    async def release(self, redis: ArqRedis, queue_name: str) -> int:
        """Make every job deferred by a Postgres outage due now; returns how many."""
        ids, self._ids = self._ids, set()
        if not ids:
            return 0
        now = timestamp_ms()
        # XX: only jobs still queued (one that ran meanwhile is not put back).
        moved = await redis.zadd(queue_name, dict.fromkeys(ids, now), xx=True, ch=True)
        if moved:  # idle workers sleep until told
            await redis.publish(wake_channel(queue_name), now)
        log.info("db_deferred_jobs_released", jobs=len(ids), moved=moved)
        return len(ids)
