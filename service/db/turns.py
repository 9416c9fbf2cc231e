"""SQL for turns: what the API reads and writes, and the worker's schedule."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from service.db.events import head_of
from service.db.webhook_deliveries import delivery_ids
from service.models import Turn

TURN_COLUMNS = """
    t.id, t.conversation_id, t.seq, t.parent_turn_id, t.input, t.processor, t.output_schema,
    t.metadata, t.status, t.run_id, t.interaction_id, t.previous_interaction_id, t.output,
    t.basis, t.error, t.upstream_may_continue, t.context, t.created_at, t.started_at,
    t.completed_at
"""


def to_turn(row: asyncpg.Record) -> Turn:
    return msgspec.convert(dict(row), Turn)


TURN_BY_KEY_SQL = """
SELECT id, status, request_hash, first_response FROM turn
WHERE conversation_id = $1 AND idempotency_key = $2
"""


async def get_idempotent_answer(
    conn: asyncpg.Connection | asyncpg.Pool, conversation_id: str, key: str
) -> asyncpg.Record | None:
    return await conn.fetchrow(TURN_BY_KEY_SQL, conversation_id, key)


TURN_BY_ID_SQL = f"""
SELECT {TURN_COLUMNS} FROM turn t
WHERE t.id = $1 AND t.conversation_id = $2 AND t.tenant_id = $3
"""


async def get_turn(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: str, conversation_id: str, turn_id: str
) -> Turn | None:
    row = await conn.fetchrow(TURN_BY_ID_SQL, turn_id, conversation_id, tenant_id)
    return to_turn(row) if row else None


TURN_PARENT_SQL = "SELECT conversation_id FROM turn WHERE id = $1 AND tenant_id = $2"


async def turn_conversation(conn: asyncpg.Connection, tenant_id: str, turn_id: str) -> str | None:
    conversation_id: str | None = await conn.fetchval(TURN_PARENT_SQL, turn_id, tenant_id)
    return conversation_id


LIST_TURNS_SQL = f"""
SELECT {TURN_COLUMNS} FROM turn t
WHERE t.conversation_id = $1 AND t.seq > $2
ORDER BY t.seq
LIMIT $3
"""


async def list_turns(
    conn: asyncpg.Connection | asyncpg.Pool, conversation_id: str, after_seq: int, limit: int
) -> list[Turn]:
    return [to_turn(r) for r in await conn.fetch(LIST_TURNS_SQL, conversation_id, after_seq, limit)]


LOCK_TURN_SQL = f"SELECT {TURN_COLUMNS} FROM turn t WHERE t.id = $1 FOR UPDATE"


async def lock_turn(conn: asyncpg.Connection, turn_id: str) -> Turn | None:
    row = await conn.fetchrow(LOCK_TURN_SQL, turn_id)
    return to_turn(row) if row else None


# Migration 0014: the conversation locked, the turn moved to $2 if it is in one of $7, its
# event appended (with a webhook delivery when the conversation has a webhook), in one statement.
FINISH_TURN_SQL = "SELECT * FROM finish_turn($1, $2, $7::text[], $3, $4, $5, $6, $8, $9)"


class Finished(msgspec.Struct, frozen=True):
    turn: Turn | None  # as it now is, None when it was not in from_statuses (nothing changed)
    head: tuple[str, str] | None  # the conversation's oldest open turn: (id, status)


async def finish_turn(
    conn: asyncpg.Connection | asyncpg.Pool,
    turn_id: str,
    status: str,
    *,
    from_statuses: tuple[str, ...],
    output: Any = None,
    basis: Any = None,
    error: Any = None,
    upstream_may_continue: bool = False,
) -> Finished | None:
    """Move the turn to a terminal status if it is still in one of from_statuses, with its
    event, locking its conversation first; None when the turn is gone. On a pool it commits
    on its own (one round trip); on a connection, with the caller's transaction."""
    row = await conn.fetchrow(
        FINISH_TURN_SQL, turn_id, status, output, basis, error, upstream_may_continue,
        list(from_statuses), *delivery_ids(),
    )
    if row is None:
        return None
    turn = None if row["turn_after"] is None else msgspec.convert(row["turn_after"], Turn)
    return Finished(turn, head_of(row))


OPEN_TURNS_SQL = """
SELECT id, status FROM turn
WHERE conversation_id = $1 AND status IN ('queued', 'running')
ORDER BY seq
"""


async def open_turns(
    conn: asyncpg.Connection | asyncpg.Pool, conversation_id: str
) -> list[asyncpg.Record]:
    return await conn.fetch(OPEN_TURNS_SQL, conversation_id)


HEAD_TURN_SQL = """
SELECT id, status FROM turn
WHERE conversation_id = $1 AND status IN ('queued', 'running')
ORDER BY seq
LIMIT 1
"""


async def head_turn(
    conn: asyncpg.Connection | asyncpg.Pool, conversation_id: str
) -> asyncpg.Record | None:
    """The conversation's oldest open turn: the one running, or the next to start."""
    return await conn.fetchrow(HEAD_TURN_SQL, conversation_id)


RUNNING_TURN_SQL = """
SELECT id, run_id FROM turn
WHERE conversation_id = $1 AND status = 'running' AND run_id IS NOT NULL
ORDER BY seq
LIMIT 1
"""


async def running_turn(
    conn: asyncpg.Connection | asyncpg.Pool, conversation_id: str
) -> tuple[str, str] | None:
    """(turn id, run id) of the conversation's running turn, if one is running."""
    row = await conn.fetchrow(RUNNING_TURN_SQL, conversation_id)
    return (row["id"], row["run_id"]) if row else None


# The completed ancestors of a turn (from its parent up), oldest first: its lineage's questions
# and answers. The walk stops once those found hold more than $2 characters (the oldest row
# returned may then not fit), so a long lineage costs no more than its newest part.
LINEAGE_SQL = """
WITH RECURSIVE ancestor AS (
    SELECT id, parent_turn_id, status, input, output, 0 AS depth,
           CASE WHEN status = 'completed'
                THEN length(input::text) + coalesce(length(output::text), 0) ELSE 0 END AS chars
    FROM turn WHERE id = $1
    UNION ALL
    SELECT t.id, t.parent_turn_id, t.status, t.input, t.output, a.depth + 1,
           a.chars + CASE WHEN t.status = 'completed'
                          THEN length(t.input::text) + coalesce(length(t.output::text), 0)
                          ELSE 0 END
    FROM turn t JOIN ancestor a ON t.id = a.parent_turn_id
    WHERE a.chars <= $2
)
SELECT input, output FROM ancestor WHERE status = 'completed' AND output IS NOT NULL
ORDER BY depth DESC
"""


async def lineage(
    conn: asyncpg.Connection | asyncpg.Pool, parent_turn_id: str | None, max_chars: int
) -> list[tuple[Any, Any]]:
    """(input, output) of the completed turns from `parent_turn_id` up, oldest first: all of
    them, or at least the newest ones holding `max_chars` characters."""
    if parent_turn_id is None:
        return []
    rows = await conn.fetch(LINEAGE_SQL, parent_turn_id, max_chars)
    return [(row["input"], row["output"]) for row in rows]


# Claim due checks: push each claimed turn's next check a lease ahead, so a worker that dies
# mid-check only delays it, and other workers skip rows this one holds.
# Also hands over (and clears) the finished status a webhook reported (report_run).
CLAIM_DUE_SQL = """
UPDATE turn AS t SET next_check_at = now() + make_interval(secs => $2),
    check_count = t.check_count + 1, reported_status = NULL
FROM (
    SELECT id, reported_status FROM turn
    WHERE status = 'running' AND next_check_at <= now()
    ORDER BY next_check_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
) due
WHERE t.id = due.id
RETURNING t.id, t.conversation_id, t.run_id, t.processor, t.started_at, t.check_count,
    t.taskgroup_id, due.reported_status
"""


async def claim_due(
    conn: asyncpg.Connection | asyncpg.Pool, limit: int, lease_s: float
) -> list[asyncpg.Record]:
    return await conn.fetch(CLAIM_DUE_SQL, limit, lease_s)


# `next_check_at > now()`: the check still holds its claim's lease. A webhook that made the
# check due again meanwhile (report_run and check_now set it to now()) must not be pushed back.
RESCHEDULE_SQL = """
UPDATE turn SET next_check_at = now() + make_interval(secs => $2)
WHERE id = $1 AND status = 'running' AND next_check_at > now()
"""


async def reschedule(conn: asyncpg.Connection | asyncpg.Pool, turn_id: str, delay_s: float) -> None:
    await conn.execute(RESCHEDULE_SQL, turn_id, delay_s)


RESCHEDULE_MANY_SQL = """
UPDATE turn AS t SET next_check_at = now() + make_interval(secs => d.delay_s)
FROM unnest($1::text[], $2::float8[]) AS d(id, delay_s)
WHERE t.id = d.id AND t.status = 'running' AND t.next_check_at > now()
"""


async def reschedule_many(
    conn: asyncpg.Connection | asyncpg.Pool, delays: list[tuple[str, float]]
) -> None:
    """Reschedule a follower tick's still-running turns in one statement: (turn id, delay s)."""
    if delays:
        await conn.execute(RESCHEDULE_MANY_SQL, [t for t, _ in delays], [d for _, d in delays])


CHECK_NOW_SQL = """
UPDATE turn SET next_check_at = now() WHERE run_id = $1 AND status = 'running' RETURNING id
"""


async def check_now(conn: asyncpg.Connection | asyncpg.Pool, run_id: str) -> str | None:
    """Make a running turn's check due now (Parallel said its run changed)."""
    turn_id: str | None = await conn.fetchval(CHECK_NOW_SQL, run_id)
    return turn_id


# Parallel's webhook said the run changed (push mode): the check of its running turn is due
# now, with the finished status the webhook reported (kept until the follower claims the check),
# and the workers' followers are woken (channel TURN_CHECKS_CHANNEL). `known`: whether any turn
# has stored the run, running or not (the snapshot is the statement's, before its UPDATE).
TURN_CHECKS_CHANNEL = "turn_checks"
CHECKS_DUE_PAYLOAD = "due"
REPORT_RUN_SQL = f"""
WITH due AS (
    UPDATE turn SET next_check_at = now(), reported_status = coalesce($2, reported_status)
    WHERE run_id = $1 AND status = 'running'
    RETURNING id
), woken AS (
    SELECT pg_notify('{TURN_CHECKS_CHANNEL}', '{CHECKS_DUE_PAYLOAD}') FROM due
)
SELECT (SELECT id FROM due) AS turn_id, (SELECT count(*) FROM woken) AS woken,
    EXISTS (SELECT 1 FROM turn WHERE run_id = $1) AS known
"""


async def report_run(
    conn: asyncpg.Connection | asyncpg.Pool, run_id: str, finished_status: str | None
) -> tuple[str | None, bool]:
    """Make the check of the run's running turn due now and wake the followers; (the turn's id,
    or None when no turn is running it; whether a turn has stored the run at all)."""
    row = await conn.fetchrow(REPORT_RUN_SQL, run_id, finished_status)
    assert row is not None  # one row, always
    return row["turn_id"], bool(row["known"])


# A webhook reported the run finished: claim its turn for a check now, whenever it was due (the
# lease keeps the follower off it meanwhile). Same columns as CLAIM_DUE_SQL.
CLAIM_RUN_SQL = """
UPDATE turn AS t SET next_check_at = now() + make_interval(secs => $2),
    check_count = t.check_count + 1
WHERE t.run_id = $1 AND t.status = 'running'
RETURNING t.id, t.conversation_id, t.run_id, t.processor, t.started_at, t.check_count,
    t.taskgroup_id
"""


async def claim_run(
    conn: asyncpg.Connection | asyncpg.Pool, run_id: str, lease_s: float
) -> asyncpg.Record | None:
    return await conn.fetchrow(CLAIM_RUN_SQL, run_id, lease_s)


RUN_KNOWN_SQL = "SELECT EXISTS (SELECT 1 FROM turn WHERE run_id = $1)"


async def run_known(conn: asyncpg.Connection | asyncpg.Pool, run_id: str) -> bool:
    """Whether some turn has recorded this run (running or not)."""
    return bool(await conn.fetchval(RUN_KNOWN_SQL, run_id))


RUNNING_RUNS_SQL = "SELECT run_id FROM turn WHERE run_id = ANY($1::text[]) AND status = 'running'"


async def running_runs(conn: asyncpg.Connection | asyncpg.Pool, run_ids: list[str]) -> list[str]:
    """Those of the runs whose turn is still running (not known to have ended)."""
    return [row["run_id"] for row in await conn.fetch(RUNNING_RUNS_SQL, run_ids)]


NEXT_DUE_SQL = "SELECT min(next_check_at) FROM turn WHERE status = 'running'"


async def next_due(conn: asyncpg.Connection | asyncpg.Pool) -> datetime | None:
    due: datetime | None = await conn.fetchval(NEXT_DUE_SQL)
    return due


# Heads of conversations that are waiting for a worker: the reconciler re-enqueues them.
STARTABLE_SQL = """
SELECT t.id FROM turn t
WHERE t.status = 'queued'
  AND (t.start_attempt_at IS NULL OR t.start_attempt_at < now() - make_interval(secs => $1))
  AND t.created_at < now() - make_interval(secs => $2)
  AND NOT EXISTS (
      SELECT 1 FROM turn o
      WHERE o.conversation_id = t.conversation_id AND o.status IN ('queued', 'running')
        AND o.seq < t.seq
  )
LIMIT $3
"""


async def startable_turns(
    conn: asyncpg.Connection | asyncpg.Pool, lease_s: float, min_age_s: float, limit: int
) -> list[str]:
    return [r["id"] for r in await conn.fetch(STARTABLE_SQL, lease_s, min_age_s, limit)]
