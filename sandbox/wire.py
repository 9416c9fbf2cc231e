"""Wire helpers shared by the routes: timestamps, JSON bodies and Parallel's error envelope."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import Response

_encoder = msgspec.json.Encoder()

# The scope key of the /v1 call's log entry, where handlers note the ids they touched.
CALL_KEY = "sandbox.call"


def call_entry(scope: Mapping[str, Any]) -> dict[str, Any] | None:
    """This /v1 call's entry in /_sandbox/calls (SandboxApp puts it in the scope), else None."""
    entry: dict[str, Any] | None = scope.get(CALL_KEY)
    return entry

ERROR_MESSAGES = {
    400: "Bad request",
    401: "Unauthorized: missing or invalid x-api-key",
    402: "Payment required: insufficient credit",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    408: "Request timed out; run still active",
    409: "Conflict",
    422: "Request validation error",
    429: "Quota temporarily exceeded",
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service unavailable",
    504: "Gateway timeout",
}


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def encode(value: Any) -> bytes:
    return _encoder.encode(value)


def json_response(
    value: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response[bytes]:
    return Response(
        content=encode(value), status_code=status, media_type="application/json", headers=headers
    )


def error_object(message: str, detail: dict[str, Any] | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"ref_id": str(uuid.uuid4()), "message": message}
    if detail is not None:
        err["detail"] = detail
    return err


def error_body(
    status: int, message: str | None = None, detail: dict[str, Any] | None = None
) -> bytes:
    msg = message or ERROR_MESSAGES.get(status, f"HTTP {status}")
    return encode({"type": "error", "error": error_object(msg, detail)})


def error_response(
    status: int,
    message: str | None = None,
    detail: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Response[bytes]:
    return Response(
        content=error_body(status, message, detail),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


class ApiError(Exception):
    """Raised inside handlers; rendered as the error envelope with `status`."""

    def __init__(
        self, status: int, message: str | None = None, detail: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message or ERROR_MESSAGES.get(status, ""))
        self.status = status
        self.message = message
        self.detail = detail
