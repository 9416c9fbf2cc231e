"""The webhook dispatcher: one loop per worker that sends due deliveries from the outbox.

Deliveries and their schedule live in Postgres (webhook_delivery.next_attempt_at), not in Redis:
the loop claims due rows with FOR UPDATE SKIP LOCKED (several workers share the load), sends
them concurrently, and sleeps until the next one is due or a NOTIFY says a new one was written.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import structlog

from service.clients.webhooks import WebhookSender
from service.db import webhook_deliveries as db
from service.db.pool import DB_UNAVAILABLE
from service.domain import webhooks
from service.notify import EventHub
from service.resources import Resources

log = structlog.get_logger(__name__)


class Dispatcher:
    """Sends due deliveries, at most `webhook_batch` at a time per worker."""

    def __init__(self, resources: Resources) -> None:
        self._res = resources
        self._sender = WebhookSender(resources.settings.webhook_timeout_s)
        self._hub = EventHub(resources.settings.database_url, channel=db.DELIVERY_CHANNEL)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self._hub.start()
        self._task = asyncio.create_task(self._run(), name="webhook-dispatcher")

    async def stop(self, grace_s: float = 20.0) -> None:
        """Let the attempts in hand finish (up to grace_s), then stop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), grace_s)
            except TimeoutError:
                # Unrecorded attempts become due again when their lease ends.
                for task in [self._task, *self._in_flight]:
                    task.cancel()
                await asyncio.gather(self._task, *self._in_flight, return_exceptions=True)
        await self._hub.close()
        await self._sender.close()

    async def _run(self) -> None:
        settings = self._res.settings
        failures = 0
        with self._hub.subscribe(db.WAKE_PAYLOAD) as notified:
            self._wake = notified  # a NOTIFY, a finished attempt and stop() all wake the loop
            while not self._stopping:
                try:
                    notified.clear()
                    # Attempts run as tasks, so one slow receiver never holds up the others.
                    room = settings.webhook_batch - len(self._in_flight)
                    claimed = (await webhooks.claim_due(self._res.pool, settings, room)
                               if room > 0 else [])
                    for due in claimed:
                        task = asyncio.create_task(self._deliver(due))
                        self._in_flight.add(task)
                        task.add_done_callback(self._finished)
                    failures = 0
                    if claimed:
                        continue
                    await self._sleep(await self._until_next_due() if room else 60.0)
                except DB_UNAVAILABLE as exc:
                    failures += 1
                    delay = min(30.0, 0.5 * 2**failures)
                    log.warning("dispatcher_db_unavailable", error=repr(exc), retry_in=delay)
                    await self._sleep(delay)
                except Exception:
                    log.exception("dispatcher_error")
                    await self._sleep(settings.follower_idle_s)
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

    async def _until_next_due(self) -> float:
        # Without notifications (the LISTEN connection is down) this still polls, at the
        # follower's idle interval.
        idle = self._res.settings.follower_idle_s
        next_at = await db.next_due(self._res.pool)
        if next_at is None:
            return idle
        return max(0.0, min(idle, (next_at - datetime.now(UTC)).total_seconds()))

    async def _sleep(self, seconds: float) -> None:
        if self._stopping:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
