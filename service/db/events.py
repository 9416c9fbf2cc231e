"""SQL for the per-conversation event log. Each insert notifies listeners on commit."""

from __future__ import annotations

import asyncpg
import msgspec

from service.db.pool import Conn
from service.db.webhook_deliveries import delivery_ids
from service.models import Event, Turn

NOTIFY_CHANNEL = "research_events"

# Migration 0014: the event, the conversation's counters and expiry, the NOTIFY, a terminal
# event's webhook delivery (turn.completed, turn.failed, turn.cancelled; docs/design.md §3) when
# the conversation has a webhook_url, the first answer of an Idempotency-Key ($5), and the head.
APPEND_EVENT_SQL = "SELECT * FROM append_event($1, $2, $3, $4, $5, $6, $7)"

EVENT_FIELDS = ("sequence", "type", "conversation_id", "turn_id", "created_at", "data")
EVENT_COLUMNS = ", ".join(EVENT_FIELDS)


def to_event(row: asyncpg.Record) -> Event:
    return msgspec.convert(
        {k: row[k] for k in EVENT_FIELDS}, Event,
    )


async def insert_event(
    conn: Conn, event_type: str, turn: Turn, *, first_response: bool = False,
) -> tuple[str, str] | None:
    """Append an event carrying the turn as it is now; returns the conversation's head turn,
    (id, status) (call with the conversation locked, after the turn's change).

    A terminal event also queues its webhook delivery when the conversation has a webhook, in
    the caller's transaction (the one recording the turn's status), so no status change commits
    without its webhook. `first_response`: the turn is also stored as its Idempotency-Key's
    first answer.
    """
    row = await conn.fetchrow(APPEND_EVENT_SQL, turn.conversation_id, event_type, turn.id,
                              msgspec.to_builtins(turn), first_response, *delivery_ids())
    assert row is not None  # one row always
    return head_of(row)


def head_of(row: asyncpg.Record) -> tuple[str, str] | None:
    """The (id, status) of a row's head_id and head_status, None when the conversation has no
    open turn."""
    return (row["head_id"], row["head_status"]) if row["head_id"] is not None else None


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
