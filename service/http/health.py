"""Liveness and readiness probes."""

from __future__ import annotations

from litestar import Controller, get
from litestar.di import NamedDependency

from service.errors import Unavailable
from service.http import examples as ex
from service.http.problems import problem_responses
from service.resources import Resources


class HealthController(Controller):
    path = ""
    tags = ["operations"]
    include_in_schema = True

    @get("/healthz", operation_id="Healthz", summary="The process is up",
         responses={**ex.answer(200, dict[str, str], "The process answers",
                                ex.example("ok", "Up", {"status": "ok"})),
                    405: problem_responses(405, auth=False)[405]})
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @get("/readyz", operation_id="Readyz", summary="Postgres and Redis answer",
         responses={**problem_responses(405, auth=False), **ex.answer(
             200, dict[str, str], "Postgres and Redis answer: send traffic here",
             ex.example("ready", "Ready", {"status": "ready"}))})
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
