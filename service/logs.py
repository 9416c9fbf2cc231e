"""structlog set-up: JSON lines in production, readable lines in `make run`; secrets redacted.

Each line carries what the code bound: request_id, tenant_id, conversation_id and turn_id for a
request (service.http.middleware, service.http.auth); turn_id, run_id and conversation_id in
the worker. Redaction comes last, on our own and on library lines: the console renderer gets
a cleaned event; a JSON line is rendered, and cleaned and rendered again only when it could
hold a secret (RedactedJSON).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import re
import sys
import threading
from collections.abc import Iterable, MutableMapping
from contextvars import ContextVar
from typing import Any, TextIO

import msgspec
import structlog

REDACTED = "[redacted]"
# Field names whose values are always secret, wherever they appear.
SECRET_FIELDS = frozenset({
    "authorization", "api_key", "x-api-key", "x_api_key", "parallel_api_key", "password",
    "secret", "webhook_secret", "parallel_webhook_secret",
})
# Values that look like secrets inside any string: our API keys (the key id before the secret
# is kept for debugging), webhook secrets, bearer tokens, passwords in URLs.
_KEY_WITH_ID = re.compile(r"rsk_([0-9a-f]{6,32})_.")


def _api_key(match: re.Match[str]) -> str:
    shaped = _KEY_WITH_ID.match(match.group(0))
    return f"rsk_{shaped.group(1)}_{REDACTED}" if shaped else f"rsk_{REDACTED}"


SECRET_PATTERNS: tuple[tuple[re.Pattern[str], Any], ...] = (
    (re.compile(r"\brsk_[A-Za-z0-9_\-]{8,}"), _api_key),
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=_\-]+"), f"whsec_{REDACTED}"),
    (re.compile(r"(?i)\b(bearer\s+)[^\s\"',;]+"), rf"\1{REDACTED}"),
    (re.compile(r"(\b[a-z][a-z0-9+.\-]*://[^:/@\s]*:)[^@\s/]+@"), rf"\1{REDACTED}@"),
)
MIN_LITERAL_SECRET = 8


class Redactor:
    """A structlog processor that removes secrets from an event dict, nested values included."""

    def __init__(self, literals: Iterable[str | None] = ()) -> None:
        found = {s for s in literals if s and len(s) >= MIN_LITERAL_SECRET}
        self._literals = [re.compile(re.escape(s)) for s in sorted(found, key=len, reverse=True)]
        # A substring every pattern and literal needs (a superset of what they match).
        self._trigger = re.compile(
            "|".join([r"(?i:rsk_|whsec_|://|bearer)", *(re.escape(s) for s in found)])
        )
        # The same for a rendered JSON line, as plain substrings (faster than one regex of
        # alternatives): literals also as JSON escapes them, secret field names as keys.
        self._line_markers = ("rsk_", "whsec_", "://", "bearer",
                              *(f'"{name}":' for name in sorted(SECRET_FIELDS)))
        self._line_literals = tuple({
            *found, *(json.dumps(s)[1:-1] for s in found),
            *(msgspec.json.encode(s).decode()[1:-1] for s in found),  # as lines are written
        })

    def might_hold_secret(self, line: str) -> bool:
        """False when the JSON line rendered from an event cannot hold anything to redact."""
        lowered = line.lower()
        return any(m in lowered for m in self._line_markers) or any(
            s in line for s in self._line_literals
        )

    def __call__(
        self, _logger: Any, _name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key in list(event):
            event[key] = self._clean(key, event[key])
        return event

    def _clean(self, key: object, value: Any) -> Any:
        if isinstance(key, str) and key.lower() in SECRET_FIELDS and value not in (None, ""):
            return REDACTED
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self._clean(k, v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(None, v) for v in value]
        if isinstance(value, int | float | bool) or value is None:
            return value
        return self.text(str(value))

    def text(self, value: str) -> str:
        # Most values (ids, routes, numbers) contain nothing any pattern could match: one
        # search instead of every substitution (about 5% of the API's CPU per request).
        if not self._trigger.search(value):
            return value
        for literal in self._literals:
            value = literal.sub(REDACTED, value)
        for pattern, replacement in SECRET_PATTERNS:
            value = pattern.sub(replacement, value)
        return value


class RedactedJSON:
    """The JSON renderer, behind the Redactor: most lines (ids, routes, numbers) hold nothing
    to redact, so the line is rendered first and only one that might hold a secret is
    cleaned and rendered again. One search of the line instead of one per value."""

    def __init__(self, redact: Redactor) -> None:
        self._redact = redact
        # msgspec writes the line in a third of json.dumps's time (UTF-8, no spaces); anything
        # it cannot encode is written as its str().
        self._render = structlog.processors.JSONRenderer(serializer=_encode_line)

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        line = self._json(logger, name, event)
        if self._redact.might_hold_secret(line):
            line = self._json(logger, name, self._redact(logger, name, event))
        return line

    def _json(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        # bytes only with a serializer that writes them (orjson); the default writes str.
        line = self._render(logger, name, event)
        return line.decode() if isinstance(line, bytes) else line


_line_encoder = msgspec.json.Encoder(enc_hook=str)


def _encode_line(event: Any, **_: Any) -> str:
    return _line_encoder.encode(event).decode()


# What every line logged while a request is served carries (request_id, the ids in its path,
# tenant_id once its key is known): one dict per request, set once by the request's middleware
# and filled in place. structlog's bound context variables cost a ContextVar set and reset per
# field per request, and a walk of the whole context for every bind: about a fifth of the API's
# CPU for a GET (bench/api.py). The worker binds with structlog.contextvars as usual.
request_context: ContextVar[dict[str, Any] | None] = ContextVar("request_context", default=None)


def merge_request_context(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor: the request's fields, under what the line itself names."""
    context = request_context.get()
    if context:
        for key, value in context.items():
            if key not in event:
                event[key] = value
    return event


# What a line's context comes from: the worker's bound variables and the request's fields.
CONTEXT_PROCESSORS: tuple[structlog.types.Processor, ...] = (
    structlog.contextvars.merge_contextvars, merge_request_context,
)


# LogRecord attributes that are not extras (what logging.LogRecord sets itself).
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime",
}


class LineWriter:
    """The one writer of a log stream, for structlog's lines and the standard library's alike,
    so they keep their order.

    With `coalesce`, the info and debug lines written during one pass of the running event loop
    go out together, in one write at the end of the pass, instead of a write and a flush each
    (a twentieth of the API's CPU per request). A warning or worse is written at once, with
    what is pending before it; so is a line written outside a running loop, and what is pending
    when the process exits. A process killed outright loses at most the info lines of the pass
    it was in.
    """

    def __init__(self, stream: TextIO, *, coalesce: bool = False) -> None:
        self._stream = stream
        self._coalesce = coalesce
        self._pending: list[str] = []
        self._lock = threading.Lock()
        if coalesce:
            atexit.register(self.flush)

    def write(self, line: str, *, urgent: bool = False) -> None:
        with self._lock:
            self._pending.append(line)
            if len(self._pending) > 1 and not urgent:
                return  # the first pending line's flush is already due
        if self._coalesce and not urgent:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
                return
            except RuntimeError:  # no loop runs in this thread
                pass
        self.flush()

    def flush(self) -> None:
        with self._lock:
            lines, self._pending = self._pending, []
            if lines:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()


class WriterLogger:
    """structlog's logger: the rendered line to the LineWriter, at once from warning up."""

    def __init__(self, writer: LineWriter) -> None:
        self._writer = writer

    def info(self, line: str) -> None:
        self._writer.write(line)

    debug = msg = info

    def error(self, line: str) -> None:
        self._writer.write(line, urgent=True)

    warning = warn = err = critical = exception = fatal = failure = error


class LineHandler(logging.Handler):
    """A standard library handler writing formatted records through the LineWriter."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._writer.write(line, urgent=record.levelno >= logging.WARNING)


class JSONLineHandler(LineHandler):
    """The JSON path for the standard library's records (arq's job lines, uvicorn's, asyncpg's):
    the same fields as structlog's own lines (bound context, level, timestamp, extras), without
    ProcessorFormatter's copy of every record and its processor chain."""

    def __init__(self, writer: LineWriter, render: RedactedJSON) -> None:
        super().__init__(writer)
        self._render = render
        self._stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
        self._exc = structlog.processors.format_exc_info

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = structlog.contextvars.get_contextvars()
        merge_request_context(None, "", event)
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS:
                event[key] = value
        event["event"] = record.getMessage()
        event["level"] = record.levelname.lower()
        if record.exc_info:
            event["exc_info"] = record.exc_info
        event = dict(self._exc(None, "", self._stamp(None, "", event)))
        return self._render(None, event["level"], event)


def configure_logging(
    fmt: str = "json", level: int = logging.INFO, *, secrets: Iterable[str | None] = (),
    stream: TextIO | None = None, cache: bool = True, coalesce: bool = False,
) -> None:
    """Route structlog and stdlib logging to `stream` (stderr) as JSON or console lines.

    `secrets` are literal values (the Parallel key, …) never to be written. Tests pass a
    `stream` and cache=False, so that a later configure_logging takes effect everywhere.
    `coalesce`: the LineWriter's one write per loop pass (the API and the worker).
    """
    out = stream or sys.stderr
    writer = LineWriter(out, coalesce=coalesce)
    redact = Redactor(secrets)
    # Both end in text with secrets removed.
    output: list[structlog.types.Processor] = (
        [redact, structlog.dev.ConsoleRenderer()] if fmt == "console" else [RedactedJSON(redact)]
    )
    shared: list[structlog.types.Processor] = [
        *CONTEXT_PROCESSORS,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, *output],
        logger_factory=lambda *_: WriterLogger(writer),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=cache,
    )
    handler: logging.Handler
    if fmt == "console":
        handler = LineHandler(writer)
        handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                            structlog.processors.format_exc_info, *output],
                foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            )
        )
    else:
        handler = JSONLineHandler(writer, RedactedJSON(redact))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO ("HTTP Request: GET …"): one line per Parallel call and
    # per webhook attempt, which the service's own lines already describe. Warnings still show.
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))
