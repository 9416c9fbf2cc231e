"""Benchmark 5: what an idle service costs.

The API and one worker (each its own process, the service's default mode), with no traffic at
all, for `duration_s` (60 s) after a settling pause: CPU milliseconds per second of each
(psutil, user + system, from /proc), of the Postgres backends serving the service's database
and of the Redis server. Baseline for the API: the floor app (bench/floor.py, bare Litestar on
the same uvicorn) idle beside it in the same run, measured over the same window.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Any

from bench.harness import (
    REDIS_URL,
    Row,
    bench_settings,
    free_port,
    make_tenants,
    ratio,
    scratch_database,
)
from bench.infra import PgBackends, RedisServer
from bench.procs import api_proc, floor_proc, sandbox_proc, wait_worker, worker_proc

GOAL_MS_PER_S = 3.0
_row = partial(Row, bench="idle", unit="ms/s")


async def run(size: dict[str, Any]) -> tuple[list[Row], dict[str, Any]]:
    duration, settle = size["duration_s"], size.get("settle_s", 10.0)
    async with scratch_database("idle") as dsn:
        tenants = await make_tenants(dsn, 2)
        sandbox_port, api_port, floor_port = free_port(), free_port(), free_port()
        settings = bench_settings(dsn, f"http://127.0.0.1:{sandbox_port}")
        env = {"WORKER_METRICS_PORT": "0"}
        procs = {
            "sandbox": sandbox_proc(sandbox_port, 0.0),
            "api": api_proc(settings, api_port, **env),
            "worker": worker_proc(settings, **env),
            "floor": floor_proc(settings, floor_port, tenants[0][0]),
        }
        for proc in procs.values():
            proc.start()
        try:
            procs["sandbox"].wait_http(f"http://127.0.0.1:{sandbox_port}/_sandbox/health")
            procs["api"].wait_http(f"http://127.0.0.1:{api_port}/healthz")
            procs["floor"].wait_http(f"http://127.0.0.1:{floor_port}/healthz")
            await wait_worker(procs["worker"])
            # Start-up work (the reconciler's first pass, pools filling) is not idling.
            await asyncio.sleep(settle)
            backends, redis = PgBackends(dsn), RedisServer(REDIS_URL)
            pg0, redis0 = await backends.cpu_seconds(), await redis.cpu_seconds()
            cpu0 = {name: proc.cpu_seconds() for name, proc in procs.items()}
            t0 = time.monotonic()
            await asyncio.sleep(duration)
            elapsed = time.monotonic() - t0
            spent = {name: proc.cpu_seconds() - cpu0[name] for name, proc in procs.items()}
            spent["postgres"] = await backends.cpu_seconds() - pg0
            spent["redis"] = await redis.cpu_seconds() - redis0
        finally:
            for proc in procs.values():
                proc.stop()
    per_s = {name: 1000 * s / elapsed for name, s in spent.items()}
    return rows_for(per_s, elapsed), {"ms_per_s": per_s, "elapsed_s": elapsed}


def rows_for(per_s: dict[str, float], elapsed: float) -> list[Row]:
    window = f"{elapsed:.0f} s"
    return [
        _row(
            measure=f"API CPU per second, no traffic ({window})",
            value=per_s["api"],
            baseline=per_s["floor"],
            ratio=ratio(per_s["api"], per_s["floor"]),
            goal=f"≤ {GOAL_MS_PER_S:g} ms/s (baseline: the floor app idle)",
            ok=per_s["api"] <= GOAL_MS_PER_S,
        ),
        _row(
            measure=f"worker CPU per second, no traffic ({window})",
            value=per_s["worker"],
            goal=f"≤ {GOAL_MS_PER_S:g} ms/s",
            ok=per_s["worker"] <= GOAL_MS_PER_S,
        ),
        _row(
            measure=f"Postgres backends of the service's database, no traffic ({window})",
            value=per_s["postgres"],
        ),
        _row(measure=f"Redis server, no traffic ({window})", value=per_s["redis"]),
    ]


if __name__ == "__main__":
    import sys

    from bench.harness import render_table

    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
    table_rows, raw = asyncio.run(run({"duration_s": seconds}))
    print(raw)
    print(render_table(table_rows))
