"""Request ids and log context for every request, plus its metrics and one access log line.

Every answer carries X-Request-ID; every log line of a request carries request_id, and the
conversation_id, turn_id and tenant_id (bound by ApiKeyMiddleware) it concerns.
"""

from __future__ import annotations

import re
import secrets
import time

import structlog
from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.db.pool import DB_UNAVAILABLE

log = structlog.get_logger(__name__)

# Ids a request's path may name; bound for its log lines (ApiKeyMiddleware adds tenant_id).
PATH_IDS = ("conversation_id", "turn_id", "delivery_id")
# Probes and scrapes answered fine are counted but not logged.
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})

_SAFE_ID = re.compile(r"^[A-Za-z0-9._\-]{1,128}$")


def request_id_of(scope: Scope) -> str:
    """The request's id: the caller's X-Request-ID when safe to echo, else a new one; kept in
    scope."""
    state = scope.setdefault("state", {})
    if "request_id" not in state:
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        fresh = f"req_{secrets.token_hex(8)}"
        state["request_id"] = incoming if _SAFE_ID.match(incoming) else fresh
    return str(state["request_id"])


async def add_request_id(message: Message, scope: Scope) -> None:
    """A before_send hook, so that answers no route middleware sees carry X-Request-ID too: errors
    raised by middleware (401, 429) are sent by Litestar's outer exception handler, and unknown
    routes have no middleware at all."""
    if message["type"] == "http.response.start" and scope["type"] == ScopeType.HTTP:
        MutableScopeHeaders.from_message(message)["X-Request-ID"] = request_id_of(scope)


def request_id_middleware(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        path_params = scope.get("path_params") or {}
        # `...` is structlog's "unset": it resets tenant_id, bound later, when the request ends.
        ids = {name: path_params.get(name, ...) for name in PATH_IDS}
        with structlog.contextvars.bound_contextvars(request_id=request_id, tenant_id=..., **ids):
            await app(scope, receive, send)

    return middleware


def _status_of(exc: BaseException) -> int:
    """The status the app's exception handlers answer an exception raised by middleware with."""
    for attr in ("status", "status_code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int):
            return value
    return 503 if isinstance(exc, DB_UNAVAILABLE) else 500


def access_middleware(app: ASGIApp) -> ASGIApp:
    """Count and time each request by its route template (not its path), and log it once."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_and_note)
        except BaseException as exc:
            status = _status_of(exc)
            raise
        finally:
            seconds = time.perf_counter() - start
            route = str(scope.get("path_template") or "unmatched")
            method = scope.get("method", "GET")
            metrics.http_request(method, route, status, seconds)
            if route not in QUIET_ROUTES or status >= 400:
                log.info("request", method=method, route=route, path=scope.get("path"),
                         status=status, duration_ms=round(seconds * 1000, 1))

    return middleware
