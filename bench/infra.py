"""CPU of what the service's processes lean on: the Postgres backends serving one database, and
the Redis server.

Postgres: the backends connected to the benchmark's database (pg_stat_activity), read from
/proc through psutil; a backend that ends between two readings loses what it spent since the
last one (the pools keep their connections, so few do). Redis: the server's own count
(`INFO cpu`, every thread), so a Redis shared with other work counts that work too: give the
benchmarks one of their own (BENCH_REDIS_URL). Both need the servers on this machine; otherwise
they read NaN.
"""

from __future__ import annotations

import math

import asyncpg
import psutil
import redis.asyncio as aioredis

BACKENDS_SQL = """
SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()
"""


class PgBackends:
    """CPU seconds spent by the backends of one database, counted from the first reading."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._seen: dict[int, float] = {}  # pid -> CPU seconds at its last reading
        self._spent = 0.0
        self.local = True

    async def cpu_seconds(self) -> float:
        conn = await asyncpg.connect(self._dsn)
        try:
            pids = [r["pid"] for r in await conn.fetch(BACKENDS_SQL)]
        finally:
            await conn.close()
        first = not self._seen
        for pid in pids:
            try:
                t = psutil.Process(pid).cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            now = t.user + t.system
            # A backend born since the last reading spent all its CPU since then (but the very
            # first reading is the zero point).
            before = self._seen.get(pid, now if first else 0.0)
            self._spent += now - before
            self._seen[pid] = now
        if pids and not self._seen:
            self.local = False  # the server is on another machine
        return self._spent if self.local else math.nan


class RedisServer:
    """CPU seconds of the Redis server (all of it), from its own INFO."""

    def __init__(self, url: str) -> None:
        self._url = url

    async def cpu_seconds(self) -> float:
        client = aioredis.from_url(self._url)
        try:
            info = await client.info("cpu")
        finally:
            await client.aclose()
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
