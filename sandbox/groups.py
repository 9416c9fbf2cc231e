"""Parallel's task groups (docs/parallel.md §1.6): ordinary runs of the Store, gathered in a group
with an event log and a listing of its runs.

A group's event log only grows: a `task_group_status` event each time runs are added, a
`task_run.state` event as each run reaches a non-active status, then one `task_group_status`
for the runs that ended in the same moment. An event's id is its position in the log ("1", "2",
…), so `last_event_id=N` replays exactly what came after N. The runs listing numbers the runs the
same way, in the order they were added (its own cursor: `run_cursor`, not `event_cursor`).
Counts per status are kept as runs change, so a status costs O(1) with 10,000 runs in a group.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from sandbox.store import ACTIVE, Run, Store
from sandbox.validation import check_metadata, check_task_spec, validate_create
from sandbox.wire import ApiError, encode, rfc3339

MAX_INPUTS = 1000
STATUSES = frozenset(
    {"queued", "action_required", "running", "completed", "failed", "cancelling", "cancelled"}
)
_ADD_RUNS_PATH = re.compile(r"^/v1(beta)?/tasks/groups/[^/]+/runs/?$")
_CHUNK = 256  # events per write when replaying a backlog


def creates_runs(method: str, path: str) -> bool:
    """True for the calls that make runs (create and add runs): the ones create faults apply to."""
    return method == "POST" and (
        path.rstrip("/") == "/v1/tasks/runs" or _ADD_RUNS_PATH.match(path) is not None
    )


def sse(payload: dict[str, Any]) -> bytes:
    kind: str = payload["type"]
    return b"event: " + kind.encode() + b"\ndata: " + encode(payload) + b"\n\n"


class Group:
    __slots__ = (
        "counts",
        "created_wall",
        "gone",
        "log",
        "metadata",
        "modified_wall",
        "positions",
        "queued",
        "runs",
        "starting",
        "status_due",
        "taskgroup_id",
        "waiter",
    )

    def __init__(self, taskgroup_id: str, metadata: dict[str, Any] | None) -> None:
        self.taskgroup_id = taskgroup_id
        self.metadata = metadata
        self.created_wall = self.modified_wall = time.time()
        self.runs: list[Run] = []
        self.positions: dict[str, int] = {}  # run_id → 1-based position in `runs`
        self.log: list[bytes] = []  # encoded SSE messages; event_id == str(index + 1)
        self.counts: dict[str, int] = {}
        self.queued: set[str] = set()  # runs counted as queued
        self.starting: list[tuple[float, str]] = []  # (running_mono, run_id) of queued runs
        self.status_due = False  # a task_group_status event is scheduled
        self.waiter: asyncio.Future[None] | None = None
        self.gone = False  # forgotten by a reset

    def _count(self, status: str, delta: int) -> None:
        left = self.counts.get(status, 0) + delta
        if left:
            self.counts[status] = left
        else:
            self.counts.pop(status, None)

    def refresh(self, now: float) -> None:
        """Move the runs whose queued time has passed from `queued` to `running`."""
        while self.starting and self.starting[0][0] <= now:
            _, run_id = heapq.heappop(self.starting)
            if run_id in self.queued:
                self.queued.discard(run_id)
                self._count("queued", -1)
                self._count("running", 1)
                run = self.runs[self.positions[run_id] - 1]
                self.modified_wall = run.created_wall + (run.running_mono - run.created_mono)

    def add(self, run: Run) -> None:
        run.taskgroup_id = self.taskgroup_id
        self.runs.append(run)
        self.positions[run.run_id] = len(self.runs)
        self.queued.add(run.run_id)
        self._count("queued", 1)
        heapq.heappush(self.starting, (run.running_mono, run.run_id))

    def ended(self, run: Run) -> None:
        self.refresh(time.monotonic())
        was = "queued" if run.run_id in self.queued else "running"
        self.queued.discard(run.run_id)
        self._count(was, -1)
        self._count(run.final or "failed", 1)
        self.modified_wall = run.finished_wall or time.time()

    def status(self) -> dict[str, Any]:
        self.refresh(time.monotonic())
        return {
            "num_task_runs": len(self.runs),
            "task_run_status_counts": dict(self.counts),
            "is_active": self.is_active(),
            "status_message": None,
            "modified_at": rfc3339(self.modified_wall),
        }

    def is_active(self) -> bool:
        return any(self.counts.get(status) for status in ACTIVE)

    def append(self, payload: dict[str, Any]) -> None:
        payload["event_id"] = str(len(self.log) + 1)
        self.log.append(sse(payload))
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        self.waiter = None

    async def wait(self, seconds: float) -> None:
        """Until the next event is appended, the group is forgotten, or `seconds` pass."""
        if self.waiter is None:
            self.waiter = asyncio.get_running_loop().create_future()
        # shielded: the future is shared by every follower of the group
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.waiter), seconds)

    def response(self) -> dict[str, Any]:
        return {
            "taskgroup_id": self.taskgroup_id,
            "metadata": self.metadata,
            "status": self.status(),
            "created_at": rfc3339(self.created_wall),
        }


class Groups:
    """Every task group of the sandbox, over the runs of `store` (reset with it)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.groups: dict[str, Group] = {}
        store.on_terminal.append(self.on_terminal)
        store.on_reset.append(self.reset)

    def create(self, body: Any) -> Group:
        if not isinstance(body, dict):
            raise ApiError(422, "Request validation error", _loc("", "body must be a JSON object"))
        check_metadata(body.get("metadata"))
        group = Group(f"tgrp_{secrets.token_hex(16)}", body.get("metadata"))
        self.groups[group.taskgroup_id] = group
        return group

    def get(self, taskgroup_id: str) -> Group:
        group = self.groups.get(taskgroup_id)
        if group is None:
            raise ApiError(404, "TaskGroup not found")
        return group

    def add_runs(self, group: Group, body: Any, betas: list[str]) -> dict[str, Any]:
        """Validate every input first (a bad one creates nothing), then create them all."""
        inputs = _inputs(body, betas, self.store)
        run_cursor = str(len(group.runs)) if group.runs else None
        event_cursor = str(len(group.log)) if group.log else None
        runs = [self.store.create(item, betas) for item in inputs]
        for run in runs:
            group.add(run)
        if runs:
            group.modified_wall = time.time()
            group.append({"type": "task_group_status", "status": group.status()})
        return {
            "status": group.status(),
            "run_ids": [run.run_id for run in runs],
            "run_cursor": run_cursor,
            "event_cursor": event_cursor,
        }

    def on_terminal(self, run: Run) -> None:
        group = self.groups.get(run.taskgroup_id) if run.taskgroup_id else None
        if group is None:
            return
        group.ended(run)
        if not self.store.faults.config.group_events_lose_runs:
            event = {"type": "task_run.state", "input": None, "run": self.store.task_run(run)}
            group.append({**event, "output": None})
        if not group.status_due:  # one status event for the runs ending in this loop pass
            group.status_due = True
            asyncio.get_running_loop().call_soon(self._status_event, group)

    def _status_event(self, group: Group) -> None:
        group.status_due = False
        if not group.gone:
            group.append({"type": "task_group_status", "status": group.status()})

    def reset(self) -> None:
        for group in self.groups.values():
            group.gone = True
            group.wake()
        self.groups.clear()

    async def events(self, group: Group, after: int, timeout_s: float) -> AsyncIterator[bytes]:
        """The log after position `after`, then new events while a run is active (≤ timeout_s)."""
        deadline = time.monotonic() + timeout_s
        sent = after
        while True:
            while sent < len(group.log):
                chunk = group.log[sent : sent + _CHUNK]
                sent += len(chunk)
                yield b"".join(chunk)
            quiet = not group.is_active() and not group.status_due
            remaining = deadline - time.monotonic()
            if quiet or group.gone or self.store.closed or remaining <= 0:
                return
            await group.wait(min(remaining, 1.0))

    async def runs(
        self, group: Group, after: int, status: str | None, with_input: bool, with_output: bool
    ) -> AsyncIterator[bytes]:
        """Every run added after position `after`, as it is now, in the order added."""
        store = self.store
        batch: list[bytes] = []
        for position in range(after + 1, len(group.runs) + 1):
            run = group.runs[position - 1]
            store.get(run.run_id)  # finishes it if due
            if status is not None and store.status(run) != status:
                continue
            event: dict[str, Any] = {"type": "task_run.state", "event_id": str(position)}
            event["input"] = store.run_input(run) if with_input else None
            event["run"] = store.task_run(run)
            event["output"] = store.output(run) if with_output else None
            batch.append(sse(event))
            if len(batch) >= _CHUNK:
                yield b"".join(batch)
                batch = []
        if batch:
            yield b"".join(batch)


def _loc(loc: str | list[Any], msg: str) -> dict[str, Any]:
    path = [loc] if isinstance(loc, str) else loc
    return {"errors": [{"loc": ["body", *path], "msg": msg}]}


def _inputs(body: Any, betas: list[str], store: Store) -> list[dict[str, Any]]:
    """The create bodies of an add-runs request, each with the default task spec applied."""
    invalid = "Request validation error"
    if not isinstance(body, dict):
        raise ApiError(422, invalid, _loc("", "body must be a JSON object"))
    inputs = body.get("inputs")
    if not isinstance(inputs, list):
        raise ApiError(422, invalid, _loc("inputs", "inputs is required and must be a list"))
    if len(inputs) > MAX_INPUTS:
        raise ApiError(422, invalid, _loc("inputs", f"at most {MAX_INPUTS} inputs per request"))
    default_spec = body.get("default_task_spec")
    try:
        check_task_spec(default_spec)
    except ApiError as exc:
        raise _relocated(exc, [], rename="default_task_spec") from None
    bodies = []
    for index, item in enumerate(inputs):
        if isinstance(item, dict) and item.get("task_spec") is None and default_spec is not None:
            item = {**item, "task_spec": default_spec}
        try:
            validate_create(item, betas, store.config.strict_betas)
        except ApiError as exc:
            raise _relocated(exc, ["inputs", index]) from None
        refused = store.interaction_refusal(item.get("previous_interaction_id"))
        if refused is not None:
            status, message, detail = refused
            loc = _loc(["inputs", index, "previous_interaction_id"], detail)
            raise ApiError(status, message, loc)
        bodies.append(item)
    return bodies


def _relocated(exc: ApiError, prefix: list[Any], rename: str = "") -> ApiError:
    """The same error, its `loc`s under `prefix` (["body", "inputs", 3, "metadata"]), or with
    `task_spec` renamed (["body", "default_task_spec.output_schema"])."""
    for error in (exc.detail or {}).get("errors") or []:
        loc = [part for part in error.get("loc", []) if part not in ("body", "")]
        if rename and loc and isinstance(loc[0], str):
            loc[0] = loc[0].replace("task_spec", rename, 1)
        error["loc"] = ["body", *prefix, *loc]
    return exc
