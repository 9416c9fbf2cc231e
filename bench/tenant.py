"""Benchmark: one tenant is not a bottleneck. POST turn throughput of one API process with all
the load on one tenant (50 keys of it) against the same load spread over 50 tenants (one key
each), alternating rounds; each figure is the median of its rounds. Every tenant has a monthly
budget, so each new turn passes both quota counters (docs/design.md §2, "Quotas")."""

from __future__ import annotations

import asyncio
import statistics
from decimal import Decimal
from typing import Any

import asyncpg

from bench.api import API_RATE_LIMIT, BODY, MAX_RPS, _clear_jobs
from bench.harness import (
    Row,
    bench_settings,
    free_port,
    make_conversations,
    ratio,
    scratch_database,
)
from bench.load import LoadStats, run_load
from bench.procs import api_proc
from service.db.keys import create_key

KEYS = 50
GOAL = 0.8
# Large enough never to refuse a turn here: only the cost of counting is measured.
BUDGET_USD = Decimal(10**9)


async def _tenants(dsn: str) -> dict[str, list[tuple[str, str]]]:
    """(tenant id, key) of KEYS keys: of one tenant ("one"), and of KEYS tenants ("spread")."""
    conn = await asyncpg.connect(dsn)
    try:
        arms: dict[str, list[tuple[str, str]]] = {"one": [], "spread": []}
        for n in range(KEYS):
            for arm, name in (("one", "bench-one"), ("spread", f"bench-{n}")):
                _, key = await create_key(conn, name, monthly_budget_usd=BUDGET_USD)
                tenant_id = await conn.fetchval("SELECT id FROM tenant WHERE name = $1", name)
                arms[arm].append((str(tenant_id), key))
    finally:
        await conn.close()
    return arms


async def run(size: dict[str, Any]) -> tuple[list[Row], dict[str, Any]]:
    duration, rounds, connections = size["duration_s"], size["rounds"], size["connections"]
    async with scratch_database("tenant") as dsn:
        settings = bench_settings(dsn, "http://127.0.0.1:9")
        arms = await _tenants(dsn)
        per_arm = int(MAX_RPS * duration * rounds) + 1000
        posts: dict[str, list[tuple[str, str]]] = {}
        for arm, tenants in arms.items():
            ids = list(dict.fromkeys(t for t, _ in tenants))
            made = await make_conversations(dsn, ids, per_arm, f"conv_{arm[0]}")
            # Each request uses the next key of its arm, its conversation belonging to that
            # key's tenant (in the "one" arm, all of them the same tenant).
            posts[arm] = [
                (f"/v1/conversations/{c}/turns", tenants[g % KEYS if arm == "one" else t][1])
                for g, (c, t) in enumerate(made)
            ]
        port = free_port()
        proc = api_proc(settings, port, RATE_LIMIT_PER_MIN=str(API_RATE_LIMIT),
                        MAX_OPEN_TURNS_PER_TENANT=str(10**9))
        proc.start()
        results: dict[str, list[LoadStats]] = {"one": [], "spread": []}
        try:
            proc.wait_http(f"http://127.0.0.1:{port}/healthz")
            offsets = {"one": 0, "spread": 0}
            for r in range(rounds):
                for arm in ("spread", "one") if r % 2 == 0 else ("one", "spread"):
                    stats = run_load(f"http://127.0.0.1:{port}", "POST",
                                     posts[arm][offsets[arm]:], body=BODY, duration_s=duration,
                                     connections=connections)
                    offsets[arm] += int(stats["requests"]) + 1
                    results[arm].append(stats)
        finally:
            proc.stop()
        await _clear_jobs(dsn, settings.queue_name)
    one = {k: statistics.median(s[k] for s in results["one"]) for k in ("rps", "p50", "p99")}
    spread = {k: statistics.median(s[k] for s in results["spread"]) for k in ("rps", "p50", "p99")}
    rps_ratio = ratio(one["rps"], spread["rps"])
    rows = [
        Row(bench="tenant", measure="POST turn req/s, one tenant vs 50", value=one["rps"],
            baseline=spread["rps"], ratio=rps_ratio, goal=f"ratio ≥ {GOAL}",
            ok=rps_ratio >= GOAL),
        Row(bench="tenant", measure="POST turn p99, one tenant vs 50", value=one["p99"],
            unit="ms", baseline=spread["p99"], ratio=ratio(one["p99"], spread["p99"])),
    ]
    errors = sum(s["errors"] for s in results["one"] + results["spread"])
    if errors:
        rows.append(Row(bench="tenant", measure="POST turn errors", value=errors, ok=False))
    return rows, {"rounds": results, "duration_s": duration, "connections": connections}


if __name__ == "__main__":
    from bench.harness import render_table

    table_rows, _ = asyncio.run(run({"duration_s": 3, "rounds": 3, "connections": 32}))
    print(render_table(table_rows))
