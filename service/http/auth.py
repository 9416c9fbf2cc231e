"""Bearer API keys: every /v1 route but Parallel's inbound webhook needs one, within its rate limit.

Every answer to a keyed request carries the key's rate limit as the IETF RateLimit-Policy and
RateLimit fields (draft-ietf-httpapi-ratelimit-headers, structured-field form):

    RateLimit-Policy: "default";q=600;w=60     600 requests per 60 s window
    RateLimit: "default";r=599;t=42            599 left; the minute's counter closes in 42 s

A 429 says r=0 and t= its Retry-After. The remaining count is approximate across API processes
(service.domain.ratelimits explains by how much).
"""

from __future__ import annotations

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send

from service.domain.ratelimits import WINDOW_S, Quota
from service.errors import RateLimited, Unauthorized
from service.logs import request_context
from service.resources import Resources

POLICY = "default"
# Where a request's Quota waits in its scope state for the answer's headers
# (service.http.middleware.add_answer_headers).
QUOTA_STATE = "rate_limit_quota"


def policy_field(quota: Quota) -> str:
    return f'"{POLICY}";q={quota.limit};w={WINDOW_S}'


def ratelimit_field(quota: Quota) -> str:
    return f'"{POLICY}";r={quota.remaining};t={quota.reset_s}'


def api_key_middleware(app: ASGIApp) -> ASGIApp:
    """Route middleware: the request's tenant (`request.auth`) from its bearer key, counted
    against the key's rate limit; or Unauthorized / RateLimited, answered as problem+json."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == ScopeType.HTTP:
            scope["auth"] = scope["user"] = await _authenticate(scope)
        await app(scope, receive, send)

    return middleware


async def _authenticate(scope: Scope) -> str:
    header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
    scheme, _, key = header.decode("latin-1").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthorized()
    resources: Resources = scope["litestar_app"].state.resources
    auth = await resources.keys.authenticate(resources.pool, key)
    if auth is None:
        raise Unauthorized("The API key is not valid or has been revoked.")
    if (context := request_context.get()) is not None:
        context["tenant_id"] = auth.tenant_id  # the request's log lines name the tenant
    limit = resources.settings.rate_limit_per_min if auth.rate_limit_per_min is None else (
        auth.rate_limit_per_min
    )
    state = scope.setdefault("state", {})
    try:
        quota = await resources.limiter.check(auth.key_id, limit)
    except RateLimited as exc:
        state[QUOTA_STATE] = Quota(limit, 0, exc.retry_after or 1)
        raise
    if quota is not None:
        state[QUOTA_STATE] = quota
    return auth.tenant_id
