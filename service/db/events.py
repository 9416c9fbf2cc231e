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

# The notification carries the event itself when it fits in a NOTIFY payload (under 8,000 bytes),
# as "<conversation id> <event JSON>", so a feed (service.domain.feeds) need not read it back;
# a bare conversation id means "read what is new". created_at is written as Python writes it.
# $5: also store the turn as the first answer of its Idempotency-Key (it is the event's data).
# The conversation's head (its oldest open turn) comes back too: once a turn ends, the next one
# to start.
# Every event is activity: a conversation with a TTL expires that long after its last one.
# An event row `e` as its notification's JSON, and the notification itself.
EVENT_PAYLOAD = """json_build_object(
        'sequence', e.sequence, 'type', e.type, 'conversation_id', e.conversation_id,
        'turn_id', e.turn_id,
        'created_at', to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'data', e.data)::text"""
NOTIFY = ("pg_notify('research_events', CASE WHEN octet_length({payload}) < 7900 "
          "THEN {conversation_id} || ' ' || {payload} ELSE {conversation_id} END)")
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
), first AS (
    UPDATE turn SET first_response = $4 WHERE id = $3 AND $5
), j AS (
    SELECT e.*, {EVENT_PAYLOAD} AS payload FROM e
)
SELECT j.sequence, j.type, j.conversation_id, j.turn_id, j.created_at, j.data,
    {NOTIFY.format(conversation_id="$1", payload="j.payload")},
    h.id AS head_id, h.status AS head_status
FROM j
LEFT JOIN LATERAL (
    SELECT id, status FROM turn
    WHERE conversation_id = $1 AND status IN ('queued', 'running')
    ORDER BY seq
    LIMIT 1
) h ON true
"""

EVENT_FIELDS = ("sequence", "type", "conversation_id", "turn_id", "created_at", "data")
EVENT_COLUMNS = ", ".join(EVENT_FIELDS)


def to_event(row: asyncpg.Record) -> Event:
    return msgspec.convert(
        {k: row[k] for k in EVENT_FIELDS}, Event,
    )


class Inserted(msgspec.Struct, frozen=True):
    event: Event
    # The conversation's oldest open turn once this commits: (id, status), None when none is.
    head: tuple[str, str] | None


async def insert_event(
    conn: Conn, event_type: str, turn: Turn, *, webhook: bool = True,
    first_response: bool = False,
) -> Inserted:
    """Append an event carrying the turn as it is now; returns it with its sequence, and the
    conversation's head turn (call with the conversation locked, after the turn's change).

    A terminal event also queues its webhook delivery here when the conversation has a webhook
    (`webhook`: the caller read its webhook_url under the lock), in the caller's transaction
    (the one recording the turn's status), so no status change commits without its webhook.
    `first_response`: the turn is also stored as its Idempotency-Key's first answer.
    """
    data = msgspec.to_builtins(turn)
    row = await conn.fetchrow(INSERT_EVENT_SQL, turn.conversation_id, event_type, turn.id, data,
                              first_response)
    assert row is not None  # the conversation is locked by the caller, so it exists
    event = to_event(row)
    if webhook and event_type in WEBHOOK_EVENT_TYPES:
        await insert_delivery(conn, event)
    head = (row["head_id"], row["head_status"]) if row["head_id"] is not None else None
    return Inserted(event, head)


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
