"""The composition root: create_app(settings, resources) -> Litestar."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar, Router
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, License, SecurityScheme, Tag

from service import __version__
from service.config import Settings
from service.http.auth import api_key_middleware
from service.http.conversations import ConversationController
from service.http.events import EventController
from service.http.health import HealthController
from service.http.input import CheckedRequest
from service.http.metrics import MetricsController
from service.http.middleware import add_answer_headers, request_middleware
from service.http.openapi_extras import render_plugins
from service.http.problems import EXCEPTION_HANDLERS
from service.http.transcripts import TranscriptController
from service.http.turns import TurnController
from service.http.usage import UsageController
from service.http.webhooks import ParallelHookController, WebhookDeliveryController
from service.resources import Resources

MAX_BODY_BYTES = 1_000_000

TAGS = [
    Tag(name="conversations", description="A conversation holds turns, their shared context "
        "and its webhook settings"),
    Tag(name="turns", description="A question, run as a Parallel task chained to the turn "
        "before it: ask, read, long-poll, cancel"),
    Tag(name="events", description="Every status change of a turn, as JSON pages or a "
        "Server-Sent Events stream"),
    Tag(name="webhooks", description="Signed POSTs of terminal events to a conversation's "
        "`webhook_url` (see `webhooks`), and their delivery ledger"),
    Tag(name="usage", description="Estimated spend per calendar month"),
    Tag(name="hooks", description="Inbound webhooks from Parallel (push mode)"),
    Tag(name="operations", description="Liveness and readiness probes"),
]

OPENAPI = OpenAPIConfig(
    title="Research conversations",
    version=__version__,
    description="Chained research questions over Parallel's Task API (see docs/design.md). "
                "Every /v1 route but /v1/hooks/parallel needs `Authorization: Bearer <key>`; "
                "errors are application/problem+json (RFC 9457).",
    license=License(name="Proprietary", identifier="LicenseRef-Proprietary"),
    path="/schema",
    tags=TAGS,
    use_handler_docstrings=True,
    # Each serves the document service.http.openapi_extras.finish completes (webhooks, SSE,
    # headers, msgspec's strict schemas): the served /schema is the committed file.
    render_plugins=render_plugins(),
    components=Components(
        security_schemes={"BearerAuth": SecurityScheme(
            type="http", scheme="bearer",
            description="An API key (`research-service keys create`)")}
    ),
)


def create_app(settings: Settings | None = None, resources: Resources | None = None) -> Litestar:
    """The API. Tests inject `resources`; otherwise the lifespan opens them from settings."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        if resources is not None:
            app.state.resources = resources
            yield
            return
        opened = await Resources.open(settings or Settings.from_env(), listen=True)
        app.state.resources = opened
        try:
            yield
        finally:
            await opened.close()

    def provide_resources() -> Resources:
        # A provider with no parameters: resolving it per request builds no State and
        # validates no arguments (5-6 % of a GET's CPU when it took `state`: bench/api.py).
        opened: Resources = app.state.resources  # State attributes are untyped
        return opened

    v1 = Router(
        path="/",
        route_handlers=[ConversationController, TranscriptController, TurnController,
                        EventController, UsageController, WebhookDeliveryController],
        middleware=[api_key_middleware],
        # Declared here, not for the whole document: the probes and /metrics need no key.
        security=[{"BearerAuth": []}],
    )
    app = Litestar(
        # Parallel's inbound webhook is signed, not keyed: outside v1, so no BearerAuth either.
        route_handlers=[v1, ParallelHookController, HealthController, MetricsController],
        dependencies={"resources": Provide(provide_resources, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,
        # Runs before the v1 router's API keys, so unreadable text (a key too) answers 400.
        middleware=[request_middleware],
        request_class=CheckedRequest,
        before_send=[add_answer_headers],
        lifespan=[lifespan],
        openapi_config=OPENAPI,
        request_max_body_size=MAX_BODY_BYTES,
        debug=False,
        logging_config=None,  # service.logs owns logging: JSON lines, secrets redacted
    )
    if resources is not None:
        app.state.resources = resources  # usable without running the lifespan (tests)
    return app
