"""Live progress of running turns, relayed from Parallel's run events to SSE watchers.

Only while someone watches: the first watcher of a run opens one upstream stream
(`/v1/tasks/runs/{id}/events`, docs/parallel.md §5) in this process, later watchers of the same
run share it, and the last one to leave closes it. Progress is never stored nor sent as a
webhook; each `turn.progress` event is a snapshot of the latest meter, source counts and message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from datetime import UTC, datetime
from typing import Any

import structlog

from service.clients.parallel import ParallelClient
from service.errors import UpstreamRejected, UpstreamUnavailable
from service.models import Progress, ProgressEvent

log = structlog.get_logger(__name__)

# Parallel closes event streams after 570 s, and a stream may break: reconnect after this long
# while the run is active and watched.
RECONNECT_S = 1.0
PENDING_MAX = 50


class Watch:
    """One watcher's queue of progress events; `ready` is set while it holds any."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.ready = asyncio.Event()
        self._pending: deque[ProgressEvent] = deque(maxlen=PENDING_MAX)

    def push(self, event: ProgressEvent) -> None:
        self._pending.append(event)
        self.ready.set()

    def drain(self) -> list[ProgressEvent]:
        self.ready.clear()
        events = list(self._pending)
        self._pending.clear()
        return events


class _Upstream:
    def __init__(self, conversation_id: str, turn_id: str, run_id: str) -> None:
        self.conversation_id = conversation_id
        self.turn_id = turn_id
        self.run_id = run_id
        self.watches: set[Watch] = set()
        self.progress = Progress()
        self.seen: set[tuple[Any, ...]] = set()  # messages sent (a reconnect replays them all)
        self.task: asyncio.Task[None] | None = None

    def snapshot(self) -> ProgressEvent:
        return ProgressEvent(conversation_id=self.conversation_id, turn_id=self.turn_id,
                             created_at=datetime.now(UTC), data=self.progress)

    def apply(self, event: dict[str, Any]) -> bool:
        """Fold one upstream event into the snapshot; True when watchers should hear of it."""
        kind = str(event.get("type", ""))
        if kind == "task_run.progress_stats":
            stats = event.get("source_stats") or {}
            self.progress = Progress(
                progress_meter=event.get("progress_meter"),
                sources_considered=stats.get("num_sources_considered"),
                sources_read=stats.get("num_sources_read"),
                sources_read_sample=stats.get("sources_read_sample"),
                message=self.progress.message, message_type=self.progress.message_type,
                message_at=self.progress.message_at,
            )
            return True
        if kind.startswith("task_run.progress_msg."):
            key = (kind, event.get("message"), event.get("timestamp"))
            if key in self.seen:
                return False
            self.seen.add(key)
            p = self.progress
            self.progress = Progress(
                progress_meter=p.progress_meter, sources_considered=p.sources_considered,
                sources_read=p.sources_read, sources_read_sample=p.sources_read_sample,
                message=event.get("message"), message_type=kind.rsplit(".", 1)[1],
                message_at=event.get("timestamp"),
            )
            return True
        return False


def run_finished(event: dict[str, Any]) -> bool:
    run = event.get("run") or {}
    return event.get("type") == "task_run.state" and run.get("is_active") is False


class ProgressRelay:
    """One per API process, on Resources."""

    def __init__(self, parallel: ParallelClient) -> None:
        self._parallel = parallel
        self._runs: dict[str, _Upstream] = {}

    def watch(self, conversation_id: str, turn_id: str, run_id: str) -> Watch:
        """Start hearing the run's progress; call unwatch() with the result when done."""
        upstream = self._runs.get(run_id)
        if upstream is None:
            upstream = self._runs[run_id] = _Upstream(conversation_id, turn_id, run_id)
            upstream.task = asyncio.create_task(self._follow(upstream), name=f"progress:{run_id}")
        watch = Watch(run_id)
        upstream.watches.add(watch)
        if upstream.seen or upstream.progress.progress_meter is not None:
            watch.push(upstream.snapshot())  # a late watcher starts from the latest snapshot
        return watch

    def unwatch(self, watch: Watch) -> None:
        upstream = self._runs.get(watch.run_id)
        if upstream is None:
            return
        upstream.watches.discard(watch)
        if not upstream.watches:
            del self._runs[watch.run_id]
            if upstream.task is not None:
                upstream.task.cancel()

    @property
    def upstream_count(self) -> int:
        return len(self._runs)

    async def close(self) -> None:
        tasks = [u.task for u in self._runs.values() if u.task is not None]
        self._runs.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow(self, upstream: _Upstream) -> None:
        while upstream.watches:
            try:
                async with contextlib.aclosing(self._parallel.progress(upstream.run_id)) as events:
                    async for event in events:
                        if run_finished(event):
                            return
                        if upstream.apply(event):
                            snapshot = upstream.snapshot()
                            for watch in upstream.watches:
                                watch.push(snapshot)
            except UpstreamRejected as exc:
                log.info("progress_unavailable", run_id=upstream.run_id, error=exc.detail)
                return
            except UpstreamUnavailable as exc:
                log.info("progress_interrupted", run_id=upstream.run_id, error=exc.detail)
            except Exception:
                log.exception("progress_relay_error", run_id=upstream.run_id)
            await asyncio.sleep(RECONNECT_S)
