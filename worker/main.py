"""Build and run the arq worker from Settings (no import-time globals)."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import structlog
from arq import cron
from arq.connections import RedisSettings
from arq.worker import func

from service import metrics, queue
from service.config import Settings
from service.domain import starts
from service.domain.groups import GroupStarts
from service.resources import Resources
from worker import jobs
from worker.dispatcher import Dispatcher
from worker.follower import Follower
from worker.group_follower import GroupFollower, follower_id
from worker.limits import CreationLimiter
from worker.recovery import DbDeferredJobs
from worker.supervised import REDIS_DOWN, SupervisedWorker

log = structlog.get_logger(__name__)


async def on_startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    resources = await _open_resources(settings)
    ctx["resources"] = resources
    ctx["creation_limiter"] = CreationLimiter(
        resources.queue, settings.creations_per_min, prefix=settings.queue_name
    )
    ctx["follower"] = Follower(resources)
    await ctx["follower"].start()
    ctx["dispatcher"] = Dispatcher(resources)
    # Whichever loop sees Postgres back first releases the jobs its outage deferred.
    ctx["follower"].on_recovered = ctx["dispatcher"].on_recovered = functools.partial(
        ctx["db_deferred"].release, resources.queue, settings.queue_name)
    await ctx["dispatcher"].start()
    if settings.parallel_task_groups != "off":
        # Group mode: runs go to this worker's task groups, their streams followed here.
        me = follower_id()
        ctx["group_follower"] = GroupFollower(resources, me)
        ctx["group_follower"].start()
        ctx["group_starts"] = GroupStarts(resources.pool, resources.parallel, settings, me,
                                          on_added=ctx["group_follower"].added)
        ctx["group_follower"].on_stream_read = ctx["group_starts"].stream_read
    ctx["metrics_server"] = metrics.start_worker_server(
        settings.worker_metrics_port, settings.worker_metrics_host
    )


async def _open_resources(settings: Settings) -> Resources:
    """The worker's resources, waiting while Redis (or Postgres, refusing connections) is away
    at start, rather than exiting into a restart loop."""
    while True:
        try:
            return await Resources.open(settings, role="worker")
        except REDIS_DOWN as exc:
            log.warning("startup_waiting", error=repr(exc), retry_in=settings.redis_retry_s)
            await asyncio.sleep(settings.redis_retry_s)


async def on_shutdown(ctx: dict[str, Any]) -> None:
    if "follower" in ctx:
        await ctx["follower"].stop()
    if "group_follower" in ctx:
        await ctx["group_follower"].stop()
    if "dispatcher" in ctx:
        await ctx["dispatcher"].stop(grace_s=ctx["settings"].shutdown_grace_s)
    if "resources" in ctx:
        await ctx["resources"].close()
    if (server := ctx.pop("metrics_server", None)) is not None:
        await asyncio.to_thread(server.shutdown)  # scrapeable until the drain is over
        server.server_close()


# The idle worker's poll for jobs no message announced (see worker.wakeful).
IDLE_POLL_S = 1.0


def reconcile_seconds(interval_s: int) -> set[int]:
    """The seconds of each minute a cron job runs at, for an interval of 1 to 60 s."""
    step = max(1, min(60, interval_s))
    return set(range(0, 60, step))


def repair_minutes(interval_min: int) -> set[int]:
    step = max(1, min(60, interval_min))
    return set(range(0, 60, step))


def build_worker(
    settings: Settings, *, handle_signals: bool = True, **overrides: Any
) -> SupervisedWorker:
    """The worker for these settings; tests pass handle_signals=False and run it in-process."""
    deferred = DbDeferredJobs()
    options: dict[str, Any] = {
        "functions": [
            # The attempt's lease, not arq's timeout, must be what ends a start attempt: arq
            # cancelling a create mid-flight, or the store of its run while Postgres is slow to
            # answer (a statement may take 30 s), would leave a run nobody recorded: the job
            # outlives the store's last retry (service.domain.starts.RECORD_GRACE_S) by 10 s.
            func(deferred.track(jobs.start_turn), name=queue.START_TURN, keep_result=0,
                 max_tries=1000, timeout=settings.start_lease_s + starts.RECORD_GRACE_S + 10),
            func(deferred.track(jobs.check_turn), name=queue.CHECK_TURN, keep_result=0,
                 max_tries=100),
        ],
        "cron_jobs": [
            cron(jobs.reconcile, name=f"{queue.RECONCILE}:{settings.queue_name}",
                 second=reconcile_seconds(settings.reconcile_interval_s), run_at_startup=True,
                 unique=True, keep_result=0),
            cron(jobs.sweep_expired, name=f"{queue.SWEEP_EXPIRED}:{settings.queue_name}",
                 second=reconcile_seconds(settings.retention_sweep_interval_s),
                 run_at_startup=True, unique=True, keep_result=0),
            cron(jobs.repair_quotas, name=f"{queue.REPAIR_QUOTAS}:{settings.queue_name}",
                 minute=repair_minutes(settings.quota_repair_interval_min), second={0},
                 run_at_startup=True, unique=True, keep_result=0),
        ],
        "on_startup": on_startup,
        "on_shutdown": on_shutdown,
        "redis_settings": RedisSettings.from_dsn(settings.redis_url),
        "queue_name": settings.queue_name,
        "job_serializer": queue.serialize,
        "job_deserializer": queue.deserialize,
        "ctx": {"settings": settings, "db_deferred": deferred},
        "handle_signals": handle_signals,
        # SIGTERM: stop taking jobs, let running ones finish for this long, then cancel them.
        "job_completion_wait": settings.shutdown_grace_s,
        # Jobs are short (one Parallel call or one query): an enqueue wakes the worker at once
        # (worker.wakeful); with nothing announced it looks every IDLE_POLL_S, and two polls
        # are at least poll_delay apart (the loop's pace under load, and while the wake
        # channel is down).
        "poll_delay": 0.01,
        "idle_poll_s": IDLE_POLL_S,
        "max_jobs": 50,
        "job_timeout": settings.job_timeout_s,
        "keep_result": 0,
        # The health key (`arq --check`) is rewritten this often; an idle worker polls every
        # IDLE_POLL_S, well within it.
        "health_check_interval": 60,
        "redis_retry_s": settings.redis_retry_s,
    }
    options.update(overrides)
    return SupervisedWorker(**options)


def run(settings: Settings, *, loop: str = "uvloop") -> None:
    """The worker in this process until SIGTERM/SIGINT, on uvloop unless `loop` is "asyncio"
    (less CPU per job: docs/benchmarks.md)."""
    if loop == "uvloop":
        import uvloop

        asyncio.set_event_loop(uvloop.new_event_loop())
    build_worker(settings).run()
