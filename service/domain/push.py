"""Push mode: Parallel's `task_run.status` webhook triggers an immediate check of the run.

Parallel signs like Standard Webhooks but keys the HMAC with the raw UTF-8 bytes of the account
secret (docs/parallel.md §4), where the `standardwebhooks` package would base64-decode it: so
this one check is written out by hand.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping

import msgspec
import structlog
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from service import queue as jobs
from service.config import Settings
from service.errors import BadRequest, Unauthorized, Unavailable

log = structlog.get_logger(__name__)

# Older (or newer) timestamps are refused, so a captured delivery cannot be replayed later.
TOLERANCE_S = 300


class InvalidSignature(Unauthorized):
    """The webhook's signature is missing, wrong or too old."""

    type_ = "invalid-signature"
    title = "Invalid signature"


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
        raise InvalidSignature("Push mode is not configured: PARALLEL_WEBHOOK_SECRET is not set.")
    webhook_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    if not webhook_id or not timestamp.isdigit():
        raise InvalidSignature("webhook-id and webhook-timestamp headers are required.")
    now = time.time() if now is None else now
    if abs(now - int(timestamp)) > TOLERANCE_S:
        raise InvalidSignature(f"webhook-timestamp is more than {TOLERANCE_S} s away from now.")
    expected = parallel_signature(secret, webhook_id, timestamp, body).encode()
    for entry in headers.get("webhook-signature", "").split():
        if entry.startswith("v1,") and hmac.compare_digest(entry.encode(), expected):
            return
    raise InvalidSignature()


async def receive_parallel_webhook(
    queue: ArqRedis, settings: Settings, headers: Mapping[str, str], body: bytes
) -> str | None:
    """Verify the delivery and enqueue a check of its run; returns the run id.

    Nothing else happens here: the check (worker) reads the run's state from Parallel itself,
    so a duplicate delivery only costs one more check. Raises InvalidSignature, BadRequest,
    Unavailable (Redis is down: Parallel retries).
    """
    verify_parallel_webhook(settings.parallel_webhook_secret, headers, body)
    try:
        hook = msgspec.json.decode(body, type=ParallelWebhook)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadRequest(f"Not a task_run.status webhook: {exc}") from None
    if hook.type != "task_run.status":
        log.info("parallel_webhook_ignored", type=hook.type)
        return None
    try:
        await jobs.enqueue_check_turn(
            queue, settings.queue_name, hook.data.run_id, hook.data.status
        )
    except (RedisError, OSError, TimeoutError) as exc:
        raise Unavailable("Redis is not reachable; retry the webhook.") from exc
    log.info("parallel_webhook", run_id=hook.data.run_id, status=hook.data.status)
    return hook.data.run_id
