"""`GET /metrics`: Prometheus text, outside the OpenAPI document (it is not JSON)."""

from __future__ import annotations

from litestar import Controller, Response, get
from litestar.di import NamedDependency

from service import metrics
from service.resources import Resources


class MetricsController(Controller):
    path = "/metrics"
    include_in_schema = False

    @get(operation_id="Metrics", summary="Prometheus metrics")
    async def metrics(self, resources: NamedDependency[Resources]) -> Response[bytes]:
        body = await metrics.render(resources.pool, resources.queue, resources.settings.queue_name)
        return Response(body, media_type=metrics.CONTENT_TYPE)
