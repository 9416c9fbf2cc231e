"""Bearer API keys: every /v1 route but Parallel's inbound webhook needs one, within its rate limit.

Every answer to a keyed request carries the key's rate limit as the IETF RateLimit-Policy and
RateLimit fields (draft-ietf-httpapi-ratelimit-headers, structured-field form):

    RateLimit-Policy: "default";q=600;w=60     600 requests per 60 s window
    RateLimit: "default";r=599;t=42            599 left; the minute's counter closes in 42 s

A 429 says r=0 and t= its Retry-After. The remaining count is approximate across API processes
(service.domain.ratelimits explains by how much).
"""

from __future__ import annotations

from typing import Any

import structlog
from litestar.connection import ASGIConnection
from litestar.datastructures import MutableScopeHeaders
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.types import Message, Scope

from service.domain.ratelimits import WINDOW_S, Quota
from service.errors import RateLimited, Unauthorized
from service.resources import Resources

POLICY = "default"
# Where a request's Quota waits in its scope state for add_rate_limit_headers.
QUOTA_STATE = "rate_limit_quota"


def policy_field(quota: Quota) -> str:
    return f'"{POLICY}";q={quota.limit};w={WINDOW_S}'


def ratelimit_field(quota: Quota) -> str:
    return f'"{POLICY}";r={quota.remaining};t={quota.reset_s}'


async def add_rate_limit_headers(message: Message, scope: Scope) -> None:
    """A before_send hook, so the 429 that the middleware raises carries the fields too."""
    if message["type"] != "http.response.start":
        return
    quota = scope.get("state", {}).get(QUOTA_STATE)
    if isinstance(quota, Quota):
        headers = MutableScopeHeaders.from_message(message)
        headers["RateLimit-Policy"] = policy_field(quota)
        headers["RateLimit"] = ratelimit_field(quota)


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        header = connection.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized()
        resources: Resources = connection.app.state.resources
        auth = await resources.keys.authenticate(resources.pool, key.strip())
        if auth is None:
            raise Unauthorized("The API key is not valid or has been revoked.")
        # The request's log lines name the tenant (request_id_middleware unbinds it afterwards).
        structlog.contextvars.bind_contextvars(tenant_id=auth.tenant_id)
        limit = resources.settings.rate_limit_per_min if auth.rate_limit_per_min is None else (
            auth.rate_limit_per_min
        )
        state = connection.scope.setdefault("state", {})
        try:
            quota = await resources.limiter.check(auth.key_id, limit)
        except RateLimited as exc:
            state[QUOTA_STATE] = Quota(limit, 0, exc.retry_after or 1)
            raise
        if quota is not None:
            state[QUOTA_STATE] = quota
        return AuthenticationResult(user=auth.tenant_id, auth=auth.tenant_id)
