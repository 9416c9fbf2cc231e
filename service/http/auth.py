"""Bearer API keys: every /v1 route but Parallel's inbound webhook needs one."""

from __future__ import annotations

from litestar.connection import ASGIConnection
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from service.db.keys import tenant_for_key
from service.errors import Unauthorized


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        header = connection.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized()
        tenant_id = await tenant_for_key(connection.app.state.resources.pool, key.strip())
        if tenant_id is None:
            raise Unauthorized("The API key is not valid or has been revoked.")
        return AuthenticationResult(user=tenant_id, auth=tenant_id)
