"""SQL for the per-conversation event log. Each insert notifies listeners on commit."""

from __future__ import annotations

import asyncpg
import msgspec

from service.db.conversations import EXPIRES_AT
from service.db.pool import Conn
from service.db.webhook_deliveries import insert_delivery
from service.models import Event, Turn

NOTIFY_CHANNEL = "research_events"
# Events that conversations with a webhook_url are sent (docs/design.md §3).
WEBHOOK_EVENT_TYPES = frozenset({"turn.completed", "turn.failed", "turn.cancelled"})

# Every event is activity: a conversation with a TTL expires that long after its last one.
INSERT_EVENT_SQL = f"""
WITH c AS (
    UPDATE conversation SET event_count = event_count + 1, updated_at = now(),
        last_activity_at = now(), expires_at = {EXPIRES_AT.format(ttl="ttl_seconds", at="now()")}
    WHERE id = $1
    RETURNING event_count
), e AS (
    INSERT INTO event (conversation_id, sequence, type, turn_id, data)
    SELECT $1, c.event_count, $2, $3, $4 FROM c
    RETURNING sequence, type, conversation_id, turn_id, created_at, data
)
SELECT e.*, pg_notify('research_events', $1) FROM e
"""

EVENT_FIELDS = ("sequence", "type", "conversation_id", "turn_id", "created_at", "data")
EVENT_COLUMNS = ", ".join(EVENT_FIELDS)


def to_event(row: asyncpg.Record) -> Event:
    return msgspec.convert(
        {k: row[k] for k in EVENT_FIELDS}, Event,
    )


async def insert_event(conn: Conn, event_type: str, turn: Turn) -> Event:
    """Append an event carrying the turn as it is now; returns it with its sequence.

    A terminal event also queues its webhook delivery here, in the caller's transaction (the
    one recording the turn's status), so no status change commits without its webhook.
    """
    data = msgspec.to_builtins(turn)
    row = await conn.fetchrow(INSERT_EVENT_SQL, turn.conversation_id, event_type, turn.id, data)
    assert row is not None  # the conversation is locked by the caller, so it exists
    event = to_event(row)
    if event_type in WEBHOOK_EVENT_TYPES:
        await insert_delivery(conn, event)
    return event


LIST_EVENTS_SQL = f"""
SELECT {EVENT_COLUMNS} FROM event
WHERE conversation_id = $1 AND sequence > $2
ORDER BY sequence
LIMIT $3
"""


async def list_events(
    conn: Conn | asyncpg.Pool, conversation_id: str, after: int, limit: int
) -> list[Event]:
    return [to_event(r) for r in await conn.fetch(LIST_EVENTS_SQL, conversation_id, after, limit)]
