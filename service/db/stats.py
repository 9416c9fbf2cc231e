"""SQL behind the gauges that /metrics computes when scraped (service.metrics)."""

from __future__ import annotations

import asyncpg

# Open turns only: turn_tenant_open_idx (partial on the same statuses) keeps this proportional to
# the work in progress, not to the table. Turns that ended are counted by the workers'
# research_turn_transitions_total instead.
OPEN_TURN_COUNTS_SQL = """
SELECT status, processor, count(*) AS n FROM turn
WHERE status IN ('queued', 'running')
GROUP BY status, processor
"""

# Uses turn_due_idx (partial on status = 'running').
DUE_CHECKS_SQL = "SELECT count(*) FROM turn WHERE status = 'running' AND next_check_at <= now()"


async def open_turn_counts(pool: asyncpg.Pool, timeout_s: float) -> list[tuple[str, str, int]]:
    """(status, processor, turns) of queued and running turns across every tenant."""
    rows = await pool.fetch(OPEN_TURN_COUNTS_SQL, timeout=timeout_s)
    return [(r["status"], r["processor"], r["n"]) for r in rows]


async def due_checks(pool: asyncpg.Pool, timeout_s: float) -> int:
    """Running turns whose next check is due now: the follower's backlog."""
    return int(await pool.fetchval(DUE_CHECKS_SQL, timeout=timeout_s))
