"""A turn's start attempts, the transitions of service.domain.lifecycle that take a queued turn
to running (or fail it): an attempt takes the turn's start lease, then stores the run it made,
or gives the lease up (abandon) or fails the turn (Parallel refused the create, or too many
creates went unanswered). Each is one transaction, locking in the lifecycle's order."""

from __future__ import annotations

import asyncpg
import msgspec

from service.config import Settings
from service.db import attempts as attempt_db
from service.db import conversations as conversation_db
from service.domain import lifecycle
from service.domain.followups import NOTHING, Ended, FollowUps, LogLine, transaction
from service.models import Turn


class LeaseHeld(Exception):
    """Another attempt owns the turn's start lease for `seconds` more: look again then."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"a start attempt holds the lease for {seconds:.1f} s more")
        self.seconds = seconds


class Begun(msgspec.Struct, frozen=True, kw_only=True):
    turn: Turn
    number: int
    previous_interaction_id: str | None
    previous_lost: bool  # the attempt before never came back (its lease ran out)


def _lost(turn_id: str, attempt: int) -> FollowUps:
    """The attempt never came back (its worker died or froze), maybe after Parallel made its run."""
    line = LogLine("create_in_doubt", {"turn_id": turn_id, "attempt": attempt,
                                       "reason": "attempt_lost"}, "warning")
    return FollowUps(in_doubt=("attempt_lost",), logs=(line,))


async def begin_attempt(
    pool: asyncpg.Pool, settings: Settings, turn_id: str, grouped: bool = False
) -> tuple[Begun | str, FollowUps]:
    """Begin a start attempt (its lease) if the turn is queued and its conversation's head, or
    say why not: "gone", "not-queued", "waiting", or "create_in_doubt" (too many creates may
    each have made a run already: the turn failed instead). Raises LeaseHeld. `grouped`: the
    attempt adds its run to a task group (attempts.begin_start). One statement (migration
    0014's begin_attempt), locking in the lifecycle's order."""
    attempt = await attempt_db.begin_attempt(
        pool, turn_id, lease_s=settings.start_lease_s, grouped=grouped,
        max_doubtful=settings.max_doubtful_attempts, doubt_error=_doubt_error(settings))
    if attempt.outcome == "lease-held":
        raise LeaseHeld(attempt.lease_left_s)
    # A lost attempt that added its run to a task group is not in doubt: this one lists it.
    lost = NOTHING if attempt.lost_attempt is None else _lost(turn_id, attempt.lost_attempt)
    if attempt.outcome == "create_in_doubt":
        return "create_in_doubt", lost + lifecycle.terminal(turn_id, "failed", attempt.turn,
                                                            attempt.head)
    if attempt.outcome != "begun":
        return attempt.outcome, NOTHING
    assert attempt.turn is not None and attempt.number is not None
    return Begun(turn=attempt.turn, number=attempt.number,
                 previous_interaction_id=attempt.previous_interaction_id,
                 previous_lost=attempt.previous_lost), lost


async def record_run(
    pool: asyncpg.Pool, turn: Turn, attempt: int, run_id: str, interaction_id: str,
    first_check_s: float, taskgroup_id: str | None = None, *, reseeded: bool = False,
) -> tuple[str, FollowUps]:
    """Store the attempt's run (`reseeded`: created without its previous_interaction_id): the
    queued turn becomes running ("started"; a cancelled one keeps it as a run that may go on),
    or, once a newer attempt owns the lease or the turn is gone, the run is an "extra-run"
    (kept in turn_extra_run while the turn exists)."""
    recorded = await attempt_db.record_run(pool, turn.id, attempt, run_id, interaction_id,
                                           first_check_s, taskgroup_id, reseeded=reseeded)
    if recorded is None or recorded.turn is None:
        reason = "turn_deleted" if recorded is None else "stale_attempt"
        # Billed and never read. See README, "Guarantees".
        line = LogLine("extra_run", {"turn_id": turn.id, "attempt": attempt, "run_id": run_id,
                                     "reason": reason}, "warning")
        counted = (reason,) if recorded is None or recorded.extra else ()
        return "extra-run", FollowUps(extra_runs=counted, logs=(line,))
    status = recorded.turn.status
    line = LogLine("run_started", {"turn_id": turn.id, "run_id": run_id, "status": status})
    if status == "running":
        return "started", FollowUps(counted=(recorded.turn,), logs=(line,))
    return status, FollowUps(logs=(line,))


async def abandon_attempt(
    pool: asyncpg.Pool, settings: Settings, turn_id: str, attempt: int, *, in_doubt: bool
) -> tuple[str, FollowUps]:
    """End the attempt without a run, so the next one need not wait out its lease: "abandoned",
    "stale" (it no longer owned the lease), or "create_in_doubt" when this made too many
    creates in doubt (the turn failed). `in_doubt`: its create may have made a run."""
    async with transaction(pool) as conn:
        if await conversation_db.lock_conversation_of_turn(conn, turn_id) is None:
            return "stale", NOTHING
        doubtful = await attempt_db.abandon_start(conn, turn_id, attempt, in_doubt=in_doubt)
        if doubtful is None:
            return "stale", NOTHING
        if doubtful < settings.max_doubtful_attempts:
            return "abandoned", NOTHING
        return "create_in_doubt", await _fail_in_doubt(conn, settings, turn_id, attempt)


async def fail_attempt(
    pool: asyncpg.Pool, turn_id: str, attempt: int, error: dict[str, str]
) -> Ended:
    """Fail the queued turn for its attempt (Parallel refused the create); None, changing
    nothing, once a newer attempt owns the turn or it left `queued` (a cancel won)."""
    async with transaction(pool) as conn:
        if await conversation_db.lock_conversation_of_turn(conn, turn_id) is None:
            return None, NOTHING
        turn = await attempt_db.fail_start(conn, turn_id, attempt, error)
        return turn, await lifecycle.ended(conn, turn_id, "failed", turn)


def _doubt_error(settings: Settings) -> dict[str, str]:
    message = (
        f"Parallel did not answer {settings.max_doubtful_attempts} requests to create this "
        "turn's run in time; each may have made a billed run that cannot be looked up, so the "
        "turn is not tried again. Post the question again to retry."
    )
    return {"code": "create_in_doubt", "message": message}


async def _fail_in_doubt(
    conn: asyncpg.Connection, settings: Settings, turn_id: str, attempt: int
) -> FollowUps:
    turn = await attempt_db.fail_start(conn, turn_id, attempt, _doubt_error(settings))
    return await lifecycle.ended(conn, turn_id, "failed", turn)


# a run's end --------------------------------------------------------------------------------
