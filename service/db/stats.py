"""SQL behind the gauges that /metrics computes when scraped (service.metrics)."""

from __future__ import annotations

import asyncpg

TURN_COUNTS_SQL = "SELECT status, processor, count(*) AS n FROM turn GROUP BY status, processor"

# Uses turn_due_idx (partial on status = 'running').
DUE_CHECKS_SQL = "SELECT count(*) FROM turn WHERE status = 'running' AND next_check_at <= now()"


async def turn_counts(pool: asyncpg.Pool, timeout_s: float) -> list[tuple[str, str, int]]:
    """(status, processor, turns) across every tenant."""
    rows = await pool.fetch(TURN_COUNTS_SQL, timeout=timeout_s)
    return [(r["status"], r["processor"], r["n"]) for r in rows]


async def due_checks(pool: asyncpg.Pool, timeout_s: float) -> int:
    """Running turns whose next check is due now: the follower's backlog."""
    return int(await pool.fetchval(DUE_CHECKS_SQL, timeout=timeout_s))
