"""Prometheus metrics of the API (`GET /metrics`) and the worker (its own port), all defined here.

Counters and histograms count what this process did. With PROMETHEUS_MULTIPROC_DIR set,
prometheus_client keeps them in files in that folder and every scrape adds up all the processes
that share it (several API processes behind one port), so totals stay right. Gauges of shared
state (turns by status, queue depth) are not kept in any process: the API measures them in
Postgres and Redis, at most once per `metrics_state_max_age_s` (5 s) whatever the scrape rate
(StateCache), so they are right whichever replica answers, give or take that age (aggregate
them with max(), not sum()). docs/operations.md lists every metric and the alerts worth setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.db import stats
from service.models import TERMINAL_STATUSES

if TYPE_CHECKING:
    import asyncpg
    from arq.connections import ArqRedis

    from service.models import Turn

log = structlog.get_logger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The classic text format (what generate_latest writes for these legacy-named metrics), each
# parameter once: Prometheus 3 picks its parser with Go's mime.ParseMediaType, which refuses a
# repeated parameter (prometheus_client's CONTENT_TYPE_LATEST plus Litestar's own charset gave
# `charset=utf-8` twice, and the scrape failed).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPEN_STATUSES = ("queued", "running")
STATE_QUERY_TIMEOUT_S = 2.0

HTTP_REQUESTS = Counter(
    "research_http_requests_total", "HTTP requests answered, by route template and status.",
    ["method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "research_http_request_duration_seconds", "Time to answer an HTTP request (SSE: the stream).",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TURN_TRANSITIONS = Counter(
    "research_turn_transitions_total", "Turns that entered a status, where the change happened.",
    ["status", "processor"],
)
TURN_DURATION = Histogram(
    "research_turn_duration_seconds", "From a turn's creation to its terminal status.",
    ["status", "processor"],
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400),
)
PARALLEL_REQUESTS = Counter(
    "research_parallel_requests_total",
    "Calls to Parallel's Task API by endpoint and outcome: ok, the HTTP status of an error "
    "answer, or the error class when there was no answer.",
    ["endpoint", "status"],
)
PARALLEL_DURATION = Histogram(
    "research_parallel_request_duration_seconds", "Time of a call to Parallel's Task API.",
    ["endpoint"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
PARALLEL_WEBHOOK_REJECTED = Counter(
    "research_parallel_webhook_rejected_total",
    "Parallel webhooks (POST /v1/hooks/parallel) refused with 401, by reason: mismatch (wrong "
    "signature: PARALLEL_WEBHOOK_SECRET is probably wrong), unconfigured (no secret set), "
    "headers (webhook-id or webhook-timestamp missing), timestamp (older or newer than 300 s).",
    ["reason"],
)
WEBHOOK_DELIVERIES = Counter(
    "research_webhook_deliveries_total", "Webhook delivery attempts to clients, by outcome.",
    ["outcome"],
)
WEBHOOK_DURATION = Histogram(
    "research_webhook_delivery_duration_seconds", "Time of a webhook delivery attempt.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RECONCILER_REPAIRS = Counter(
    "research_reconciler_repairs_total",
    "Things the reconciler put right, by kind (requeued_start: a turn whose job Redis lost; "
    "quota_counter: a tenant whose quota counters disagreed with its turns).",
    ["kind"],
)

CREATE_IN_DOUBT = Counter(
    "research_create_in_doubt_total",
    "Start attempts whose create may have made a Parallel run nobody follows (billed, never "
    "read), by reason: connection (broke after sending), timeout (no answer in time) or "
    "attempt_lost (worker died, lease ran out).",
    ["reason"],
)
EXTRA_RUNS = Counter(
    "research_extra_runs_total",
    "Parallel runs a start attempt made and got the id of, but its turn does not follow (billed, "
    "never read), by reason: stale_attempt (a newer attempt had taken over; the run is in "
    "turn_extra_run), turn_deleted, or unrecorded (Postgres did not answer within the attempt's "
    "lease; the run id is only in the log).",
    ["reason"],
)
CONTEXT_RESEEDED = Counter(
    "research_context_reseeded_total",
    "Creates Parallel refused because of their previous_interaction_id (expired or unknown) that "
    "were sent once more without it, the lineage's questions and answers prefixed to the input, "
    "by outcome: created (the turn's context is `reseeded`) or refused (that create was refused "
    "too; the turn failed with Parallel's error).",
    ["outcome"],
)

CONVERSATIONS_EXPIRED = Counter(
    "research_conversations_expired_total",
    "Conversations the retention sweep deleted, each after its expires_at (ttl_seconds).",
)

TASK_GROUPS_FALLBACK = Counter(
    "research_task_groups_fallback_total",
    "Times this worker stopped using Parallel task groups (PARALLEL_TASK_GROUPS=auto) and went "
    "back to one-by-one runs, by reason: unsupported (a group route answered 404, 405 or 501), "
    "refused (another 4xx) or failing (group calls kept failing); it tries groups again later.",
    ["reason"],
)

RATE_LIMIT_FAIL_OPEN = Counter(
    "research_rate_limit_fail_open_total",
    "Requests let through without a rate-limit count because Redis did not answer.",
)
REDIS_OUTAGES = Counter(
    "research_redis_outages_total",
    "Times this worker lost Redis (it keeps running, probes it, and resumes when it answers).",
)


def turn_transition(turn: Turn) -> None:
    """Count a turn entering its current status (call after the change committed)."""
    TURN_TRANSITIONS.labels(turn.status, turn.processor).inc()
    if turn.status in TERMINAL_STATUSES and turn.completed_at is not None:
        seconds = (turn.completed_at - turn.created_at).total_seconds()
        TURN_DURATION.labels(turn.status, turn.processor).observe(max(0.0, seconds))


def record_webhook_delivery(outcome: str, seconds: float | None = None) -> None:
    """Count one delivery attempt: outcome is e.g. delivered, failed (will retry), gave_up."""
    WEBHOOK_DELIVERIES.labels(outcome).inc()
    if seconds is not None:
        WEBHOOK_DURATION.observe(seconds)


def create_in_doubt(reason: str) -> None:
    CREATE_IN_DOUBT.labels(reason).inc()


def context_reseeded(outcome: str) -> None:
    CONTEXT_RESEEDED.labels(outcome).inc()


def conversation_expired() -> None:
    CONVERSATIONS_EXPIRED.inc()


def task_groups_fallback(reason: str) -> None:
    TASK_GROUPS_FALLBACK.labels(reason).inc()


def rate_limit_fail_open() -> None:
    RATE_LIMIT_FAIL_OPEN.inc()


def redis_outage() -> None:
    REDIS_OUTAGES.inc()


def extra_run(reason: str) -> None:
    EXTRA_RUNS.labels(reason).inc()


def reconciler_repairs(kind: str, count: int) -> None:
    if count:
        RECONCILER_REPAIRS.labels(kind).inc(count)


# Each request's two series, by (method, route template, status): labels() takes a lock and
# builds its key on every call, a tenth of the access layer's cost.
_http_series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
MAX_HTTP_SERIES = 1000


def http_request(method: str, route: str, status: int, seconds: float) -> None:
    key = (method, route, status)
    series = _http_series.get(key)
    if series is None:
        if len(_http_series) >= MAX_HTTP_SERIES:
            _http_series.clear()
        series = _http_series[key] = (
            HTTP_REQUESTS.labels(method, route, str(status)), HTTP_DURATION.labels(method, route)
        )
    series[0].inc()
    series[1].observe(seconds)


def call_outcome(exc: BaseException) -> str:
    """The `status` label of a failed call: the answer's HTTP status, else the error's class."""
    status = getattr(exc, "status_code", None)
    return str(status) if isinstance(status, int) else type(exc).__name__


@contextlib.contextmanager
def parallel_call(endpoint: str) -> Iterator[None]:
    """Time and count one call to Parallel (service.clients.parallel wraps each SDK call)."""
    start = time.perf_counter()
    outcome = "ok"
    try:
        yield
    except BaseException as exc:
        outcome = call_outcome(exc)
        raise
    finally:
        PARALLEL_REQUESTS.labels(endpoint, outcome).inc()
        PARALLEL_DURATION.labels(endpoint).observe(time.perf_counter() - start)


def process_registry() -> CollectorRegistry:
    """What this process (or, in multiprocess mode, every process sharing the folder) counted."""
    if not os.environ.get(MULTIPROC_ENV):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # unannotated
    return registry


class _Snapshot(Collector):
    """Gauges measured just now, exposed once."""

    def __init__(self, families: list[Any]) -> None:
        self._families = families

    def collect(self) -> Iterator[Any]:
        yield from self._families


async def shared_state(pool: asyncpg.Pool, queue: ArqRedis, queue_name: str) -> list[Any]:
    """Turns by status and the queue depth, from Postgres and Redis, as metric families.

    research_state_up is 0 (and the others are missing) when either could not be read.
    """
    up = GaugeMetricFamily("research_state_up", "1 when Postgres and Redis answered this scrape.")
    try:
        counts = await stats.open_turn_counts(pool, STATE_QUERY_TIMEOUT_S)
        due = await stats.due_checks(pool, STATE_QUERY_TIMEOUT_S)
        jobs = int(await queue.zcard(queue_name))
    except Exception as exc:
        log.warning("metrics_state_unavailable", error=repr(exc))
        up.add_metric([], 0)
        return [up]
    up.add_metric([], 1)
    turns = GaugeMetricFamily(
        "research_open_turns",
        "Queued and running turns by status and processor (all tenants), counted in Postgres.",
        labels=["status", "processor"],
    )
    found = {(status, processor): n for status, processor, n in counts}
    # The default processor's series exist (at 0) even before its first turn.
    for processor in sorted({processor for _, processor in found} | {"lite"}):
        for status in OPEN_STATUSES:
            turns.add_metric([status, processor], found.get((status, processor), 0))
    return [
        up,
        turns,
        GaugeMetricFamily("research_queue_jobs", "Jobs in the arq queue (ZCARD).", value=jobs),
        GaugeMetricFamily("research_due_checks", "Running turns whose check is due.", value=due),
        GaugeMetricFamily(
            "research_queue_depth", "Work waiting for workers: queue jobs plus due checks.",
            value=jobs + due,
        ),
    ]


class StateCache:
    """The shared-state gauges, measured at most once per `max_age_s` however often scraped.

    Scrapes that find the copy stale wait for one refresh together (a lock, bounded by the
    queries' own timeouts); a failed measurement is kept for the same time, so Postgres or
    Redis being away does not turn every scrape into a query either.
    """

    def __init__(self, max_age_s: float, clock: Any = time.monotonic) -> None:
        self.max_age_s = max_age_s
        self.refreshes = 0
        self._clock = clock
        self._families: list[Any] = []
        self._measured_at: float | None = None
        self._lock = asyncio.Lock()

    def _fresh(self) -> bool:
        at = self._measured_at
        return at is not None and self._clock() - at < self.max_age_s

    async def families(self, pool: asyncpg.Pool, queue: ArqRedis, queue_name: str) -> list[Any]:
        if self._fresh():
            return self._families
        async with self._lock:
            if not self._fresh():
                self._families = await shared_state(pool, queue, queue_name)
                self._measured_at = self._clock()
                self.refreshes += 1
        return self._families


async def render(
    pool: asyncpg.Pool, queue: ArqRedis, queue_name: str, cache: StateCache
) -> bytes:
    """The API's /metrics page: process counters plus the shared state, at most `max_age_s` old."""
    snapshot = CollectorRegistry(auto_describe=False)
    snapshot.register(_Snapshot(await cache.families(pool, queue, queue_name)))
    return generate_latest(process_registry()) + generate_latest(snapshot)


def start_worker_server(port: int, host: str = "127.0.0.1") -> Any:
    """Serve this worker's metrics on `host`:`port` (0: off). A port in use is logged, not fatal.

    Loopback unless told otherwise (WORKER_METRICS_HOST): the page is unauthenticated, so only
    a deployment that means it to be scraped from outside (k8s sets 0.0.0.0) exposes it.
    """
    if port <= 0:
        return None
    try:
        server, _thread = start_http_server(port, addr=host, registry=process_registry())
    except OSError as exc:
        log.warning("metrics_port_unavailable", host=host, port=port, error=repr(exc))
        return None
    log.info("metrics_serving", host=host, port=port)
    return server
