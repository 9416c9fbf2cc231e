"""SQL for task groups: the groups the service owns, which attempt added its run to which group,
and the lease of the worker following each group's event stream."""

from __future__ import annotations

from typing import Any

import asyncpg

INSERT_GROUP_SQL = """
INSERT INTO task_group (id, follower, lease_until)
VALUES ($1, $2, now() + make_interval(secs => $3))
"""


async def insert_group(
    conn: asyncpg.Connection | asyncpg.Pool, taskgroup_id: str, follower: str, lease_s: float
) -> None:
    """A new group, followed by its maker from the start (its runs' events come on its stream)."""
    await conn.execute(INSERT_GROUP_SQL, taskgroup_id, follower, lease_s)


# Before an add is sent: each attempt that still owns its turn's lease names the group its run
# goes to (a later attempt lists that group before creating another run), and the group counts
# them. Attempts that lost their lease meanwhile are left out of the add.
ASSIGN_SQL = """
WITH assigned AS (
    UPDATE turn AS t
    SET attempt_groups = t.attempt_groups || jsonb_build_object(d.attempt::text, $1::text)
    FROM unnest($2::text[], $3::int[]) AS d(id, attempt)
    WHERE t.id = d.id AND t.start_attempts = d.attempt AND t.start_attempt_at IS NOT NULL
      AND t.run_id IS NULL AND t.status = 'queued'
    RETURNING t.id
), counted AS (
    UPDATE task_group SET run_count = run_count + (SELECT count(*) FROM assigned) WHERE id = $1
)
SELECT id FROM assigned
"""


async def assign_attempts(
    conn: asyncpg.Connection | asyncpg.Pool, taskgroup_id: str, attempts: list[tuple[str, int]]
) -> set[str]:
    """Record that these (turn id, attempt) add their run to the group; the turn ids that may."""
    rows = await conn.fetch(ASSIGN_SQL, taskgroup_id, [t for t, _ in attempts],
                            [a for _, a in attempts])
    return {r["id"] for r in rows}


# The attempt goes one by one after all: its create may make a run no group lists.
UNMARK_SQL = """
UPDATE turn SET attempt_groups = attempt_groups - $2::text
WHERE id = $1 AND start_attempts = $3 AND attempt_groups ->> $2::text = ''
"""


async def unmark_attempt(
    conn: asyncpg.Connection | asyncpg.Pool, turn_id: str, attempt: int
) -> None:
    """Before an attempt begun in group mode creates its run one by one."""
    await conn.execute(UNMARK_SQL, turn_id, str(attempt), attempt)


ATTEMPT_GROUPS_SQL = "SELECT attempt_groups FROM turn WHERE id = $1"


async def attempt_groups(conn: asyncpg.Connection | asyncpg.Pool, turn_id: str) -> dict[str, str]:
    """{attempt number: taskgroup_id} of the turn's attempts begun in group mode ("" for one
    that had not sent its add yet)."""
    groups: dict[str, Any] | None = await conn.fetchval(ATTEMPT_GROUPS_SQL, turn_id)
    return {str(k): str(v) for k, v in (groups or {}).items()}


CLOSE_GROUP_SQL = "UPDATE task_group SET closed_at = now() WHERE id = $1 AND closed_at IS NULL"


async def close_group(conn: asyncpg.Connection | asyncpg.Pool, taskgroup_id: str) -> None:
    """No run is added to the group any more (rotated); once none is active it is finished."""
    await conn.execute(CLOSE_GROUP_SQL, taskgroup_id)


# Groups nobody follows (new and unclaimed, or their follower's lease ran out: it died) are
# taken over; the worker's own are renewed in the same statement.
CLAIM_GROUPS_SQL = """
UPDATE task_group AS g SET follower = $1, lease_until = now() + make_interval(secs => $2)
FROM (
    SELECT id FROM task_group
    WHERE finished_at IS NULL AND (follower = $1 OR lease_until IS NULL OR lease_until < now())
    ORDER BY follower = $1 DESC, created_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
) free
WHERE g.id = free.id
RETURNING g.id, g.event_cursor,
    g.closed_at IS NOT NULL OR g.created_at < now() - make_interval(secs => $4) AS closed
"""


async def claim_groups(
    conn: asyncpg.Connection | asyncpg.Pool, follower: str, lease_s: float, limit: int,
    max_age_s: float,
) -> list[asyncpg.Record]:
    """Renew this follower's leases and take over unfollowed groups, `limit` in all. A group
    older than max_age_s (plus a minute) counts as closed even if its maker died before
    closing it: no run is added to it any more."""
    return await conn.fetch(CLAIM_GROUPS_SQL, follower, lease_s, limit, max_age_s + 60)


SAVE_CURSOR_SQL = """
UPDATE task_group SET event_cursor = $3 WHERE id = $1 AND follower = $2 RETURNING id
"""


async def save_cursor(
    conn: asyncpg.Connection | asyncpg.Pool, taskgroup_id: str, follower: str, cursor: str
) -> bool:
    """Store how far the stream was handled; False when another worker follows it now."""
    return await conn.fetchval(SAVE_CURSOR_SQL, taskgroup_id, follower, cursor) is not None


FINISH_GROUP_SQL = """
UPDATE task_group SET finished_at = now(), follower = NULL, lease_until = NULL,
    closed_at = COALESCE(closed_at, now())
WHERE id = $1 AND follower = $2
"""


async def finish_group(
    conn: asyncpg.Connection | asyncpg.Pool, taskgroup_id: str, follower: str
) -> None:
    """A closed group whose every run has ended: its stream is not followed any more."""
    await conn.execute(FINISH_GROUP_SQL, taskgroup_id, follower)


RELEASE_SQL = """
UPDATE task_group SET follower = NULL, lease_until = NULL
WHERE follower = $1 AND id = ANY($2::text[])
"""


async def release_groups(
    conn: asyncpg.Connection | asyncpg.Pool, follower: str, taskgroup_ids: list[str]
) -> None:
    """Let other workers take these groups' streams at once (a clean shutdown)."""
    await conn.execute(RELEASE_SQL, follower, taskgroup_ids)


# The group's running turns leave its slow safety-net schedule: they are checked now, then on
# the ordinary poll schedule, as runs made one by one are (their group's stream is not working).
POLL_RUNS_OF_SQL = """
UPDATE turn SET taskgroup_id = NULL, next_check_at = LEAST(next_check_at, now())
WHERE taskgroup_id = $1 AND status = 'running'
"""


async def poll_runs_of(conn: asyncpg.Connection | asyncpg.Pool, taskgroup_id: str) -> int:
    """Put the group's running turns back on the ordinary poll schedule; how many."""
    status = await conn.execute(POLL_RUNS_OF_SQL, taskgroup_id)
    return int(status.split()[-1])
