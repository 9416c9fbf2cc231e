"""How the parallel-web SDK's exceptions become the service's: UpstreamUnavailable (retry later)
or UpstreamRejected (give up), and, for a failed create, whether a run may exist all the same
(service.clients.parallel raises these; nothing else sees an SDK exception)."""

from __future__ import annotations

import httpx
import msgspec
import parallel

try:
    import aiohttp
except ImportError:  # the SDK falls back to httpx's own transport
    aiohttp = None  # type: ignore[assignment]  # an optional module: None when not installed

from service.errors import UpstreamRejected, UpstreamUnavailable

# Error codes a failed turn carries when Parallel refuses to start its run.
REJECTION_CODES = {
    400: "parallel_bad_request",
    401: "parallel_unauthorized",
    402: "parallel_payment_required",
    403: "parallel_forbidden",
    404: "parallel_run_not_found",
    422: "parallel_invalid_request",
}


def _retry_after(exc: parallel.APIStatusError) -> float | None:
    value = exc.response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def translate(exc: Exception) -> Exception:
    """Map an SDK exception to UpstreamUnavailable or UpstreamRejected."""
    if isinstance(exc, parallel.APIConnectionError):  # includes APITimeoutError
        return UpstreamUnavailable(f"Parallel unreachable: {type(exc).__name__}")
    if isinstance(exc, parallel.APIStatusError):
        status = exc.status_code
        message = _error_message(exc)
        if status in (408, 409, 429) or status >= 500:
            return UpstreamUnavailable(
                f"Parallel answered {status}: {message}", retry_after=_retry_after(exc)
            )
        code = REJECTION_CODES.get(status, f"parallel_http_{status}")
        return UpstreamRejected(f"Parallel answered {status}: {message}", status_code=status,
                                code=code)
    unreadable = parallel.APIResponseValidationError | httpx.HTTPError | msgspec.DecodeError
    if isinstance(exc, unreadable):
        return UpstreamUnavailable(f"Parallel answered unexpectedly: {exc}")
    return exc


def _error_message(exc: parallel.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
    return exc.message


def _failed_to_connect(exc: BaseException) -> bool:
    """Whether the request failed while connecting (or waiting for a pooled connection), so it
    never reached Parallel. The aiohttp transport reports every aiohttp connection error, a
    server hanging up after the request was sent included, as httpx.ConnectTimeout: its own
    cause tells them apart."""
    cause = exc.__cause__
    if isinstance(cause, httpx.PoolTimeout):
        return True
    if not isinstance(cause, httpx.ConnectError | httpx.ConnectTimeout):
        return False
    inner = cause.__cause__
    if aiohttp is not None and isinstance(inner, aiohttp.ClientError):
        return isinstance(inner, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)
    return True


def _no_answer_in_time(exc: BaseException) -> bool:
    """Whether a request failed waiting for its answer (rather than the connection breaking).
    The SDK calls both APITimeoutError with the aiohttp transport, which reports a hang-up as
    httpx.ConnectTimeout: the aiohttp error beneath tells them apart."""
    cause = exc.__cause__
    if not isinstance(cause, httpx.TimeoutException):
        return False
    inner = cause.__cause__
    if aiohttp is not None and isinstance(inner, aiohttp.ClientError):
        return isinstance(inner, aiohttp.ServerTimeoutError)
    return True


def create_error(exc: Exception) -> Exception:
    """The error of a failed create, saying whether a run may exist all the same."""
    if isinstance(exc, TimeoutError):  # the whole call ran out of time, maybe after sending
        error = UpstreamUnavailable("Parallel did not answer the create in time")
        error.in_doubt = error.timed_out = True
        return error
    translated = translate(exc)
    if isinstance(translated, UpstreamUnavailable):
        if isinstance(exc, parallel.APIConnectionError):
            translated.in_doubt = not _failed_to_connect(exc)
            translated.timed_out = translated.in_doubt and _no_answer_in_time(exc)
        elif not isinstance(exc, parallel.APIStatusError):
            # It answered 2xx (a run exists) with a body we cannot read.
            translated.in_doubt = True
    return translated
