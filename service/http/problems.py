"""Every error answer is application/problem+json (RFC 9457), never a stack trace."""

from __future__ import annotations

import re
from typing import Any

import asyncpg
import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, NotAuthorizedException, ValidationException
from litestar.openapi.datastructures import ResponseSpec

from service.db.pool import DB_UNAVAILABLE
from service.errors import ServiceError, TooManyRequests, Unauthorized, Unavailable
from service.http.examples import example
from service.schemas import Problem

log = structlog.get_logger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"

PROBLEM_DESCRIPTIONS = {
    400: "The request could not be understood (malformed JSON, bytes that are not UTF-8, a NUL "
         "in the path, query or a header, a bad cursor)",
    401: "No valid API key (missing, malformed, unknown or revoked)",
    402: "The tenant's monthly budget is spent",
    404: "No such resource, or another tenant's",
    406: "The Accept header allows none of the route's media types",
    409: "Conflicts with the resource's state",
    413: "The body is larger than 1 MB",
    422: "A value is not acceptable; `errors` lists the fields",
    429: "Rate limit (with Retry-After) or open-turn limit reached",
    503: "Postgres or Redis is unavailable; retry shortly",
    405: "The route answers other methods only",
}


def _example(status: int, slug: str, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"type": f"/problems/{slug}", "title": title, "status": status, "detail": detail,
            **extra}


# One typical answer per status, as the handlers below write it (the OpenAPI examples).
PROBLEM_EXAMPLES = {
    400: _example(400, "bad-request", "Bad request", "The body is not valid JSON."),
    401: _example(401, "unauthorized", "Unauthorized",
                  "A valid API key is required: send `Authorization: Bearer <key>`."),
    402: _example(402, "budget-exceeded", "Budget exceeded",
                  "The tenant's monthly budget is spent; new turns are refused until next month."),
    404: _example(404, "not-found", "Not found",
                  "Conversation 'conv_5d3aaf9f42be041f26853248' not found."),
    406: _example(406, "not-acceptable", "Not acceptable",
                  "A transcript is served as application/json or text/markdown; the Accept "
                  "header allows neither ('text/html')."),
    405: _example(405, "method-not-allowed", "Method Not Allowed", "Method Not Allowed"),
    409: _example(409, "conflict", "Conflict", "The turn already ended: it is completed."),
    413: _example(413, "request-entity-too-large", "Request Entity Too Large",
                  "Request Entity Too Large"),
    422: _example(422, "validation-error", "Invalid request",
                  "input: Expected `str | object`, got `int`",
                  errors=[{"field": "input", "message": "Expected `str | object`, got `int`",
                           "source": "body"}]),
    429: _example(429, "rate-limited", "Too many requests",
                  "This API key sent more requests this minute than its limit allows."),
    503: _example(503, "unavailable", "Service unavailable",
                  "A backing service is unavailable; retry shortly."),
}


# Further answers some routes give, beside the one of PROBLEM_EXAMPLES.
BUSY_EXAMPLE = _example(
    409, "conversation-busy", "Conversation busy",
    "Conversation 'conv_5d3aaf9f42be041f26853248' already has a turn running "
    "(turn_8e1f0c6b2a9d4e7f3c5b1a0d); post again once it ends, or with if_busy \"interrupt\" "
    "to cancel it.")


def problem_responses(
    *statuses: int, auth: bool = True, also: tuple[dict[str, Any], ...] = ()
) -> dict[int, ResponseSpec]:
    """OpenAPI entries for a route's problem+json answers; /v1 routes add the ones all can give.
    `also`: more example answers (PROBLEM_EXAMPLES' shape), each under its status."""
    common = (400, 401, 422, 429, 503) if auth else (503,)
    return {
        status: ResponseSpec(
            data_container=Problem, media_type=PROBLEM_MEDIA_TYPE,
            description=PROBLEM_DESCRIPTIONS[status], generate_examples=False,
            examples=[example(body["type"].rsplit("/", 1)[1], body["title"], body)
                      for body in (PROBLEM_EXAMPLES[status], *also) if body["status"] == status],
        )
        for status in sorted({*common, *statuses})
    }


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


def handle_validation(
    _: Request[Any, Any, Any], exc: ValidationException
) -> Response[dict[str, Any]]:
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


def handle_http_exception(
    _: Request[Any, Any, Any], exc: HTTPException
) -> Response[dict[str, Any]]:
    if isinstance(exc, NotAuthorizedException):
        return handle_service_error(_, Unauthorized())
    status = exc.status_code
    if status >= 500:
        log.error("http_error", status=status, detail=str(exc.detail))
        return problem(status, "Internal error", "The server failed; the error was logged.",
                       "internal-error")
    slug = _title(status).lower().replace(" ", "-")
    return problem(status, _title(status), str(exc.detail), slug, headers=exc.headers)


def handle_unavailable(_: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    log.warning("backend_unavailable", error=repr(exc))
    if isinstance(exc, asyncpg.LockNotAvailableError):
        # lock_timeout: another session (maybe a frozen process) holds what this request needs.
        return handle_service_error(_, Unavailable(
            "Another request holds this resource; retry shortly."))
    return handle_service_error(_, Unavailable())


def handle_too_deep(
    request: Request[Any, Any, Any], exc: RecursionError
) -> Response[dict[str, Any]]:
    # msgspec refuses JSON nested past the interpreter's recursion limit this way, before any
    # validation runs: the body is at fault, not the server.
    log.warning("body_too_deep", path=request.url.path, error=str(exc))
    return problem(400, "Bad request", "The body nests too deeply to be read.", "bad-request")


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
    RecursionError: handle_too_deep,
    Exception: handle_internal,
}
