"""SQL for a conversation's shared feed (service.domain.feeds): its state and new events, in one
read."""

from __future__ import annotations

import asyncpg
import msgspec

from service.db.events import EVENT_COLUMNS, to_event
from service.models import Event


class FeedRead(msgspec.Struct, frozen=True, kw_only=True):
    exists: bool
    # (turn id, run id) of the running turn, if one runs.
    running: tuple[str, str] | None
    events: list[Event]


# The conversation's running turn (as service.db.turns.running_turn finds it) beside each of its
# events from {events}, in one statement, so from one snapshot: one row per event, or a single
# row of nulls but the running turn when there is none. No row: the conversation is gone.
FEED_TEMPLATE = """
SELECT r.id AS running_turn_id, r.run_id AS running_run_id, e.*
FROM conversation c
LEFT JOIN LATERAL (
    SELECT id, run_id FROM turn
    WHERE conversation_id = c.id AND status = 'running' AND run_id IS NOT NULL
    ORDER BY seq
    LIMIT 1
) r ON true
LEFT JOIN LATERAL ({events}) e ON true
WHERE c.id = $1
"""
# The newest events, newest first; the events after $3, oldest first. Up to $2 of them.
TAIL_FEED_SQL = FEED_TEMPLATE.format(events=f"""
    SELECT {EVENT_COLUMNS} FROM event WHERE conversation_id = c.id
    ORDER BY sequence DESC LIMIT $2""")
NEW_FEED_SQL = FEED_TEMPLATE.format(events=f"""
    SELECT {EVENT_COLUMNS} FROM event WHERE conversation_id = c.id AND sequence > $3
    ORDER BY sequence LIMIT $2""")


async def read_feed(
    pool: asyncpg.Pool, conversation_id: str, after: int | None, limit: int
) -> FeedRead:
    """The conversation's state and its events after `after` (None: its newest `limit`, oldest
    first), from one snapshot: one statement."""
    if after is None:
        rows = list(reversed(await pool.fetch(TAIL_FEED_SQL, conversation_id, limit)))
    else:
        rows = await pool.fetch(NEW_FEED_SQL, conversation_id, limit, after)
    if not rows:
        return FeedRead(exists=False, running=None, events=[])
    first = rows[0]
    running = ((first["running_turn_id"], first["running_run_id"])
               if first["running_turn_id"] is not None else None)
    events = [to_event(r) for r in rows if r["sequence"] is not None]
    return FeedRead(exists=True, running=running, events=events)
