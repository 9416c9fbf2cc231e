"""Turns as the worker sees them: start a Parallel run, check it, record how it ended.

Lock order in every transaction that changes a turn: its conversation row first, then the turn.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
import structlog
from arq.connections import ArqRedis

from service import metrics
from service.clients.parallel import ParallelClient, RunInfo, RunResult
from service.config import Settings
from service.db import conversations as conversation_db
from service.db import events as event_db
from service.db import turns as db
from service.db.pool import DB_UNAVAILABLE
from service.domain.schedule import check_delay, poll_cap, poll_start, profile
from service.domain.turns import enqueue_start
from service.errors import UpstreamRejected, UpstreamUnavailable
from service.models import Turn

log = structlog.get_logger(__name__)

# Keys we add to a run's metadata; user keys of the same name are overwritten.
TURN_TAG = "rs_turn"
ATTEMPT_TAG = "rs_attempt"


async def start_turn(
    pool: asyncpg.Pool, parallel: ParallelClient, queue: ArqRedis | None, settings: Settings,
    turn_id: str, webhook_url: str | None = None,
    before_create: Callable[[], Awaitable[None]] | None = None,
) -> str:
    """Create the turn's Parallel run if the turn is next in its conversation; returns what happened.

    The attempt is recorded (with a lease) before Parallel is called and the run right after, so
    a retry never overlaps a live attempt. `before_create` may raise UpstreamUnavailable to defer
    (the global creation rate limit). Raises UpstreamUnavailable: the caller retries later.
    """
    async with pool.acquire() as conn, conn.transaction():
        if await conversation_db.lock_conversation_of_turn(conn, turn_id) is None:
            return "gone"
        turn = await db.lock_turn(conn, turn_id)
        assert turn is not None
        if turn.status != "queued" or turn.run_id is not None:
            return "not-queued"
        head = await db.head_turn(conn, turn.conversation_id)
        if head is None or head["id"] != turn_id:
            return "waiting"
        attempt_at = await conn.fetchval("SELECT start_attempt_at FROM turn WHERE id = $1", turn_id)
        if attempt_at is not None and (
            (datetime.now(UTC) - attempt_at).total_seconds() < settings.start_lease_s
        ):
            return "in-progress"
        previous = await db.previous_interaction(conn, turn.parent_turn_id)
        attempt = await db.begin_start(conn, turn_id, previous)
    if attempt.previous_lost:
        # The attempt before never came back (its worker died or its lease ran out), maybe after
        # Parallel had made its run. See README, "Guarantees".
        log.warning("create_in_doubt", turn_id=turn_id, attempt=attempt.number - 1,
                    reason="attempt_lost")
        metrics.create_in_doubt("attempt_lost")
    # No connection is held while Parallel answers.
    try:
        if before_create is not None:
            await before_create()
        run = await parallel.create_run(
            input=turn.input,
            processor=turn.processor,
            output_schema=turn.output_schema,
            previous_interaction_id=previous,
            metadata={**turn.metadata, TURN_TAG: turn_id, ATTEMPT_TAG: str(attempt.number)},
            webhook_url=webhook_url,
            timeout_s=settings.start_lease_s / 2,
        )
    except UpstreamUnavailable as exc:
        if exc.in_doubt:
            # Parallel may have created a run we cannot look up (no list endpoint): the retry
            # may create a second one. See README, "Guarantees".
            log.warning("create_in_doubt", turn_id=turn_id, attempt=attempt.number,
                        reason="connection", error=exc.detail)
            metrics.create_in_doubt("connection")
        await db.abandon_start(pool, turn_id, in_doubt=exc.in_doubt)
        raise
    except UpstreamRejected as exc:
        await finish(pool, queue, settings, turn_id, "failed", from_statuses=("queued",),
                     error={"code": exc.code, "message": exc.detail})
        return "rejected"
    return await _record_run(pool, settings, turn, run)


async def _record_run(pool: asyncpg.Pool, settings: Settings, turn: Turn, run: RunInfo) -> str:
    """Store the new run's ids, retrying while Postgres is away but only within the attempt's
    lease: after it, another attempt may start and the run must not be recorded twice."""
    deadline = time.monotonic() + settings.start_lease_s / 2
    delay = 0.2
    while True:
        try:
            async with pool.acquire() as conn:
                return await _record_run_once(conn, settings, turn, run)
        except DB_UNAVAILABLE as exc:
            if time.monotonic() + delay > deadline:
                log.error("run_not_recorded", turn_id=turn.id, run_id=run.run_id, error=repr(exc))
                raise
            log.warning("record_run_retry", turn_id=turn.id, run_id=run.run_id, error=repr(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def _record_run_once(
    conn: asyncpg.Connection, settings: Settings, turn: Turn, run: RunInfo
) -> str:
    first_check = check_delay(turn.processor, 0, poll_start(settings), poll_cap(settings))
    async with conn.transaction():
        await conversation_db.lock_conversation_of_turn(conn, turn.id)
        recorded = await db.record_run(conn, turn.id, run.run_id, run.interaction_id, first_check)
        if recorded is None:
            log.error("run_already_recorded", turn_id=turn.id, run_id=run.run_id)
            return "duplicate"
        if recorded.status == "running":
            await event_db.insert_event(conn, "turn.running", recorded)
    log.info("run_started", turn_id=turn.id, run_id=run.run_id, status=recorded.status)
    if recorded.status == "running":
        metrics.turn_transition(recorded)
    return "started" if recorded.status == "running" else recorded.status


async def finish(
    pool: asyncpg.Pool, queue: ArqRedis | None, settings: Settings, turn_id: str, status: str,
    *, from_statuses: tuple[str, ...] = ("running",), **fields: Any,
) -> Turn | None:
    """Record a terminal status unless the turn already ended (a cancel wins); start the next turn."""
    async with pool.acquire() as conn, conn.transaction():
        conversation_id = await conversation_db.lock_conversation_of_turn(conn, turn_id)
        if conversation_id is None:
            return None
        turn = await db.finish_turn(conn, turn_id, status, from_statuses=from_statuses, **fields)
        if turn is None:
            log.info("late_result_ignored", turn_id=turn_id, status=status)
            return None
        await event_db.insert_event(conn, f"turn.{status}", turn)
        head = await db.head_turn(conn, conversation_id)
    log.info("turn_finished", turn_id=turn_id, status=status)
    metrics.turn_transition(turn)
    if head is not None and head["status"] == "queued":
        await enqueue_start(queue, settings, head["id"])
    return turn


async def check_turn(
    pool: asyncpg.Pool, parallel: ParallelClient, queue: ArqRedis | None, settings: Settings,
    due: asyncpg.Record, later: list[tuple[str, float]] | None = None,
    reported_status: str | None = None,
) -> str:
    """Check one claimed run once: reschedule it, or record its output or failure.

    With `later`, a still-running turn's (turn id, delay) is appended there instead of being
    written, so the follower reschedules a whole tick in one statement. `reported_status` is
    what Parallel's webhook said: "completed" asks for the result at once (one call, not two).
    """
    turn_id, run_id, processor = due["id"], due["run_id"], due["processor"]
    try:
        result = None
        if reported_status == "completed":
            result = await _reported_result(parallel, run_id)
        if result is not None:
            run = result.run
        else:
            run = await parallel.retrieve(run_id)
            if run.status == "completed":
                result = await parallel.result(run_id)
    except UpstreamUnavailable as exc:
        delay = exc.retry_after or check_delay(processor, due["check_count"], poll_start(settings),
                                               poll_cap(settings))
        await _reschedule(pool, turn_id, delay, later)
        return "retry"
    except UpstreamRejected as exc:
        await finish(pool, queue, settings, turn_id, "failed",
                     error={"code": exc.code, "message": exc.detail})
        return "failed"
    if run.status == "completed":
        output = {"type": result.output.type, "content": result.output.content}
        await finish(pool, queue, settings, turn_id, "completed", output=output,
                     basis=msgspec.to_builtins(result.output.basis))
        return "completed"
    if run.status in ("failed", "cancelled"):
        message = run.error.message if run.error else f"The Parallel run was {run.status}."
        await finish(pool, queue, settings, turn_id, "failed",
                     error={"code": f"run_{run.status}", "message": message})
        return "failed"
    elapsed = (datetime.now(UTC) - due["started_at"]).total_seconds()
    if elapsed > profile(processor).deadline_s * settings.run_deadline_scale:
        await finish(pool, queue, settings, turn_id, "failed", upstream_may_continue=True,
                     error={"code": "timeout",
                            "message": f"The run was still {run.status} after {elapsed:.0f} s."})
        return "timeout"
    delay = check_delay(processor, due["check_count"], poll_start(settings), poll_cap(settings))
    await _reschedule(pool, turn_id, delay, later)
    return "active"


async def _reported_result(parallel: ParallelClient, run_id: str) -> RunResult | None:
    """The result of a run a webhook reported completed, or None when it has none after all
    (failed, still active, Parallel away): the caller then asks for the status as usual."""
    try:
        result = await parallel.result(run_id, wait_s=1)
    except (UpstreamUnavailable, UpstreamRejected) as exc:
        log.info("reported_result_missing", run_id=run_id, error=exc.detail)
        return None
    return result if result.run.status == "completed" else None


async def _reschedule(
    pool: asyncpg.Pool, turn_id: str, delay: float, later: list[tuple[str, float]] | None
) -> None:
    if later is None:
        await db.reschedule(pool, turn_id, delay)
    else:
        later.append((turn_id, delay))
