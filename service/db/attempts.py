"""SQL for start attempts: the lease an attempt holds while it creates its turn's Parallel run.

Attempt N of a turn owns the lease while `start_attempts = N` and `start_attempt_at` is set.
Every write an attempt makes (begin, record its run, abandon, fail the turn) is conditional on
that number, so a stale attempt (its lease ran out and a newer one began) changes nothing of the
newer attempt's state; the run a stale attempt made is kept in turn_extra_run instead.
"""

from __future__ import annotations

import asyncpg
import msgspec

from service.db.turns import TURN_COLUMNS, to_turn
from service.models import Turn

# The turn, locked, with its attempts as Postgres's clock sees the lease, and its conversation's
# head (oldest open turn) in one round trip. Call it with the conversation locked: no turn of it
# opens or closes meanwhile, so the head read here is the one at commit.
# An attempt that added its run to a task group (attempt_groups) is not in doubt for good: the
# next attempt lists the group and adopts the run if it exists (service.domain.groups), so only
# the others count towards max_doubtful_attempts.
LOCK_FOR_START_SQL = f"""
SELECT {TURN_COLUMNS},
    t.start_attempts,
    ARRAY(SELECT a FROM unnest(t.doubtful_attempts) AS a WHERE NOT t.attempt_groups ? a::text)
        AS doubtful,
    t.start_attempt_at IS NOT NULL AS held,
    t.attempt_groups ? t.start_attempts::text AS held_grouped,
    GREATEST(0, EXTRACT(epoch FROM t.start_attempt_at + make_interval(secs => $2) - now()))
        AS lease_left_s,
    (SELECT h.id FROM turn h
     WHERE h.conversation_id = t.conversation_id AND h.status IN ('queued', 'running')
     ORDER BY h.seq LIMIT 1) AS head_id
FROM turn t WHERE t.id = $1
FOR UPDATE OF t
"""


class AttemptState(msgspec.Struct, frozen=True):
    attempts: int  # begun so far; the newest one owns the lease when `held`
    doubtful: list[int]  # attempts in doubt whose run no group listing can find
    held: bool  # the newest attempt has not ended (no run recorded, not abandoned)
    lease_left_s: float  # > 0: its lease is live, nobody may begin another attempt
    held_grouped: bool = False  # the newest attempt added its run to a task group

    @property
    def unresolved(self) -> int:
        """Attempts that may each have made a run nothing can find (held: the newest, if lost)."""
        return len(self.doubtful) + (self.held and not self.held_grouped)


class ForStart(msgspec.Struct, frozen=True):
    turn: Turn
    state: AttemptState
    head_id: str | None  # the conversation's oldest open turn


async def lock_for_start(conn: asyncpg.Connection, turn_id: str, lease_s: float) -> ForStart | None:
    """Lock the turn (its conversation locked already) with its attempt state and its
    conversation's head; None when the turn is gone."""
    row = await conn.fetchrow(LOCK_FOR_START_SQL, turn_id, lease_s)
    if row is None:
        return None
    state = AttemptState(row["start_attempts"], list(row["doubtful"]), row["held"],
                         float(row["lease_left_s"] or 0), row["held_grouped"])
    return ForStart(to_turn(row), state, row["head_id"])


# Begins attempt $3 + 1, only if attempt $3 is still the newest and holds no live lease. An
# attempt still holding a lease that ran out never came back (its worker died or froze, maybe
# after Parallel had made its run): it joins doubtful_attempts. In group mode ($5) the attempt
# is marked as one that makes its run only by adding it to a group (attempt_groups: "" until
# the group is known), so dying before the add leaves no doubt.
BEGIN_START_SQL = """
UPDATE turn AS t SET start_attempts = t.start_attempts + 1, start_attempt_at = now(),
    previous_interaction_id = $2,
    attempt_groups = CASE WHEN $5 THEN t.attempt_groups
                                       || jsonb_build_object((t.start_attempts + 1)::text, '')
                          ELSE t.attempt_groups END,
    doubtful_attempts = CASE WHEN t.start_attempt_at IS NOT NULL
                             THEN t.doubtful_attempts || t.start_attempts
                             ELSE t.doubtful_attempts END
WHERE t.id = $1 AND t.start_attempts = $3 AND t.status = 'queued' AND t.run_id IS NULL
  AND (t.start_attempt_at IS NULL OR t.start_attempt_at <= now() - make_interval(secs => $4))
RETURNING t.start_attempts
"""


async def begin_start(
    conn: asyncpg.Connection, turn_id: str, previous: str | None, after: int, lease_s: float,
    grouped: bool = False,
) -> int | None:
    """Begin the attempt after attempt `after`, before calling Parallel; its number, or None
    when another attempt began first or still holds a live lease. `grouped`: it will make its
    run by adding it to a task group (service.domain.groups), or not at all."""
    number: int | None = await conn.fetchval(BEGIN_START_SQL, turn_id, previous, after, lease_s,
                                             grouped)
    return number


# Only the attempt that owns the lease ends it. A stale attempt is already in doubtful_attempts
# (the attempt that took over its lease put it there), so it has nothing left to write.
ABANDON_START_SQL = """
UPDATE turn SET start_attempt_at = NULL,
    doubtful_attempts = CASE WHEN $3 THEN doubtful_attempts || $2 ELSE doubtful_attempts END
WHERE id = $1 AND start_attempts = $2 AND start_attempt_at IS NOT NULL AND run_id IS NULL
RETURNING cardinality(ARRAY(
    SELECT a FROM unnest(doubtful_attempts) AS a WHERE NOT attempt_groups ? a::text))
"""


async def abandon_start(
    conn: asyncpg.Connection | asyncpg.Pool, turn_id: str, attempt: int, *, in_doubt: bool
) -> int | None:
    """End attempt `attempt` without a run, so the next one need not wait out the lease.

    `in_doubt`: its create may have made a run (it joins doubtful_attempts). Returns how many
    attempts are in doubt now (an attempt that added to a task group is not: its run can be
    listed), or None when the attempt no longer owned the lease."""
    doubtful: int | None = await conn.fetchval(ABANDON_START_SQL, turn_id, attempt, in_doubt)
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
    pool: asyncpg.Pool, turn_id: str, attempt: int, run_id: str, interaction_id: str,
    first_check_s: float, taskgroup_id: str | None = None, *, reseeded: bool = False,
) -> Recorded | None:
    """Store attempt `attempt`'s run (`reseeded`: created without the attempt's
    previous_interaction_id): as the turn's run if that attempt still owns the lease, else in
    turn_extra_run; committed on its own. None when the turn is gone.
    `taskgroup_id`: the task group the run is in (its polling is then a slow safety net)."""
    row = await pool.fetchrow(
        RECORD_RUN_SQL, turn_id, run_id, interaction_id, first_check_s, attempt, reseeded,
        taskgroup_id,
    )
    if row is None:
        return None
    if row["turn_after"] is None:
        return Recorded(None, row["extra"])
    return Recorded(msgspec.convert(row["turn_after"], Turn), False)


# Parallel refused the attempt's create, or too many creates are in doubt: the turn fails,
# unless a newer attempt owns it by now (or the turn left `queued`: a cancel won).
FAIL_START_SQL = f"""
UPDATE turn AS t SET status = 'failed', error = $3, completed_at = now(), next_check_at = NULL,
    start_attempt_at = NULL
WHERE t.id = $1 AND t.start_attempts = $2 AND t.status = 'queued' AND t.run_id IS NULL
RETURNING {TURN_COLUMNS}
"""


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
