"""SQL for start attempts: the lease an attempt holds while it creates its turn's Parallel run.

Attempt N of a turn owns the lease while `start_attempts = N` and `start_attempt_at` is set.
Every write an attempt makes (begin, record its run, abandon, fail the turn) is conditional on
that number, so a stale attempt (its lease ran out and a newer one began) changes nothing of the
newer attempt's state; the run a stale attempt made is kept in turn_extra_run instead.
"""

from __future__ import annotations

import asyncpg
import msgspec

from service.db.events import head_of
from service.db.turns import TURN_COLUMNS, to_turn
from service.db.webhook_deliveries import delivery_ids
from service.models import Turn

# Migration 0014's begin_attempt: the conversation locked, then the turn, its attempts as
# Postgres's clock sees the lease and its conversation's head, and the attempt begun (or the
# turn failed, too many creates being in doubt), in one statement.
BEGIN_ATTEMPT_SQL = "SELECT * FROM begin_attempt($1, $2, $3, $4, $5, $6, $7)"


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    """What begin_attempt (migration 0014) did: see its comment for each outcome."""

    outcome: str  # gone | not-queued | waiting | lease-held | create_in_doubt | begun
    turn: Turn | None = None  # as locked; as failed for create_in_doubt
    number: int | None = None  # begun: the attempt's number
    previous_interaction_id: str | None = None  # begun: what its run continues
    previous_lost: bool = False  # the attempt before never came back (its lease ran out)
    lost_attempt: int | None = None  # its number, when no task group can find its run
    lease_left_s: float = 0.0  # lease-held: how long another attempt's lease is live
    head: tuple[str, str] | None = None  # create_in_doubt: the conversation's next turn


async def begin_attempt(
    pool: asyncpg.Pool, turn_id: str, *, lease_s: float, grouped: bool, max_doubtful: int,
    doubt_error: dict[str, str],
) -> Attempt:
    """Begin a start attempt of the turn, or say why not (committed on its own)."""
    row = await pool.fetchrow(BEGIN_ATTEMPT_SQL, turn_id, lease_s, grouped, max_doubtful,
                              doubt_error, *delivery_ids())
    assert row is not None  # one row always
    turn = None if row["turn_now"] is None else msgspec.convert(row["turn_now"], Turn)
    return Attempt(
        outcome=row["outcome"], turn=turn, number=row["attempt"],
        previous_interaction_id=row["previous"], previous_lost=bool(row["previous_lost"]),
        lost_attempt=row["lost_attempt"], lease_left_s=float(row["lease_left_s"] or 0),
        head=head_of(row),
    )


async def begin_start(
    conn: asyncpg.Connection, turn_id: str, previous: str | None, after: int, lease_s: float,
    grouped: bool = False,
) -> int | None:
    """Begin the attempt after attempt `after` (migration 0014's begin_start, which
    begin_attempt calls), before calling Parallel; its number, or None when another attempt
    began first or still holds a live lease. `grouped`: it will make its run by adding it to a
    task group (service.domain.groups), or not at all."""
    number: int | None = await conn.fetchval("SELECT begin_start($1, $2, $3, $4, $5)",
                                             turn_id, previous, after, lease_s, grouped)
    return number


async def abandon_start(
    conn: asyncpg.Connection | asyncpg.Pool, turn_id: str, attempt: int, *, in_doubt: bool
) -> int | None:
    """End attempt `attempt` without a run, so the next one need not wait out the lease
    (migration 0014's abandon_start).

    `in_doubt`: its create may have made a run (it joins doubtful_attempts). Returns how many
    attempts are in doubt now (an attempt that added to a task group is not: its run can be
    listed), or None when the attempt no longer owned the lease."""
    doubtful: int | None = await conn.fetchval("SELECT abandon_start($1, $2, $3)", turn_id,
                                               attempt, in_doubt)
    return doubtful


# Migration 0014's record_run: the conversation locked, then the run stored, in one statement.
# The attempt that owns the lease (it is the newest and has not ended: abandoned, or its turn
# failed for it) records its run: a queued turn becomes running, with its turn.running event; a
# cancelled one stays cancelled and says its run may go on. Any other attempt's run is an extra
# run. The run was created with the previous_interaction_id the attempt began with, unless it
# was reseeded ($6: created without it, Parallel having refused it).
RECORD_RUN_SQL = "SELECT * FROM record_run($1, $5, $2, $3, $4, $6, $7)"


class Recorded(msgspec.Struct, frozen=True):
    turn: Turn | None  # the turn with its run, when this attempt owned the lease
    extra: bool  # otherwise the run was stored as an extra run (False: it was already there)


async def record_run(
    conn: asyncpg.Connection | asyncpg.Pool, turn_id: str, attempt: int, run_id: str,
    interaction_id: str, first_check_s: float, taskgroup_id: str | None = None, *,
    reseeded: bool = False,
) -> Recorded | None:
    """Store attempt `attempt`'s run (`reseeded`: created without the attempt's
    previous_interaction_id): as the turn's run if that attempt still owns the lease, else in
    turn_extra_run; committed on its own. None when the turn is gone.
    `taskgroup_id`: the task group the run is in (its polling is then a slow safety net)."""
    row = await conn.fetchrow(
        RECORD_RUN_SQL, turn_id, run_id, interaction_id, first_check_s, attempt, reseeded,
        taskgroup_id,
    )
    if row is None:
        return None
    if row["turn_after"] is None:
        return Recorded(None, row["extra"])
    return Recorded(msgspec.convert(row["turn_after"], Turn), False)


# Migration 0014's fail_start: Parallel refused the attempt's create; the turn fails, unless a
# newer attempt owns it by now (or the turn left `queued`: a cancel won).
FAIL_START_SQL = f"SELECT {TURN_COLUMNS} FROM fail_start($1, $2, $3) AS t"


async def fail_start(
    conn: asyncpg.Connection, turn_id: str, attempt: int, error: dict[str, str]
) -> Turn | None:
    """Fail the queued turn for attempt `attempt`; None when that attempt no longer owns it."""
    row = await conn.fetchrow(FAIL_START_SQL, turn_id, attempt, error)
    return to_turn(row) if row else None


EXTRA_RUNS_SQL = """
SELECT attempt, run_id, interaction_id, found_at FROM turn_extra_run WHERE turn_id = $1
ORDER BY attempt
"""


async def extra_runs(conn: asyncpg.Connection | asyncpg.Pool, turn_id: str) -> list[asyncpg.Record]:
    """The runs the turn's stale attempts made (billed, not followed), oldest attempt first."""
    return await conn.fetch(EXTRA_RUNS_SQL, turn_id)
