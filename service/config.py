"""Settings read once from the environment at process start (docs/design.md §4)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

import msgspec

KNOWN_PROCESSORS = (
    "lite", "base", "core", "core2x", "pro", "ultra", "ultra2x", "ultra4x", "ultra8x",
)


def _all_processors() -> list[str]:
    return [*KNOWN_PROCESSORS, *(f"{p}-fast" for p in KNOWN_PROCESSORS)]


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Every setting, in four groups (README.md, "Configuration", has the same groups): what a
    production deployment sets, the limits it may want to change, tuning with sound defaults,
    and timing knobs that exist for the tests (leave them at their defaults)."""

    # --- Production: connections, secrets and what this deployment serves ---
    database_url: str
    redis_url: str
    parallel_api_key: str
    parallel_base_url: str | None = None
    parallel_webhook_secret: str | None = None
    # This API's public URL: when set, push mode (Parallel's webhooks trigger checks).
    public_base_url: str | None = None
    # Task groups (README, "Modes"): `auto` adds runs to Parallel task groups the service owns
    # and follows them over the groups' event streams, falling back to one-by-one runs when
    # Parallel refuses the group routes; `on` requires them; `off` never uses them.
    parallel_task_groups: Literal["auto", "on", "off"] = "auto"
    queue_name: str = "research:queue"
    db_pool_min: int = 2
    db_pool_max: int = 10
    default_processor: str = "lite"
    processors: list[str] = msgspec.field(default_factory=_all_processors)
    webhook_allow_private: bool = False
    log_format: str = "json"
    # When set, GET /metrics needs `Authorization: Bearer <metrics_token>` (else 401).
    metrics_token: str | None = None
    # The worker serves Prometheus metrics on this port (0: off); the API serves GET /metrics.
    worker_metrics_port: int = 9102
    # Where the worker's (unauthenticated) metrics server listens: loopback unless a
    # deployment means it to be scraped from outside (deploy/k8s sets 0.0.0.0).
    worker_metrics_host: str = "127.0.0.1"

    # --- Limits: what a client is refused past, and caps on shared capacity ---
    max_input_chars: int = 25_000
    # Objects in a turn's `input` may nest this many levels (a flat object is 1).
    max_input_depth: int = 8
    # Requests per minute per API key when its row sets none (0: unlimited); shared in Redis.
    rate_limit_per_min: int = 600
    # Queued plus running turns; past these a new turn is refused with 429.
    max_open_turns_per_conversation: int = 100
    max_open_turns_per_tenant: int = 1000
    # SSE streams plus `?wait=` long-polls a tenant may hold open across all API processes
    # (counted in Redis, service.domain.slots), and the longest a stream stays open (the client
    # resumes with Last-Event-ID) (docs/design.md, Events).
    max_open_streams_per_tenant: int = 200
    max_stream_s: float = 3600.0
    # Global cap on Parallel run creations across all workers (Parallel's limit: 2,000/min).
    creations_per_min: int = 2000
    # Fair webhook delivery (docs/webhooks.md): attempts in flight at once across all workers,
    # per tenant and per receiving host (the URL's host[:port]), so receivers that hang hold up
    # only their own tenant's and host's deliveries. Keep the tenant cap well below
    # webhook_batch, each worker's own limit.
    webhook_max_in_flight_per_tenant: int = 20
    webhook_max_in_flight_per_host: int = 50
    # Start attempts (README, "Guarantees"): a turn with max_doubtful_attempts creates that got
    # no answer within create_timeout_s (each may have made a run nobody can look up) fails
    # with error.code create_in_doubt rather than paying for one more run.
    max_doubtful_attempts: int = 2

    # --- Tuning: polling, leases, retries and timeouts (the defaults suit production) ---
    # Following runs: the first check comes poll_initial_s after the run starts (scaled per
    # processor, see service.domain.schedule), each later one twice as far, capped at poll_max_s.
    poll_initial_s: float = 1.0
    poll_max_s: float = 30.0
    # Push mode (public_base_url set): Parallel's webhook triggers checks, so polling is only a
    # safety net: its first check comes push_poll_initial_s after the start (times the
    # processor's scale) and it backs off to this cap instead of poll_max_s. A 2-minute run then
    # costs 4 Parallel calls, a 20-minute one 7 (docs/benchmarks.md).
    push_poll_initial_s: float = 60.0
    push_poll_max_s: float = 600.0
    # Group mode: a group takes runs until it holds group_max_runs or is group_max_age_s old,
    # so listing it (to find a run whose create answer was lost) stays short. Its event stream
    # is asked to end after group_stream_timeout_s and resumed from its cursor; the worker
    # following it holds a lease of group_lease_s. Its safety net is the group's listing, read
    # every group_sweep_interval_s by that worker: one call for up to group_max_runs runs, and
    # any run it lists ended whose turn is still running is checked. Each run is also polled,
    # as a last net, first group_poll_initial_s after the start (times the processor's scale)
    # and at its deadline, backing off to group_poll_max_s.
    group_max_runs: int = 1000
    group_max_age_s: float = 600.0
    group_stream_timeout_s: float = 60.0
    group_lease_s: float = 20.0
    group_sweep_interval_s: float = 300.0
    group_poll_initial_s: float = 1800.0
    group_poll_max_s: float = 1800.0
    follower_batch: int = 200
    # One follower check (Parallel calls and the SQL recording them) ends after this, so a slow
    # check cannot hold the follower's tick; its claim's lease makes the turn due again.
    follower_check_timeout_s: float = 20.0
    # A start attempt that has not recorded its run after this long is considered dead and
    # another may begin. A live attempt ends inside it: its create gives up after
    # create_timeout_s, and storing the run must be done before the lease's last few seconds.
    start_lease_s: float = 45.0
    # Parallel documents its create as answering at once (the run is queued); one that has not
    # answered in this long is given up (see max_doubtful_attempts).
    create_timeout_s: float = 30.0
    # A claimed check not finished within this long (its worker died) becomes due again.
    check_lease_s: float = 30.0
    # arq: a job whose worker died runs again job_timeout_s + 10 s later; jobs are short.
    job_timeout_s: int = 60
    # Seconds a SIGTERMed worker lets its current jobs finish before it cancels them.
    shutdown_grace_s: int = 20
    # Outbound webhooks (docs/design.md §3): the first attempt right away, then one after each of
    # these delays (about a day in all), then the delivery is marked failed.
    webhook_retry_schedule_s: list[float] = msgspec.field(
        default_factory=lambda: [5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 10800.0, 21600.0,
                                 43200.0]
    )
    # An attempt's DNS check, then its request (the response included), each end after this.
    webhook_timeout_s: float = 10.0
    # Attempts in flight at once per worker.
    webhook_batch: int = 100
    # An event stream's heartbeat comment after this many idle seconds.
    sse_heartbeat_s: float = 15.0
    # How long the API keeps an idle HTTP connection open for its next request. Longer than
    # clients and proxies keep theirs (httpx 5 s, aiohttp 15 s, AWS ALB 60 s): when the server
    # closes first, a client may send its next request on the closing connection and read an
    # error it cannot tell from a lost answer. uvicorn's default is 5 s.
    http_keep_alive_s: int = 75
    # Outages and deadlines (README, "Configuration"; docs/operations.md, "Outages"): every wait
    # on Postgres ends. The API's are short (a request answers 503 within a few seconds); the
    # worker's are longer (batches, no client waiting). Per role: waiting for a pool connection,
    # one statement (server-side statement_timeout), one lock (lock_timeout).
    db_acquire_timeout_s: float = 2.0
    db_statement_timeout_s: float = 5.0
    db_lock_timeout_s: float = 2.0
    worker_db_acquire_timeout_s: float = 10.0
    worker_db_statement_timeout_s: float = 30.0
    worker_db_lock_timeout_s: float = 5.0
    # Postgres ends a session idle inside a transaction this long (a process frozen mid-
    # transaction), releasing its locks; no transaction here waits on anything but SQL.
    db_idle_in_transaction_timeout_s: float = 15.0
    # Server-side TCP keepalives on every pool connection: first probe after this idle time.
    db_tcp_keepalives_idle_s: int = 30
    # Retention: the worker deletes expired conversations every this many seconds (1 to 60),
    # so one goes within this long (plus the sweep itself) of its expires_at.
    retention_sweep_interval_s: int = 30
    # The worker recounts quota counters that disagree with the turns this often (minutes; they
    # drift only when turns are changed outside the service, docs/design.md §2).
    quota_repair_interval_min: int = 10

    # --- Test timing knobs: leave them at their defaults; tests shrink them to run fast ---
    # Multiplies every processor's deadline (service.domain.schedule).
    run_deadline_scale: float = 1.0
    # The follower's and the webhook dispatcher's longest sleep: they wake when work is due or
    # announced, and look this often for what nobody announced (another worker's runs).
    follower_idle_s: float = 10.0
    # How often the reconciler re-enqueues turns whose job Redis lost.
    reconcile_interval_s: int = 30
    # While Redis is away the worker probes it this often, and wakes its loops when it answers.
    redis_retry_s: float = 1.0
    # The gauges of shared state (open turns, queue depth) are measured in Postgres and Redis
    # at most once per this many seconds, however often /metrics is scraped.
    metrics_state_max_age_s: float = 5.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **overrides: object) -> Settings:
        """Build settings from upper-cased environment variables; raises msgspec.ValidationError."""
        known = {name.upper(): name for name in cls.__struct_fields__}
        raw: dict[str, object] = {known[k]: v for k, v in environ.items() if k in known and v}
        for name in ("processors", "webhook_retry_schedule_s"):  # comma-separated lists
            if isinstance(raw.get(name), str):
                raw[name] = [p.strip() for p in str(raw[name]).split(",") if p.strip()]
        raw.update(overrides)
        return msgspec.convert(raw, cls, strict=False)
