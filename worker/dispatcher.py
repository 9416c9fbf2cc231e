"""The webhook dispatcher: one loop per worker that sends due deliveries from the outbox.

Deliveries and their schedule live in Postgres (webhook_delivery.next_attempt_at), not in Redis:
the loop claims due rows with FOR UPDATE SKIP LOCKED (several workers share the load), fairly
(round-robin across tenants, in-flight caps per tenant and per host, see
service.db.webhook_deliveries), sends them concurrently, and sleeps until the next one is due,
an attempt ends or a NOTIFY says a new one was written.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

import structlog

from service.clients.webhooks import WebhookSender
from service.db import webhook_deliveries as db
from service.domain import webhooks
from service.resources import Resources
from worker.loops import NotifiedLoop

log = structlog.get_logger(__name__)


class Dispatcher(NotifiedLoop):
    """Sends due deliveries, at most `webhook_batch` at a time per worker; a new delivery's
    NOTIFY and a finished attempt wake it."""

    name = "dispatcher"

    def __init__(self, resources: Resources) -> None:
        # Idle, it sleeps for up to the follower's idle interval.
        super().__init__(resources.settings.follower_idle_s, resources.settings.database_url,
                         db.DELIVERY_CHANNEL, db.WAKE_PAYLOAD)
        self._res = resources
        self._sender = WebhookSender(resources.settings.webhook_timeout_s)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._next_due: datetime | None = None

    async def stop(self, grace_s: float = 20.0) -> None:
        """Let the attempts in hand finish (up to grace_s), then stop."""
        if not await self.stop_loop(grace_s):
            # Unrecorded attempts become due again when their lease ends.
            for task in self._in_flight:
                task.cancel()
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        await self.stop_listening()
        await self._sender.close()

    async def tick(self) -> bool:
        # Attempts run as tasks, so one slow receiver never holds up the others.
        room = self._res.settings.webhook_batch - len(self._in_flight)
        if room <= 0:
            return False  # a finished attempt wakes the loop
        claim = await webhooks.claim_due(self._res.pool, self._res.settings, room)
        self._next_due = claim.next_due
        for due in claim.deliveries:
            task = asyncio.create_task(self._deliver(due))
            self._in_flight.add(task)
            task.add_done_callback(self._finished)
        # A full claim may leave more; a short one left nothing due but rows held back by the
        # caps, which a finished attempt (a wake-up here, the idle poll for other workers') frees.
        return len(claim.deliveries) == room

    async def next_due(self) -> datetime | None:
        if len(self._in_flight) >= self._res.settings.webhook_batch:
            return None
        return self._next_due

    async def drain(self) -> None:
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def _deliver(self, due: db.DueDelivery) -> None:
        try:
            await webhooks.deliver(self._res.pool, self._sender, self._res.settings, due)
        except Exception:
            # Not recorded: the claim's lease makes the delivery due again later.
            log.exception("webhook_attempt_failed", delivery_id=due.id)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._wake.set()
