"""Bearer API keys: every /v1 route but Parallel's inbound webhook needs one, within its rate limit."""

from __future__ import annotations

import structlog
from litestar.connection import ASGIConnection
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from service.errors import Unauthorized
from service.resources import Resources


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
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
        limit = auth.rate_limit_per_min
        await resources.limiter.check(
            auth.key_id, resources.settings.rate_limit_per_min if limit is None else limit
        )
        return AuthenticationResult(user=auth.tenant_id, auth=auth.tenant_id)
