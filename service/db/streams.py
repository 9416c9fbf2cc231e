"""SQL for a conversation's shared feed (service.domain.feeds): its state and new events, in one
read."""

from __future__ import annotations

import asyncpg
import msgspec

from service.db.events import EVENT_COLUMNS, LIST_EVENTS_SQL, to_event
from service.models import Event


class FeedRead(msgspec.Struct, frozen=True, kw_only=True):
    exists: bool
    # (turn id, run id) of the running turn, if one runs.
    running: tuple[str, str] | None
    events: list[Event]


# No row: the conversation is gone. The running turn as service.db.turns.running_turn finds it.
FEED_STATE_SQL = """
SELECT r.id AS turn_id, r.run_id
FROM conversation c
LEFT JOIN LATERAL (
    SELECT id, run_id FROM turn
    WHERE conversation_id = c.id AND status = 'running' AND run_id IS NOT NULL
    ORDER BY seq
    LIMIT 1
) r ON true
WHERE c.id = $1
"""

# The newest events, newest first.
TAIL_EVENTS_SQL = f"""
SELECT {EVENT_COLUMNS} FROM event
WHERE conversation_id = $1
ORDER BY sequence DESC
LIMIT $2
"""


async def read_feed(
    pool: asyncpg.Pool, conversation_id: str, after: int | None, limit: int
) -> FeedRead:
    """The conversation's state and its events after `after` (None: its newest `limit`, oldest
    first), from one snapshot: one read-only transaction."""
    async with pool.acquire() as conn, conn.transaction(
        isolation="repeatable_read", readonly=True
    ):
        state = await conn.fetchrow(FEED_STATE_SQL, conversation_id)
        if state is None:
            return FeedRead(exists=False, running=None, events=[])
        if after is None:
            rows = list(reversed(await conn.fetch(TAIL_EVENTS_SQL, conversation_id, limit)))
        else:
            rows = await conn.fetch(LIST_EVENTS_SQL, conversation_id, after, limit)
    running = (state["turn_id"], state["run_id"]) if state["turn_id"] is not None else None
    return FeedRead(exists=True, running=running, events=[to_event(r) for r in rows])
