"""Benchmark 4: database growth. The API's read latency with N turns in Postgres against an
almost empty database, and an EXPLAIN of every SQL constant the API and the worker run.

The N turns (K per conversation, each with a `turn.queued` and a `turn.completed` event) are
generated with INSERT … SELECT generate_series, then ANALYZEd; so are M more conversations
(`conversations`, no turns) each tagged with its own `customer` metadata, for the list filtered
by metadata (one customer's conversation among M, against the one in the almost empty
database). Latency is measured with light
closed-loop load (a few connections, so it is latency rather than throughput) on random
conversations and turns. The EXPLAIN uses generic plans (plan_cache_mode = force_generic_plan),
the plans the API's prepared statements end up with, on the big database.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import pkgutil
import random
import statistics
from typing import Any

import asyncpg

import service.db
from bench.harness import (
    Row,
    bench_settings,
    free_port,
    make_tenants,
    ratio,
    scratch_database,
)
from bench.load import LoadStats, run_load
from bench.procs import api_proc
from service.db.turns import TURN_COLUMNS

TURNS_PER_CONVERSATION = 20
# Tables that grow with use: a sequential scan of one of these is a finding.
GROWING_TABLES = {"turn", "event", "conversation", "webhook_delivery", "webhook_attempt"}
GOAL_RATIO = 1.5
BIG_TABLE_ROWS = 10_000

GEN_CONVERSATIONS_SQL = """
INSERT INTO conversation (id, tenant_id, processor, turn_count, last_turn_id, event_count,
                          created_at, updated_at)
SELECT 'gc_' || c, ($1::text[])[1 + c % cardinality($1::text[])], 'lite', $4::int,
       'gt_' || c || '_' || $4::int, 2 * $4::int, now() - make_interval(secs => c), now()
FROM generate_series($2::int, $3::int) c
"""

GEN_TURNS_SQL = """
INSERT INTO turn (id, conversation_id, tenant_id, seq, parent_turn_id, input, processor,
                  output_schema, metadata, status, run_id, interaction_id, previous_interaction_id,
                  output, basis, created_at, started_at, completed_at)
SELECT 'gt_' || c || '_' || k, 'gc_' || c, ($1::text[])[1 + c % cardinality($1::text[])], k,
       CASE WHEN k > 1 THEN 'gt_' || c || '_' || (k - 1) END,
       to_jsonb('Question ' || k || ' of conversation ' || c), 'lite', '{"type": "text"}', '{}',
       'completed', 'trun_' || c || '_' || k, 'intr_' || c || '_' || k,
       CASE WHEN k > 1 THEN 'intr_' || c || '_' || (k - 1) END,
       jsonb_build_object('type', 'text',
                          'content', 'Answer ' || k || ': ' || repeat('lorem ', 20)),
       '[{"field": "output", "citations": [{"url": "https://example.com/a", "title": "A",
          "excerpts": ["An excerpt."]}], "reasoning": "Because.", "confidence": "high"}]',
       now() - make_interval(secs => c * 100 - k), now() - make_interval(secs => c * 100 - k),
       now() - make_interval(secs => c * 100 - k - 1)
FROM generate_series($2::int, $3::int) c, generate_series(1, $4::int) k
"""

# Each turn's two events carry the turn as the API shows it, built from the row.
GEN_EVENTS_SQL = f"""
INSERT INTO event (conversation_id, sequence, type, turn_id, data, created_at)
SELECT t.conversation_id, 2 * t.seq - 1 + e.i,
       CASE e.i WHEN 0 THEN 'turn.queued' ELSE 'turn.completed' END, t.id,
       (SELECT to_jsonb(x) FROM (SELECT {TURN_COLUMNS}) x), t.created_at
FROM turn t CROSS JOIN (VALUES (0), (1)) e(i)
WHERE t.conversation_id = ANY(SELECT 'gc_' || c FROM generate_series($1::int, $2::int) c)
"""


# Conversations a backend finds again by its own ids: one per customer, ten regions.
GEN_TAGGED_SQL = """
INSERT INTO conversation (id, tenant_id, processor, metadata, created_at, updated_at)
SELECT 'gm_' || c, ($1::text[])[1 + c % cardinality($1::text[])], 'lite',
       jsonb_build_object('customer', 'cu_' || c, 'region', 'r' || c % 10),
       now() - make_interval(secs => c), now()
FROM generate_series($2::int, $3::int) c
"""


async def generate_tagged(dsn: str, tenant_ids: list[str], conversations: int) -> None:
    """`conversations` tagged conversations (gm_1 …), in chunks, then ANALYZE."""
    conn = await asyncpg.connect(dsn)
    try:
        step = 50_000
        for low in range(1, conversations + 1, step):
            await conn.execute(GEN_TAGGED_SQL, tenant_ids, low,
                               min(conversations, low + step - 1))
        await conn.execute("ANALYZE conversation")
    finally:
        await conn.close()


async def generate(dsn: str, tenant_ids: list[str], conversations: int) -> None:
    """conversations x TURNS_PER_CONVERSATION turns and twice as many events, in chunks."""
    conn = await asyncpg.connect(dsn)
    try:
        step = 5000
        for low in range(1, conversations + 1, step):
            high = min(conversations, low + step - 1)
            async with conn.transaction():
                await conn.execute(
                    GEN_CONVERSATIONS_SQL, tenant_ids, low, high, TURNS_PER_CONVERSATION
                )
                await conn.execute(GEN_TURNS_SQL, tenant_ids, low, high, TURNS_PER_CONVERSATION)
                await conn.execute(GEN_EVENTS_SQL, low, high)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


FILTERED = "list conversations filtered by metadata"
READS = ("GET turn", "list turns", "list events", FILTERED)


def targets(
    conversations: int, keys: list[str], count: int, tagged: int = 1
) -> dict[str, list[tuple[str, str]]]:
    """Random (path, key) targets for the four reads; `tagged`: how many gm_ conversations."""
    rng = random.Random(conversations)
    picks = [rng.randint(1, conversations) for _ in range(count)]
    customers = [rng.randint(1, tagged) for _ in range(count)]
    key = lambda c: keys[c % len(keys)]  # noqa: E731
    return {
        FILTERED: [(f"/v1/conversations?metadata.customer=cu_{c}", key(c)) for c in customers],
        "GET turn": [
            (
                f"/v1/conversations/gc_{c}/turns/gt_{c}_{rng.randint(1, TURNS_PER_CONVERSATION)}",
                key(c),
            )
            for c in picks
        ],
        "list turns": [(f"/v1/conversations/gc_{c}/turns?limit=20", key(c)) for c in picks],
        "list events": [(f"/v1/conversations/gc_{c}/events?limit=100", key(c)) for c in picks],
    }


async def measure(
    dbs: dict[str, tuple[str, int, list[str], int]], size: dict[str, Any]
) -> dict[str, dict[str, list[LoadStats]]]:
    """p50s of the four reads on each database; the two APIs take turns, `rounds` times."""
    ports = {label: free_port() for label in dbs}
    procs = {
        label: api_proc(
            bench_settings(dsn, "http://127.0.0.1:9"),
            ports[label],
            RATE_LIMIT_PER_MIN="1000000000",
            WORKER_METRICS_PORT="0",
        )
        for label, (dsn, _, _, _) in dbs.items()
    }
    out: dict[str, dict[str, list[LoadStats]]] = {}
    try:
        for label, proc in procs.items():
            proc.start().wait_http(f"http://127.0.0.1:{ports[label]}/healthz")
        tgts = {label: targets(count, keys, 5000, tagged)
                for label, (_, count, keys, tagged) in dbs.items()}
        for name in READS:
            out[name] = {label: [] for label in dbs}
            for r in range(size["rounds"]):
                for label in sorted(dbs, reverse=r % 2 == 1):
                    out[name][label].append(
                        run_load(
                            f"http://127.0.0.1:{ports[label]}",
                            "GET",
                            tgts[label][name],
                            duration_s=size["duration_s"],
                            connections=size["connections"],
                        )
                    )
    finally:
        for proc in procs.values():
            proc.stop()
    return out


async def explain_all(dsn: str) -> dict[str, Any]:
    """Generic-plan EXPLAIN of every *_SQL constant in service/db: the scans each one uses.

    A statement is a finding when its plan scans a growing table sequentially although that
    table is big (the planner chose to), or when it still does with enable_seqscan off (no
    index can serve it at all; this also covers tables the generated data leaves empty).
    """
    conn = await asyncpg.connect(dsn)
    report: dict[str, Any] = {}
    try:
        found = await conn.fetch(
            "SELECT relname, reltuples::bigint FROM pg_class WHERE relname = ANY($1::text[])",
            list(GROWING_TABLES),
        )
        rows: dict[str, int] = {r["relname"]: r["reltuples"] for r in found}
        big = {t for t, n in rows.items() if n >= BIG_TABLE_ROWS}
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        for info in pkgutil.iter_modules(service.db.__path__):
            module = importlib.import_module(f"service.db.{info.name}")
            for name, sql in sorted(vars(module).items()):
                if not (name.endswith("_SQL") and isinstance(sql, str)) or not _is_query(sql):
                    continue
                key = f"{info.name}.{name}"
                try:
                    chosen = await _explain(conn, sql)
                    await conn.execute("SET enable_seqscan = off")
                    forced = await _explain(conn, sql)
                except asyncpg.PostgresError as exc:
                    report[key] = {"error": str(exc)}
                    continue
                finally:
                    await conn.execute("RESET enable_seqscan")
                seq = {_seq_table(s) for s in chosen if _seq_table(s) in big}
                seq |= {_seq_table(s) for s in forced if _seq_table(s) in GROWING_TABLES}
                report[key] = {"scans": chosen, "seq_scans_on_growing_tables": sorted(seq)}
    finally:
        await conn.close()
    return report


def _is_query(sql: str) -> bool:
    return sql.lstrip().split(None, 1)[0].upper() in (
        "SELECT",
        "INSERT",
        "UPDATE",
        "DELETE",
        "WITH",
    )


def _seq_table(scan: str) -> str | None:
    return scan.split(" on ")[1] if scan.startswith("Seq Scan on ") else None


async def _explain(conn: asyncpg.Connection, sql: str) -> list[str]:
    await conn.execute(f"PREPARE bench_q AS {sql}")
    try:
        types = await conn.fetchval(
            "SELECT cardinality(parameter_types) FROM pg_prepared_statements WHERE name = 'bench_q'"
        )
        args = f"({', '.join(['NULL'] * types)})" if types else ""
        plan = json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE bench_q{args}"))
    finally:
        await conn.execute("DEALLOCATE bench_q")
    scans: list[str] = []
    _walk(plan[0]["Plan"], scans)
    return scans


def _walk(node: dict[str, Any], scans: list[str]) -> None:
    if "Relation Name" in node:
        index = f" using {node['Index Name']}" if "Index Name" in node else ""
        scans.append(f"{node['Node Type']} on {node['Relation Name']}{index}")
    for child in node.get("Plans", []):
        _walk(child, scans)


async def run(size: dict[str, Any]) -> tuple[list[Row], dict[str, Any]]:
    conversations = size["turns"] // TURNS_PER_CONVERSATION
    tagged = size.get("conversations", 1)
    results: dict[str, Any] = {}
    async with scratch_database("dbempty") as empty, scratch_database("dbbig") as big:
        dbs = {}
        for label, dsn, count, tags in (("empty", empty, 1, 1),
                                        ("big", big, conversations, tagged)):
            tenants = await make_tenants(dsn, 20 if count > 1 else 1)
            await generate(dsn, [t for t, _ in tenants], count)
            await generate_tagged(dsn, [t for t, _ in tenants], tags)
            dbs[label] = (dsn, count, [k for _, k in tenants], tags)
        results["reads"] = await measure(dbs, size)
        results["explain"] = await explain_all(big)
    rows = []
    for name, by_db in results["reads"].items():
        big_p50 = statistics.median(s["p50"] for s in by_db["big"])
        empty_p50 = statistics.median(s["p50"] for s in by_db["empty"])
        value = ratio(big_p50, empty_p50)
        rows.append(
            Row(
                bench="dbgrowth",
                measure=(f"{name} p50, {tagged:,} conversations vs empty" if name == FILTERED
                         else f"{name} p50, {size['turns']:,} turns vs empty"),
                value=big_p50,
                unit="ms",
                baseline=empty_p50,
                ratio=value,
                goal=f"ratio ≤ {GOAL_RATIO}",
                ok=value <= GOAL_RATIO,
            )
        )
    explained = results["explain"]
    bad = sorted(k for k, v in explained.items() if v.get("seq_scans_on_growing_tables"))
    failed = sorted(k for k, v in explained.items() if "error" in v)
    audited = sum(1 for v in explained.values() if "scans" in v)
    rows.append(
        Row(
            bench="dbgrowth",
            measure="SQL constants with a Seq Scan on a growing table",
            value=len(bad),
            baseline=audited,
            goal="0 (baseline: statements explained)",
            ok=not bad,
        )
    )
    if failed:
        rows.append(
            Row(
                bench="dbgrowth",
                measure="SQL constants EXPLAIN could not plan",
                value=len(failed),
                ok=False,
            )
        )
    results.update(seq_scans={k: explained[k]["scans"] for k in bad}, explain_errors=failed)
    return rows, results


if __name__ == "__main__":
    import sys

    from bench.harness import render_table

    # python -m bench.dbgrowth TURNS [TAGGED_CONVERSATIONS]
    turns, tagged = [*map(int, sys.argv[1:3]), 1][:2]
    table_rows, raw = asyncio.run(
        run({"turns": turns, "conversations": tagged, "duration_s": 2, "rounds": 2,
             "connections": 4})
    )
    print(json.dumps({k: raw[k] for k in ("seq_scans", "explain_errors")}, indent=1))
    print(render_table(table_rows))
