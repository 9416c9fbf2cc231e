"""arq's Worker, polling Redis only when there may be work, instead of every `poll_delay`.

arq's own loop polls the queue every `poll_delay` (10 ms here, for short hops): about 50 ms of
CPU a second for an idle worker and ten times that in Redis round trips. This one sleeps until
the first of:

- a message on the queue's wake channel: every enqueue through `service.queue.enqueue`
  publishes one once its job is in the queue, so a turn's start is picked up as soon as it is
  enqueued, by an idle worker as by a busy one;
- the score of the next deferred job (a retry's, the cron's), read in the same round trip as the
  due jobs, and the cron's next enqueue time;
- a job of its own ending while it had due jobs it could not take (`max_jobs`), or ending in a
  retry (its new score is read);
- `idle_poll_s`, for what no message announces: a job queued by other means, a job another
  worker retried, a dead worker's job whose claim lapsed.

While the wake channel is not subscribed (at start, or Redis dropped the connection), it polls
every `poll_delay`, as arq does. Two polls are never closer than `poll_delay`, so a busy queue
costs no more round trips than arq's loop. A poll also skips the jobs this worker is running
(arq would WATCH and read each of them on every poll, only to find it running).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog
from arq.connections import log_redis_info
from arq.utils import timestamp_ms
from arq.worker import Worker
from arq.worker import logger as arq_logger
from redis.exceptions import RedisError

from service.queue import wake_channel

log = structlog.get_logger(__name__)

# arq enqueues a cron job up to this long before it is due (worker.run_cron's two windows of
# max(poll_delay, 0.5) s): waking this much early lets the job be in the queue on time.
CRON_LEAD_S = 0.9


class WakefulWorker(Worker):
    def __init__(self, *args: Any, idle_poll_s: float = 1.0, wake_retry_s: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle_poll_s = idle_poll_s
        self.wake_retry_s = wake_retry_s
        self.polls = 0  # tests and the benchmark read it
        self.listening = False
        self._wake = asyncio.Event()
        self._busy = False  # the last poll started jobs: there may be more right behind them
        self._saturated = False  # the last poll left due jobs for want of a free slot
        self._next_at: float | None = None  # unix time of the next deferred job

    def wake(self) -> None:
        """Poll now (at most `poll_delay` after the previous poll)."""
        self._wake.set()

    async def main(self) -> None:
        """arq's main() with its fixed-step poll replaced (no burst mode: the service has none)."""
        arq_logger.info("Starting worker for %d functions: %s", len(self.functions),
                        ", ".join(self.functions))
        await log_redis_info(self.pool, arq_logger.info)
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        listener = asyncio.create_task(self._listen(), name="arq-wake")
        try:
            while True:
                self._wake.clear()  # before looking: a message during the poll is not lost
                began = time.monotonic()
                await self._poll_iteration()
                await self._rest(began)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _rest(self, began: float) -> None:
        gap = max(0.0, began + self.poll_delay_s - time.monotonic())
        if self._busy or not self.listening:
            await asyncio.sleep(gap)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(gap, self._until_next()))
        # Woken early: still keep the gap between two polls.
        await asyncio.sleep(max(0.0, began + self.poll_delay_s - time.monotonic()))

    def _until_next(self) -> float:
        now = time.time()
        wait = self.idle_poll_s
        if self._next_at is not None:
            wait = min(wait, self._next_at - now)
        for cron_job in self.cron_jobs:
            if cron_job.next_run is not None:
                wait = min(wait, cron_job.next_run.timestamp() - CRON_LEAD_S - now)
        return max(0.0, wait)

    async def _poll_iteration(self) -> None:
        """arq's poll in one round trip: the due jobs this worker is not running, and the score
        of the next job not due yet; the heartbeat (health key, cron) first, so that a cron job
        it enqueues is seen."""
        self.polls += 1
        await self.heart_beat()
        self._busy = self._saturated = False
        self._next_at = None
        if self.allow_pick_jobs:
            if self.job_counter < self.max_jobs:
                now = timestamp_ms()
                async with self.pool.pipeline(transaction=False) as pipe:
                    pipe.zrangebyscore(self.queue_name, min=float("-inf"), max=now,
                                       start=self._queue_read_offset, num=self.queue_read_limit)
                    pipe.zrangebyscore(self.queue_name, min=f"({now}", max=float("inf"),
                                       start=0, num=1, withscores=True)
                    due, upcoming = await pipe.execute()
                running = {job_id for job_id, task in self.tasks.items() if not task.done()}
                fresh = [job_id for job_id in due if job_id.decode() not in running]
                before = len(self.tasks)
                await self.start_jobs(fresh)
                self._busy = len(self.tasks) > before or len(due) >= self.queue_read_limit
                self._saturated = self.job_counter >= self.max_jobs and bool(fresh)
                if upcoming:
                    self._next_at = upcoming[0][1] / 1000
            else:
                self._saturated = True
        if self.allow_abort_jobs:
            await self._cancel_aborted_jobs()
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                task.result()  # as arq: an error in run_job propagates

    async def run_job(self, job_id: str, score: int) -> None:
        retried = self.jobs_retried
        await super().run_job(job_id, score)
        if self.jobs_retried != retried:  # its new score is written: read it
            self._wake.set()

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        if self._saturated:  # a free slot for a job waiting for one
            self._wake.set()

    async def _listen(self) -> None:
        """Keep the wake channel subscribed; every message wakes the poll."""
        channel = wake_channel(self.queue_name)
        while True:
            pubsub = self.pool.pubsub()
            try:
                await pubsub.subscribe(channel)
                self.listening = True
                self._wake.set()  # anything enqueued before the subscription: look now
                while True:
                    if await pubsub.get_message(ignore_subscribe_messages=True, timeout=None):
                        self._wake.set()
            except (RedisError, OSError, TimeoutError) as exc:
                log.info("wake_channel_lost", error=repr(exc), retry_in=self.wake_retry_s)
            finally:
                self.listening = False
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(self.wake_retry_s)
