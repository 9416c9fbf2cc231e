"""Push mode: Parallel's `task_run.status` webhook triggers an immediate check of the run.

The webhook makes the check of the run's turn due now in Postgres, with the finished status it
reported, and wakes the workers' followers (LISTEN/NOTIFY): one statement here, no queue job,
and the follower asks for a completed run's result at once (one Parallel call, as the SDK loop
makes). A run that ends within milliseconds can be reported before the worker that created it
has stored its id: then, and only then, a `check_turn` job looks again shortly (worker.jobs).

Parallel signs like Standard Webhooks but keys the HMAC with the raw UTF-8 bytes of the account
secret (docs/parallel.md §4), where the `standardwebhooks` package would base64-decode it: so
this one check is written out by hand.

A delivery is checked once: its `webhook-id` is remembered in Redis (SET NX EX) for as long as
its signature is accepted, so a captured request replayed within that window is answered 2xx
and queues nothing. Redis, not Postgres: the ids live minutes, expire by themselves and cost no
table, sweep or write on the database for an unauthenticated route. While Redis is unreachable
the webhook is still reported to Postgres and answered 204; replays then cost one idempotent
UPDATE each, and a run not stored yet is left to the safety-net poll.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Mapping

import asyncpg
import msgspec
import structlog
from redis.exceptions import RedisError

from service import metrics
from service import queue as jobs
from service.config import Settings
from service.db import turns as turn_db
from service.domain.validation import unstorable_field
from service.errors import BadRequest, Unauthorized

log = structlog.get_logger(__name__)

# Older (or newer) timestamps are refused, so a captured delivery cannot be replayed later.
TOLERANCE_S = 300
# This many well-formed deliveries in a row whose signature does not match: the secret is
# probably wrong (logged then, and again at 10, 100, 1000… in a row).
WRONG_SECRET_STREAK = 3
# A delivery is accepted from TOLERANCE_S before its timestamp to TOLERANCE_S after it, so its id
# is remembered that long from whenever it first came.
SEEN_FOR_S = 2 * TOLERANCE_S
# Unix seconds, ASCII digits only: str.isdigit() also takes "²", which int() refuses.
_TIMESTAMP = re.compile(r"[0-9]{1,12}", re.ASCII)
MAX_WEBHOOK_ID = 256  # a Redis key part; Parallel's are ~30 characters
REDIS_DOWN = (RedisError, OSError, TimeoutError)
# Statuses after which a run has ended: a check asks for its result (or error) at once.
FINISHED_RUN_STATUSES = frozenset({"completed", "failed", "cancelled"})


class InvalidSignature(Unauthorized):
    """The webhook's signature is missing, wrong or too old."""

    type_ = "invalid-signature"
    title = "Invalid signature"

    def __init__(self, detail: str | None = None, *, reason: str = "mismatch") -> None:
        super().__init__(detail)
        self.reason = reason  # the metric's label: mismatch, unconfigured, headers, timestamp


class RunStatus(msgspec.Struct, kw_only=True):
    run_id: str
    status: str | None = None


class ParallelWebhook(msgspec.Struct, kw_only=True):
    type: str
    data: RunStatus


def parallel_signature(secret: str, webhook_id: str, timestamp: str, body: bytes) -> str:
    """`v1,` + base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`, keyed with the secret as is."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify_parallel_webhook(
    secret: str | None, headers: Mapping[str, str], body: bytes, now: float | None = None
) -> None:
    """Accept the delivery or raise InvalidSignature. Any `v1,` entry of the header may match
    (Parallel sends several while it rotates its secret)."""
    if not secret:
        raise InvalidSignature("Push mode is not configured: PARALLEL_WEBHOOK_SECRET is not set.",
                               reason="unconfigured")
    webhook_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    if not 0 < len(webhook_id) <= MAX_WEBHOOK_ID or not _TIMESTAMP.fullmatch(timestamp):
        raise InvalidSignature("webhook-id and webhook-timestamp headers are required.",
                               reason="headers")
    now = time.time() if now is None else now
    if abs(now - int(timestamp)) > TOLERANCE_S:
        raise InvalidSignature(f"webhook-timestamp is more than {TOLERANCE_S} s away from now.",
                               reason="timestamp")
    expected = parallel_signature(secret, webhook_id, timestamp, body).encode()
    for entry in headers.get("webhook-signature", "").split():
        if entry.startswith("v1,") and hmac.compare_digest(entry.encode(), expected):
            return
    raise InvalidSignature()


def seen_key(queue_name: str, webhook_id: str) -> str:
    return f"{queue_name}:parallel-webhook:{webhook_id}"


def parse_parallel_webhook(body: bytes) -> ParallelWebhook:
    """The delivery's body, with strings Postgres can store. Raises BadRequest."""
    try:
        raw = msgspec.json.decode(body)
        hook = msgspec.convert(raw, ParallelWebhook)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise BadRequest(f"Not a task_run.status webhook: {exc}") from None
    if (field := unstorable_field(raw)) is not None:
        raise BadRequest(f"Not a task_run.status webhook: {field} holds a NUL.")
    return hook


async def receive_parallel_webhook(
    pool: asyncpg.Pool, queue: jobs.Queue, settings: Settings, headers: Mapping[str, str],
    body: bytes,
) -> str | None:
    """Verify the delivery and have its run checked now, once per webhook-id; returns the run id
    (None for another event type or a replay).

    Nothing else happens here: the check (worker) reads the run's state from Parallel itself.
    Raises InvalidSignature, BadRequest.
    """
    try:
        verify_parallel_webhook(settings.parallel_webhook_secret, headers, body)
    except InvalidSignature as exc:
        _rejected(exc.reason)
        raise
    _refused_in_a_row.count = 0
    hook = parse_parallel_webhook(body)
    if hook.type != "task_run.status":
        log.info("parallel_webhook_ignored", type=hook.type)
        return None
    run_id, status = hook.data.run_id, hook.data.status
    redis_up = True
    try:
        # After the signature only: an unsigned request must not use up a genuine id.
        key = seen_key(settings.queue_name, headers["webhook-id"])
        if not await queue.set(key, b"1", nx=True, ex=SEEN_FOR_S):
            log.info("parallel_webhook_replayed", run_id=run_id)
            return None
    except REDIS_DOWN as exc:
        log.warning("parallel_webhook_unchecked_for_replay", run_id=run_id, error=repr(exc))
        redis_up = False
    finished = status if status in FINISHED_RUN_STATUSES else None
    turn_id, known = await turn_db.report_run(pool, run_id, finished)
    if turn_id is None and not known and redis_up:
        # Not stored yet (or never by this service): a worker job asks again shortly.
        try:
            await jobs.enqueue_check_turn(queue, settings.queue_name, run_id, status)
        except REDIS_DOWN as exc:
            log.warning("parallel_webhook_check_not_queued", run_id=run_id, error=repr(exc))
    log.info("parallel_webhook", run_id=run_id, status=status, turn_id=turn_id)
    return run_id


class _Streak:
    count = 0  # well-formed deliveries refused in a row, in this process


_refused_in_a_row = _Streak()


def _rejected(reason: str) -> None:
    """Count a refused delivery; a run of well-formed ones that fail the check means the secret
    (or its absence) is wrong: every turn then waits for the safety-net poll instead."""
    metrics.PARALLEL_WEBHOOK_REJECTED.labels(reason).inc()
    if reason not in ("mismatch", "unconfigured"):
        return
    _refused_in_a_row.count += 1
    streak = _refused_in_a_row.count
    if streak == WRONG_SECRET_STREAK or (streak >= 10 and str(streak).strip("0") == "1"):
        log.warning(
            "parallel_webhook_secret_probably_wrong", rejected_in_a_row=streak, reason=reason,
            hint="PARALLEL_WEBHOOK_SECRET is not the secret Parallel signs its webhooks with "
                 "(for the sandbox: SANDBOX_WEBHOOK_SECRET); turns end only at the safety-net "
                 "polls (PUSH_POLL_INITIAL_S) until it is fixed",
        )
