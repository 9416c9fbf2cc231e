"""Long-lived clients of one process: the Postgres pool, the arq queue, Parallel, the event hub."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Literal

import asyncpg
from arq.connections import ArqRedis

from service.clients.parallel import ParallelClient
from service.config import Settings
from service.db.pool import DbDeadlines, create_pool
from service.domain.feeds import Feeds
from service.domain.keycache import KeyCache
from service.domain.progress import ProgressRelay
from service.domain.ratelimits import RateLimiter
from service.domain.slots import Slots
from service.domain.streams import Streams
from service.notify import EventHub
from service.queue import create_queue


def db_deadlines(settings: Settings, role: Literal["api", "worker"]) -> DbDeadlines:
    """The Postgres deadlines of a role, from the settings' outage block."""
    worker = role == "worker"
    return DbDeadlines(
        acquire_timeout_s=(settings.worker_db_acquire_timeout_s if worker
                           else settings.db_acquire_timeout_s),
        statement_timeout_s=(settings.worker_db_statement_timeout_s if worker
                             else settings.db_statement_timeout_s),
        lock_timeout_s=settings.worker_db_lock_timeout_s if worker else settings.db_lock_timeout_s,
        idle_in_transaction_timeout_s=settings.db_idle_in_transaction_timeout_s,
        tcp_keepalives_idle_s=settings.db_tcp_keepalives_idle_s,
        application_name=f"research-service-{role}",
    )


@dataclass(slots=True)
class Resources:
    settings: Settings
    pool: asyncpg.Pool
    queue: ArqRedis
    parallel: ParallelClient
    hub: EventHub | None = None
    # The API's relay of running turns' progress to SSE watchers (with `listen`).
    relay: ProgressRelay | None = None
    # Verified API keys; trusted only with `hub` listening (without it, every lookup is a query).
    keys: KeyCache = field(default_factory=lambda: KeyCache(None))
    # The API's event streams and long-polls: shared reads per conversation, slots per tenant.
    streams: Streams | None = None
    # Per-key request rates, counted in Redis through leases (service.domain.ratelimits).
    limiter: RateLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.limiter = RateLimiter(self.queue)

    @classmethod
    async def open(
        cls, settings: Settings, *, listen: bool = False, role: Literal["api", "worker"] = "api"
    ) -> Resources:
        """Connect everything; `listen` adds the LISTEN connection the API's waiters use, `role`
        picks the Postgres deadlines (service.db.pool.DbDeadlines)."""
        pool = await create_pool(
            settings.database_url, min_size=settings.db_pool_min, max_size=settings.db_pool_max,
            deadlines=db_deadlines(settings, role),
        )
        try:
            queue = await create_queue(settings.redis_url)
        except BaseException:
            await pool.close()
            raise
        parallel = ParallelClient(
            api_key=settings.parallel_api_key, base_url=settings.parallel_base_url
        )
        hub: EventHub | None = None
        relay: ProgressRelay | None = None
        if listen:
            hub = EventHub(settings.database_url)
            relay = ProgressRelay(parallel)
        keys = KeyCache(hub)  # registers its channel on the hub before it starts listening
        streams: Streams | None = None
        if hub is not None:
            await hub.start()
            feeds = Feeds(pool, hub, refresh_s=settings.sse_heartbeat_s)
            streams = Streams(settings, pool, keys, feeds, Slots(queue), relay)
        return cls(settings=settings, pool=pool, queue=queue, parallel=parallel, hub=hub,
                   relay=relay, keys=keys, streams=streams)

    async def close(self) -> None:
        if self.streams is not None:
            await self.streams.feeds.close()
            await self.streams.slots.close()
        if self.relay is not None:
            await self.relay.close()
        if self.hub is not None:
            await self.hub.close()
        await self.parallel.close()
        with contextlib.suppress(Exception):
            await self.queue.aclose()
        await self.pool.close()
