"""What a committed transition of service.domain.lifecycle leaves to do (FollowUps), and how it
is done (`after_commit`): start the conversation's next turn, count the transition, log. A queue
(Redis) failure here is logged, never raised: the write is committed, and the reconciler
enqueues what could not be. Also the transaction every transition runs in."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import asyncpg
import structlog

from service import metrics
from service import queue as jobs
from service.config import Settings
from service.models import Turn

log = structlog.get_logger(__name__)


@asynccontextmanager
async def transaction(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection inside a transaction that commits when the block ends."""
    async with pool.acquire() as proxy, proxy.transaction():
        # The pool's proxy forwards every Connection method to the connection it holds.
        yield cast(asyncpg.Connection, proxy)


@dataclass(frozen=True, slots=True)
class LogLine:
    event: str
    fields: dict[str, Any] = field(default_factory=dict)
    level: str = "info"


@dataclass(frozen=True, slots=True)
class FollowUps:
    """What a committed transition leaves to do; `+` joins two."""

    start: tuple[str, ...] = ()  # turns to enqueue a start job for (each its conversation's head)
    counted: tuple[Turn, ...] = ()  # turns whose new status the metrics count
    in_doubt: tuple[str, ...] = ()  # research_create_in_doubt_total reasons
    extra_runs: tuple[str, ...] = ()  # research_extra_runs_total reasons
    logs: tuple[LogLine, ...] = ()

    def __add__(self, other: FollowUps) -> FollowUps:
        return FollowUps(self.start + other.start, self.counted + other.counted,
                         self.in_doubt + other.in_doubt, self.extra_runs + other.extra_runs,
                         self.logs + other.logs)


NOTHING = FollowUps()
# The turn a transition ended (None: it had ended already, or it is gone), and its follow-ups.
Ended = tuple[Turn | None, FollowUps]


async def after_commit(
    follow_ups: FollowUps, queue: jobs.Queue | None = None, settings: Settings | None = None
) -> int:
    """Run a committed transition's follow-ups; returns how many start jobs were added (none
    without a queue and its settings: the reconciler starts those turns)."""
    for line in follow_ups.logs:
        getattr(log, line.level)(line.event, **line.fields)
    for turn in follow_ups.counted:
        metrics.turn_transition(turn)
    for reason in follow_ups.in_doubt:
        metrics.create_in_doubt(reason)
    for reason in follow_ups.extra_runs:
        metrics.extra_run(reason)
    added = 0
    if settings is not None:
        for turn_id in follow_ups.start:
            added += await enqueue_start(queue, settings, turn_id)
    return added


async def enqueue_start(queue: jobs.Queue | None, settings: Settings, turn_id: str) -> bool:
    """Enqueue a start; with Redis down the reconciler finds the turn later, so only log.
    True when a job was added (False: already queued, or Redis is down)."""
    if queue is None:
        return False
    try:
        return await jobs.enqueue_start_turn(queue, settings.queue_name, turn_id)
    except jobs.QUEUE_UNAVAILABLE as exc:
        log.warning("enqueue_failed", turn_id=turn_id, error=repr(exc))
        return False
