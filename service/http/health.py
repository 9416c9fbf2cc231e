"""Liveness and readiness probes: both answer within 2 s, whatever Postgres and Redis do.

`/healthz` does no I/O: the process answers. `/readyz` is ready when Postgres answers within its
deadline (waiting for a pool connection included); Redis is reported in the body but does not
fail readiness, since the API accepts turns without it (the reconciler starts them later).
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import structlog
from litestar import Controller, Response, get
from litestar.di import NamedDependency
from redis.asyncio import Redis

from service.http import examples as ex
from service.http.problems import PROBLEM_MEDIA_TYPE, problem_responses
from service.resources import Resources

log = structlog.get_logger(__name__)

# Each dependency gets this long, both at once, so the probe answers within 2 s.
POSTGRES_PROBE_S = 1.5
REDIS_PROBE_S = 1.0


async def _answers(probe: Any, timeout_s: float) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            await probe
    except Exception as exc:  # any failure, a timeout included, means "not answering"
        log.info("probe_failed", error=repr(exc))
        return False
    return True


async def postgres_answers(pool: asyncpg.Pool) -> bool:
    return await _answers(pool.fetchval("SELECT 1", timeout=POSTGRES_PROBE_S), POSTGRES_PROBE_S)


async def redis_answers(redis: Redis) -> bool:
    return await _answers(redis.ping(), REDIS_PROBE_S)


class HealthController(Controller):
    path = ""
    tags = ("operations",)
    include_in_schema = True

    @get("/healthz", operation_id="Healthz", summary="The process is up",
         responses={**ex.answer(200, dict[str, str], "The process answers (no I/O)",
                                ex.example("ok", "Up", {"status": "ok"})),
                    405: problem_responses(405, auth=False)[405]})
    async def healthz(self) -> dict[str, str]:
        """Liveness: the process answers, without I/O."""
        return {"status": "ok"}

    @get("/readyz", operation_id="Readyz", summary="Postgres answers (Redis is reported)",
         responses={**problem_responses(405, auth=False), **ex.answer(
             200, dict[str, str], "Postgres answers within its deadline: send traffic here. "
             "`redis` says whether Redis answers; without it turns are accepted and start later",
             ex.example("ready", "Ready", {"status": "ready", "postgres": "ok", "redis": "ok"}),
             ex.example("ready-without-redis", "Ready, Redis away",
                        {"status": "ready", "postgres": "ok", "redis": "down"}))})
    async def readyz(self, resources: NamedDependency[Resources]) -> Response[dict[str, Any]]:
        """Readiness: Postgres answers within its deadline. Redis is reported but not required
        (turns are then started later by the reconciler)."""
        postgres, redis = await asyncio.gather(
            postgres_answers(resources.pool), redis_answers(resources.queue)
        )
        states = {"postgres": "ok" if postgres else "down", "redis": "ok" if redis else "down"}
        if not postgres:
            return Response(
                {"type": "/problems/unavailable", "title": "Service unavailable", "status": 503,
                 "detail": "Postgres is not answering.", **states},
                status_code=503, media_type=PROBLEM_MEDIA_TYPE, headers={"Retry-After": "5"})
        return Response({"status": "ready", **states})
