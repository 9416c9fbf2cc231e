"""Benchmark 2: many research runs in flight on one worker process.

N turns on N conversations are POSTed at once through the API; the sandbox (its own process)
holds each run for about L seconds (uniformly 0.75-1.25 x L, so checks are not phase-locked
with completions); one worker process starts and follows them all. Measured on the worker:
peak RSS and CPU seconds (psutil), Parallel calls per turn (the sandbox's call log), and the
lag from the sandbox completing a run to the turn being completed in Postgres.

Push mode sets PUBLIC_BASE_URL, so each run is created with a webhook to the API's
/v1/hooks/parallel; poll mode relies on the follower's schedule alone; group mode
(PARALLEL_TASK_GROUPS=on, no PUBLIC_BASE_URL) adds the runs to task groups and follows the groups'
event streams. Push and poll create runs one by one (PARALLEL_TASK_GROUPS=off).
"""

from __future__ import annotations

import asyncio
import random
import time
from functools import partial
from typing import Any

import asyncpg
import httpx

from bench.harness import (
    Row,
    bench_settings,
    free_port,
    make_conversations,
    make_tenants,
    post_turns,
    ratio,
    scratch_database,
    summarize,
    wait_until,
)
from bench.procs import Proc, push_available, service_stack, wait_worker

WEBHOOK_SECRET = "bench_webhook_secret"
IDLE_SAMPLE_S = 10.0
CALLS_GOAL_LENGTH_S = 120.0
MIN_LENGTH = 0.75  # the shortest run, as a share of the configured length (see the docstring)
STEADY_MIN_S = 20.0  # the shortest window the in-flight CPU is measured over
STEADY_GOAL_PCT = 10.0  # issue 16: worker CPU once all runs are created, at 100,000 runs
_row = partial(Row, bench="inflight")
# Parallel's documented limit is 2,000 creations a minute per key; the benchmark measures the
# service's own capacity, as with a raised limit (see docs/benchmarks.md).
CREATIONS_PER_MIN = 1_000_000


async def run_config(mode: str, n: int, length_s: float) -> dict[str, Any]:
    """One inflight run: returns its raw figures."""
    async with scratch_database("inflight") as dsn:
        tenants = await make_tenants(dsn, max(1, n // 500))
        ids, keys = [t for t, _ in tenants], [k for _, k in tenants]
        convs = await make_conversations(dsn, ids, n, "conv_")
        sandbox_port, api_port = free_port(), free_port()
        settings = bench_settings(
            dsn, f"http://127.0.0.1:{sandbox_port}", creations_per_min=CREATIONS_PER_MIN
        )
        env = {
            "WORKER_METRICS_PORT": "0",
            "RATE_LIMIT_PER_MIN": "1000000000",
            # lite's deadline is 120 s (twice its documented longest run): longer runs would
            # fail as timeouts, so it scales with the run length here.
            "RUN_DEADLINE_SCALE": str(max(1.0, length_s / 40)),
        }
        with service_stack(
            settings, mode, api_port, sandbox_port, WEBHOOK_SECRET, **env
        ) as (_sandbox, _api, worker):
            if mode == "push" and not await push_available(f"http://127.0.0.1:{api_port}"):
                return {"mode": mode, "n": n, "length_s": length_s, "unavailable": True}
            await wait_worker(worker)
            idle_rss = worker.rss()
            idle_cpu_s = await _idle_cpu(worker)
            worker.mark()
            rng = random.Random(n)
            lengths = [length_s * rng.uniform(MIN_LENGTH, 2 - MIN_LENGTH) for _ in range(n)]
            t0 = time.time()
            await post_turns(f"http://127.0.0.1:{api_port}", convs, keys, lengths)
            posted_s = time.time() - t0
            steady = await _steady_cpu(worker, dsn, n, t0 + MIN_LENGTH * length_s)
            done = await wait_until(
                lambda: _all_terminal(dsn, n), timeout_s=posted_s + length_s * 1.5 + 180
            )
            elapsed = time.time() - t0
            cpu_s, peak_rss = worker.cpu_since_mark(), worker.peak_rss
            figures = await _figures(dsn, f"http://127.0.0.1:{sandbox_port}", t0)
            # The worker's idle CPU (arq's Redis polls, the follower's and dispatcher's ticks)
            # is per second, not per turn: sampled before and after, 10 s each (psutil counts
            # 10 ms ticks, so shorter samples are too coarse).
            idle_cpu_per_s = (idle_cpu_s + await _idle_cpu(worker)) / (2 * IDLE_SAMPLE_S)
    figures.update(
        mode=mode,
        n=n,
        length_s=length_s,
        all_terminal=done,
        posted_s=posted_s,
        elapsed_s=elapsed,
        worker_cpu_s=cpu_s,
        worker_peak_rss_mb=peak_rss / 2**20,
        worker_idle_rss_mb=idle_rss / 2**20,
        worker_idle_cpu_per_s=idle_cpu_per_s,
        poll_max_s=settings.poll_max_s,
        steady_cpu_pct=steady,
        cpu_ms_per_turn=1000 * cpu_s / n,
        net_cpu_ms_per_turn=1000 * (cpu_s - idle_cpu_per_s * elapsed) / n,
    )
    return figures


async def _steady_cpu(worker: Proc, dsn: str, n: int, first_end: float) -> float | None:
    """The worker's CPU (% of a core) once every run is created and before the first can end:
    what holding N runs in flight costs. None when that window is under STEADY_MIN_S."""
    created = await wait_until(lambda: _all_running(dsn, n),
                               timeout_s=max(0.0, first_end - time.time()))
    if not created:
        return None
    start, before = time.time(), worker.cpu_seconds()
    if first_end - start < STEADY_MIN_S:
        return None
    await asyncio.sleep(first_end - start - 1)
    return 100 * (worker.cpu_seconds() - before) / (time.time() - start)


async def _idle_cpu(worker: Proc) -> float:
    before = worker.cpu_seconds()
    await asyncio.sleep(IDLE_SAMPLE_S)
    return worker.cpu_seconds() - before


async def _turns_at_least(dsn: str, n: int, where: str) -> bool:
    """Whether at least `n` turns match the SQL condition `where`."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(f"SELECT count(*) FROM turn WHERE {where}") >= n
    finally:
        await conn.close()


async def _all_terminal(dsn: str, n: int) -> bool:
    return await _turns_at_least(dsn, n, "status IN ('completed', 'failed', 'cancelled')")


async def _all_running(dsn: str, n: int) -> bool:
    return await _turns_at_least(dsn, n, "run_id IS NOT NULL")


async def _figures(dsn: str, sandbox_url: str, t0: float) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=sandbox_url, timeout=120) as client:
        runs = (await client.get("/_sandbox/runs")).json()["data"]
        calls = (await client.get("/_sandbox/calls")).json()
    conn = await asyncpg.connect(dsn)
    try:
        turns = await conn.fetch(
            "SELECT run_id, status, extract(epoch FROM completed_at) AS done FROM turn"
        )
    finally:
        await conn.close()
    finished = {r["run_id"]: r["completed_at_unix"] for r in runs if r["completed_at_unix"]}
    lags = [
        float(t["done"]) - finished[t["run_id"]]
        for t in turns
        if t["status"] == "completed" and t["run_id"] in finished
    ]
    kinds: dict[str, int] = {}
    for call in calls["data"]:
        path = call["path"]
        kind = (
            "create"
            if call["method"] == "POST"
            else ("result" if path.endswith("/result") else "retrieve")
        )
        kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "turns": len(turns),
        "completed": sum(t["status"] == "completed" for t in turns),
        "runs": len(runs),
        "created_all_s": max(r["created_at_unix"] for r in runs) - t0 if runs else float("nan"),
        "calls_total": calls["total"],
        "calls_per_turn": calls["total"] / max(1, len(turns)),
        "calls_by_kind": kinds,
        "lag_s": summarize(lags),
    }


def rows_for(f: dict[str, Any]) -> list[Row]:
    """Table rows of one configuration."""
    label = f"{f['mode']} {f['n']:,}x{f['length_s']:g} s"
    if f.get("unavailable"):
        return [
            _row(
                measure=f"{label}: no /v1/hooks/parallel route (push mode)",
                value=float("nan"),
                ok=False,
            )
        ]
    # Issue 14: 300 MB at 10,000 runs; issue 16: 400 MB at 100,000.
    rss_goal = 400 if f["n"] >= 100_000 else 300
    calls_goal, lag_goal = {"push": (4, 1.0), "group": (2.2, 1.0)}.get(
        f["mode"], (20, f["poll_max_s"]))
    # The issue states the calls goal for runs of 120 s; longer runs get more safety checks.
    calls_apply = f["length_s"] <= CALLS_GOAL_LENGTH_S
    lag = f["lag_s"]
    rows = [
        _row(
            measure=f"{label}: all runs created",
            value=f["created_all_s"],
            unit="s",
            baseline=f["posted_s"],
            ratio=ratio(f["created_all_s"], f["posted_s"]),
            goal="baseline: all POSTs answered",
        ),
        _row(
            measure=f"{label}: worker peak RSS",
            value=f["worker_peak_rss_mb"],
            unit="MB",
            baseline=f["worker_idle_rss_mb"],
            ratio=ratio(f["worker_peak_rss_mb"], f["worker_idle_rss_mb"]),
            goal=f"≤ {rss_goal} MB",
            ok=f["worker_peak_rss_mb"] <= rss_goal,
        ),
        _row(
            measure=f"{label}: worker CPU per turn",
            value=f["cpu_ms_per_turn"],
            unit="ms",
            baseline=f["net_cpu_ms_per_turn"],
            goal="baseline: net of idle CPU",
        ),
        _row(
            measure=f"{label}: Parallel calls per turn",
            value=f["calls_per_turn"],
            baseline=2.0,
            ratio=f["calls_per_turn"] / 2,
            goal=f"≤ {calls_goal} (baseline: create + result)"
            if calls_apply
            else f"goal is for {CALLS_GOAL_LENGTH_S:g} s runs",
            ok=f["calls_per_turn"] <= calls_goal if calls_apply else None,
        ),
        _row(
            measure=f"{label}: lag p50 / p99",
            value=lag["p50"],
            unit="s",
            baseline=lag["p99"],
            goal="baseline column: p99",
        ),
        _row(
            measure=f"{label}: lag p95",
            value=lag["p95"],
            unit="s",
            goal=f"≤ {lag_goal:g} s",
            ok=lag["p95"] <= lag_goal,
        ),
    ]
    if f.get("steady_cpu_pct") is not None:
        rows.append(
            _row(
                measure=f"{label}: worker CPU with all runs in flight",
                value=f["steady_cpu_pct"],
                unit="%",
                baseline=100 * f["worker_idle_cpu_per_s"],
                goal=f"≤ {STEADY_GOAL_PCT:g} % of a core (baseline: idle)",
                ok=f["steady_cpu_pct"] <= STEADY_GOAL_PCT,
            )
        )
    if f["completed"] < f["n"] or not f["all_terminal"]:
        rows.append(
            _row(
                measure=f"{label}: turns completed",
                value=f["completed"],
                baseline=f["n"],
                goal="all",
                ok=False,
            )
        )
    return rows


def scaling_rows(configs: list[dict[str, Any]]) -> list[Row]:
    """CPU per turn of the longest run length against the shortest, per mode and size; and CPU
    per Parallel call, which separates what a check costs from how many checks a run gets."""
    rows = []
    for mode in ("group", "push", "poll"):
        for n in sorted({c["n"] for c in configs}):
            same = sorted(
                (c for c in configs if c["mode"] == mode and c["n"] == n),
                key=lambda c: c["length_s"],
            )
            if len(same) < 2:
                continue
            short, long = same[0], same[-1]
            limit = 1.1 if mode == "group" else 1.25
            value = ratio(long["net_cpu_ms_per_turn"], short["net_cpu_ms_per_turn"])
            rows.append(
                _row(
                    measure=f"{mode} {n:,}: net CPU per turn, "
                    f"{long['length_s']:g} s vs {short['length_s']:g} s runs",
                    value=long["net_cpu_ms_per_turn"],
                    unit="ms",
                    baseline=short["net_cpu_ms_per_turn"],
                    ratio=value,
                    goal=f"ratio ≤ {limit} (does not grow)",
                    ok=value <= limit,
                )
            )
            per_call = [c["net_cpu_ms_per_turn"] / c["calls_per_turn"] for c in (long, short)]
            rows.append(
                _row(
                    measure=f"{mode} {n:,}: net CPU per Parallel call, "
                    f"{long['length_s']:g} s vs {short['length_s']:g} s runs",
                    value=per_call[0],
                    unit="ms",
                    baseline=per_call[1],
                    ratio=ratio(*per_call),
                    goal="explains the row above",
                )
            )
    return rows


async def run(size: dict[str, Any]) -> tuple[list[Row], dict[str, Any]]:
    configs = []
    for mode, n, length in size["configs"]:
        configs.append(await run_config(mode, n, length))
    measured = [c for c in configs if not c.get("unavailable")]
    rows = [row for f in configs for row in rows_for(f)] + scaling_rows(measured)
    return rows, {"configs": configs}


if __name__ == "__main__":
    import sys

    from bench.harness import render_table

    mode, n, length = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    table_rows, raw = asyncio.run(run({"configs": [(mode, n, length)]}))
    print(raw)
    print(render_table(table_rows))
