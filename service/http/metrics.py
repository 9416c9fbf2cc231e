"""`GET /metrics`: Prometheus text, outside the OpenAPI document (it is not JSON).

With METRICS_TOKEN set, a scrape must send `Authorization: Bearer <token>` (Prometheus:
`authorization: {credentials: …}` in the scrape config); without it, anyone who reaches the port
may read it, so keep it behind the network policy.
"""

from __future__ import annotations

import hmac
from typing import Any

from litestar import Controller, Request, Response, get
from litestar.di import NamedDependency

from service import metrics
from service.errors import Unauthorized
from service.resources import Resources

STATE_KEY = "metrics_state_cache"


def state_cache(request: Request[Any, Any, Any], max_age_s: float) -> metrics.StateCache:
    """The app's one StateCache (made on the first scrape), shared by every scrape."""
    state = request.app.state
    cache = getattr(state, STATE_KEY, None)
    if cache is None:
        cache = metrics.StateCache(max_age_s)
        setattr(state, STATE_KEY, cache)
    return cache


def check_token(request: Request[Any, Any, Any], token: str | None) -> None:
    if token is None:
        return
    scheme, _, sent = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        sent.strip().encode(), token.encode()
    ):
        raise Unauthorized("A metrics token is required: send `Authorization: Bearer <token>`.")


class MetricsController(Controller):
    path = "/metrics"
    include_in_schema = False

    @get(operation_id="Metrics", summary="Prometheus metrics")
    async def metrics(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources]
    ) -> Response[bytes]:
        settings = resources.settings
        check_token(request, settings.metrics_token)
        cache = state_cache(request, settings.metrics_state_max_age_s)
        body = await metrics.render(resources.pool, resources.queue, settings.queue_name, cache)
        # Given whole as a header: a media_type starting with text/ gets a second charset added.
        return Response(body, headers={"content-type": metrics.CONTENT_TYPE})
