"""Text that Postgres cannot store is refused at the request boundary, once for every route.

A NUL character or bytes that are not UTF-8, in the path, the query, a header or the body,
answer 400 (body strings holding a NUL: 422, naming the field) before any handler runs
(check_scope_text, called by service.http.middleware for every request), so no
field needs a check of its own and nothing is written (docs/design.md, HTTP contract).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_to_bytes

from litestar import Request
from litestar.types import Scope

from service.domain.validation import check_raw_text, check_storable
from service.errors import BadRequest

_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")


def check_scope_text(scope: Scope) -> None:
    """Refuse a request whose path, query or headers hold a NUL or invalid UTF-8.

    Raises BadRequest."""
    raw_path = scope.get("raw_path")
    if raw_path:
        # httpx's ASGI transport puts the query in raw_path too; servers do not.
        check_raw_text(unquote_to_bytes(raw_path.split(b"?", 1)[0]), "path")
    else:
        check_raw_text(scope["path"].encode("utf-8", "surrogatepass"), "path")
    query = scope.get("query_string", b"")
    if query:
        check_raw_text(unquote_to_bytes(query.replace(b"+", b" ")), "query string")
    for name, value in scope["headers"]:
        if name.isascii() and value.isascii() and b"\0" not in name and b"\0" not in value:
            continue  # the usual header: ASCII is UTF-8
        label = f"{name.decode('ascii')} header" if _TOKEN.match(name) else "header name"
        check_raw_text(name, label)
        check_raw_text(value, label)


class CheckedRequest(Request[Any, Any, Any]):
    """The app's request class: a JSON body must be UTF-8 and hold no NUL in any string."""

    async def json(self) -> Any:
        try:
            value = await super().json()
        except UnicodeDecodeError:
            # msgspec raises this one itself for bytes that are not UTF-8; Litestar lets it pass.
            raise BadRequest("The body is not valid UTF-8.") from None
        check_storable(value)
        return value
