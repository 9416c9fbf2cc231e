"""Benchmark 3: end-to-end overhead of a turn, against the loop a user would otherwise write.

C conversations x K chained turns with an instant sandbox (its own process). Baseline: the
README's loop calling the SDK directly (create, then result, chaining previous_interaction_id),
C of them concurrently. Service: POST the turn, then GET it with ?wait= until it ends, then the
next; API and worker are processes of their own. Per-turn latency is from sending the question
to holding the answer; the added latency is service minus baseline at the same percentile.
Baseline and service alternate for `rounds` rounds (each service round on conversations of its
own); each service process's CPU per turn is the median of its rounds, and the latencies are those
of all rounds, so one noisy round moves neither side much.

The SDK loop's own CPU is bimodal, and not by noise: on the SDK's default transport (httpx's
connection pool, at most 20 kept-alive connections) 50 concurrent conversations settle, for a
whole round, either into reopening a connection for almost every call (about 3 ms a turn here)
or into keeping 50 alive and scanning all of them, with a `getpeername` and a `poll` each, on
every request the pool assigns (about 5 ms). So it runs BASELINE_ROUNDS times per service round
and its figure is their mean, the cost a user's loop has on average, with the cheapest and the
dearest round beside it. A fourth arm runs the same loop on the SDK's aiohttp transport, the one
the service's worker uses: steady (1.8 to 2.1 ms a turn), the like-for-like yardstick.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx
import parallel
import psutil
from parallel import AsyncParallel

from bench import minimal
from bench.harness import (
    REDIS_URL,
    Row,
    bench_settings,
    free_port,
    make_conversations,
    make_tenants,
    ratio,
    scratch_database,
    summarize,
)
from bench.inflight import WEBHOOK_SECRET
from bench.infra import PgBackends, RedisServer
from bench.procs import push_available, service_stack, wait_worker

# Added latency p50 per turn: under load (C conversations at once), and for one alone.
GOAL_ADDED_P50_MS = 100
GOAL_ADDED_SERIAL_MS = 30
# CPU per turn of the API and worker against the SDK loop's own; with Postgres and Redis.
GOAL_CPU_RATIO = 2.0
GOAL_CPU_ALL_RATIO = 2.5
# SDK loop rounds per service round (each about a second at 50 x 5): its CPU is bimodal (above).
BASELINE_ROUNDS = 4


async def sdk_loop(
    base_url: str, conversations: int, turns: int, *, aiohttp: bool = False
) -> tuple[list[float], float]:
    """The README's loop, `conversations` at once; (per-turn latencies in s, wall time). With
    `aiohttp`, on the SDK's aiohttp transport instead of its default (httpx)."""
    http_client = parallel.DefaultAioHttpClient() if aiohttp else None
    client = AsyncParallel(api_key="bench-key", base_url=base_url, http_client=http_client)
    latencies: list[float] = []

    async def conversation(c: int) -> None:
        previous = None
        for k in range(turns):
            t0 = time.perf_counter()
            run = await client.task_run.create(
                input=f"conversation {c} question {k}",
                processor="lite",
                previous_interaction_id=previous,
            )
            await client.task_run.result(run.run_id, api_timeout=600)
            previous = run.interaction_id
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(conversation(c) for c in range(conversations)))
    finally:
        await client.close()
    return latencies, time.perf_counter() - t0


async def service_loop(
    api_url: str, convs: list[tuple[str, int]], keys: list[str], turns: int
) -> tuple[list[float], float]:
    """The same conversations through the service: POST, then long-poll until the turn ends."""
    latencies: list[float] = []
    limits = httpx.Limits(
        max_connections=len(convs) + 10, max_keepalive_connections=len(convs) + 10
    )
    # The load generator on the SDK's aiohttp transport: on httpx's own pool, its 60 kept-alive
    # connections were all scanned on every request (the SDK loop's dear state, in this
    # module's docstring): 11 ms of CPU a turn, more than the API and the worker together,
    # taken from the service's two cores (2.0 ms on aiohttp).
    async with parallel.DefaultAioHttpClient(base_url=api_url, limits=limits, timeout=90) as client:

        async def conversation(c: int, conv: str, tenant: int) -> None:
            auth = {"Authorization": f"Bearer {keys[tenant]}"}
            for k in range(turns):
                t0 = time.perf_counter()
                r = await client.post(
                    f"/v1/conversations/{conv}/turns",
                    headers=auth,
                    json={"input": f"conversation {c} question {k}"},
                )
                if r.status_code != 202:
                    raise RuntimeError(f"POST turn answered {r.status_code}: {r.text[:300]}")
                turn = r.json()
                while turn["status"] not in ("completed", "failed", "cancelled"):
                    r = await client.get(
                        f"/v1/conversations/{conv}/turns/{turn['id']}",
                        params={"wait": 30},
                        headers=auth,
                    )
                    turn = r.json()
                if turn["status"] != "completed":
                    raise RuntimeError(f"turn ended {turn['status']}: {turn.get('error')}")
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(conversation(i, c, t) for i, (c, t) in enumerate(convs)))
    return latencies, time.perf_counter() - t0


def _own_cpu_seconds() -> float:
    """This process alone (the load generator), not its children."""
    t = psutil.Process().cpu_times()
    return t.user + t.system


class _Cpu:
    """CPU seconds each process spent since the previous lap."""

    def __init__(self, readers: dict[str, Callable[[], float]]) -> None:
        self.readers = readers
        self.last = {name: read() for name, read in readers.items()}

    def lap(self) -> dict[str, float]:
        now = {name: read() for name, read in self.readers.items()}
        spent = {name: now[name] - self.last[name] for name in now}
        self.last = now
        return spent


def _median_cpu(laps: list[dict[str, float]]) -> dict[str, float]:
    """Each process's median CPU over the rounds' laps."""
    return {name: statistics.median(lap[name] for lap in laps) for name in laps[0]}


def _mean_cpu(laps: list[dict[str, float]]) -> dict[str, float]:
    """Each process's mean CPU over the rounds' laps (of a bimodal figure, the median is one
    mode or the other)."""
    return {name: statistics.fmean(lap[name] for lap in laps) for name in laps[0]}


async def run_mode(
    mode: str, conversations: int, turns: int, serial: int, rounds: int = 1
) -> dict[str, Any]:
    async with scratch_database("e2e") as dsn:
        tenants = await make_tenants(dsn, max(1, conversations // 50))
        ids, keys = [t for t, _ in tenants], [k for _, k in tenants]
        all_convs = await make_conversations(dsn, ids, conversations * rounds, "conv_")
        convs = all_convs[:conversations]
        minimal_convs = await make_conversations(dsn, ids, conversations, "convm_")
        sandbox_port, api_port = free_port(), free_port()
        sandbox_url = f"http://127.0.0.1:{sandbox_port}"
        settings = bench_settings(dsn, sandbox_url)
        env = {"WORKER_METRICS_PORT": "0", "RATE_LIMIT_PER_MIN": "1000000000"}
        with service_stack(
            settings, mode, api_port, sandbox_port, WEBHOOK_SECRET, **env
        ) as (sandbox, api, worker):
            if mode == "push" and not await push_available(f"http://127.0.0.1:{api_port}"):
                return {
                    "mode": mode,
                    "conversations": conversations,
                    "turns": turns,
                    "unavailable": True,
                }
            await wait_worker(worker)
            # Baseline and service take turns on the same machine, the baseline first. Then the
            # same with one conversation (`serial` turns): the hops alone, without CPU queueing.
            cpu = _Cpu(
                {
                    "sandbox": sandbox.cpu_seconds,
                    "api": api.cpu_seconds,
                    "worker": worker.cpu_seconds,
                    "client": _own_cpu_seconds,
                }
            )
            infra = _Infra(dsn)
            await infra.lap()
            base_lat, svc_lat = [], []
            base_laps, svc_laps, base_walls, svc_walls, aio_laps = [], [], [], [], []
            for r in range(rounds):
                for _ in range(BASELINE_ROUNDS):
                    latencies, wall = await sdk_loop(sandbox_url, conversations, turns)
                    base_lat += latencies
                    base_walls.append(wall)
                    base_laps.append(cpu.lap() | await infra.lap())
                await sdk_loop(sandbox_url, conversations, turns, aiohttp=True)
                aio_laps.append(cpu.lap() | await infra.lap())
                latencies, wall = await service_loop(
                    f"http://127.0.0.1:{api_port}",
                    all_convs[r * conversations:(r + 1) * conversations], keys, turns,
                )
                svc_lat += latencies
                svc_walls.append(wall)
                svc_laps.append(cpu.lap() | await infra.lap())
            base_cpu, svc_cpu = _mean_cpu(base_laps), _median_cpu(svc_laps)
            sdk_rounds = sorted(lap["client"] for lap in base_laps)
            base_wall, svc_wall = statistics.median(base_walls), statistics.median(svc_walls)
            mini = await minimal_arm(settings, sandbox.cpu_seconds, infra, minimal_convs, turns)
            serial_base, _ = await sdk_loop(sandbox_url, 1, serial)
            serial_svc, _ = await service_loop(
                f"http://127.0.0.1:{api_port}", convs[:1], keys, serial
            )
    base, svc = summarize(base_lat), summarize(svc_lat)
    n = conversations * turns
    return {
        "mode": mode,
        "conversations": conversations,
        "turns": turns,
        "rounds": rounds,
        "serial_turns": serial,
        "serial_baseline_s": summarize(serial_base),
        "serial_service_s": summarize(serial_svc),
        "cpu_ms_per_turn": {
            "baseline": {k: 1000 * v / n for k, v in base_cpu.items()},
            "service": {k: 1000 * v / n for k, v in svc_cpu.items()},
            "baseline_aiohttp": {k: 1000 * v / n for k, v in _median_cpu(aio_laps).items()},
            "baseline_rounds": [1000 * v / n for v in sdk_rounds],
        },
        "baseline_s": base,
        "service_s": svc,
        "baseline_wall_s": base_wall,
        "service_wall_s": svc_wall,
        "added_p50_ms": 1000 * (svc["p50"] - base["p50"]),
        "added_p95_ms": 1000 * (svc["p95"] - base["p95"]),
        "minimal": mini | {"cpu_ms_per_turn": {k: 1000 * v / n for k, v in mini["cpu"].items()}},
    }


class _Infra:
    """CPU seconds of the database's Postgres backends and of Redis since the previous lap."""

    def __init__(self, dsn: str) -> None:
        self.readers: dict[str, PgBackends | RedisServer] = {
            "postgres": PgBackends(dsn), "redis": RedisServer(REDIS_URL)}
        self.last: dict[str, float] = {}

    async def lap(self) -> dict[str, float]:
        now = {name: await r.cpu_seconds() for name, r in self.readers.items()}
        spent = {name: now[name] - self.last.get(name, now[name]) for name in now}
        self.last = now
        return spent


async def minimal_arm(
    settings: Any, sandbox_cpu: Callable[[], float], infra: _Infra,
    convs: list[tuple[str, int]], turns: int,
) -> dict[str, Any]:
    """The same conversations through bench.minimal's API and worker (their own processes)."""
    port = free_port()
    api, worker = minimal.procs(settings, port)
    with api, worker:
        api.wait_http(f"http://127.0.0.1:{port}/healthz")
        await wait_worker(worker)
        await infra.lap()
        cpu = _Cpu({"sandbox": sandbox_cpu, "api": api.cpu_seconds,
                    "worker": worker.cpu_seconds, "client": _own_cpu_seconds})
        latencies, wall = await service_loop(f"http://127.0.0.1:{port}", convs, ["-"], turns)
        spent = cpu.lap() | await infra.lap()
    return {"latency_s": summarize(latencies), "wall_s": wall, "cpu": spent}


def rows_for(f: dict[str, Any]) -> list[Row]:
    label = f"{f['mode']} {f['conversations']}x{f['turns']}"
    if f.get("unavailable"):
        return [
            Row(
                bench="e2e",
                measure=f"{label}: no /v1/hooks/parallel route (push mode)",
                value=float("nan"),
                ok=False,
            )
        ]
    base, svc, cpu = f["baseline_s"], f["service_s"], f["cpu_ms_per_turn"]
    added_serial = 1000 * (f["serial_service_s"]["p50"] - f["serial_baseline_s"]["p50"])
    return [
        Row(
            bench="e2e",
            measure=f"{label}: turn latency p50",
            value=1000 * svc["p50"],
            unit="ms",
            baseline=1000 * base["p50"],
            ratio=ratio(svc["p50"], base["p50"]),
            goal=f"added ≤ {GOAL_ADDED_P50_MS} ms",
            ok=f["added_p50_ms"] <= GOAL_ADDED_P50_MS,
        ),
        Row(
            bench="e2e",
            measure=f"{label}: turn latency p95",
            value=1000 * svc["p95"],
            unit="ms",
            baseline=1000 * base["p95"],
            ratio=ratio(svc["p95"], base["p95"]),
        ),
        Row(
            bench="e2e",
            measure=f"{label}: added per turn p50 / p95",
            value=f["added_p50_ms"],
            unit="ms",
            baseline=f["added_p95_ms"],
            goal="baseline column: p95",
        ),
        Row(
            bench="e2e",
            measure=f"{label}: wall time",
            value=f["service_wall_s"],
            unit="s",
            baseline=f["baseline_wall_s"],
            ratio=ratio(f["service_wall_s"], f["baseline_wall_s"]),
        ),
        Row(
            bench="e2e",
            measure=f"{label}: CPU per turn, all processes (Postgres and Redis included)",
            value=sum(cpu["service"].values()),
            unit="ms",
            baseline=sum(cpu["baseline"].values()),
            ratio=ratio(sum(cpu["service"].values()), sum(cpu["baseline"].values())),
        ),
        Row(
            bench="e2e",
            measure=f"{f['mode']} 1x{f['serial_turns']} (no queueing): added per turn p50",
            value=added_serial,
            unit="ms",
            baseline=1000 * f["serial_baseline_s"]["p50"],
            goal=f"≤ {GOAL_ADDED_SERIAL_MS} ms (baseline: SDK p50)",
            ok=added_serial <= GOAL_ADDED_SERIAL_MS,
        ),
    ]


async def run(size: dict[str, Any]) -> tuple[list[Row], dict[str, Any]]:
    results = [
        await run_mode(mode, size["conversations"], size["turns"], size["serial_turns"],
                       size.get("rounds", 1))
        for mode in size["modes"]
    ]
    return [row for f in results for row in rows_for(f) + cost_rows(f)], {"modes": results}


def cost_rows(f: dict[str, Any]) -> list[Row]:
    """What a turn costs in CPU: the service's API + worker against the SDK loop's own, and
    against the minimal API + worker (bench.minimal), without and with Postgres and Redis."""
    if f.get("unavailable"):
        return []
    label = f"{f['mode']} {f['conversations']}x{f['turns']}"
    svc, base = f["cpu_ms_per_turn"]["service"], f["cpu_ms_per_turn"]["baseline"]
    mini = f["minimal"]["cpu_ms_per_turn"]
    infra = ("postgres", "redis")

    def ours(cpu: dict[str, float], *extra: str) -> float:
        return sum(cpu[k] for k in ("api", "worker", *extra))

    sdk, sdk_all = base["client"], base["client"] + sum(base[k] for k in infra)
    spread = f["cpu_ms_per_turn"]["baseline_rounds"]
    aio = f["cpu_ms_per_turn"]["baseline_aiohttp"]["client"]
    rows = [
        Row(bench="e2e",
            measure=f"{label}: the SDK loop's CPU per turn, mean of {len(spread)} rounds "
                    f"(rounds from {spread[0]:.2f} to {spread[-1]:.2f} ms)",
            value=sdk, unit="ms", goal="the yardstick of the two rows below"),
        Row(bench="e2e", measure=f"{label}: CPU per turn, API + worker vs the SDK loop",
            value=ours(svc), unit="ms", baseline=sdk, ratio=ratio(ours(svc), sdk),
            goal=f"ratio ≤ {GOAL_CPU_RATIO}", ok=ratio(ours(svc), sdk) <= GOAL_CPU_RATIO),
        Row(bench="e2e",
            measure=f"{label}: CPU per turn, API + worker + Postgres + Redis vs the SDK loop's",
            value=ours(svc, *infra), unit="ms", baseline=sdk_all,
            ratio=ratio(ours(svc, *infra), sdk_all), goal=f"ratio ≤ {GOAL_CPU_ALL_RATIO}",
            ok=ratio(ours(svc, *infra), sdk_all) <= GOAL_CPU_ALL_RATIO),
        Row(bench="e2e",
            measure=f"{label}: CPU per turn, API + worker vs the SDK loop on its aiohttp "
                    "transport (the worker's)",
            value=ours(svc), unit="ms", baseline=aio, ratio=ratio(ours(svc), aio),
            goal="baseline: like for like, steady"),
        Row(bench="e2e",
            measure=f"{label}: CPU per turn, API + worker vs a minimal one (no guarantees)",
            value=ours(svc), unit="ms", baseline=ours(mini), ratio=ratio(ours(svc), ours(mini)),
            goal="baseline: bench/minimal.py"),
        Row(bench="e2e",
            measure=f"{label}: the same with Postgres + Redis",
            value=ours(svc, *infra), unit="ms", baseline=ours(mini, *infra),
            ratio=ratio(ours(svc, *infra), ours(mini, *infra)), goal="baseline: bench/minimal.py"),
        Row(bench="e2e", measure=f"{label}: turn latency p50 vs the minimal one",
            value=1000 * f["service_s"]["p50"], unit="ms",
            baseline=1000 * f["minimal"]["latency_s"]["p50"],
            ratio=ratio(f["service_s"]["p50"], f["minimal"]["latency_s"]["p50"])),
    ]
    return rows


if __name__ == "__main__":
    import sys

    from bench.harness import render_table

    table_rows, raw = asyncio.run(
        run(
            {
                "modes": sys.argv[1].split(","),
                "serial_turns": 10,
                "conversations": int(sys.argv[2]),
                "turns": 5,
            }
        )
    )
    print(render_table(table_rows))
