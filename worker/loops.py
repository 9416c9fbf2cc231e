"""A loop that takes due work from a schedule in Postgres, shared by the follower and the
webhook dispatcher: claim what is due, else sleep until the next item is due or a wake-up.

Idle, it costs nothing between two looks: it sleeps until the next item's due time (read from
Postgres after each tick), a wake-up (`wake()`: a webhook's check, a NOTIFY), a hint of work
made in this process (`wake_in()`: a run just stored) or at most `idle_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import structlog

from service.db.pool import DB_UNAVAILABLE
from service.notify import EventHub

log = structlog.get_logger(__name__)

DB_RETRY_MAX_S = 2.0


class DueLoop:
    name = "loop"

    def __init__(self, idle_s: float) -> None:
        self._idle_s = idle_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # The earliest hint given since the last tick began (monotonic time), see wake_in().
        self._hint: float | None = None
        # The sleep's own alarm and its time. The time is kept here: a handle for a time already
        # past is a plain Handle under uvloop, with no when().
        self._alarm: asyncio.Handle | None = None
        self._alarm_at = 0.0
        # Called once when a tick succeeds after Postgres was away (the worker releases the jobs
        # it deferred meanwhile: worker.recovery).
        self.on_recovered: Callable[[], Awaitable[None]] | None = None

    async def tick(self) -> bool:
        """Claim and handle due work; True when there may be more right away."""
        raise NotImplementedError

    async def next_due(self) -> datetime | None:
        """When the next item falls due, or None when nothing is scheduled."""
        raise NotImplementedError

    def start_loop(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    def wake(self) -> None:
        self._wake.set()

    def wake_in(self, seconds: float) -> None:
        """Work may fall due in `seconds` (it was just committed): sleep no longer than that.
        A hint that comes while the loop ticks is kept for its next sleep, so it cannot be lost
        between the tick's reading of the schedule and the sleep."""
        loop = asyncio.get_running_loop()
        at = loop.time() + max(0.0, seconds)
        if self._hint is None or at < self._hint:
            self._hint = at
        if self._alarm is not None and at < self._alarm_at:
            self._alarm.cancel()
            self._alarm, self._alarm_at = loop.call_at(at, self._wake.set), at

    def idle_s(self) -> float:
        """The longest sleep, when nothing is due sooner."""
        return self._idle_s

    async def stop_loop(self, grace_s: float) -> bool:
        """Let the loop finish what it holds for up to grace_s; False if it had to be cancelled."""
        self._stopping = True
        self._wake.set()
        if self._task is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace_s)
            return True
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            return False

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            # Cleared before looking, so a wake-up that comes while we look is not lost.
            self._wake.clear()
            self._hint = None
            try:
                more = await self.tick()
                if failures:
                    log.info(f"{self.name}_db_back", failed_ticks=failures)
                    await self._recovered()
                failures = 0
                if not more:
                    await self._sleep(await self._until_next_due())
            except DB_UNAVAILABLE as exc:
                failures += 1
                # A short cap, so work resumes within DB_RETRY_MAX_S of Postgres answering again
                # (a failed tick costs one refused connection or one timed-out statement).
                delay = min(DB_RETRY_MAX_S, 0.25 * 2**failures)
                log.warning(f"{self.name}_db_unavailable", error=repr(exc), retry_in=delay)
                await self._sleep(delay)
            except Exception:
                log.exception(f"{self.name}_error")
                await self._sleep(self.idle_s())
        await self.drain()

    async def _recovered(self) -> None:
        if self.on_recovered is None:
            return
        try:
            await self.on_recovered()
        except Exception:
            log.exception(f"{self.name}_recovery_failed")

    async def drain(self) -> None:
        """Wait for work still in hand once the loop stops (nothing by default)."""

    async def _until_next_due(self) -> float:
        next_at = await self.next_due()
        if next_at is None:
            return self.idle_s()
        return max(0.0, min(self.idle_s(), (next_at - datetime.now(UTC)).total_seconds()))

    async def _sleep(self, seconds: float) -> None:
        if self._stopping:
            return
        loop = asyncio.get_running_loop()
        at = loop.time() + seconds
        if self._hint is not None:
            at = min(at, self._hint)
        self._alarm, self._alarm_at = loop.call_at(at, self._wake.set), at
        try:
            await self._wake.wait()
        finally:
            self._alarm.cancel()
            self._alarm = None


# While its LISTEN connection is down, a NotifiedLoop looks for work this often at most.
UNNOTIFIED_POLL_S = 1.0


class NotifiedLoop(DueLoop):
    """A DueLoop that a NOTIFY wakes too: `payload` on `channel`, heard on a LISTEN connection
    of its own (service.notify.EventHub, whose reconnection also wakes it: anything may have been
    missed meanwhile). While that connection is down it polls every UNNOTIFIED_POLL_S at most."""

    def __init__(self, idle_s: float, database_url: str, channel: str, payload: str) -> None:
        super().__init__(idle_s)
        self._hub = EventHub(database_url, channel=channel)
        self._subscription = self._hub.subscribe(payload)

    async def start(self) -> None:
        await self._hub.start()
        # A NOTIFY, wake() and stop_loop() all set this event.
        self._wake = self._subscription.__enter__()
        self.start_loop()

    async def stop_listening(self) -> None:
        """Close the LISTEN connection (once the loop has stopped)."""
        self._subscription.__exit__(None, None, None)
        await self._hub.close()

    def idle_s(self) -> float:
        idle = super().idle_s()
        return idle if self._hub.connected else min(UNNOTIFIED_POLL_S, idle)
