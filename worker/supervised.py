"""arq's Worker, kept alive while Redis is away: it backs off, probes Redis, and resumes by itself.

arq's own loop lets a Redis error escape `main()`, so the process exits (code 1) and a supervisor
restarts it into the same outage. Here the poll step catches it, probes Redis every
`REDIS_RETRY_S` and, once Redis answers, puts right what the outage broke: jobs whose end could
not be written are freed (their in-progress marker would otherwise block them for the job's
timeout plus 10 s), turns whose enqueue failed meanwhile are re-enqueued at once (the reconciler
with no minimum age), and the follower and the dispatcher are woken.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Any

import structlog
from arq.connections import ArqRedis, create_pool
from arq.constants import in_progress_key_prefix
from redis.exceptions import RedisError

from service import metrics
from worker.wakeful import WakefulWorker

log = structlog.get_logger(__name__)

# What redis-py raises while Redis is down, restarting, or unreachable.
REDIS_DOWN: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
PROBE_TIMEOUT_S = 1.0


async def redis_answers(redis: ArqRedis) -> bool:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            await redis.ping()
    except REDIS_DOWN:
        return False
    return True


class SupervisedWorker(WakefulWorker):
    def __init__(self, *args: Any, redis_retry_s: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, wake_retry_s=redis_retry_s, **kwargs)
        self.redis_retry_s = redis_retry_s
        # Jobs whose end (result, retry, removal) could not be written to Redis.
        self._orphaned: set[str] = set()
        # Seconds of the last outage, from the first failure to the first answer (tests read it).
        self.outages: list[float] = []

    async def main(self) -> None:
        if self._pool is None:
            self._pool = await self._connect()
        await super().main()

    async def _connect(self) -> ArqRedis:
        """arq's pool, waiting for Redis as long as it takes (a worker may start in an outage)."""
        while True:
            try:
                return await create_pool(
                    self.redis_settings, job_deserializer=self.job_deserializer,
                    job_serializer=self.job_serializer, default_queue_name=self.queue_name,
                    expires_extra_ms=self.expires_extra_ms,
                )
            except REDIS_DOWN as exc:
                log.warning("redis_unavailable", error=repr(exc), retry_in=self.redis_retry_s)
                await asyncio.sleep(self.redis_retry_s)

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
            if self._orphaned:  # a blip that only a job's end met: Redis answers again
                await self._free_orphaned()
        except REDIS_DOWN as exc:
            await self._wait_for_redis(exc)

    async def run_job(self, job_id: str, score: int) -> None:
        try:
            await super().run_job(job_id, score)
        except REDIS_DOWN as exc:
            # Not re-raised: arq's poll would take it for a fatal error. The job stays queued
            # with its in-progress marker; _free_orphaned lets it run again.
            log.warning("job_end_not_recorded", job_id=job_id, error=repr(exc))
            self._orphaned.add(job_id)

    async def close(self) -> None:
        """arq's close(), but a Redis still away does not skip the shutdown hook."""
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        if not self._pool:
            return
        await asyncio.gather(*self.tasks.values())
        with contextlib.suppress(*REDIS_DOWN):
            await self.pool.delete(self.health_check_key)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        await self.pool.aclose(close_connection_pool=True)
        self._pool = None

    async def _wait_for_redis(self, exc: BaseException) -> None:
        started = time.monotonic()
        metrics.redis_outage()
        log.warning("redis_unavailable", error=repr(exc), retry_in=self.redis_retry_s)
        # Polling is the point: Redis's return raises no event this process could await.
        while not await redis_answers(self.pool):  # noqa: ASYNC110
            await asyncio.sleep(self.redis_retry_s)
        self.outages.append(time.monotonic() - started)
        log.info("redis_back", outage_s=round(self.outages[-1], 3))
        try:
            await self._recover()
        except REDIS_DOWN as again:  # gone again: the next poll waits once more
            log.warning("redis_recovery_failed", error=repr(again))

    async def _recover(self) -> None:
        from worker import jobs  # jobs imports the domain; keep this module importable alone

        freed = await self._free_orphaned()
        requeued = await jobs.reconcile(self.ctx, min_age_s=0.0)
        for loop in ("follower", "dispatcher"):
            if (due_loop := self.ctx.get(loop)) is not None:
                due_loop.wake()
        log.info("redis_recovered", freed_jobs=freed, startable_turns=requeued)

    async def _free_orphaned(self) -> int:
        """Delete the in-progress markers of jobs whose end was lost, so they run again (every
        job is idempotent; their tasks are over, so none runs twice at once)."""
        orphaned, self._orphaned = self._orphaned, set()
        if orphaned:
            try:
                await self.pool.delete(*(in_progress_key_prefix + job_id for job_id in orphaned))
            except REDIS_DOWN:
                self._orphaned |= orphaned
                raise
        return len(orphaned)
