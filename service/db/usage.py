"""SQL for quotas: open turns, a tenant's spend in a month, and the usage report."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import asyncpg

from service.db.pool import Conn

# What a turn costs against the budget: every turn that has (or may still get) a Parallel run.
# A turn that ended without one (cancelled while queued, or refused by Parallel at creation) was
# never billed and is left out; a queued turn counts as a reservation.
BILLABLE = "(t.run_id IS NOT NULL OR t.status IN ('queued', 'running', 'completed'))"

# Turns of the month as (processor, conversation_id, usd), live ones and deleted conversations'.
# $1 tenant, $2 the month's first day; months are calendar months in UTC.
MONTH_TURNS_SQL = f"""
SELECT t.processor, t.conversation_id, 1 AS turns, t.estimated_cost_usd AS usd
FROM turn t
WHERE t.tenant_id = $1
  AND t.created_at >= ($2::date)::timestamp AT TIME ZONE 'UTC'
  AND t.created_at < ($2::date + interval '1 month') AT TIME ZONE 'UTC'
  AND {BILLABLE}
UNION ALL
SELECT d.processor, d.conversation_id, d.turns, d.usd
FROM deleted_usage d
WHERE d.tenant_id = $1 AND d.month = $2::date
"""

LOCK_TENANT_SQL = "SELECT monthly_budget_usd FROM tenant WHERE id = $1 FOR UPDATE"


async def lock_tenant(conn: Conn, tenant_id: str) -> Decimal | None:
    """Lock the tenant row for the transaction (its turns are counted under it); its budget."""
    budget: Decimal | None = await conn.fetchval(LOCK_TENANT_SQL, tenant_id)
    return budget


OPEN_TURNS_SQL = """
SELECT
    (SELECT count(*) FROM turn WHERE conversation_id = $2 AND status IN ('queued', 'running')),
    (SELECT count(*) FROM turn WHERE tenant_id = $1 AND status IN ('queued', 'running'))
"""


async def count_open_turns(
    conn: Conn, tenant_id: str, conversation_id: str
) -> tuple[int, int]:
    """Queued plus running turns of the conversation, and of the whole tenant."""
    row = await conn.fetchrow(OPEN_TURNS_SQL, tenant_id, conversation_id)
    assert row is not None  # a SELECT without FROM returns its one row
    return int(row[0]), int(row[1])


MONTH_SPEND_SQL = f"SELECT COALESCE(sum(usd), 0) FROM ({MONTH_TURNS_SQL}) m"


async def month_spend(
    conn: Conn | asyncpg.Pool, tenant_id: str, month: date
) -> Decimal:
    spend: Decimal = await conn.fetchval(MONTH_SPEND_SQL, tenant_id, month)
    return spend


BY_PROCESSOR_SQL = f"""
SELECT processor, sum(turns)::int AS turns, sum(usd) AS usd FROM ({MONTH_TURNS_SQL}) m
GROUP BY processor ORDER BY processor
"""
BY_CONVERSATION_SQL = f"""
SELECT conversation_id, sum(turns)::int AS turns, sum(usd) AS usd FROM ({MONTH_TURNS_SQL}) m
GROUP BY conversation_id ORDER BY conversation_id
"""


async def usage_by_processor(
    conn: Conn, tenant_id: str, month: date
) -> list[asyncpg.Record]:
    return await conn.fetch(BY_PROCESSOR_SQL, tenant_id, month)


async def usage_by_conversation(
    conn: Conn, tenant_id: str, month: date
) -> list[asyncpg.Record]:
    return await conn.fetch(BY_CONVERSATION_SQL, tenant_id, month)


TENANT_BUDGET_SQL = "SELECT monthly_budget_usd FROM tenant WHERE id = $1"


async def tenant_budget(conn: Conn, tenant_id: str) -> Decimal | None:
    budget: Decimal | None = await conn.fetchval(TENANT_BUDGET_SQL, tenant_id)
    return budget


ARCHIVE_USAGE_SQL = f"""
INSERT INTO deleted_usage AS d (tenant_id, month, conversation_id, processor, turns, usd)
SELECT t.tenant_id, date_trunc('month', t.created_at AT TIME ZONE 'UTC')::date, t.conversation_id,
       t.processor, count(*), sum(t.estimated_cost_usd)
FROM turn t
WHERE t.conversation_id = $1 AND t.tenant_id = $2 AND {BILLABLE}
GROUP BY 1, 2, 3, 4
ON CONFLICT (tenant_id, month, conversation_id, processor)
DO UPDATE SET turns = d.turns + EXCLUDED.turns, usd = d.usd + EXCLUDED.usd
"""


async def archive_usage(conn: Conn, tenant_id: str, conversation_id: str) -> None:
    """Keep the spend of a conversation about to be deleted (call in the deleting transaction)."""
    await conn.execute(ARCHIVE_USAGE_SQL, conversation_id, tenant_id)
