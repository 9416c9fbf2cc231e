"""Liveness and readiness probes."""

from __future__ import annotations

from litestar import Controller, get
from litestar.di import NamedDependency

from service.errors import Unavailable
from service.resources import Resources


class HealthController(Controller):
    path = ""
    tags = ["operations"]
    include_in_schema = True

    @get("/healthz", operation_id="Healthz", summary="The process is up")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @get("/readyz", operation_id="Readyz", summary="Postgres and Redis answer")
    async def readyz(self, resources: NamedDependency[Resources]) -> dict[str, str]:
        try:
            await resources.pool.fetchval("SELECT 1", timeout=2)
        except Exception as exc:
            raise Unavailable("Postgres is not reachable.") from exc
        try:
            await resources.queue.ping()
        except Exception as exc:
            raise Unavailable("Redis is not reachable.") from exc
        return {"status": "ready"}
