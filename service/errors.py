"""Domain errors; service.http.problems turns them into problem+json.

ServiceError
  ├── InvalidInput        422
  ├── BadRequest          400
  ├── Unauthorized        401
  ├── PaymentRequired     402  (the tenant's monthly budget is spent)
  ├── NotFound            404
  ├── NotAcceptable       406  (no media type the Accept header allows)
  ├── Conflict            409
  │     └── ConversationBusy  `if_busy: "reject"` and a turn is queued or running
  ├── TooManyRequests     429
  │     ├── RateLimited       the key's requests per minute (with Retry-After)
  │     ├── TooManyOpenTurns  queued plus running turns of a conversation or tenant
  │     └── TooManyStreams    open SSE streams plus ?wait= long-polls of a tenant
  ├── Unavailable         503
  └── UpstreamError              (Parallel; never reaches HTTP)
        ├── UpstreamUnavailable  transient: retry later
        └── UpstreamRejected     permanent: fail the turn
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """The service could not do that."""

    status = 500
    type_ = "internal-error"
    title = "Internal error"

    def __init__(self, detail: str | None = None, *, errors: list[dict[str, Any]] | None = None):
        self.detail = detail or (self.__doc__ or "").strip()
        self.errors = errors
        super().__init__(self.detail)


class InvalidInput(ServiceError):
    """The request is well-formed but its values are not acceptable."""

    status = 422
    type_ = "validation-error"
    title = "Invalid request"


class BadRequest(ServiceError):
    """The request could not be understood."""

    status = 400
    type_ = "bad-request"
    title = "Bad request"


class Unauthorized(ServiceError):
    """A valid API key is required: send `Authorization: Bearer <key>`."""

    status = 401
    type_ = "unauthorized"
    title = "Unauthorized"


class PaymentRequired(ServiceError):
    """The tenant's monthly budget is spent; new turns are refused until next month."""

    status = 402
    type_ = "budget-exceeded"
    title = "Budget exceeded"


class NotFound(ServiceError):
    """No such resource."""

    status = 404
    type_ = "not-found"
    title = "Not found"


class NotAcceptable(ServiceError):
    """The route cannot answer in any media type the Accept header allows."""

    status = 406
    type_ = "not-acceptable"
    title = "Not acceptable"


class Conflict(ServiceError):
    """The request conflicts with the resource's current state."""

    status = 409
    type_ = "conflict"
    title = "Conflict"


class ConversationBusy(Conflict):
    """The conversation already has a queued or running turn, and the request asked
    `if_busy: "reject"`; nothing was written."""

    type_ = "conversation-busy"
    title = "Conversation busy"


class TooManyRequests(ServiceError):
    """Too many requests; slow down."""

    status = 429
    type_ = "too-many-requests"
    title = "Too many requests"

    def __init__(self, detail: str | None = None, *, retry_after: int | None = None):
        super().__init__(detail)
        self.retry_after = retry_after


class RateLimited(TooManyRequests):
    """This API key sent more requests this minute than its limit allows."""

    type_ = "rate-limited"


class TooManyOpenTurns(TooManyRequests):
    """Too many turns are queued or running; wait for some to finish."""

    type_ = "too-many-open-turns"


class TooManyStreams(TooManyRequests):
    """Too many event streams and long-polls are open; close one or retry later."""

    type_ = "too-many-streams"


class Unavailable(ServiceError):
    """A backing service is unavailable; retry shortly."""

    status = 503
    type_ = "unavailable"
    title = "Service unavailable"


class UpstreamError(ServiceError):
    """Parallel's API answered with an error."""


class UpstreamUnavailable(UpstreamError):
    """Parallel is unreachable, rate-limiting or failing; the call may be retried."""

    def __init__(self, detail: str | None = None, *, retry_after: float | None = None):
        super().__init__(detail)
        self.retry_after = retry_after
        # The request may have been processed although no answer came back.
        self.in_doubt = False
        # No answer came in time (rather than the connection breaking).
        self.timed_out = False


class UpstreamRejected(UpstreamError):
    """Parallel refused the request; retrying the same call will not help."""

    def __init__(self, detail: str, *, status_code: int, code: str):
        super().__init__(detail)
        self.status_code = status_code
        self.code = code
