"""The group follower: follows the event streams of the service's task groups, one stream per
group and one worker per stream, and checks each run as soon as its group reports it ended.

Which worker follows a group is a lease in Postgres (task_group.follower, lease_until): a worker
renews its own every GROUP_LEASE_S / 3 and takes over groups whose follower's lease ran out (it
died), a few per round, so several workers share the groups. A stream's cursor (the last
event_id handled, in order) is stored as it goes; after the stream ends (Parallel closes it
after an hour, or after the `timeout` asked) or after a crash it resumes from there, so no
event is missed (an event handled twice costs one UPDATE that finds the turn ended). A
`task_run.state` event of an ended run makes its turn's check happen at once, as a webhook does
in push mode (a completed run asks for its result alone). A closed group whose runs have all
ended is finished and not followed any more.

The safety net for an event that never came is the group's run listing, read by the follower
every GROUP_SWEEP_INTERVAL_S (one call for the whole group, whatever its runs' lengths, so a
turn costs the same Parallel calls however long its run takes); a stream that keeps failing
hands its runs to the ordinary per-run polls instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable

import structlog

from service.db import groups as group_db
from service.db import turns as turn_db
from service.db.pool import DB_UNAVAILABLE
from service.domain import runs
from service.errors import UpstreamRejected, UpstreamUnavailable
from service.resources import Resources

log = structlog.get_logger(__name__)

# A run reported ended before its attempt stored it (it ended within milliseconds): looked up
# again as soon as this process stores a run (its attempt usually runs here), else after 0.25,
# 0.5, 0.75 and 1 s, then left to the safety net.
UNRECORDED_TRIES = 5
CHECKS_AT_ONCE = 200  # checks in flight per worker
SAVE_EVERY_S = 1.0  # how often a stream's cursor is stored while events come
# A stream that ended with nothing active is opened again after 1 s, then 2, 4, 5, 5 … s while
# it stays quiet (at once when this worker adds runs to the group).
IDLE_RECONNECT_S = (1.0, 5.0)
TAKE_OVER_PER_ROUND = 2  # groups taken over from dead followers per lease round
# A stream that failed this many times in a row (about 3.5 s of retries) no longer holds its
# runs to the slow safety-net poll: they are polled as one-by-one runs are, and the worker's
# group starts hear of it (a 404 there means this Parallel has no group streams: one by one).
FAILURES_BEFORE_POLLING = 3


# Told how each read of a stream ended: None when it was read, else its error.
StreamRead = Callable[[UpstreamUnavailable | UpstreamRejected | None], None]


def follower_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class GroupFollower:
    def __init__(self, resources: Resources, follower: str) -> None:
        self._res = resources
        self.follower = follower
        # Told how each stream read ended (GroupStarts.stream_read): set once both exist.
        self.on_stream_read: StreamRead | None = None
        self._streams: dict[str, asyncio.Task[None]] = {}
        self._closed: dict[str, bool] = {}
        self._news: dict[str, asyncio.Event] = {}
        self._checks = asyncio.Semaphore(CHECKS_AT_ONCE)
        self._stored = asyncio.Event()  # set (and replaced) when this process stores a run
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="group-follower")

    def stored(self) -> None:
        """A start attempt of this process stored its run: checks waiting for theirs to be
        stored look again now."""
        self._stored.set()
        self._stored = asyncio.Event()

    def added(self, taskgroup_id: str) -> None:
        """Runs were added to the group here: open its stream now if it is idle (or not yet
        claimed)."""
        if (news := self._news.get(taskgroup_id)) is not None:
            news.set()
        else:
            self._wake.set()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        for task in self._streams.values():
            task.cancel()
        await asyncio.gather(*self._streams.values(), return_exceptions=True)
        held = list(self._streams)
        if held:
            with contextlib.suppress(Exception):
                await group_db.release_groups(self._res.pool, self.follower, held)

    async def _run(self) -> None:
        settings = self._res.settings
        while not self._stopping:
            self._wake.clear()
            try:
                await self._claim()
            except DB_UNAVAILABLE as exc:
                log.warning("group_follower_db_unavailable", error=repr(exc))
            except Exception:
                log.exception("group_follower_error")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), settings.group_lease_s / 3)

    async def _claim(self) -> None:
        """Renew this worker's leases, take over unfollowed groups, start and stop streams."""
        settings = self._res.settings
        mine = [gid for gid, task in self._streams.items() if not task.done()]
        rows = await group_db.claim_groups(self._res.pool, self.follower, settings.group_lease_s,
                                           len(mine) + TAKE_OVER_PER_ROUND,
                                           settings.group_max_age_s)
        held = {row["id"]: row for row in rows}
        for gid, task in list(self._streams.items()):
            if task.done() or gid not in held:  # finished, or another worker has it now
                task.cancel()
                del self._streams[gid]
                self._news.pop(gid, None)
                self._closed.pop(gid, None)
        for gid, row in held.items():
            self._closed[gid] = row["closed"]
            if gid not in self._streams:
                self._news[gid] = asyncio.Event()
                self._streams[gid] = asyncio.create_task(
                    self._follow(gid, row["event_cursor"]), name=f"group-stream:{gid}")

    async def _follow(self, taskgroup_id: str, cursor: str | None) -> None:
        """Follow one group's stream until it is finished (or the task is cancelled)."""
        settings = self._res.settings
        failures = quiet = 0
        swept = time.monotonic()  # a stream resumed from its cursor misses nothing before
        structlog.contextvars.bind_contextvars(taskgroup_id=taskgroup_id)
        while True:
            if time.monotonic() - swept >= settings.group_sweep_interval_s:
                swept = time.monotonic()
                await self._sweep(taskgroup_id)
            news = self._news.get(taskgroup_id)
            if news is not None:
                news.clear()
            opened = time.monotonic()
            try:
                before, cursor = cursor, await self._read(taskgroup_id, cursor)
                failures = 0
                if self.on_stream_read is not None:
                    self.on_stream_read(None)
                quiet = quiet + 1 if cursor == before else 0
            except (UpstreamUnavailable, UpstreamRejected) as exc:
                failures += 1
                delay = min(30.0, 0.5 * 2 ** min(failures, 6))
                log.warning("group_stream_failed", error=exc.detail, retry_in=delay)
                if self.on_stream_read is not None:
                    self.on_stream_read(exc)
                if failures >= FAILURES_BEFORE_POLLING:
                    await self._poll_runs(taskgroup_id)
                await self._idle(taskgroup_id, delay)
                continue
            except DB_UNAVAILABLE as exc:
                log.warning("group_stream_db_unavailable", error=repr(exc))
                await self._idle(taskgroup_id, 2.0)
                continue
            if time.monotonic() - opened < settings.group_stream_timeout_s - 1:
                # Parallel ended it early: nothing of the group is active now.
                if self._closed.get(taskgroup_id) and not await self._active(taskgroup_id):
                    await group_db.finish_group(self._res.pool, taskgroup_id, self.follower)
                    log.info("task_group_finished")
                    return
                first, most = IDLE_RECONNECT_S
                await self._idle(taskgroup_id, min(most, first * 2 ** max(0, quiet - 1)))

    async def _sweep(self, taskgroup_id: str) -> None:
        """The safety net of a followed group: list its runs (one call) and check each one
        listed ended whose turn is still running (its event was missed), as the event would."""
        try:
            runs = await self._res.parallel.group_runs(taskgroup_id)
            ended = {run.run_id: run.status for run in runs if not run.is_active}
            missed = await turn_db.running_runs(self._res.pool, list(ended)) if ended else []
        except (UpstreamUnavailable, UpstreamRejected) as exc:
            log.info("group_sweep_failed", error=exc.detail)  # the next sweep lists again
            return
        except DB_UNAVAILABLE as exc:
            log.warning("group_stream_db_unavailable", error=repr(exc))
            return
        if missed:
            log.warning("group_events_missed", runs=len(missed))
            await asyncio.gather(*(self._check(run_id, ended[run_id]) for run_id in missed))

    async def _poll_runs(self, taskgroup_id: str) -> None:
        """The stream keeps failing: its group's runs are polled as one-by-one runs are, so
        none waits for the slow safety net (a stand-in whose group streams differ, an outage)."""
        try:
            moved = await group_db.poll_runs_of(self._res.pool, taskgroup_id)
        except DB_UNAVAILABLE as exc:
            log.warning("group_stream_db_unavailable", error=repr(exc))
            return
        if moved:
            log.warning("group_runs_polled_instead", runs=moved)

    async def _idle(self, taskgroup_id: str, seconds: float) -> None:
        news = self._news.get(taskgroup_id)
        if news is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(news.wait(), seconds)

    async def _active(self, taskgroup_id: str) -> bool:
        try:
            return await self._res.parallel.group_active(taskgroup_id)
        except (UpstreamUnavailable, UpstreamRejected) as exc:
            log.info("group_status_failed", error=exc.detail)
            return True

    async def _read(self, taskgroup_id: str, cursor: str | None) -> str | None:
        """Read the stream once from `cursor` to its end; the cursor handled by then. The
        cursor only moves past an event once its check succeeded (a crash, or a failed check,
        replays the rest when the stream is reopened)."""
        res = self._res
        pending: deque[tuple[str, asyncio.Task[bool] | None]] = deque()
        saved, last_save = cursor, time.monotonic()

        def handled() -> str | None:
            done = cursor_done
            while pending and _checked(pending[0][1]):
                done = pending.popleft()[0]
            return done

        cursor_done = cursor
        # aclosing: a follower stopped (or cancelled) mid-stream closes the stream and gives
        # its connection back now, not whenever the generator is collected.
        events = contextlib.aclosing(res.parallel.group_events(
            taskgroup_id, cursor, timeout_s=res.settings.group_stream_timeout_s))
        try:
            async with events as stream:
                async for event in stream:
                    check = self._handle(event)
                    event_id = event.get("event_id")
                    if isinstance(event_id, str) and event_id:
                        pending.append((event_id, check))
                    if time.monotonic() - last_save >= SAVE_EVERY_S:
                        cursor_done = handled()
                        saved = await self._save(taskgroup_id, saved, cursor_done)
                        last_save = time.monotonic()
        finally:
            checks = [task for _, task in pending if task is not None]
            if checks:
                await asyncio.wait(checks, timeout=res.settings.follower_check_timeout_s)
            cursor_done = handled()
            with contextlib.suppress(*DB_UNAVAILABLE):
                saved = await self._save(taskgroup_id, saved, cursor_done)
        return cursor_done

    async def _save(self, taskgroup_id: str, saved: str | None, cursor: str | None) -> str | None:
        if cursor is None or cursor == saved:
            return saved
        if not await group_db.save_cursor(self._res.pool, taskgroup_id, self.follower, cursor):
            log.info("group_stream_taken_over")
            raise asyncio.CancelledError  # another worker follows it now
        return cursor

    def _handle(self, event: dict[str, object]) -> asyncio.Task[bool] | None:
        """Start the check of a run the event reports ended; None for any other event."""
        if event.get("type") != "task_run.state":
            if event.get("type") == "error":
                log.warning("group_stream_error_event", event=event)
            return None
        run = event.get("run")
        if not isinstance(run, dict) or run.get("is_active") or not run.get("run_id"):
            return None
        return asyncio.create_task(self._check(str(run["run_id"]), str(run.get("status"))))

    async def _check(self, run_id: str, status: str) -> bool:
        """Check the run its event reports ended; False when that failed, so the stream's
        cursor stays before the event and it is read again when the stream is reopened. While
        Postgres is away the check is tried again, for up to FOLLOWER_CHECK_TIMEOUT_S."""
        settings = self._res.settings
        # Each check runs in its own task, so these ids stay on its log lines only.
        structlog.contextvars.bind_contextvars(run_id=run_id)
        deadline, delay = time.monotonic() + settings.follower_check_timeout_s, 0.25
        while True:
            try:
                async with self._checks, asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    await self._check_once(run_id, status)
                return True
            except DB_UNAVAILABLE as exc:
                if time.monotonic() + delay >= deadline:
                    log.warning("group_check_failed", error=repr(exc))
                    return False
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
            except Exception:
                log.exception("group_check_failed")
                return False

    async def _check_once(self, run_id: str, status: str) -> None:
        res = self._res
        for tries in range(UNRECORDED_TRIES):
            stored = self._stored  # taken before the claim: no store is missed
            claimed = await turn_db.claim_run(res.pool, run_id, res.settings.check_lease_s)
            if claimed is None and await turn_db.run_known(res.pool, run_id):
                # Stored between the two reads, or ended already.
                claimed = await turn_db.claim_run(res.pool, run_id, res.settings.check_lease_s)
                if claimed is None:
                    return
            if claimed is not None:
                structlog.contextvars.bind_contextvars(
                    turn_id=claimed["id"], conversation_id=claimed["conversation_id"])
                await runs.check_turn(res.pool, res.parallel, res.queue, res.settings, claimed,
                                      reported_status=status)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stored.wait(), 0.25 * (tries + 1))


def _checked(check: asyncio.Task[bool] | None) -> bool:
    """Whether the stream's cursor may move past this event: no check, or one that succeeded."""
    return check is None or (check.done() and not check.cancelled() and check.result())
