"""arq jobs: thin wrappers that call service.domain and turn transient failures into retries."""

from __future__ import annotations

from typing import Any

import asyncpg
import structlog
from arq import Retry

from service import metrics, queue
from service.db import turns as turn_db
from service.db.pool import DB_UNAVAILABLE
from service.domain import attempts, conversations, push, runs, schedule, starts, usage
from service.errors import UpstreamUnavailable
from service.resources import Resources

log = structlog.get_logger(__name__)

# Tries of a webhook's check whose run no turn has recorded yet (see check_turn).
UNRECORDED_RUN_TRIES = 5

# How many turns one reconcile pass re-enqueues at most; the next pass takes the rest.
RECONCILE_BATCH = 1000
# Turns per enqueue script (each one round trip; Redis runs a script alone, so keep it short).
RECONCILE_CHUNK = 250


def _backoff(ctx: dict[str, Any], hint: float | None = None) -> float:
    """Retry delay: the server's hint, else 1, 2, 4, … s capped at 60 s."""
    return hint if hint and hint > 0 else min(60.0, 2.0 ** (ctx.get("job_try", 1) - 1))


def push_url(resources: Resources) -> str | None:
    base = resources.settings.public_base_url
    return f"{base.rstrip('/')}/v1/hooks/parallel" if base else None


# arq's claim on a running start job lapses this long after the attempt's lease would (see
# start_turn), so a worker that dies mid-start holds its turn up for START_LEASE_S + 5 s.
START_CLAIM_MARGIN_S = 5.0


async def start_turn(ctx: dict[str, Any], turn_id: str) -> str:
    """Start the turn's run if the turn is next in its conversation."""
    res: Resources = ctx["resources"]
    # Every log line of this job names the turn (the job runs in its own task and context).
    structlog.contextvars.bind_contextvars(turn_id=turn_id)
    # arq keeps a running job claimed for the longest job timeout + 10 s (70 s here), and only
    # then lets another worker take it again if this one died. The attempt's lease is what
    # guards a start, so the claim only needs to outlive it.
    try:
        await queue.limit_job_claim(
            ctx["redis"], ctx["job_id"], res.settings.start_lease_s + START_CLAIM_MARGIN_S
        )
    except queue.QUEUE_UNAVAILABLE as exc:
        log.warning("start_claim_not_limited", error=repr(exc))
    try:
        outcome = await starts.start_turn(
            res.pool, res.parallel, res.queue, res.settings, turn_id, webhook_url=push_url(res),
            before_create=ctx["creation_limiter"].acquire, groups=ctx.get("group_starts"),
        )
        # A stored run's first check is due in poll_start(…) times its processor's scale (at
        # least 1): the follower, which may be sleeping until a later check, wakes by then.
        ctx["follower"].wake_in(schedule.poll_start(res.settings))
        if outcome == "started" and "group_follower" in ctx:  # its group may have told already
            ctx["group_follower"].stored()
        return outcome
    except attempts.LeaseHeld as exc:
        # A duplicate of this job (or one whose worker froze) holds the lease: look again when
        # it runs out, rather than ending and leaving the turn to the reconciler.
        raise Retry(defer=exc.seconds + 0.5) from exc
    except UpstreamUnavailable as exc:
        log.warning("start_retry", turn_id=turn_id, error=exc.detail)
        raise Retry(defer=_backoff(ctx, exc.retry_after)) from exc
    except DB_UNAVAILABLE as exc:
        log.warning("start_retry_db", turn_id=turn_id, error=repr(exc))
        raise Retry(defer=_backoff(ctx)) from exc


async def check_turn(ctx: dict[str, Any], run_id: str, status: str | None = None) -> str | None:
    """Parallel said the run changed, before any turn had stored the run (the API reports the
    webhooks of stored runs to Postgres itself: service.domain.push). When it says the run
    finished, check it here and now (the webhook's status lets a completed run's check skip the
    status call); otherwise make its check due now and wake the follower."""
    res: Resources = ctx["resources"]
    structlog.contextvars.bind_contextvars(run_id=run_id)
    here = status in push.FINISHED_RUN_STATUSES

    async def claim() -> asyncpg.Record | str | None:
        if here:
            return await turn_db.claim_run(res.pool, run_id, res.settings.check_lease_s)
        return await turn_db.check_now(res.pool, run_id)

    try:
        claimed = await claim()
        if claimed is None:
            if await turn_db.run_known(res.pool, run_id):
                # Stored between the two reads: the UPDATE above skipped the row because the
                # transaction storing the run had not committed yet. Now it has.
                claimed = await claim()
            elif ctx.get("job_try", 1) < UNRECORDED_RUN_TRIES:
                # A run that ends within milliseconds can be reported before the worker that
                # created it has stored its id: look again shortly (0.25 + 0.5 + 0.75 + 1 s)
                # before giving up, which would leave the run to the slow safety-net poll.
                raise Retry(defer=0.25 * ctx.get("job_try", 1))
    except DB_UNAVAILABLE as exc:
        raise Retry(defer=_backoff(ctx)) from exc
    if claimed is None:
        return None
    if isinstance(claimed, str):
        ctx["follower"].wake()
        return claimed
    structlog.contextvars.bind_contextvars(
        turn_id=claimed["id"], conversation_id=claimed["conversation_id"]
    )
    try:
        await runs.check_turn(res.pool, res.parallel, res.queue, res.settings, claimed,
                              reported_status=status)
    except Exception:
        # As in the follower: the claim's lease makes the turn due again for it.
        log.exception("check_failed", turn_id=claimed["id"])
    return str(claimed["id"])


async def reconcile(ctx: dict[str, Any], min_age_s: float = 5.0) -> int:
    """Re-enqueue turns waiting for a worker whose job Redis lost (the follower's schedule is in
    Postgres already). Safe to run anywhere, any time: job ids dedupe. The cron leaves turns
    younger than `min_age_s` to the API's own enqueue; the worker passes 0 when Redis comes back
    (every enqueue of the outage failed)."""
    res: Resources = ctx["resources"]
    settings = res.settings
    try:
        turn_ids = await turn_db.startable_turns(
            res.pool, settings.start_lease_s, min_age_s=min_age_s, limit=RECONCILE_BATCH
        )
    except DB_UNAVAILABLE as exc:
        log.warning("reconcile_db_unavailable", error=repr(exc))
        return 0
    # One round trip per RECONCILE_CHUNK turns, whether their jobs are there or not.
    requeued = 0
    try:
        for i in range(0, len(turn_ids), RECONCILE_CHUNK):
            requeued += await queue.enqueue_starts(
                res.queue, settings.queue_name, turn_ids[i : i + RECONCILE_CHUNK])
    except queue.QUEUE_UNAVAILABLE as exc:
        log.warning("reconcile_enqueue_failed", error=repr(exc))
    # A turn whose start job is still queued is not a repair; one whose job Redis lost is.
    metrics.reconciler_repairs("requeued_start", requeued)
    if requeued:
        log.info("reconciled", requeued=requeued, checked=len(turn_ids))
    return len(turn_ids)


# The longest one sweep deletes for (well within the job's timeout); the next takes the rest.
SWEEP_BUDGET_S = 20.0


async def sweep_expired(ctx: dict[str, Any]) -> int:
    """Delete the conversations whose TTL ran out (docs/design.md, Retention); a cron job every
    RETENTION_SWEEP_INTERVAL_S. Several workers may run it at once: each claim skips the rows
    another holds."""
    res: Resources = ctx["resources"]
    try:
        return await conversations.sweep_expired(res.pool, SWEEP_BUDGET_S)
    except DB_UNAVAILABLE as exc:
        log.warning("sweep_expired_db_unavailable", error=repr(exc))
        return 0


async def repair_quotas(ctx: dict[str, Any]) -> int:
    """Recount the quota counters that disagree with the turns (service.domain.usage)."""
    res: Resources = ctx["resources"]
    try:
        repaired = await usage.repair_quota_counters(res.pool)
    except DB_UNAVAILABLE as exc:
        log.warning("quota_repair_db_unavailable", error=repr(exc))
        return 0
    metrics.reconciler_repairs("quota_counter", len(repaired))
    if repaired:
        log.warning("quota_counters_repaired", tenants=repaired[:20], count=len(repaired))
    return len(repaired)
