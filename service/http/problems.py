"""Every error answer is application/problem+json (RFC 9457), never a stack trace."""

from __future__ import annotations

import re
from typing import Any

import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, NotAuthorizedException, ValidationException

from service.db.pool import DB_UNAVAILABLE
from service.errors import ServiceError, TooManyRequests, Unauthorized, Unavailable

log = structlog.get_logger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"


def problem(
    status: int, title: str, detail: str, slug: str, *, errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response[dict[str, Any]]:
    body: dict[str, Any] = {"type": f"/problems/{slug}", "title": title, "status": status,
                            "detail": detail}
    if errors is not None:
        body["errors"] = errors
    return Response(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def handle_service_error(_: Request[Any, Any, Any], exc: ServiceError) -> Response[dict[str, Any]]:
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    if isinstance(exc, Unavailable):
        headers = {"Retry-After": "5"}
    if isinstance(exc, TooManyRequests) and exc.retry_after is not None:
        headers = {"Retry-After": str(exc.retry_after)}
    return problem(exc.status, exc.title, exc.detail, exc.type_, errors=exc.errors, headers=headers)


def handle_validation(_: Request[Any, Any, Any], exc: ValidationException) -> Response[dict[str, Any]]:
    extra = exc.extra if isinstance(exc.extra, list) else []
    errors = [_error_item(e) for e in extra]
    detail = str(exc.detail)
    if "Malformed" in detail or "decode" in detail.lower():
        return problem(400, "Bad request", "The body is not valid JSON.", "bad-request")
    messages = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or detail
    return problem(422, "Invalid request", messages, "validation-error", errors=errors)


_MISSING_FIELD = re.compile(r"missing required field `([^`]+)`")


def _error_item(error: Any) -> dict[str, Any]:
    """One entry of `errors`: the field (dotted, relative to the body) and what is wrong."""
    if not isinstance(error, dict):
        return {"field": "body", "message": str(error)}
    message = str(error.get("message", ""))
    field = str(error.get("key") or "body")
    if field in ("data", "body") and (missing := _MISSING_FIELD.search(message)):
        field = missing.group(1)
    elif field == "data":
        field = "body"
    return {"field": field, "message": message, "source": error.get("source", "body")}


def handle_http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    if isinstance(exc, NotAuthorizedException):
        return handle_service_error(_, Unauthorized())
    status = exc.status_code
    if status >= 500:
        log.error("http_error", status=status, detail=str(exc.detail))
        return problem(status, "Internal error", "The server failed; the error was logged.",
                       "internal-error")
    return problem(status, _title(status), str(exc.detail), _title(status).lower().replace(" ", "-"),
                   headers=exc.headers)


def handle_unavailable(_: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    log.warning("backend_unavailable", error=repr(exc))
    return handle_service_error(_, Unavailable())


def handle_internal(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    if isinstance(exc, DB_UNAVAILABLE):
        return handle_unavailable(request, exc)
    log.exception("unhandled_error", path=request.url.path)
    return problem(500, "Internal error", "The server failed; the error was logged.",
                   "internal-error")


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


EXCEPTION_HANDLERS: dict[Any, Any] = {
    ServiceError: handle_service_error,
    ValidationException: handle_validation,
    HTTPException: handle_http_exception,
    **{exc: handle_unavailable for exc in DB_UNAVAILABLE},
    Exception: handle_internal,
}
