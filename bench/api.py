"""Benchmark 1: the API's two hot routes against the floor app, under the same closed-loop load.

POST /v1/conversations/{id}/turns goes to a fresh conversation every time (so every request
also enqueues a start job, as in the floor); GET …/turns/{id} reads the turns the POSTs made.
Scenarios alternate service/floor for `rounds` rounds and each figure is the median of its
rounds, so a burst of noise from other work on the machine hits both sides alike.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from bench.harness import (
    REDIS_URL,
    Row,
    bench_settings,
    free_port,
    make_conversations,
    make_tenants,
    ratio,
    scratch_database,
)
from bench.load import LoadStats, run_load
from bench.procs import api_proc, floor_proc

BODY = b'{"input": "Which country won the most gold medals in 2026?"}'
API_RATE_LIMIT = 6_000
# Upper bound on POST throughput per second, to make enough fresh conversations.
MAX_RPS = 4000


async def run(size: dict[str, Any]) -> tuple[list[Row], dict[str, Any]]:
    duration, rounds, connections = size["duration_s"], size["rounds"], size["connections"]
    async with scratch_database("api") as dsn:
        settings = bench_settings(dsn, "http://127.0.0.1:9")
        # Many tenants, as in production: open-turn counts and rate limits are per tenant/key.
        # The floor's rows belong to a tenant of their own, so they count against no one.
        tenants = await make_tenants(dsn, size["tenants"] + 1)
        floor_tenant, tenants = tenants[-1][0], tenants[:-1]
        ids, keys = [t for t, _ in tenants], [k for _, k in tenants]
        per_app = int(MAX_RPS * duration * rounds) + 1000
        posts = {
            "service": [
                (f"/v1/conversations/{c}/turns", keys[t])
                for c, t in await make_conversations(dsn, ids, per_app, "conv_s")
            ],
            "floor": [
                (f"/v1/conversations/{c}/turns", "-")
                for c, _ in await make_conversations(dsn, [floor_tenant], per_app, "conv_f")
            ],
        }
        # Conversations for the event-loop comparison (cpu_per_request), made now so that
        # neither of its two servers pays for the other's rows.
        loop_posts = {
            name: [
                (f"/v1/conversations/{c}/turns", keys[t])
                for c, t in await make_conversations(dsn, ids, per_app // rounds, f"conv_{name}")
            ]
            for name in LOOP_CONFIGS
        }
        ports = {"service": free_port(), "floor": free_port()}
        # The per-key rate limit stays on (its Redis round trips are part of the cost) at a
        # limit a busy backend key might have, ten times what one key sends here: 6,000 a
        # minute, so the process leases 60 requests at a time (at the default 600: 6).
        procs = {
            "service": api_proc(settings, ports["service"], RATE_LIMIT_PER_MIN=str(API_RATE_LIMIT)),
            "floor": floor_proc(settings, ports["floor"], floor_tenant),
        }
        for proc in procs.values():
            proc.start()
        try:
            for name, proc in procs.items():
                proc.wait_http(f"http://127.0.0.1:{ports[name]}/healthz")
            results: dict[str, dict[str, list[LoadStats]]] = {
                "POST": {"service": [], "floor": []},
                "GET": {"service": [], "floor": []},
            }
            offsets = {"service": 0, "floor": 0}
            for r in range(rounds):
                for name in ("floor", "service") if r % 2 == 0 else ("service", "floor"):
                    stats = run_load(
                        f"http://127.0.0.1:{ports[name]}",
                        "POST",
                        posts[name][offsets[name] :],
                        body=BODY,
                        duration_s=duration,
                        connections=connections,
                    )
                    offsets[name] += int(stats["requests"]) + 1
                    results["POST"][name].append(stats)
            gets = await _turn_targets(dsn, dict(tenants), 20_000)
            for r in range(rounds):
                for name in ("floor", "service") if r % 2 == 0 else ("service", "floor"):
                    stats = run_load(
                        f"http://127.0.0.1:{ports[name]}",
                        "GET",
                        gets,
                        duration_s=duration,
                        connections=connections,
                    )
                    results["GET"][name].append(stats)
        finally:
            for proc in procs.values():
                proc.stop()
        loops = cpu_per_request(settings, loop_posts, gets, duration, connections)
        await _clear_jobs(dsn, settings.queue_name)
    rows: list[Row] = []
    goals = {"POST": 0.6, "GET": 0.8}  # issue 16: against the floor without request logging
    for method, by_app in results.items():
        label = "POST turn" if method == "POST" else "GET turn"
        svc = {k: statistics.median(s[k] for s in by_app["service"]) for k in ("rps", "p50", "p99")}
        flr = {k: statistics.median(s[k] for s in by_app["floor"]) for k in ("rps", "p50", "p99")}
        rps_ratio = ratio(svc["rps"], flr["rps"])
        rows.append(
            Row(
                bench="api",
                measure=f"{label} req/s",
                value=svc["rps"],
                baseline=flr["rps"],
                ratio=rps_ratio,
                goal=f"ratio ≥ {goals[method]}",
                ok=rps_ratio >= goals[method],
            )
        )
        for pct in ("p50", "p99"):
            rows.append(
                Row(
                    bench="api",
                    measure=f"{label} {pct}",
                    value=svc[pct],
                    unit="ms",
                    baseline=flr[pct],
                    ratio=ratio(svc[pct], flr[pct]),
                )
            )
        errors = sum(s["errors"] for s in by_app["service"] + by_app["floor"])
        if errors:
            rows.append(Row(bench="api", measure=f"{label} errors", value=errors, ok=False))
    rows += loop_rows(loops)
    return rows, {"rounds": results, "duration_s": duration, "connections": connections,
                  "cpu_per_request_ms": loops}


# `research-service api` on uvloop and httptools (its defaults) against asyncio's loop and h11.
LOOP_CONFIGS = {
    "uvloop": ["--loop", "uvloop", "--http", "httptools"],
    "asyncio": ["--loop", "asyncio", "--http", "h11"],
}


def cpu_per_request(
    settings: Any, posts: dict[str, list[tuple[str, str]]], gets: list[tuple[str, str]],
    duration: float, connections: int,
) -> dict[str, dict[str, float]]:
    """The API process's CPU milliseconds per request, POST and GET, for each LOOP_CONFIGS
    entry: each its own process, one after the other, under the same load."""
    figures: dict[str, dict[str, float]] = {}
    for name, cli in LOOP_CONFIGS.items():
        port = free_port()
        proc = api_proc(settings, port, cli=cli, RATE_LIMIT_PER_MIN=str(API_RATE_LIMIT))
        with proc:
            proc.wait_http(f"http://127.0.0.1:{port}/healthz")
            figures[name] = {}
            for method, targets in (("POST", posts[name]), ("GET", gets)):
                before = proc.cpu_seconds()
                stats = run_load(f"http://127.0.0.1:{port}", method, targets,
                                 body=BODY if method == "POST" else b"",
                                 duration_s=duration, connections=connections)
                spent = proc.cpu_seconds() - before
                figures[name][method] = 1000 * spent / max(1.0, stats["requests"])
    return figures


def loop_rows(figures: dict[str, dict[str, float]]) -> list[Row]:
    return [
        Row(
            bench="api",
            measure=f"{method} turn: API CPU per request, uvloop + httptools vs asyncio + h11",
            value=figures["uvloop"][method],
            unit="ms",
            baseline=figures["asyncio"][method],
            ratio=ratio(figures["uvloop"][method], figures["asyncio"][method]),
            goal="ratio < 1 (they help)",
            ok=figures["uvloop"][method] < figures["asyncio"][method],
        )
        for method in ("POST", "GET")
    ]


async def _turn_targets(dsn: str, keys: dict[str, str], limit: int) -> list[tuple[str, str]]:
    """GET targets: turns the POSTs made, in random order, each with its tenant's key."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT id, conversation_id, tenant_id FROM turn WHERE tenant_id = ANY($1::text[])"
            " ORDER BY random() LIMIT $2",
            list(keys),
            limit,
        )
    finally:
        await conn.close()
    return [
        (f"/v1/conversations/{r['conversation_id']}/turns/{r['id']}", keys[r["tenant_id"]])
        for r in rows
    ]


async def _clear_jobs(dsn: str, queue_name: str) -> None:
    """Drop the start jobs the POSTs enqueued (no worker ran them)."""
    conn = await asyncpg.connect(dsn)
    try:
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM turn")]
    finally:
        await conn.close()
    client = aioredis.from_url(REDIS_URL)
    try:
        for i in range(0, len(ids), 5000):
            await client.delete(*(f"arq:job:start_turn:{t}" for t in ids[i : i + 5000]))
        await client.delete(queue_name)
    finally:
        await client.aclose()


if __name__ == "__main__":
    from bench.harness import render_table

    table_rows, _ = asyncio.run(
        run({"duration_s": 3, "rounds": 1, "connections": 32, "tenants": 100})
    )
    print(render_table(table_rows))
