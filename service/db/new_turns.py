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
    """$1 to $13 of INSERT_TURN_SQL."""
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
# held across round trips, no COMMIT, no read of the conversation before it (service.domain.
# lifecycle.queue_turn's fast path). The conversation gives the turn what the request left out:
# its seq (turn_count + 1), its parent ($5, else the conversation's last turn) and its processor
# ($4, else the conversation's). It writes only in the common case, and nothing otherwise (no row
# comes back; queue_turn's transaction then decides, under the conversation's lock): the
# conversation is the tenant's and unchanged since the statement's snapshot (a concurrent new
# turn changes turn_count; the UPDATE is the lock), it has fewer than $14 open turns, its
# processor is one of $15's (processor -> price per run, the processors the service allows),
# the Idempotency-Key $9 is unused in it and the parent $5 is one of its turns. $12 is the
# turn's event data but for what the conversation gives and created_at (the statement's now(),
# as the API writes it); $13: also store it as the Idempotency-Key's first answer. The tenant's
# limits are checked at the commit (migration 0011), as for INSERT_TURN_SQL.
QUEUE_TURN_AT_ONCE_SQL = f"""
WITH asked AS (
    SELECT c.turn_count, c.turn_count + 1 AS seq,
        COALESCE($5::text, c.last_turn_id) AS parent_turn_id,
        COALESCE($4::text, c.processor) AS processor
    FROM conversation c WHERE c.id = $2 AND c.tenant_id = $3
), open AS (
    SELECT count(*) AS n FROM turn WHERE conversation_id = $2 AND status IN ('queued', 'running')
), c AS (
    UPDATE conversation u SET turn_count = a.seq, last_turn_id = $1, updated_at = now(),
        event_count = u.event_count + 1, last_activity_at = now(),
        expires_at = {EXPIRES_AT.format(ttl="u.ttl_seconds", at="now()")}
    FROM asked a
    WHERE u.id = $2 AND u.turn_count = a.turn_count AND (SELECT n FROM open) < $14
        AND $15::jsonb ? a.processor
        AND ($9::text IS NULL OR NOT EXISTS (
            SELECT 1 FROM turn k WHERE k.conversation_id = $2 AND k.idempotency_key = $9))
        AND ($5::text IS NULL OR EXISTS (
            SELECT 1 FROM turn p WHERE p.id = $5 AND p.conversation_id = $2))
    RETURNING u.event_count, a.seq, a.parent_turn_id, a.processor
), d AS (
    SELECT $12::jsonb || jsonb_build_object(
        'seq', c.seq, 'parent_turn_id', c.parent_turn_id, 'processor', c.processor,
        'created_at', api_time(now())) AS turn
    FROM c
), t AS (
    INSERT INTO turn AS t (
        id, conversation_id, tenant_id, seq, parent_turn_id, input, processor, output_schema,
        metadata, idempotency_key, request_hash, estimated_cost_usd, first_response
    )
    SELECT $1, $2, $3, c.seq, c.parent_turn_id, $6, c.processor, $7, $8, $9, $10,
        ($15::jsonb ->> c.processor)::numeric, CASE WHEN $13 THEN d.turn END
    FROM c, d, (SELECT set_config('research.max_open_turns_per_tenant', $11, true)) AS limits
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
    conn: asyncpg.Connection, *, id: str, conversation_id: str, tenant_id: str,
    processor: str | None, parent_turn_id: str | None, input: Any, output_schema: Any,
    metadata: Any, idempotency_key: str | None, request_hash: bytes,
    tenant_open_limit: int | None, event_data: dict[str, Any], first_response: bool,
    conversation_open_limit: int, prices: dict[str, str],
) -> tuple[Turn, int] | None:
    """QUEUE_TURN_AT_ONCE_SQL: the turn with how many turns of its conversation were open
    before it (as of the statement's start), or None when it wrote nothing (the conversation
    missing, changed meanwhile, at its open-turn limit, its processor not among `prices`'s, the
    key used, the parent not its turn). Raises what the commit raises for the tenant's limits
    (service.domain.usage.quota_refusal), UniqueViolationError for an Idempotency-Key used
    meanwhile."""
    row = await conn.fetchrow(
        QUEUE_TURN_AT_ONCE_SQL, id, conversation_id, tenant_id, processor, parent_turn_id, input,
        output_schema, metadata, idempotency_key, request_hash,
        "" if tenant_open_limit is None else str(tenant_open_limit), event_data,
        first_response, conversation_open_limit, prices,
    )
    return None if row is None else _turn_and_open_before(row)
