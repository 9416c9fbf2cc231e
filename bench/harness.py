"""What every benchmark shares: statistics, result rows and their table, databases, settings.

Pure helpers (percentile, ratio, Row, render_table) have no I/O, so tests/test_bench_harness.py
checks them without running a benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import msgspec

from service.config import Settings
from service.db.keys import create_key
from service.db.migrate import migrate
from service.devstack import free_port as free_port  # the one helper, shared with tests

# A server the benchmarks may create databases on, and a Redis database index of their own.
ADMIN_DSN = (
    os.environ.get("BENCH_DATABASE_URL")
    or os.environ.get("TEST_DATABASE_URL")
    or "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9")


# --- statistics ---------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Count, p50, p95, p99 and max of a sample."""
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else math.nan,
    }


def ratio(value: float, baseline: float) -> float:
    """value / baseline, NaN when the baseline is zero or missing."""
    if not baseline or math.isnan(baseline) or math.isnan(value):
        return math.nan
    return value / baseline


# --- result rows and the table ------------------------------------------------------------


class Row(msgspec.Struct, kw_only=True):
    """One line of the results table. `ratio` is service/baseline when there is a baseline;
    `ok` is whether the goal holds (None: no goal for this figure)."""

    bench: str
    measure: str
    value: float
    unit: str = ""
    baseline: float | None = None
    ratio: float | None = None
    goal: str = ""
    ok: bool | None = None


def fmt(value: float | None, unit: str = "") -> str:
    """A short human figure: 3 significant digits, thousands separated."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000:
        text = f"{value:,.0f}"
    elif magnitude >= 100:
        text = f"{value:.0f}"
    elif magnitude >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".rstrip()


def render_table(rows: Iterable[Row]) -> str:
    """The markdown table README and bench/results.md show."""
    lines = [
        "| benchmark | measure | service | baseline | ratio | goal | met |",
        "|---|---|---:|---:|---:|---|:-:|",
    ]
    for r in rows:
        met = "-" if r.ok is None else ("yes" if r.ok else "**no**")
        lines.append(
            f"| {r.bench} | {r.measure} | {fmt(r.value, r.unit)} | {fmt(r.baseline, r.unit)} "
            f"| {fmt(r.ratio)} | {r.goal} | {met} |"
        )
    return "\n".join(lines)


# --- infrastructure -----------------------------------------------------------------------


def with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


@contextlib.asynccontextmanager
async def scratch_database(label: str) -> AsyncIterator[str]:
    """A migrated database of our own (bench_<label>_<random>), dropped afterwards."""
    name = f"bench_{label}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = with_database(ADMIN_DSN, name)
    try:
        await migrate(dsn)
        yield dsn
    finally:
        admin = await asyncpg.connect(ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def bench_settings(database_url: str, parallel_url: str, **overrides: Any) -> Settings:
    """Production defaults, pointed at our database, Redis index and sandbox, on a fresh queue."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": REDIS_URL,
        "parallel_api_key": "bench-key",
        "parallel_base_url": parallel_url,
        "queue_name": f"bench:{secrets.token_hex(4)}",
        "webhook_allow_private": True,
        "log_format": "json",
        # On a loaded, shared machine a cold pool's first burst (50 conversations posting at
        # once) can wait past the 2 s outage deadlines and answer 503: these bound outages,
        # not cost, so the benchmarks give them room.
        "db_acquire_timeout_s": 30.0,
        "db_lock_timeout_s": 30.0,
    }
    values.update(overrides)
    return Settings(**values)


async def make_tenants(database_url: str, count: int) -> list[tuple[str, str]]:
    """(tenant id, API key) for `count` new tenants, one key each."""
    conn = await asyncpg.connect(database_url)
    try:
        tenants = []
        for n in range(count):
            name = f"bench-{n}"
            _, key = await create_key(conn, name)
            tenant_id = await conn.fetchval("SELECT id FROM tenant WHERE name = $1", name)
            tenants.append((str(tenant_id), key))
    finally:
        await conn.close()
    return tenants


# Conversations made in SQL (setup, not what is measured), dealt round-robin to the tenants.
MAKE_CONVERSATIONS_SQL = """
INSERT INTO conversation (id, tenant_id, processor)
SELECT $2 || lpad(g::text, 8, '0'), ($1::text[])[1 + g % cardinality($1::text[])], 'lite'
FROM generate_series(1, $3) g
"""


async def make_conversations(
    database_url: str, tenant_ids: list[str], count: int, prefix: str
) -> list[tuple[str, int]]:
    """(conversation id, index of its tenant in tenant_ids) for `count` new conversations."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(MAKE_CONVERSATIONS_SQL, tenant_ids, prefix, count)
    finally:
        await conn.close()
    return [(f"{prefix}{g:08d}", g % len(tenant_ids)) for g in range(1, count + 1)]


async def wait_until(predicate: Any, timeout_s: float, interval: float = 0.5) -> bool:
    """Await `predicate()` until it is true or `timeout_s` passes; returns whether it held."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        if await predicate():
            return True
        if loop.time() > deadline:
            return False
        await asyncio.sleep(interval)


async def post_turns(
    base_url: str,
    convs: list[tuple[str, int]],
    keys: list[str],
    lengths: list[float],
    concurrency: int = 32,
) -> None:
    """POST one turn on each conversation, `concurrency` at a time; the sandbox holds turn i's
    run lengths[i] seconds. With wrk installed, wrk sends them (at 100,000 turns this
    generator's own CPU would be half a core beside the service's)."""
    from bench.load import have_wrk, post_once_wrk  # bench.load imports this module

    bodies = [msgspec.json.encode({"input": f"[sandbox:slow={lengths[i]:.2f}] bench question {i}"})
              for i in range(len(convs))]
    if have_wrk():
        targets = [(f"/v1/conversations/{conv}/turns", keys[tenant], bodies[i])
                   for i, (conv, tenant) in enumerate(convs)]
        await asyncio.to_thread(post_once_wrk, base_url, targets, connections=concurrency)
        return
    todo = iter(enumerate(convs))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as client:

        async def post(i: int, conv: str, auth: dict[str, str]) -> None:
            for _ in range(3):
                try:
                    r = await client.post(
                        f"/v1/conversations/{conv}/turns", content=bodies[i],
                        headers={**auth, "Content-Type": "application/json"},
                    )
                    break
                except httpx.TransportError:
                    # A kept-alive connection the server closed as we reused it: post again
                    # unless the first attempt got through.
                    r = await client.get(f"/v1/conversations/{conv}/turns", headers=auth)
                    if r.status_code == 200 and r.json()["data"]:
                        return
            if r.status_code != 202:
                raise RuntimeError(f"POST turn answered {r.status_code}: {r.text[:300]}")

        async def poster() -> None:
            for i, (conv, tenant) in todo:
                await post(i, conv, {"Authorization": f"Bearer {keys[tenant]}"})

        await asyncio.gather(*(poster() for _ in range(concurrency)))
