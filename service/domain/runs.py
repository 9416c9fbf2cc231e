"""Turns as the worker sees them: check a run, record how it ended (service.domain.starts
creates it; service.domain.lifecycle makes every change of the turn)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
import structlog

from service.clients.parallel import ParallelClient, RunResult
from service.config import Settings
from service.db import turns as db
from service.domain import followups, lifecycle
from service.domain.schedule import check_delay, poll_cap, poll_start, run_deadline_s
from service.errors import UpstreamRejected, UpstreamUnavailable
from service.models import Turn
from service.queue import Queue

log = structlog.get_logger(__name__)


async def finish(
    pool: asyncpg.Pool, queue: Queue | None, settings: Settings, turn_id: str, status: str,
    **fields: Any,
) -> Turn | None:
    """Record how the turn's run ended, unless the turn already ended (a cancel wins), then
    start the next turn: `status` "completed" (output, basis), "failed" (error) or "timeout"
    (error; the run may go on upstream). None when nothing changed."""
    transitions: dict[str, Callable[..., Awaitable[followups.Ended]]] = {
        "completed": lifecycle.complete, "failed": lifecycle.fail, "timeout": lifecycle.time_out,
    }
    turn, follow_ups = await transitions[status](pool, turn_id, **fields)
    await followups.after_commit(follow_ups, queue, settings)
    return turn


async def check_turn(
    pool: asyncpg.Pool, parallel: ParallelClient, queue: Queue | None, settings: Settings,
    due: asyncpg.Record, later: list[tuple[str, float]] | None = None,
    reported_status: str | None = None,
) -> str:
    """Check one claimed run once: reschedule it, or record its output or failure.

    With `later`, a still-running turn's (turn id, delay) is appended there instead of being
    written, so the follower reschedules a whole tick in one statement. `reported_status` is
    what Parallel's webhook said: "completed" asks for the result at once (one call, not two).
    """
    turn_id, run_id, processor = due["id"], due["run_id"], due["processor"]
    grouped = due["taskgroup_id"] is not None
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
        # Parallel failed to answer: looked at again soon, not on a group's slow safety net
        # (its stream may have reported the run ended already).
        delay = exc.retry_after or check_delay(processor, due["check_count"],
                                               poll_start(settings), poll_cap(settings))
        await _reschedule(pool, turn_id, delay, later)
        return "retry"
    except UpstreamRejected as exc:
        await finish(pool, queue, settings, turn_id, "failed",
                     error={"code": exc.code, "message": exc.detail})
        return "failed"
    if run.status == "completed":
        assert result is not None  # asked for whenever the run completed
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
    deadline_s = run_deadline_s(settings, processor)
    if elapsed > deadline_s:
        await finish(pool, queue, settings, turn_id, "timeout",
                     error={"code": "timeout",
                            "message": f"The run was still {run.status} after {elapsed:.0f} s."})
        return "timeout"
    delay = check_delay(processor, due["check_count"], poll_start(settings, grouped),
                        poll_cap(settings, grouped))
    # Checked again by its deadline at the latest, however slow the safety net (group mode).
    delay = min(delay, max(0.5, deadline_s - elapsed + 0.5))
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
