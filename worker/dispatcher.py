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
from service.notify import EventHub
from service.resources import Resources
from worker.loops import DueLoop

log = structlog.get_logger(__name__)


class Dispatcher(DueLoop):
    """Sends due deliveries, at most `webhook_batch` at a time per worker."""

    name = "dispatcher"

    def __init__(self, resources: Resources) -> None:
        # Idle, it sleeps for up to the follower's idle interval; without notifications (the
        # LISTEN connection is down) it polls every second at most.
        super().__init__(resources.settings.follower_idle_s)
        self._res = resources
        self._sender = WebhookSender(resources.settings.webhook_timeout_s)
        self._hub = EventHub(resources.settings.database_url, channel=db.DELIVERY_CHANNEL)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._next_due: datetime | None = None
        self._subscription = self._hub.subscribe(db.WAKE_PAYLOAD)

    async def start(self) -> None:
        await self._hub.start()
        # A NOTIFY, a finished attempt and stop() all wake the loop.
        self._wake = self._subscription.__enter__()
        self.start_loop()

    async def stop(self, grace_s: float = 20.0) -> None:
        """Let the attempts in hand finish (up to grace_s), then stop."""
        if not await self.stop_loop(grace_s):
            # Unrecorded attempts become due again when their lease ends.
            for task in self._in_flight:
                task.cancel()
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        self._subscription.__exit__(None, None, None)
        await self._hub.close()
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

    def idle_s(self) -> float:
        # While notifications arrive, a new delivery wakes the loop; without them, poll.
        return super().idle_s() if self._hub.connected else min(1.0, super().idle_s())

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
