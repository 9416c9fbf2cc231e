"""SQL for conversations. Every read is scoped by tenant: another tenant's id is not found."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from service.models import Conversation

# A turn `o` that is open: the conversation is `active` while it has one.
OPEN_TURN = "o.status IN ('queued', 'running')"
CONVERSATION_COLUMNS = f"""
    c.id, c.title, c.processor, c.metadata, c.webhook_url,
    CASE WHEN EXISTS (
        SELECT 1 FROM turn o WHERE o.conversation_id = c.id AND {OPEN_TURN}
    ) THEN 'active' ELSE 'idle' END AS status,
    c.turn_count, c.last_turn_id, c.ttl_seconds, c.expires_at, c.created_at, c.updated_at
"""
# When a conversation with a TTL expires, from its last activity (`at`, an SQL expression).
EXPIRES_AT = "CASE WHEN {ttl} IS NOT NULL THEN {at} + make_interval(secs => {ttl}) END"


def to_conversation(row: asyncpg.Record) -> Conversation:
    return Conversation(**row)


INSERT_CONVERSATION_SQL = f"""
INSERT INTO conversation AS c (
    id, tenant_id, title, processor, metadata, webhook_url, webhook_secret, ttl_seconds,
    last_activity_at, expires_at
) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now(),
          {EXPIRES_AT.format(ttl="$8::int", at="now()")})
RETURNING {CONVERSATION_COLUMNS}
"""


async def insert_conversation(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    id: str,
    tenant_id: str,
    title: str | None,
    processor: str,
    metadata: dict[str, str],
    webhook_url: str | None,
    webhook_secret: str | None,
    ttl_seconds: int | None,
) -> Conversation:
    row = await conn.fetchrow(
        INSERT_CONVERSATION_SQL, id, tenant_id, title, processor, metadata, webhook_url,
        webhook_secret, ttl_seconds,
    )
    assert row is not None  # an INSERT … RETURNING returns its row
    return to_conversation(row)


CONVERSATION_BY_ID_SQL = f"""
SELECT {CONVERSATION_COLUMNS} FROM conversation c WHERE c.id = $1 AND c.tenant_id = $2
"""


async def get_conversation(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: str, conversation_id: str
) -> Conversation | None:
    row = await conn.fetchrow(CONVERSATION_BY_ID_SQL, conversation_id, tenant_id)
    return to_conversation(row) if row else None


def _list_sql(status: str | None = None, metadata: bool = False) -> str:
    """A page of the tenant's conversations, newest first, after the cursor ($2, $3), with the
    filters ANDed: the status (`active`: an open turn; `idle`: none) and, with `metadata`,
    `metadata @> $5`. One statement per combination rather than `($5 IS NULL OR …)`, so that
    each plan can use the filter's index: `active` starts from the tenant's open turns
    (turn_tenant_open_idx: at most MAX_OPEN_TURNS_PER_TENANT of them), `idle` walks the
    tenant's conversations newest first probing turn_open_idx, and a metadata filter reads
    conversation_metadata_idx (GIN). A generic plan, knowing no metadata value, walks the
    tenant's conversations instead; Postgres keeps it for a prepared statement only when its
    estimate is no worse than the custom plans' (tests/integration/test_conversation_search)."""
    where = ["c.tenant_id = $1",
             "($2::timestamptz IS NULL OR (c.created_at, c.id) < ($2::timestamptz, $3::text))"]
    if status == "active":
        where.append(f"c.id IN (SELECT o.conversation_id FROM turn o WHERE o.tenant_id = $1 "
                     f"AND {OPEN_TURN})")
    elif status == "idle":
        where.append(f"NOT EXISTS (SELECT 1 FROM turn o WHERE o.conversation_id = c.id "
                     f"AND {OPEN_TURN})")
    if metadata:
        where.append("c.metadata @> $5::jsonb")
    return (f"SELECT {CONVERSATION_COLUMNS} FROM conversation c\nWHERE "
            + "\n  AND ".join(where) + "\nORDER BY c.created_at DESC, c.id DESC\nLIMIT $4\n")


LIST_CONVERSATIONS_SQL = _list_sql()
LIST_ACTIVE_CONVERSATIONS_SQL = _list_sql("active")
LIST_IDLE_CONVERSATIONS_SQL = _list_sql("idle")
LIST_CONVERSATIONS_BY_METADATA_SQL = _list_sql(metadata=True)
LIST_ACTIVE_CONVERSATIONS_BY_METADATA_SQL = _list_sql("active", metadata=True)
LIST_IDLE_CONVERSATIONS_BY_METADATA_SQL = _list_sql("idle", metadata=True)
LIST_SQL = {
    (None, False): LIST_CONVERSATIONS_SQL,
    ("active", False): LIST_ACTIVE_CONVERSATIONS_SQL,
    ("idle", False): LIST_IDLE_CONVERSATIONS_SQL,
    (None, True): LIST_CONVERSATIONS_BY_METADATA_SQL,
    ("active", True): LIST_ACTIVE_CONVERSATIONS_BY_METADATA_SQL,
    ("idle", True): LIST_IDLE_CONVERSATIONS_BY_METADATA_SQL,
}


def list_conversations_query(
    tenant_id: str, before: tuple[datetime, str] | None, limit: int, status: str | None,
    metadata: dict[str, str] | None,
) -> tuple[str, list[Any]]:
    """The statement and arguments of a filtered page (also what tests EXPLAIN)."""
    created, cid = before if before else (None, None)
    args: list[Any] = [tenant_id, created, cid, limit]
    if metadata:
        args.append(metadata)
    return LIST_SQL[(status, bool(metadata))], args


async def list_conversations(
    conn: asyncpg.Connection | asyncpg.Pool,
    tenant_id: str,
    before: tuple[datetime, str] | None,
    limit: int,
    status: str | None = None,
    metadata: dict[str, str] | None = None,
) -> list[Conversation]:
    sql, args = list_conversations_query(tenant_id, before, limit, status, metadata)
    return [to_conversation(r) for r in await conn.fetch(sql, *args)]


LOCK_CONVERSATION_SQL = """
SELECT id, processor, turn_count, last_turn_id, webhook_url, webhook_secret
FROM conversation WHERE id = $1 AND tenant_id = $2
FOR UPDATE
"""


async def lock_conversation(
    conn: asyncpg.Connection, tenant_id: str, conversation_id: str
) -> asyncpg.Record | None:
    """Lock the conversation row for the transaction: turns and events are numbered under it."""
    return await conn.fetchrow(LOCK_CONVERSATION_SQL, conversation_id, tenant_id)


UPDATE_CONVERSATION_SQL = f"""
UPDATE conversation AS c SET
    title = CASE WHEN $3 THEN $4 ELSE c.title END,
    processor = COALESCE($5, c.processor),
    metadata = COALESCE($6, c.metadata),
    webhook_url = CASE WHEN $7 THEN $8 ELSE c.webhook_url END,
    webhook_secret = COALESCE($9, c.webhook_secret),
    ttl_seconds = CASE WHEN $10 THEN $11 ELSE c.ttl_seconds END,
    -- A new TTL counts from the last activity (a PATCH is not one).
    expires_at = CASE WHEN $10 THEN {EXPIRES_AT.format(
        ttl="$11::int", at="COALESCE(c.last_activity_at, c.updated_at)")}
        ELSE c.expires_at END,
    updated_at = now()
WHERE c.id = $1 AND c.tenant_id = $2
RETURNING {CONVERSATION_COLUMNS}
"""


async def update_conversation(
    conn: asyncpg.Connection, tenant_id: str, conversation_id: str, changes: dict[str, Any]
) -> Conversation | None:
    """Apply the given changes; keys absent from `changes` are left alone."""
    row = await conn.fetchrow(
        UPDATE_CONVERSATION_SQL,
        conversation_id,
        tenant_id,
        "title" in changes,
        changes.get("title"),
        changes.get("processor"),
        changes.get("metadata"),
        "webhook_url" in changes,
        changes.get("webhook_url"),
        changes.get("webhook_secret"),
        "ttl_seconds" in changes,
        changes.get("ttl_seconds"),
    )
    return to_conversation(row) if row else None


# The replaced secret joins the previous ones (each signs until 24 h after it was replaced);
# the latest also stays in webhook_secret_previous/_until for workers of the previous release.
ROTATE_SECRET_SQL = """
WITH current AS (
    SELECT id, webhook_secret FROM conversation
    WHERE id = $1 AND tenant_id = $2 AND webhook_url IS NOT NULL
    FOR UPDATE
), kept AS (
    INSERT INTO previous_webhook_secret (conversation_id, secret, expires_at)
    SELECT id, webhook_secret, now() + make_interval(secs => $4) FROM current
    WHERE webhook_secret IS NOT NULL
    ON CONFLICT (conversation_id, secret) DO UPDATE SET expires_at = EXCLUDED.expires_at
)
UPDATE conversation AS c SET
    webhook_secret_previous = current.webhook_secret,
    webhook_secret_previous_until = now() + make_interval(secs => $4),
    webhook_secret = $3,
    updated_at = now()
FROM current
WHERE c.id = current.id
RETURNING c.id
"""


async def rotate_webhook_secret(
    conn: asyncpg.Connection, tenant_id: str, conversation_id: str, secret: str, overlap_s: float
) -> bool:
    """False when the tenant has no such conversation or it has no webhook URL."""
    rotated = await conn.fetchval(ROTATE_SECRET_SQL, conversation_id, tenant_id, secret, overlap_s)
    return rotated is not None


# Expired ones go; the rest are counted, with how long until the oldest expires.
LIVE_PREVIOUS_SECRETS_SQL = """
WITH gone AS (
    DELETE FROM previous_webhook_secret WHERE conversation_id = $1 AND expires_at <= now()
)
SELECT count(*) AS live,
    COALESCE(extract(epoch FROM min(expires_at) - now()), 0)::float8 AS oldest_expires_in_s
FROM previous_webhook_secret WHERE conversation_id = $1 AND expires_at > now()
"""


async def live_previous_secrets(
    conn: asyncpg.Connection, conversation_id: str
) -> tuple[int, float]:
    """How many replaced secrets still sign, and seconds until the oldest of them stops."""
    row = await conn.fetchrow(LIVE_PREVIOUS_SECRETS_SQL, conversation_id)
    assert row is not None  # an aggregate returns one row
    return row["live"], row["oldest_expires_in_s"]


# The notification (on commit) ends the conversation's open event streams at once.
DELETE_CONVERSATION_SQL = """
DELETE FROM conversation WHERE id = $1 AND tenant_id = $2
RETURNING id, pg_notify('research_events', id)
"""


async def delete_conversation(
    conn: asyncpg.Connection, tenant_id: str, conversation_id: str
) -> bool:
    return await conn.fetchval(DELETE_CONVERSATION_SQL, conversation_id, tenant_id) is not None


# The sweeper's next conversation: expired and without an open turn (an open turn keeps it;
# its next event moves expires_at on). Locked, skipping ones other transactions hold (another
# worker's sweep, a request on it), so several workers share the sweep; `$1` are the ones this
# sweep already failed to delete.
CLAIM_EXPIRED_SQL = f"""
SELECT c.id, c.tenant_id FROM conversation c
WHERE c.expires_at <= now() AND c.id <> ALL($1::text[])
  AND NOT EXISTS (SELECT 1 FROM turn o WHERE o.conversation_id = c.id AND {OPEN_TURN})
ORDER BY c.expires_at
LIMIT 1
FOR UPDATE OF c SKIP LOCKED
"""


async def claim_expired_conversation(
    conn: asyncpg.Connection, skip: list[str]
) -> asyncpg.Record | None:
    """Lock the next expired conversation for this transaction: (id, tenant_id), or None."""
    return await conn.fetchrow(CLAIM_EXPIRED_SQL, skip)


# Migration 0014's lock_conversation_of, which the worker's one-statement transitions call too.
LOCK_CONVERSATION_OF_TURN_SQL = "SELECT lock_conversation_of($1)"


async def lock_conversation_of_turn(conn: asyncpg.Connection, turn_id: str) -> str | None:
    """Lock the turn's conversation (always before the turn itself: one lock order, no
    deadlocks): its id, or None when the turn is gone."""
    conversation_id: str | None = await conn.fetchval(LOCK_CONVERSATION_OF_TURN_SQL, turn_id)
    return conversation_id
