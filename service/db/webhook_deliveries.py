"""SQL for the webhook outbox: deliveries of terminal events and the ledger of their attempts."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from service.models import AttemptOutcome, Event, WebhookDelivery

# Inserts and redeliveries notify this channel on commit; the worker's dispatcher listens.
DELIVERY_CHANNEL = "webhook_deliveries"
WAKE_PAYLOAD = "due"

# Only conversations with a webhook URL get a row; the pg_notify runs once per inserted row.
INSERT_DELIVERY_SQL = """
WITH d AS (
    INSERT INTO webhook_delivery (
        id, conversation_id, tenant_id, event_sequence, event_type, webhook_id, url, payload,
        next_attempt_at
    )
    SELECT $1, c.id, c.tenant_id, $3, $4, $5, c.webhook_url, $6, now()
    FROM conversation c
    WHERE c.id = $2 AND c.webhook_url IS NOT NULL
    RETURNING id
)
SELECT d.id, pg_notify('webhook_deliveries', 'due') FROM d
"""


def webhook_payload(event: Event) -> dict[str, Any]:
    """The body every attempt sends: the event itself, so the receiver needs no further call."""
    data = msgspec.to_builtins(event)
    return {"type": event.type, "timestamp": data["created_at"], "data": data}


async def insert_delivery(conn: asyncpg.Connection, event: Event) -> str | None:
    """Queue the event's webhook (call in the transaction recording it); None without a URL."""
    return await conn.fetchval(  # type: ignore[no-any-return]
        INSERT_DELIVERY_SQL,
        f"whd_{secrets.token_hex(12)}",
        event.conversation_id,
        event.sequence,
        event.type,
        f"msg_{secrets.token_hex(12)}",
        webhook_payload(event),
    )


class DueDelivery(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    webhook_id: str
    url: str
    payload: dict[str, Any]
    attempts_in_round: int
    # The claim's lease end; recording the outcome checks it is still ours.
    lease_until: datetime
    secrets: list[str]


# Claim due deliveries: push each one's next_attempt_at a lease ahead, so a dispatcher that
# dies mid-send only delays it, and other dispatchers skip rows this one holds.
CLAIM_DUE_SQL = """
UPDATE webhook_delivery AS d SET next_attempt_at = now() + make_interval(secs => $2)
FROM (
    SELECT id FROM webhook_delivery
    WHERE status = 'pending' AND next_attempt_at <= now()
    ORDER BY next_attempt_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
) due, conversation c
WHERE d.id = due.id AND c.id = d.conversation_id
RETURNING d.id, d.webhook_id, d.url, d.payload, d.attempts_in_round,
    d.next_attempt_at AS lease_until,
    array_remove(ARRAY[
        c.webhook_secret,
        CASE WHEN c.webhook_secret_previous_until > now() THEN c.webhook_secret_previous END
    ], NULL) AS secrets
"""


async def claim_due(pool: asyncpg.Pool, limit: int, lease_s: float) -> list[DueDelivery]:
    """Due deliveries with the secrets to sign them with (two during a rotation's overlap)."""
    rows = await pool.fetch(CLAIM_DUE_SQL, limit, lease_s)
    return [DueDelivery(**row) for row in rows]


NEXT_DUE_SQL = "SELECT min(next_attempt_at) FROM webhook_delivery WHERE status = 'pending'"


async def next_due(pool: asyncpg.Pool) -> datetime | None:
    return await pool.fetchval(NEXT_DUE_SQL)  # type: ignore[no-any-return]


# $2 is the claim's lease end: when it no longer matches, the delivery was redelivered while
# this attempt ran, so the attempt is recorded but the new round's schedule is left alone.
RECORD_ATTEMPT_SQL = """
WITH d AS (
    UPDATE webhook_delivery AS d SET
        attempt_count = d.attempt_count + 1,
        last_status_code = $4,
        attempts_in_round = CASE WHEN d.next_attempt_at = $2
            THEN d.attempts_in_round + 1 ELSE d.attempts_in_round END,
        status = CASE WHEN d.next_attempt_at = $2 THEN $8 ELSE d.status END,
        delivered_at = CASE WHEN d.next_attempt_at = $2 AND $8 = 'delivered'
            THEN now() ELSE d.delivered_at END,
        next_attempt_at = CASE WHEN d.next_attempt_at <> $2 THEN d.next_attempt_at
            WHEN $8 = 'pending' THEN now() + make_interval(secs => $9::float8) END
    WHERE d.id = $1
    RETURNING d.id, d.attempt_count
)
INSERT INTO webhook_attempt (
    delivery_id, attempt, started_at, status_code, latency_ms, error, response_excerpt
)
SELECT d.id, d.attempt_count, $3, $4, $5, $6, $7 FROM d
RETURNING attempt
"""


async def record_attempt(
    pool: asyncpg.Pool, due: DueDelivery, outcome: AttemptOutcome, status: str,
    retry_in_s: float | None,
) -> int | None:
    """Append the attempt to the ledger and move the delivery on; returns the attempt number."""
    return await pool.fetchval(  # type: ignore[no-any-return]
        RECORD_ATTEMPT_SQL, due.id, due.lease_until, outcome.started_at, outcome.status_code,
        outcome.latency_ms, outcome.error, outcome.response_excerpt, status, retry_in_s,
    )


DELIVERY_COLUMNS = """
    d.id, d.conversation_id, d.event_sequence, d.event_type, d.webhook_id, d.url, d.status,
    d.attempt_count, d.next_attempt_at, d.created_at, d.delivered_at,
    COALESCE((
        SELECT jsonb_agg(jsonb_build_object(
            'attempt', a.attempt, 'started_at', a.started_at, 'status_code', a.status_code,
            'latency_ms', a.latency_ms, 'error', a.error, 'response_excerpt', a.response_excerpt
        ) ORDER BY a.attempt)
        FROM webhook_attempt a WHERE a.delivery_id = d.id
    ), '[]'::jsonb) AS attempts
"""


def to_delivery(row: asyncpg.Record) -> WebhookDelivery:
    return msgspec.convert(dict(row), WebhookDelivery, strict=False)


LIST_DELIVERIES_SQL = f"""
SELECT {DELIVERY_COLUMNS} FROM webhook_delivery d
WHERE d.conversation_id = $1 AND d.tenant_id = $2 AND d.event_sequence > $3
ORDER BY d.event_sequence
LIMIT $4
"""


async def list_deliveries(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: str, conversation_id: str,
    after_sequence: int, limit: int,
) -> list[WebhookDelivery]:
    rows = await conn.fetch(LIST_DELIVERIES_SQL, conversation_id, tenant_id, after_sequence, limit)
    return [to_delivery(r) for r in rows]


# A new round on the same delivery (same webhook-id), due now, to the conversation's current
# URL if it still has one.
REDELIVER_SQL = """
UPDATE webhook_delivery AS d SET
    status = 'pending', next_attempt_at = now(), attempts_in_round = 0,
    url = COALESCE(c.webhook_url, d.url)
FROM conversation c
WHERE d.id = $1 AND d.tenant_id = $2 AND c.id = d.conversation_id
RETURNING d.id, pg_notify('webhook_deliveries', 'due')
"""


async def redeliver(conn: asyncpg.Connection, tenant_id: str, delivery_id: str) -> bool:
    """Make the delivery due again; False when the tenant has no such delivery."""
    return await conn.fetchrow(REDELIVER_SQL, delivery_id, tenant_id) is not None


DELIVERY_BY_ID_SQL = f"""
SELECT {DELIVERY_COLUMNS} FROM webhook_delivery d WHERE d.id = $1 AND d.tenant_id = $2
"""


async def get_delivery(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: str, delivery_id: str
) -> WebhookDelivery | None:
    row = await conn.fetchrow(DELIVERY_BY_ID_SQL, delivery_id, tenant_id)
    return to_delivery(row) if row else None
