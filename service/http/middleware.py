"""One layer around every request: its id and log context, its text checked, its metrics and one
access log line; and one before_send hook for the headers every answer carries.

Every answer carries X-Request-ID (and, for a keyed request, the RateLimit fields); every log
line of a request carries request_id, and the conversation_id, turn_id and delivery_id its path
names, and tenant_id once its API key is known (service.http.auth). One ASGI function rather than
one per concern: each layer of Litestar middleware costs a closure call, a send wrapper and, for
structlog's bound context, a ContextVar set and reset per field (bench/api.py measures the
layer against a bare Litestar app).
"""

from __future__ import annotations

import random
import re
import time

import structlog
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.db.pool import DB_UNAVAILABLE
from service.domain.ratelimits import Quota
from service.http.auth import QUOTA_STATE, policy_field, ratelimit_field
from service.http.input import check_scope_text
from service.logs import request_context

log = structlog.get_logger(__name__)

# Ids a request's path may name; in its log lines (service.http.auth adds tenant_id).
PATH_IDS = ("conversation_id", "turn_id", "delivery_id")
# Probes and scrapes answered fine are counted but not logged.
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})

_SAFE_ID = re.compile(r"^[A-Za-z0-9._\-]{1,128}$")
# Request ids name a request in logs; they need to be unique, not secret.
_ids = random.Random()


def request_id_of(scope: Scope) -> str:
    """The request's id: the caller's X-Request-ID when safe to echo, else a new one; kept in
    scope."""
    state = scope.setdefault("state", {})
    request_id = state.get("request_id")
    if request_id is None:
        incoming = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        text = incoming.decode("latin-1")
        request_id = text if _SAFE_ID.match(text) else f"req_{_ids.getrandbits(64):016x}"
        state["request_id"] = request_id
    return str(request_id)


async def add_answer_headers(message: Message, scope: Scope) -> None:
    """A before_send hook, so that answers no route middleware sees carry the headers too: errors
    raised by middleware (400, 401, 429) are sent by Litestar's outer exception handler, and
    unknown routes have no middleware at all."""
    if message["type"] != "http.response.start" or scope["type"] != ScopeType.HTTP:
        return
    headers = message.get("headers")
    if not isinstance(headers, list):
        headers = message["headers"] = list(headers or ())
    headers.append((b"x-request-id", request_id_of(scope).encode("latin-1")))
    quota = scope.get("state", {}).get(QUOTA_STATE)
    if isinstance(quota, Quota):
        headers.append((b"ratelimit-policy", policy_field(quota).encode()))
        headers.append((b"ratelimit", ratelimit_field(quota).encode()))


def _status_of(exc: BaseException) -> int:
    """The status the app's exception handlers answer an exception raised by middleware with."""
    for attr in ("status", "status_code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int):
            return value
    return 503 if isinstance(exc, DB_UNAVAILABLE) else 500


def request_middleware(app: ASGIApp) -> ASGIApp:
    """Bind the request's log context; refuse unreadable text (service.http.input) before the
    route's own middleware (API keys: a key is text too) and handler; count and time the request
    by its route template (not its path), and log it once."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        start = time.perf_counter()
        context = {"request_id": request_id_of(scope)}
        if path_params := scope.get("path_params"):
            for name in PATH_IDS:
                if name in path_params:
                    context[name] = path_params[name]
        token = request_context.set(context)
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            check_scope_text(scope)
            await app(scope, receive, send_and_note)
        except BaseException as exc:
            status = _status_of(exc)
            raise
        finally:
            try:
                seconds = time.perf_counter() - start
                route = str(scope.get("path_template") or "unmatched")
                method = scope.get("method", "GET")
                metrics.http_request(method, route, status, seconds)
                if route not in QUIET_ROUTES or status >= 400:
                    log.info("request", method=method, route=route, path=scope.get("path"),
                             status=status, duration_ms=round(seconds * 1000, 1))
            finally:
                request_context.reset(token)

    return middleware
