"""Dependencies shared by the controllers."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request
from litestar.params import QueryParameter


def tenant_of(request: Request[Any, Any, Any]) -> str:
    """The tenant the request's API key belongs to (set by service.http.auth)."""
    return str(request.auth)


Limit = Annotated[int, QueryParameter(ge=1, le=100, description="Page size, 1 to 100")]
Cursor = Annotated[
    str | None, QueryParameter(max_length=512, description="`next_cursor` of the previous page")
]
