"""SQL that creates turns: the INSERT under the conversation's lock, and the one statement that
writes a turn with its event and commits on its own (service.domain.lifecycle.queue_turn)."""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec

from service.db.conversations import EXPIRES_AT
from service.db.turns import TURN_COLUMNS
from service.models import Turn

# The new turn, made its conversation's last in the same round trip, with how many turns of the
# conversation were open before it (its caller holds the conversation's lock, so that count is
# exact). The open-turn limit of the tenant goes to the turn_quota_insert trigger (migration
# 0011) as a setting of the transaction; '' means none.
INSERT_TURN_SQL = f"""
WITH open AS (
    SELECT count(*) AS n FROM turn WHERE conversation_id = $2 AND status IN ('queued', 'running')
), conversation AS (
    UPDATE conversation SET turn_count = $4, last_turn_id = $1, updated_at = now() WHERE id = $2
)
INSERT INTO turn AS t (
    id, conversation_id, tenant_id, seq, parent_turn_id, input, processor, output_schema,
    metadata, idempotency_key, request_hash, estimated_cost_usd
)
SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12
FROM (SELECT set_config('research.max_open_turns_per_tenant', $13, true)) AS limits
RETURNING {TURN_COLUMNS}, (SELECT n FROM open) AS open_before
"""


async def insert_turn(
    conn: asyncpg.Connection, *, tenant_open_limit: int | None = None, **values: Any
) -> tuple[Turn, int]:
    """Insert a turn; its conversation's turn_count becomes its seq and last_turn_id its id.
    Returns it with how many turns of the conversation were open before it. Its commit fails
    (service.domain.usage.quota_refusal) if it takes the tenant past `tenant_open_limit` or
    its monthly budget."""
    row = await conn.fetchrow(INSERT_TURN_SQL, *_turn_args(values, tenant_open_limit))
    assert row is not None  # an INSERT … RETURNING returns its row
    return _turn_and_open_before(row)


def _turn_args(values: dict[str, Any], tenant_open_limit: int | None) -> tuple[Any, ...]:
    """$1 to $13 of INSERT_TURN_SQL and QUEUE_TURN_AT_ONCE_SQL."""
    return (
        values["id"], values["conversation_id"], values["tenant_id"], values["seq"],
        values["parent_turn_id"], values["input"], values["processor"], values["output_schema"],
        values["metadata"], values["idempotency_key"], values["request_hash"],
        values.get("estimated_cost_usd", 0),
        "" if tenant_open_limit is None else str(tenant_open_limit),
    )


def _turn_and_open_before(row: asyncpg.Record) -> tuple[Turn, int]:
    fields = {k: v for k, v in row.items() if k != "notify_event"}
    open_before = int(fields.pop("open_before"))
    return msgspec.convert(fields, Turn), open_before


# A new turn and its turn.queued event in one statement, committed on its own: no BEGIN, no lock
# held across round trips, no COMMIT (service.domain.lifecycle.queue_turn's fast path). It writes
# only if the conversation is as the caller read it ($4 - 1 turns) and has fewer than $16 open
# turns; otherwise nothing, and no row comes back. The conversation's UPDATE is the lock: a
# concurrent new turn changes turn_count, so one of the two writes nothing (its seq would be
# refused by turn_conversation_seq_key too, which the caller takes the same way). $14 is the turn's
# event data but created_at, which is the statement's now() as the API writes it; $15:
# also store it as the Idempotency-Key's first answer. The tenant's limits are checked at the
# commit (migration 0011), as for INSERT_TURN_SQL.
QUEUE_TURN_AT_ONCE_SQL = f"""
WITH open AS (
    SELECT count(*) AS n FROM turn WHERE conversation_id = $2 AND status IN ('queued', 'running')
), c AS (
    UPDATE conversation SET turn_count = $4, last_turn_id = $1, updated_at = now(),
        event_count = event_count + 1, last_activity_at = now(),
        expires_at = {EXPIRES_AT.format(ttl="ttl_seconds", at="now()")}
    WHERE id = $2 AND tenant_id = $3 AND turn_count = $4 - 1 AND (SELECT n FROM open) < $16
    RETURNING event_count
), d AS (
    SELECT $14::jsonb || jsonb_build_object('created_at', api_time(now())) AS turn
), t AS (
    INSERT INTO turn AS t (
        id, conversation_id, tenant_id, seq, parent_turn_id, input, processor, output_schema,
        metadata, idempotency_key, request_hash, estimated_cost_usd, first_response
    )
    SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, CASE WHEN $15 THEN d.turn END
    FROM c, d, (SELECT set_config('research.max_open_turns_per_tenant', $13, true)) AS limits
    RETURNING {TURN_COLUMNS}
), e AS (
    INSERT INTO event (conversation_id, sequence, type, turn_id, data)
    SELECT $2, c.event_count, 'turn.queued', $1, d.turn FROM c, d, t
    RETURNING sequence, type, conversation_id, turn_id, created_at, data
)
SELECT t.*, (SELECT n FROM open) AS open_before,
    notify_event($2, e.sequence, e.type, e.turn_id, e.created_at, e.data)
FROM t, e
"""


async def queue_turn_at_once(
    conn: asyncpg.Connection, *, event_data: dict[str, Any], first_response: bool,
    conversation_open_limit: int, tenant_open_limit: int | None = None, **values: Any
) -> tuple[Turn, int] | None:
    """QUEUE_TURN_AT_ONCE_SQL: the turn with how many turns of its conversation were open
    before it (as of the statement's start), or None when the conversation was not as read or
    was at its open-turn limit (nothing written). Raises what the commit raises for the
    tenant's limits (service.domain.usage.quota_refusal), UniqueViolationError for an
    Idempotency-Key used meanwhile."""
    row = await conn.fetchrow(
        QUEUE_TURN_AT_ONCE_SQL, *_turn_args(values, tenant_open_limit),
        event_data, first_response, conversation_open_limit,
    )
    return None if row is None else _turn_and_open_before(row)
