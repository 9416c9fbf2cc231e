"""SQL for the webhook outbox: deliveries of terminal events and the ledger of their attempts."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from service.db.pool import Conn
from service.models import AttemptOutcome, WebhookDelivery

# Inserts and redeliveries notify this channel on commit; the worker's dispatcher listens.
DELIVERY_CHANNEL = "webhook_deliveries"
WAKE_PAYLOAD = "due"

def delivery_ids() -> tuple[str, str]:
    """A new delivery's id and its Standard Webhooks `webhook-id` (migration 0014's
    append_event uses them when its event is one to deliver)."""
    return f"whd_{secrets.token_hex(12)}", f"msg_{secrets.token_hex(12)}"


class DueDelivery(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    tenant_id: str
    webhook_id: str
    url: str
    payload: dict[str, Any]
    attempts_in_round: int
    # The claim's lease end; recording the outcome checks it is still ours.
    lease_until: datetime
    secrets: list[str]


# The receiving host of a delivery's URL: host[:port] as written, lower-cased, without
# credentials. In-flight attempts are capped per host, whoever's tenant they are.
HOST_OF = "COALESCE(lower(substring({t}.url from '^[^:/?#]+://(?:[^@/?#]*@)?([^/?#]*)')), '')"

# Claims are serialized across workers (a transaction-level advisory lock held for the few
# milliseconds a claim takes), so each sees the leases the one before it took and the caps hold
# across all workers. The key is arbitrary; nothing else in the service uses it.
CLAIM_LOCK_KEY = 0x77686B01
CLAIM_LOCK_SQL = "SELECT pg_advisory_xact_lock($1)"

# Claim due deliveries fairly ($1 rows at most, leases of $2 s, at most $3 attempts in flight per
# tenant and $4 per host): each tenant with pending rows (found by a skip scan of
# webhook_delivery_tenant_due_idx) offers its earliest due rows up to its free room, on hosts
# that are not full; the rows are then taken round-robin within each host's free room, counting
# what each tenant already has in flight (tenant_rank: a tenant with 3 in flight offers its next
# row as its 4th, so it waits behind a tenant with none). A claimed row's next_attempt_at and
# leased_until move a lease ahead, so a dispatcher that dies mid-send only delays it.
CLAIM_DUE_SQL = f"""
WITH RECURSIVE tenants AS (
    (SELECT tenant_id FROM webhook_delivery WHERE status = 'pending'
     ORDER BY tenant_id LIMIT 1)
    UNION ALL
    SELECT (SELECT w.tenant_id FROM webhook_delivery w
            WHERE w.status = 'pending' AND w.tenant_id > t.tenant_id
            ORDER BY w.tenant_id LIMIT 1)
    FROM tenants t WHERE t.tenant_id IS NOT NULL
),
in_flight AS MATERIALIZED (
    SELECT f.tenant_id, {HOST_OF.format(t="f")} AS host
    FROM webhook_delivery f WHERE f.leased_until > now()
),
host_load AS (SELECT host, count(*) AS n FROM in_flight GROUP BY host),
offered AS (
    SELECT o.id, o.host, o.next_attempt_at, o.tenant_rank
    FROM tenants t
    CROSS JOIN LATERAL (
        SELECT count(*) AS n FROM in_flight f WHERE f.tenant_id = t.tenant_id
    ) load
    CROSS JOIN LATERAL (
        SELECT w.id, {HOST_OF.format(t="w")} AS host, w.next_attempt_at,
            load.n + row_number() OVER (ORDER BY w.next_attempt_at) AS tenant_rank
        FROM webhook_delivery w
        WHERE w.tenant_id = t.tenant_id AND w.status = 'pending' AND w.next_attempt_at <= now()
          AND {HOST_OF.format(t="w")} NOT IN (SELECT host FROM host_load WHERE n >= $4)
        ORDER BY w.next_attempt_at
        LIMIT greatest($3 - load.n, 0)
    ) o
    WHERE t.tenant_id IS NOT NULL
),
picked AS (
    SELECT id FROM (
        SELECT o.id, o.host, o.tenant_rank, o.next_attempt_at,
            row_number() OVER (
                PARTITION BY o.host ORDER BY o.tenant_rank, o.next_attempt_at
            ) AS on_host
        FROM offered o
    ) r
    LEFT JOIN host_load h ON h.host = r.host
    WHERE r.on_host <= $4 - COALESCE(h.n, 0)
    ORDER BY r.tenant_rank, r.next_attempt_at
    LIMIT $1
),
due AS (
    SELECT w.id FROM webhook_delivery w
    WHERE w.id IN (SELECT id FROM picked) AND w.status = 'pending' AND w.next_attempt_at <= now()
    FOR UPDATE SKIP LOCKED
)
UPDATE webhook_delivery AS d SET
    next_attempt_at = now() + make_interval(secs => $2),
    leased_until = now() + make_interval(secs => $2)
FROM due, conversation c
WHERE d.id = due.id AND c.id = d.conversation_id
RETURNING d.id, d.tenant_id, d.webhook_id, d.url, d.payload, d.attempts_in_round,
    d.next_attempt_at AS lease_until,
    ARRAY(
        SELECT s.secret FROM (
            SELECT c.webhook_secret AS secret, 'infinity'::timestamptz AS until
            UNION ALL
            SELECT p.secret, p.expires_at FROM previous_webhook_secret p
            WHERE p.conversation_id = c.id AND p.expires_at > now()
            UNION ALL
            SELECT c.webhook_secret_previous, c.webhook_secret_previous_until
            WHERE c.webhook_secret_previous_until > now()
        ) s
        WHERE s.secret IS NOT NULL
        GROUP BY s.secret ORDER BY max(s.until) DESC
    ) AS secrets
"""

# In the claim's transaction, so now() is the claim's: rows due by then were offered to it
# (and left for caps or other workers), so only later ones are worth waking up for.
NEXT_DUE_SQL = """
SELECT min(next_attempt_at) FROM webhook_delivery
WHERE status = 'pending' AND next_attempt_at > now()
"""


class Claim(msgspec.Struct, frozen=True, kw_only=True):
    deliveries: list[DueDelivery]
    # When the next delivery not yet due falls due (None: nothing is scheduled).
    next_due: datetime | None


async def claim_due(
    pool: asyncpg.Pool, limit: int, lease_s: float, per_tenant: int, per_host: int
) -> Claim:
    """Due deliveries with every live secret to sign them with (the current one first)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(CLAIM_LOCK_SQL, CLAIM_LOCK_KEY)
        rows = await conn.fetch(CLAIM_DUE_SQL, limit, lease_s, per_tenant, per_host)
        next_at = await conn.fetchval(NEXT_DUE_SQL)
    return Claim(deliveries=[DueDelivery(**row) for row in rows], next_due=next_at)


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
            WHEN $8 = 'pending' THEN now() + make_interval(secs => $9::float8) END,
        leased_until = CASE WHEN d.leased_until = $2 THEN NULL ELSE d.leased_until END
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
    attempt: int | None = await pool.fetchval(
        RECORD_ATTEMPT_SQL, due.id, due.lease_until, outcome.started_at, outcome.status_code,
        outcome.latency_ms, outcome.error, outcome.response_excerpt, status, retry_in_s,
    )
    return attempt


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
    conn: Conn | asyncpg.Pool, tenant_id: str, conversation_id: str,
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


async def redeliver(conn: Conn, tenant_id: str, delivery_id: str) -> bool:
    """Make the delivery due again; False when the tenant has no such delivery."""
    return await conn.fetchrow(REDELIVER_SQL, delivery_id, tenant_id) is not None


DELIVERY_BY_ID_SQL = f"""
SELECT {DELIVERY_COLUMNS} FROM webhook_delivery d WHERE d.id = $1 AND d.tenant_id = $2
"""


async def get_delivery(
    conn: Conn | asyncpg.Pool, tenant_id: str, delivery_id: str
) -> WebhookDelivery | None:
    row = await conn.fetchrow(DELIVERY_BY_ID_SQL, delivery_id, tenant_id)
    return to_delivery(row) if row else None
