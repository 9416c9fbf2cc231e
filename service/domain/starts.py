"""Starting a turn: one start attempt creates its Parallel run, inside a lease.

An attempt is begun in Postgres (a lease of START_LEASE_S) before Parallel is called, and every
write it makes afterwards is conditional on still owning that lease (service.db.attempts). It
ends strictly inside the lease: its create gets at most CREATE_TIMEOUT_S, and storing the run is
tried within the lease while it may still become the turn's run. A store still failing then
keeps being retried until the job's own deadline: its write is fenced, so once a newer attempt
holds the lease it lands in turn_extra_run with its run id instead. See README, "Guarantees",
for what may still be billed.

Each write is a transition of service.domain.lifecycle (begin_attempt, record_run,
abandon_attempt, fail_attempt), which locks the conversation row first, then the turn.

A create refused for its previous_interaction_id is sent once more in the same attempt, without
it and with the lineage's questions and answers in front of the input (service.domain.reseed):
the refusal made no run, so the attempt still makes at most one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import msgspec
import structlog

from service import metrics
from service import queue as jobs
from service.clients.parallel import ParallelClient, RunInfo
from service.config import Settings
from service.db.pool import DB_UNAVAILABLE
from service.domain import attempts, followups, reseed
from service.domain.groups import GroupStarts, adopt
from service.domain.schedule import check_delay, poll_cap, poll_start, run_deadline_s
from service.errors import UpstreamRejected, UpstreamUnavailable
from service.models import Turn

log = structlog.get_logger(__name__)

# Keys we add to a run's metadata; user keys of the same name are overwritten.
TURN_TAG = "rs_turn"
ATTEMPT_TAG = "rs_attempt"

# A create given less time than this is not sent (the attempt is abandoned and retried).
MIN_CREATE_S = 1.0


class Attempt(msgspec.Struct, kw_only=True):
    turn: Turn
    number: int
    previous_interaction_id: str | None
    previous_lost: bool  # the attempt before never came back (see doubtful_attempts)
    create_by: float  # time.monotonic() deadlines, inside the lease
    record_by: float
    give_up_by: float  # past the lease, inside the start job's timeout (worker.main)


# How long past its lease an attempt keeps trying to store a run it made (fenced: as an extra
# run once a newer attempt holds the lease); worker.main gives the start job 10 s more.
RECORD_GRACE_S = 30.0


def attempt_deadlines(settings: Settings, began: float) -> tuple[float, float, float]:
    """(create_by, record_by, give_up_by) for an attempt begun at monotonic time `began` (taken
    before its transaction, so never later than the lease's start as Postgres stamps it).

    With the defaults (lease 45 s, create 30 s): the create must have answered by 35 s and the
    run be stored by 40 s to become the turn's run, 5 s of the lease being left for clocks and
    the last statement's trip; a store still failing is retried until 75 s, fenced.
    """
    margin = min(5.0, settings.start_lease_s / 6)
    lease_end = began + settings.start_lease_s
    return lease_end - 2 * margin, lease_end - margin, lease_end + RECORD_GRACE_S


async def start_turn(
    pool: asyncpg.Pool, parallel: ParallelClient, queue: jobs.Queue | None, settings: Settings,
    turn_id: str, webhook_url: str | None = None,
    before_create: Callable[[], Awaitable[None]] | None = None,
    groups: GroupStarts | None = None,
) -> str:
    """Create the turn's Parallel run if it is next in its conversation; returns what happened.

    `before_create` may raise UpstreamUnavailable to defer (the global creation rate limit).
    With `groups` (group mode), the run is added to a task group, and an attempt after the
    first adopts the run an earlier one added to its group, if there is one, instead.
    Raises UpstreamUnavailable (retry later), LeaseHeld (another attempt is live), or what
    asyncpg raises while Postgres is away.
    """
    began = time.monotonic()
    grouped = groups is not None and groups.active
    begun, follow_ups = await attempts.begin_attempt(pool, settings, turn_id, grouped)
    await followups.after_commit(follow_ups, queue, settings)
    if isinstance(begun, str):
        return begun
    create_by, record_by, give_up_by = attempt_deadlines(settings, began)
    attempt = Attempt(turn=begun.turn, number=begun.number,
                      previous_interaction_id=begun.previous_interaction_id,
                      previous_lost=begun.previous_lost, create_by=create_by,
                      record_by=record_by, give_up_by=give_up_by)
    # No connection is held while Parallel answers.
    try:
        adopted = await _adopted(pool, parallel, attempt, groups)
        if adopted is not None:
            run, reseeded = adopted, False  # made by an earlier attempt, chained as it began
        else:
            run, reseeded = await _create_or_reseed(pool, parallel, attempt, webhook_url,
                                                    before_create, groups if grouped else None)
    except UpstreamUnavailable as exc:
        return await _abandon(pool, queue, settings, attempt, exc)
    except UpstreamRejected as exc:
        _, follow_ups = await attempts.fail_attempt(
            pool, turn_id, attempt.number, {"code": exc.code, "message": exc.detail})
        await followups.after_commit(follow_ups, queue, settings)
        return "rejected"
    return await _record_run(pool, queue, settings, attempt, run, reseeded)


async def _create_or_reseed(
    pool: asyncpg.Pool, parallel: ParallelClient, attempt: Attempt, webhook_url: str | None,
    before_create: Callable[[], Awaitable[None]] | None, groups: GroupStarts | None = None,
) -> tuple[RunInfo, bool]:
    """Create the attempt's run; when Parallel refuses a create that carried a
    previous_interaction_id (a 4xx it does not ask to retry: expired or unknown, Parallel
    documents no code), create it once more without it, reseeded. A refused create made no run,
    so the attempt still makes at most one. Returns (run, reseeded). Raises as _create."""
    try:
        return await _create(parallel, attempt, webhook_url, before_create,
                             groups=groups), False
    except UpstreamRejected as exc:
        if attempt.previous_interaction_id is None:
            raise
        log.warning("chain_refused", turn_id=attempt.turn.id, attempt=attempt.number,
                    previous_interaction_id=attempt.previous_interaction_id,
                    status=exc.status_code, error=exc.detail)
    try:
        seeded = await reseed.reseeded_input(pool, attempt.turn)
    except DB_UNAVAILABLE as exc:  # no run was made: end the attempt, retry later
        raise UpstreamUnavailable(f"No lineage to reseed with (Postgres): {exc!r}") from exc
    try:
        run = await _create(parallel, attempt, webhook_url, before_create, seeded, groups)
    except UpstreamRejected:
        metrics.context_reseeded("refused")
        raise
    metrics.context_reseeded("created")
    return run, True


async def _adopted(
    pool: asyncpg.Pool, parallel: ParallelClient, attempt: Attempt, groups: GroupStarts | None
) -> RunInfo | None:
    """In group mode, the run an earlier attempt of the turn may have made (its worker died, or
    its answer was lost), listed by its group; None when there is none. Raises
    UpstreamUnavailable (no listing now: look again later, create nothing meanwhile)."""
    if groups is None or attempt.number == 1:
        return None
    try:
        return await adopt(pool, parallel, attempt.turn.id, attempt.number)
    except UpstreamUnavailable:
        if groups.active:
            raise
        return None  # groups are given up on here: one by one, as without them


async def _create(
    parallel: ParallelClient, attempt: Attempt, webhook_url: str | None,
    before_create: Callable[[], Awaitable[None]] | None,
    reseeded_input: str | dict[str, Any] | None = None, groups: GroupStarts | None = None,
) -> RunInfo:
    """Call Parallel's create within the attempt's time: chained as the attempt began, or,
    given `reseeded_input`, unchained with that input. Raises UpstreamUnavailable (in_doubt
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
    chained = reseeded_input is None
    create_run = groups.create_run if groups is not None else parallel.create_run
    return await create_run(
        input=turn.input if reseeded_input is None else reseeded_input,
        processor=turn.processor,
        output_schema=turn.output_schema,
        previous_interaction_id=attempt.previous_interaction_id if chained else None,
        metadata={**turn.metadata, TURN_TAG: turn.id, ATTEMPT_TAG: str(attempt.number)},
        webhook_url=webhook_url,
        timeout_s=timeout_s,
    )


async def _abandon(
    pool: asyncpg.Pool, queue: jobs.Queue | None, settings: Settings, attempt: Attempt,
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
    outcome, follow_ups = await attempts.abandon_attempt(
        pool, settings, turn_id, attempt.number, in_doubt=exc.in_doubt)
    await followups.after_commit(follow_ups, queue, settings)
    if outcome == "create_in_doubt":
        return outcome
    raise exc


async def _record_run(
    pool: asyncpg.Pool, queue: jobs.Queue | None, settings: Settings, attempt: Attempt,
    run: RunInfo, reseeded: bool,
) -> str:
    """Store the new run's ids, retrying while Postgres is away. Past the attempt's record
    deadline the run can no longer be the turn's for sure, but it is still known by id: the
    fenced write keeps it (as the turn's run while no newer attempt took over, else as an extra
    run), so retries go on until give_up_by, and only then is the log line its only record."""
    turn = attempt.turn
    grouped = run.task_group_id is not None
    first_check = check_delay(turn.processor, 0, poll_start(settings, grouped),
                              poll_cap(settings, grouped))
    first_check = min(first_check, run_deadline_s(settings, turn.processor) + 0.5)
    if not run.is_active:  # adopted after it ended: its group's stream has told it already
        first_check = 0.0
    delay = 0.2
    while True:
        try:
            outcome, follow_ups = await attempts.record_run(
                pool, turn, attempt.number, run.run_id, run.interaction_id, first_check,
                run.task_group_id, reseeded=reseeded)
        except DB_UNAVAILABLE as exc:
            if time.monotonic() + delay > attempt.give_up_by:
                _not_recorded(attempt, run, exc)
                raise
            late = time.monotonic() > attempt.record_by
            log.warning("record_run_retry", turn_id=turn.id, run_id=run.run_id, error=repr(exc),
                        past_lease=late)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        except BaseException as exc:  # cancelled (shutdown, job timeout) or a bug
            _not_recorded(attempt, run, exc)
            raise
        else:
            await followups.after_commit(follow_ups, queue, settings)
            return outcome


def _not_recorded(attempt: Attempt, run: RunInfo, exc: BaseException) -> None:
    """The run exists and we know its id, but Postgres never stored it: the log line is the
    only record left (the next attempt will find this one lost, in doubt)."""
    log.error("run_not_recorded", turn_id=attempt.turn.id, attempt=attempt.number,
              run_id=run.run_id, interaction_id=run.interaction_id, error=repr(exc))
    metrics.extra_run("unrecorded")
