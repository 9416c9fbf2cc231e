"""Outbound webhooks: send due deliveries, keep the ledger, redeliver on request.

A delivery row is written with its terminal event (service.db.events.insert_event); the worker's
dispatcher (worker/dispatcher.py) claims due rows, sends each once, records the attempt and
schedules the next one from WEBHOOK_RETRY_SCHEDULE_S, so the schedule lives in Postgres and
survives any crash. Claims are fair: round-robin across tenants, and never more attempts in
flight (across all workers) than WEBHOOK_MAX_IN_FLIGHT_PER_TENANT for a tenant or
WEBHOOK_MAX_IN_FLIGHT_PER_HOST for a receiving host, so hanging receivers hold up only their own.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
import msgspec
import structlog

from service import metrics
from service.clients.webhooks import WebhookSender, signed_headers
from service.config import Settings
from service.db import conversations as conversation_db
from service.db import webhook_deliveries as db
from service.domain.cursors import decode_cursor, page_of
from service.domain.webhook_urls import UnsafeWebhookUrl, check_webhook_url
from service.errors import NotFound
from service.models import AttemptOutcome, WebhookDelivery, WebhookDeliveryPage

log = structlog.get_logger(__name__)

# A claimed delivery becomes due again after its lease, in case its dispatcher died mid-send:
# longer than an attempt can take (DNS and the request, each within webhook_timeout_s) plus
# this margin for recording it.
LEASE_MARGIN_S = 5.0


def lease_s(settings: Settings) -> float:
    return 2 * settings.webhook_timeout_s + LEASE_MARGIN_S


def next_step(ok: bool, attempts_in_round: int, schedule: list[float]) -> tuple[str, float | None]:
    """The delivery's status after an attempt, and the delay before the next one if any.

    `attempts_in_round` counts the attempts before this one: after the first attempt fails the
    next comes schedule[0] later, after the second schedule[1], …; past the end it has failed.
    """
    if ok:
        return "delivered", None
    if attempts_in_round < len(schedule):
        return "pending", schedule[attempts_in_round]
    return "failed", None


async def claim_due(pool: asyncpg.Pool, settings: Settings, limit: int) -> db.Claim:
    """Claim up to `limit` due deliveries for one attempt each (a lease, see LEASE_MARGIN_S),
    round-robin across tenants and within the in-flight caps per tenant and per host."""
    return await db.claim_due(pool, limit, lease_s(settings),
                              settings.webhook_max_in_flight_per_tenant,
                              settings.webhook_max_in_flight_per_host)


async def deliver(
    pool: asyncpg.Pool, sender: WebhookSender, settings: Settings, due: db.DueDelivery
) -> str:
    """Attempt one claimed delivery and record how it went; returns the delivery's new status."""
    outcome = await _attempt(sender, settings, due)
    schedule = settings.webhook_retry_schedule_s
    status, retry_in = next_step(outcome.ok, due.attempts_in_round, schedule)
    attempt = await db.record_attempt(pool, due, outcome, status, retry_in)
    log.info("webhook_attempt", delivery_id=due.id, webhook_id=due.webhook_id, attempt=attempt,
             status_code=outcome.status_code, error=outcome.error, delivery_status=status,
             retry_in_s=retry_in)
    metrics.record_webhook_delivery(
        {"delivered": "delivered", "pending": "failed", "failed": "gave_up"}[status],
        outcome.latency_ms / 1000 if outcome.latency_ms is not None else None,
    )
    return status


async def _attempt(
    sender: WebhookSender, settings: Settings, due: db.DueDelivery
) -> AttemptOutcome:
    try:
        # Again at every attempt: DNS may have changed since the URL was registered.
        async with asyncio.timeout(settings.webhook_timeout_s):
            addresses = await check_webhook_url(due.url, settings.webhook_allow_private)
    except UnsafeWebhookUrl as exc:
        return _refused(f"refused: {exc.reason}")
    except TimeoutError:
        return _refused("refused: the host did not resolve in time")
    if not due.secrets:
        return _refused("refused: the conversation has no webhook secret")
    body = msgspec.json.encode(due.payload).decode()
    headers = signed_headers(due.secrets, due.webhook_id, body)
    return await sender.send(due.url, body, headers, pin_to=addresses[0] if addresses else None)


def _refused(error: str) -> AttemptOutcome:
    return AttemptOutcome(started_at=datetime.now(UTC), status_code=None, latency_ms=None,
                          error=error, response_excerpt=None)


async def list_deliveries(
    pool: asyncpg.Pool, tenant_id: str, conversation_id: str, limit: int, cursor: str | None
) -> WebhookDeliveryPage:
    """A conversation's deliveries with their attempts, in event order. Raises NotFound."""
    after = decode_cursor(cursor, int)[0] if cursor else 0
    if await conversation_db.get_conversation(pool, tenant_id, conversation_id) is None:
        raise NotFound(f"Conversation {conversation_id!r} not found.")
    rows = await db.list_deliveries(pool, tenant_id, conversation_id, after, limit + 1)
    page, next_cursor = page_of(rows, limit, lambda row: (row.event_sequence,))
    return WebhookDeliveryPage(data=page, next_cursor=next_cursor)


async def redeliver(pool: asyncpg.Pool, tenant_id: str, delivery_id: str) -> WebhookDelivery:
    """Send the delivery again (same webhook-id), with a fresh retry schedule. Raises NotFound."""
    async with pool.acquire() as conn, conn.transaction():
        if not await db.redeliver(conn, tenant_id, delivery_id):
            raise NotFound(f"Webhook delivery {delivery_id!r} not found.")
        delivery = await db.get_delivery(conn, tenant_id, delivery_id)
    assert delivery is not None
    return delivery
