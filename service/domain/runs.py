"""Turns as the worker sees them: check a run, record how it ended (service.domain.starts
creates it).

Lock order in every transaction that changes a turn: its conversation row first, then the turn.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
import structlog
from arq.connections import ArqRedis

from service import metrics
from service.clients.parallel import ParallelClient, RunResult
from service.config import Settings
from service.db import attempts as attempt_db
from service.db import conversations as conversation_db
from service.db import events as event_db
from service.db import turns as db
from service.domain.schedule import check_delay, poll_cap, poll_start, profile
from service.domain.turns import enqueue_start
from service.errors import UpstreamRejected, UpstreamUnavailable
from service.models import Turn

log = structlog.get_logger(__name__)


async def finish(
    pool: asyncpg.Pool, queue: ArqRedis | None, settings: Settings, turn_id: str, status: str,
    *, from_statuses: tuple[str, ...] = ("running",), attempt: int | None = None, **fields: Any,
) -> Turn | None:
    """Record a terminal status unless the turn already ended (a cancel wins); start the next turn.

    With `attempt`, a queued turn fails for that start attempt, only while it owns the turn's
    start lease (a stale attempt's failure changes nothing)."""
    async with pool.acquire() as conn, conn.transaction():
        conversation_id = await conversation_db.lock_conversation_of_turn(conn, turn_id)
        if conversation_id is None:
            return None
        if attempt is not None:
            turn = await attempt_db.fail_start(conn, turn_id, attempt, fields["error"])
        else:
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
