"""Starting a turn: one start attempt creates its Parallel run, inside a lease.

An attempt is begun in Postgres (a lease of START_LEASE_S) before Parallel is called, and every
write it makes afterwards is conditional on still owning that lease (service.db.attempts). It
ends strictly inside the lease: its create gets at most CREATE_TIMEOUT_S, and storing the run is
not tried after the lease's last seconds. See README, "Guarantees", for what may still be billed.

Lock order in every transaction that changes a turn: its conversation row first, then the turn.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import asyncpg
import msgspec
import structlog
from arq.connections import ArqRedis

from service import metrics
from service import queue as jobs
from service.clients.parallel import ParallelClient, RunInfo
from service.config import Settings
from service.db import attempts as db
from service.db import conversations as conversation_db
from service.db import events as event_db
from service.db import turns as turn_db
from service.db.pool import DB_UNAVAILABLE
from service.domain.runs import finish
from service.domain.schedule import check_delay, poll_cap, poll_start
from service.errors import UpstreamRejected, UpstreamUnavailable
from service.models import Turn

log = structlog.get_logger(__name__)

# Keys we add to a run's metadata; user keys of the same name are overwritten.
TURN_TAG = "rs_turn"
ATTEMPT_TAG = "rs_attempt"

# A create given less time than this is not sent (the attempt is abandoned and retried).
MIN_CREATE_S = 1.0


class LeaseHeld(Exception):
    """Another attempt owns the turn's start lease for `seconds` more: look again then."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"a start attempt holds the lease for {seconds:.1f} s more")
        self.seconds = seconds


class Attempt(msgspec.Struct, kw_only=True):
    turn: Turn
    number: int
    previous_interaction_id: str | None
    previous_lost: bool  # the attempt before never came back (see doubtful_attempts)
    create_by: float  # time.monotonic() deadlines, inside the lease
    record_by: float


def attempt_deadlines(settings: Settings, began: float) -> tuple[float, float]:
    """(create_by, record_by) for an attempt begun at monotonic time `began` (taken before its
    transaction, so never later than the lease's start as Postgres stamps it).

    With the defaults (lease 45 s, create 30 s): the create must have answered by 35 s, the run
    be stored by 40 s, and 5 s of the lease are left for clocks and the last statement's trip.
    """
    margin = min(5.0, settings.start_lease_s / 6)
    return began + settings.start_lease_s - 2 * margin, began + settings.start_lease_s - margin


async def start_turn(
    pool: asyncpg.Pool, parallel: ParallelClient, queue: ArqRedis | None, settings: Settings,
    turn_id: str, webhook_url: str | None = None,
    before_create: Callable[[], Awaitable[None]] | None = None,
) -> str:
    """Create the turn's Parallel run if the turn is next in its conversation; returns what happened.

    `before_create` may raise UpstreamUnavailable to defer (the global creation rate limit).
    Raises UpstreamUnavailable (retry later), LeaseHeld (another attempt is live), or what
    asyncpg raises while Postgres is away.
    """
    began = time.monotonic()
    async with pool.acquire() as conn, conn.transaction():
        begun = await _begin(conn, settings, turn_id, began)
    if isinstance(begun, str):
        if begun == "create_in_doubt":
            await _fail_in_doubt(pool, queue, settings, turn_id, None)
        return begun
    attempt = begun
    if attempt.previous_lost:
        _lost(turn_id, attempt.number - 1)
    # No connection is held while Parallel answers.
    try:
        run = await _create(parallel, attempt, webhook_url, before_create)
    except UpstreamUnavailable as exc:
        return await _abandon(pool, queue, settings, attempt, exc)
    except UpstreamRejected as exc:
        await finish(pool, queue, settings, turn_id, "failed", attempt=attempt.number,
                     error={"code": exc.code, "message": exc.detail})
        return "rejected"
    return await _record_run(pool, settings, attempt, run)


async def _begin(
    conn: asyncpg.Connection, settings: Settings, turn_id: str, began: float
) -> Attempt | str:
    if await conversation_db.lock_conversation_of_turn(conn, turn_id) is None:
        return "gone"
    turn = await turn_db.lock_turn(conn, turn_id)
    assert turn is not None
    if turn.status != "queued" or turn.run_id is not None:
        return "not-queued"
    head = await turn_db.head_turn(conn, turn.conversation_id)
    if head is None or head["id"] != turn_id:
        return "waiting"
    state = await db.attempt_state(conn, turn_id, settings.start_lease_s)
    if state.held and state.lease_left_s > 0:
        raise LeaseHeld(state.lease_left_s)
    if 0 < settings.max_doubtful_attempts <= len(state.doubtful) + state.held:
        # One more create could bill one more run: the turn fails instead.
        if state.held:
            _lost(turn_id, state.attempts)
            await db.abandon_start(conn, turn_id, state.attempts, in_doubt=True)
        return "create_in_doubt"
    previous = await turn_db.previous_interaction(conn, turn.parent_turn_id)
    number = await db.begin_start(conn, turn_id, previous, state.attempts, settings.start_lease_s)
    assert number is not None  # the turn is locked and its lease was free
    create_by, record_by = attempt_deadlines(settings, began)
    return Attempt(turn=turn, number=number, previous_interaction_id=previous,
                   previous_lost=state.held, create_by=create_by, record_by=record_by)


def _lost(turn_id: str, attempt: int) -> None:
    """The attempt never came back (its worker died or froze; its lease ran out), maybe after
    Parallel had made its run."""
    log.warning("create_in_doubt", turn_id=turn_id, attempt=attempt, reason="attempt_lost")
    metrics.create_in_doubt("attempt_lost")


async def _create(
    parallel: ParallelClient, attempt: Attempt, webhook_url: str | None,
    before_create: Callable[[], Awaitable[None]] | None,
) -> RunInfo:
    """Call Parallel's create within the attempt's time. Raises UpstreamUnavailable (in_doubt
    only when the request may have reached Parallel) or UpstreamRejected."""
    try:
        if before_create is not None:
            await before_create()
    except jobs.QUEUE_UNAVAILABLE as exc:  # the creation limiter lives in Redis
        raise UpstreamUnavailable(f"Creation limiter unreachable: {exc!r}") from exc
    timeout_s = attempt.create_by - time.monotonic()
    if timeout_s < MIN_CREATE_S:
        raise UpstreamUnavailable("The attempt's lease has too little time left for a create.")
    turn = attempt.turn
    return await parallel.create_run(
        input=turn.input,
        processor=turn.processor,
        output_schema=turn.output_schema,
        previous_interaction_id=attempt.previous_interaction_id,
        metadata={**turn.metadata, TURN_TAG: turn.id, ATTEMPT_TAG: str(attempt.number)},
        webhook_url=webhook_url,
        timeout_s=timeout_s,
    )


async def _abandon(
    pool: asyncpg.Pool, queue: ArqRedis | None, settings: Settings, attempt: Attempt,
    exc: UpstreamUnavailable,
) -> str:
    """End the attempt without a run; fail the turn once too many creates are in doubt, else
    re-raise `exc` so the caller retries later."""
    turn_id = attempt.turn.id
    if exc.in_doubt:
        # Parallel may have made a run we cannot look up (no list endpoint): the next attempt
        # may pay for a second one. See README, "Guarantees".
        reason = "timeout" if exc.timed_out else "connection"
        log.warning("create_in_doubt", turn_id=turn_id, attempt=attempt.number, reason=reason,
                    error=exc.detail)
        metrics.create_in_doubt(reason)
    doubtful = await db.abandon_start(pool, turn_id, attempt.number, in_doubt=exc.in_doubt)
    if doubtful is not None and doubtful >= settings.max_doubtful_attempts:
        await _fail_in_doubt(pool, queue, settings, turn_id, attempt.number)
        return "create_in_doubt"
    raise exc


async def _fail_in_doubt(
    pool: asyncpg.Pool, queue: ArqRedis | None, settings: Settings, turn_id: str,
    attempt: int | None,
) -> None:
    """Fail the turn rather than pay for one more run: max_doubtful_attempts creates may each
    have made a run already."""
    message = (
        f"Parallel did not answer {settings.max_doubtful_attempts} requests to create this "
        "turn's run in time; each may have made a billed run that cannot be looked up, so the "
        "turn is not tried again. Post the question again to retry."
    )
    await finish(pool, queue, settings, turn_id, "failed", attempt=attempt,
                 error={"code": "create_in_doubt", "message": message})


async def _record_run(
    pool: asyncpg.Pool, settings: Settings, attempt: Attempt, run: RunInfo
) -> str:
    """Store the new run's ids, retrying while Postgres is away, but not after the attempt's
    record deadline (a try under way then is left to finish: its write is fenced)."""
    turn_id = attempt.turn.id
    delay = 0.2
    while True:
        try:
            async with pool.acquire() as conn:
                return await _record_run_once(conn, settings, attempt, run)
        except DB_UNAVAILABLE as exc:
            if time.monotonic() + delay > attempt.record_by:
                _not_recorded(attempt, run, exc)
                raise
            log.warning("record_run_retry", turn_id=turn_id, run_id=run.run_id, error=repr(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        except BaseException as exc:  # cancelled (shutdown, job timeout) or a bug
            _not_recorded(attempt, run, exc)
            raise


def _not_recorded(attempt: Attempt, run: RunInfo, exc: BaseException) -> None:
    """The run exists and we know its id, but Postgres never stored it: the log line is the
    only record left (the next attempt will find this one lost, in doubt)."""
    log.error("run_not_recorded", turn_id=attempt.turn.id, attempt=attempt.number,
              run_id=run.run_id, interaction_id=run.interaction_id, error=repr(exc))
    metrics.extra_run("unrecorded")


async def _record_run_once(
    conn: asyncpg.Connection, settings: Settings, attempt: Attempt, run: RunInfo
) -> str:
    turn = attempt.turn
    first_check = check_delay(turn.processor, 0, poll_start(settings), poll_cap(settings))
    async with conn.transaction():
        if await conversation_db.lock_conversation_of_turn(conn, turn.id) is None:
            recorded = None
        else:
            recorded = await db.record_run(conn, turn.id, attempt.number, run.run_id,
                                           run.interaction_id, first_check)
            if recorded.turn is not None and recorded.turn.status == "running":
                await event_db.insert_event(conn, "turn.running", recorded.turn)
    if recorded is None or recorded.turn is None:
        reason = "turn_deleted" if recorded is None else "stale_attempt"
        # Billed and never read; kept in turn_extra_run (unless the turn is gone). See README.
        log.warning("extra_run", turn_id=turn.id, attempt=attempt.number, run_id=run.run_id,
                    reason=reason)
        if recorded is None or recorded.extra:
            metrics.extra_run(reason)
        return "extra-run"
    log.info("run_started", turn_id=turn.id, run_id=run.run_id, status=recorded.turn.status)
    if recorded.turn.status == "running":
        metrics.turn_transition(recorded.turn)
        return "started"
    return recorded.turn.status
