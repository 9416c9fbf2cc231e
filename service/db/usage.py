"""SQL for quotas: a tenant's spend in a month, the usage report, and the repair of the quota
counters (migration 0011: triggers on `turn` keep them and refuse the commit of a turn past a
limit)."""

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


# The quota counters' repair. Tenants whose counters disagree with their turns: open turns, and
# the spend of the month starting $1 (read without locks, so a turn committing meanwhile can make
# a tenant look wrong: the repair recounts it under the lock and finds it right). Each tenant's
# turns are read through its own indexes (open turns; turns by creation time).
DRIFTED_SQL = f"""
SELECT tn.id AS tenant_id
FROM tenant tn
LEFT JOIN quota_open_turns q ON q.tenant_id = tn.id
LEFT JOIN quota_month_spend s ON s.tenant_id = tn.id AND s.month = $1::date
CROSS JOIN LATERAL (
    SELECT count(*) AS n FROM turn t
    WHERE t.tenant_id = tn.id AND t.status IN ('queued', 'running')
) o
CROSS JOIN LATERAL (
    SELECT COALESCE(sum(m.usd), 0) AS usd FROM (
        SELECT t.estimated_cost_usd AS usd FROM turn t
        WHERE t.tenant_id = tn.id
          AND t.created_at >= ($1::date)::timestamp AT TIME ZONE 'UTC'
          AND t.created_at < ($1::date + interval '1 month') AT TIME ZONE 'UTC'
          AND {BILLABLE}
        UNION ALL
        SELECT d.usd FROM deleted_usage d WHERE d.tenant_id = tn.id AND d.month = $1::date
    ) m
) spent
WHERE COALESCE(q.open_turns, 0) <> o.n OR COALESCE(s.usd, 0) <> spent.usd
"""

# Lock the tenant's counter rows first (creating them if missing): a commit that counts a turn
# waits for them from here on, and one that counted before has committed. The recount that
# follows is a new statement, so its snapshot sees every turn those commits counted.
LOCK_COUNTERS_SQL = """
WITH o AS (
    INSERT INTO quota_open_turns AS q (tenant_id, open_turns) VALUES ($1, 0)
    ON CONFLICT (tenant_id) DO UPDATE SET open_turns = q.open_turns
    RETURNING open_turns
), s AS (
    INSERT INTO quota_month_spend AS s (tenant_id, month, usd) VALUES ($1, $2, 0)
    ON CONFLICT (tenant_id, month) DO UPDATE SET usd = s.usd
    RETURNING usd
)
SELECT o.open_turns, s.usd FROM o, s
"""

RECOUNT_SQL = f"""
WITH o AS (
    UPDATE quota_open_turns SET open_turns = (
        SELECT count(*) FROM turn WHERE tenant_id = $1 AND status IN ('queued', 'running')
    )
    WHERE tenant_id = $1
    RETURNING open_turns
), s AS (
    UPDATE quota_month_spend SET usd = ({MONTH_SPEND_SQL})
    WHERE tenant_id = $1 AND month = $2
    RETURNING usd
)
SELECT o.open_turns, s.usd FROM o, s
"""


async def drifted_tenants(conn: Conn | asyncpg.Pool, month: date) -> list[str]:
    """Tenants whose quota counters may disagree with their turns (this month's spend)."""
    return [r["tenant_id"] for r in await conn.fetch(DRIFTED_SQL, month)]


async def recount(
    conn: Conn, tenant_id: str, month: date
) -> tuple[tuple[int, Decimal], tuple[int, Decimal]]:
    """Set the tenant's counters to what its turns say (call in a transaction of its own);
    (open turns, spend) before and after."""
    before = await conn.fetchrow(LOCK_COUNTERS_SQL, tenant_id, month)
    after = await conn.fetchrow(RECOUNT_SQL, tenant_id, month)
    assert before is not None and after is not None  # both rows exist: the upserts made them
    return (before[0], before[1]), (after[0], after[1])
